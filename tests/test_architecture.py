"""The layer rule of docs/design.md, checked on the source: each module imports only its own layer
and the layers before it, with the documented exceptions. An import that points the other way
(an algorithm reading the CLI, a quantizer reading a model) fails here with its file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dopq"

ALGORITHMS = ["dopq.calibrate", "dopq.reparam", "dopq.centring", "dopq.gptq", "dopq.reconstruct", "dopq.unit_io",
              "dopq.rounding_check", "dopq.stress", "dopq.stats"]  # fmt: skip
SERVICES = 0  # errors, files, devices, distributed: usable from every layer
# module prefix -> layer, in docs/design.md's order; everything not listed is the top layer
LAYERS = {
    "dopq.errors": SERVICES,
    "dopq.files": SERVICES,
    "dopq.devices": SERVICES,
    "dopq.distributed": SERVICES,
    "dopq.quantizers": 1,
    "dopq.modules": 2,
    "dopq.models": 3,
    **dict.fromkeys(ALGORITHMS, 4),
    "dopq.export": 5,
    "dopq.data": 6,
    "dopq.evaluate": 6,
}
TOP = 7
# the typed recipes: read from layer 2 on, and reading only the quantizers and the errors
CONFIG = "dopq.config"
CONFIG_READS = {"dopq.quantizers", "dopq.errors"}
# (importer, imported): the documented lazy imports that reach down
EXCEPTIONS = {
    ("dopq.models.loading", "dopq.serialize"),  # FORMAT, to refuse a --save file given as weights
    ("dopq.export.runtime", "dopq.environment"),  # cpu_info, to tell CPUs without VNNI
    ("dopq.export.onnx_export", "dopq"),  # __version__ in the graph's metadata
}


def layer_of(module: str) -> int:
    matches = [(len(prefix), layer) for prefix, layer in LAYERS.items() if module == prefix or
               module.startswith(prefix + ".")]  # fmt: skip
    return max(matches)[1] if matches else TOP


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, src: Path) -> bool:
    path = src.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, src: Path) -> list[tuple[str, int]]:
    """``(imported dopq module, line)`` for every import in a file, lazy ones inside functions
    included; ``from dopq.x import y`` names ``dopq.x.y`` where that is a module."""
    module = _module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "dopq"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "dopq":
                continue
            for alias in node.names:
                name = f"{target}.{alias.name}"
                found.append((name if _is_module(name, src) else target, node.lineno))
    return found


def violations(src: Path) -> list[str]:
    found = []
    for path in sorted(src.rglob("*.py")):
        importer = _module_name(path, src)
        for imported, line in imports_of(path, src):
            if imported == importer or (importer, imported) in EXCEPTIONS:
                continue
            where = f"{path.relative_to(src.parent).as_posix()}:{line} imports {imported}"
            if importer == CONFIG:
                if not any(imported == r or imported.startswith(r + ".") for r in CONFIG_READS):
                    found.append(f"{where} (config reads only the quantizers and the errors)")
            elif imported == CONFIG:
                if layer_of(importer) < 2:
                    found.append(f"{where} (the recipes are read from layer 2 on)")
            elif layer_of(importer) == SERVICES and layer_of(imported) != SERVICES:
                found.append(f"{where} (a service module imports only service modules)")
            elif layer_of(imported) > layer_of(importer):
                found.append(f"{where} (layer {layer_of(importer)} importing layer {layer_of(imported)})")
    return found


def test_imports_follow_the_layer_rule() -> None:
    found = violations(SRC)
    assert not found, "imports against docs/design.md's layer rule:\n" + "\n".join(found)


def test_every_layer_named_here_exists() -> None:
    """A renamed module would silently fall into the top layer."""
    missing = [prefix for prefix in LAYERS if not _is_module(prefix, SRC)]
    assert not missing
    assert all(_is_module(m, SRC) for pair in EXCEPTIONS for m in pair)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"quantizers/__init__.py": "", "quantizers/bad.py": "def f():\n    from dopq.models import x\n"},
         ["dopq/quantizers/bad.py:2 imports dopq.models (layer 1 importing layer 3)"]),
        ({"quantizers/__init__.py": "", "quantizers/bad.py": "from .. import config\n", "config.py": ""},
         ["dopq/quantizers/bad.py:1 imports dopq.config (the recipes are read from layer 2 on)"]),
        ({"config.py": "import dopq.api\n"},
         ["dopq/config.py:1 imports dopq.api (config reads only the quantizers and the errors)"]),
        ({"files.py": "from dopq.export import deploy\n", "export/__init__.py": "", "export/deploy.py": ""},
         ["dopq/files.py:1 imports dopq.export.deploy (a service module imports only service modules)"]),
        ({"gptq.py": "from dopq import errors, reparam\nfrom .quantizers import uniform\n", "errors.py": "",
          "reparam.py": "", "quantizers/__init__.py": "", "quantizers/uniform.py": ""}, []),
    ],
)  # fmt: skip
def test_the_scan_finds_imports_against_the_rule(
    tmp_path: Path, files: dict[str, str], expected: list
) -> None:
    """The scan can fail: downward imports, lazy ones and relative ones, are reported; upward ones are not."""
    src = tmp_path / "dopq"
    for name, text in {"__init__.py": "", **files}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    assert violations(src) == expected
