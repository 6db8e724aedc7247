"""Randomness and reproducibility: the library never touches torch's global random state, and two
CPU runs with the same arguments give byte-identical saved models and identical results.

Everything random in dopq (calibration subsets, TanQ's and calibration's row sampling, QDrop masks,
reconstruction batches, timm's random initialization of checkpoint-less models) draws from a local,
seeded ``torch.Generator`` or a forked generator.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from dopq.cli import main
from dopq.models import build_model
from dopq.report import TIMING_FIELDS, without_timings

SRC = Path(__file__).resolve().parents[1] / "src" / "dopq"

# torch functions that draw from the global generator unless a ``generator=`` is passed
_SAMPLERS = {"rand", "randn", "randint", "randperm", "bernoulli", "multinomial", "normal", "poisson",
             "rand_like", "randn_like", "randint_like", "uniform_", "normal_", "random_", "bernoulli_",
             "exponential_", "geometric_", "log_normal_", "cauchy_"}  # fmt: skip
# calls that set or reseed global state
_GLOBAL_SETTERS = {"manual_seed", "seed", "set_rng_state", "manual_seed_all", "seed_all"}
# the one sanctioned place: a seeded generator forked for timm's initialization and restored after
_ALLOWED = {("models/loading.py", "_seeded_init")}


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    """Each node -> the name of the function it sits in ("" at module level)."""
    where: dict[ast.AST, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else name
            where[child] = inner
            visit(child, inner)

    visit(tree, "")
    return where


def _global_rng_call(node: ast.AST) -> str | None:
    """What global random draw or reseeding ``node`` is, if any."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        if "random" in names or any(n.startswith("numpy.random") for n in names):
            return "imports the random module"
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    name, owner = node.func.attr, ast.unparse(node.func.value)
    if name in _GLOBAL_SETTERS and ("torch" in owner or "random" in owner) and "Generator(" not in owner:
        return f"{owner}.{name}()"
    if name in _SAMPLERS and not any(k.arg == "generator" for k in node.keywords):
        return f"{owner}.{name}() without generator="
    if owner.startswith(("np.random", "numpy.random")):
        return f"{owner}.{name}()"
    return None


def _global_rng_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(SRC).as_posix()
    where = _enclosing_functions(tree)
    found = []
    for node in ast.walk(tree):
        what = _global_rng_call(node)
        if what and (rel, where.get(node, "")) not in _ALLOWED:
            found.append(f"{rel}:{node.lineno} {what}")
    return sorted(found, key=lambda h: int(h.split(":")[1].split()[0]))


def test_the_library_draws_from_no_global_random_generator() -> None:
    found = [hit for path in sorted(SRC.rglob("*.py")) for hit in _global_rng_calls(path)]
    assert not found, "global random state used in the library:\n" + "\n".join(found)


def test_the_scan_finds_global_random_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan above can fail: it flags each kind of global draw and accepts local generators."""
    fake = tmp_path / "dopq"
    fake.mkdir()
    (fake / "bad.py").write_text(
        "import random\nimport torch\n"
        "def f(x):\n"
        "    torch.manual_seed(0)\n"
        "    a = torch.rand(3)\n"
        "    x.normal_()\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    return torch.randperm(4, generator=g), a\n"
    )
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    hits = _global_rng_calls(fake / "bad.py")
    assert [h.split(" ", 1)[0] for h in hits] == ["bad.py:1", "bad.py:4", "bad.py:5", "bad.py:6"]


def test_random_init_models_are_seeded_and_leave_the_callers_state_alone() -> None:
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = build_model("test_vit")
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)  # another caller state: the same model all the same
    b = build_model("test_vit")
    c = build_model("test_vit", init_seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.fixture(scope="module")
def tiny_root(image_folder) -> Path:
    return image_folder("repro")


@pytest.mark.parametrize("method", ["dopq", "repq"])
def test_same_arguments_give_the_same_saved_model_and_result(
    tiny_root: Path, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, save = tmp_path / "r.json", tmp_path / "q.pt"
    argv = ["quantize", "--model", "test_vit", "--data", str(tiny_root), "--method", method,
            "--w-bits", "3", "--a-bits", "3", "--calib-size", "6", "--seed", "5", "--eval-subset", "8",
            "--quiet", "--output", str(out), "--save", str(save)]  # fmt: skip
    runs = []
    for caller_seed in (0, 1234):  # whatever the caller's random state, the run is the same
        torch.manual_seed(caller_seed)
        assert main(argv) == 0, capsys.readouterr().err
        runs.append((json.loads(out.read_text()), save.read_bytes()))
        shutil.copy(save, tmp_path / f"q{caller_seed}.pt")
    (first, first_bytes), (second, second_bytes) = runs
    assert first_bytes == second_bytes
    assert without_timings(first) == without_timings(second)
    assert TIMING_FIELDS & set(first)  # the comparison above did not drop everything
    assert first["quant_top1_correct"] == second["quant_top1_correct"]

    # and another calibration seed is another model: the check above can tell models apart
    argv[argv.index("--seed") + 1] = "6"
    assert main(argv) == 0
    assert save.read_bytes() != first_bytes


def test_deterministic_switch_runs_on_cpu_and_changes_nothing(tiny_root: Path, tmp_path: Path) -> None:
    """``--deterministic`` (process-wide switches, so in a subprocess) repeats the default CPU result."""
    import subprocess
    import sys

    outs = []
    for extra in ([], ["--deterministic"]):
        out = tmp_path / f"r{len(outs)}.json"
        argv = [sys.executable, "-m", "dopq", "quantize", "--model", "test_vit", "--data", str(tiny_root),
                "--calib-size", "4", "--eval-subset", "4", "--threads", "1", "--quiet", "--output", str(out),
                *extra]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outs.append(without_timings(json.loads(out.read_text())))
    assert outs[1].pop("command") != outs[0].pop("command")
    assert outs[0] == outs[1]
