"""The measured numbers in the docs are the ones in ``benchmarks/results``.

``docs/RESULTS.md`` is rendered from the JSON files by ``benchmarks/run.py render``; rendering again
must give the committed file byte for byte (nobody edits the tables by hand, and every JSON change
is rendered). Every measured figure the prose of the docs quotes (decimals, percentages, ratios,
seconds, sizes, ``+a / -b`` image counts) must appear in those rendered tables, so no number in the
docs lacks a results file behind it.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
PROSE_DOCS = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]

# A measured figure: a decimal, an exponent (p-values), or an integer given as a percentage, ratio,
# duration or size. Plain integers (settings, counts of images or layers) are not checked.
_FIGURE = re.compile(
    r"(?<![\w.\-/])(\d+\.\d+(?!\.?\d)(?:e-?\d+)?|\d+e-?\d+|\d+(?=x\b)|\d+(?= ?(?:%|s\b|ms\b|MB\b|GB\b|images/s)))"
)
_PAIR = re.compile(r"\+\d+ / -\d+")
_ANY_NUMBER = re.compile(r"(?<![\w])(\d+(?:\.\d+)?(?:e-?\d+)?)")


def _load_render():
    spec = importlib.util.spec_from_file_location("render", ROOT / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def _prose(doc: str) -> str:
    text = (ROOT / doc).read_text()
    if BEGIN in text:  # RESULTS.md: what is outside the generated tables
        text = text.split(BEGIN, 1)[0] + text.split(END, 1)[1]
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # commands
    return re.sub(r"`[^`\n]*`", " ", text)  # options, names, code


def _tolerance(token: str) -> float:
    """Half a unit of the last digit shown: 74.6 stands for [74.55, 74.65]."""
    if "e" in token:
        return 0.5 * 10 ** int(token.split("e")[1])
    if "." in token:
        return 0.5 * 10 ** -len(token.split(".")[1])
    return 0.5


def unbacked_figures(prose: str, tables: str) -> list[str]:
    """Figures in ``prose`` that no number in ``tables`` rounds to, and image pairs not in ``tables``."""
    values = sorted({float(m) for m in _ANY_NUMBER.findall(tables)})
    missing = []
    for match in _FIGURE.finditer(prose):
        token = match.group(1)
        x, tol = float(token), _tolerance(token) + 1e-9
        i = bisect.bisect_left(values, x - tol)
        if i == len(values) or values[i] > x + tol:
            context = prose[max(0, match.start() - 40) : match.end() + 10].replace("\n", " ")
            missing.append(f"{token} in '...{context}...'")
    missing += [f"{pair} (paired counts)" for pair in _PAIR.findall(prose) if pair not in tables]
    return missing


def test_rendering_reproduces_the_committed_results_file(tmp_path: Path) -> None:
    target = tmp_path / "RESULTS.md"
    target.write_text(RESULTS_MD.read_text())
    _load_render().render(RESULTS_DIR, target)
    assert target.read_text() == RESULTS_MD.read_text(), (
        "docs/RESULTS.md is not what benchmarks/results renders: run `python benchmarks/run.py render`"
    )


def test_render_refuses_nothing_silently_a_changed_result_changes_the_file(tmp_path: Path) -> None:
    """The reproduction check above can fail: one changed value in one JSON file changes the render."""
    results = tmp_path / "results"
    results.mkdir()
    source = RESULTS_DIR / "save_size.json"
    data = json.loads(source.read_text())
    (results / source.name).write_text(json.dumps(data))
    first, second = tmp_path / "a.md", tmp_path / "b.md"
    _load_render().render(results, first)
    data["rows"][0]["save_bytes"] += 10_000_000
    (results / source.name).write_text(json.dumps(data))
    _load_render().render(results, second)
    assert first.read_text() != second.read_text()


@pytest.mark.parametrize("doc", PROSE_DOCS)
def test_every_figure_in_the_docs_has_a_results_file_behind_it(doc: str) -> None:
    tables = _generated(RESULTS_MD.read_text())
    missing = unbacked_figures(_prose(doc), tables)
    assert not missing, f"{doc} quotes figures that are in no rendered results table:\n" + "\n".join(missing)


def test_the_figure_check_catches_invented_and_misrounded_numbers() -> None:
    tables = "| dopq | 69.9 | 74.7 |\n| p=0.057 | 731 s | +92 / -67 |"
    assert unbacked_figures("dopq scores 69.9 % and 74.7, p = 0.06, 731 s, +92 / -67", tables) == []
    bad = unbacked_figures("dopq scores 72.7 %, 80 %, 1.5x faster, +90 / -67", tables)
    assert [b.split()[0] for b in bad] == ["72.7", "80", "1.5", "+90"]


def test_benchmark_results_record_their_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    monkeypatch.setattr(run, "_RESULTS_DIR", [tmp_path])
    run.save("probe", {"rows": []})
    data = json.loads((tmp_path / "probe.json").read_text())
    assert set(data["versions"]) >= {"dopq", "torch", "timm", "onnxruntime"}
    assert data["versions"]["torch"] and data["device_name"] and data["threads"] >= 1
    assert data["command"]
    git = data["git"]
    if git is not None:  # None only outside a git checkout
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "probe.json"]  # no temporary left behind
