"""The measured numbers in the docs are the ones in ``benchmarks/results``.

``docs/RESULTS.md`` (a summary table per shared model, then sections by topic) and
``docs/results-archive.md`` (the superseded sections) are rendered from the JSON files by
``benchmarks/run.py render``; rendering again must give the committed files byte for byte (nobody
edits the tables by hand, and every JSON change is rendered). No two headings of a document share a
name (or an anchor), and every link into them names an existing heading. Every measured figure the
prose of the docs and the README quotes (decimals, percentages, ratios, seconds, sizes, ``+a / -b``
image counts) must appear in those rendered tables, so no number lacks a results file behind it.
"""

from __future__ import annotations

import bisect
import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
ARCHIVE_MD = ROOT / "docs" / "results-archive.md"
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- BEGIN GENERATED SUMMARY -->", "<!-- END GENERATED SUMMARY -->"
SHARED_MODELS = ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")
PROSE_DOCS = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]

# A measured figure: a decimal, an exponent (p-values), or an integer given as a percentage, ratio,
# duration or size. Plain integers (settings, counts of images or layers) are not checked.
_FIGURE = re.compile(
    r"(?<![\w.\-/])(\d+\.\d+(?!\.?\d)(?:e-?\d+)?|\d+e-?\d+|\d+(?=x\b)|\d+(?= ?(?:%|s\b|ms\b|MB\b|GB\b|images/s)))"
)
_PAIR = re.compile(r"\+\d+ / -\d+")
_ANY_NUMBER = re.compile(r"(?<![\w])(\d+(?:\.\d+)?(?:e-?\d+)?)")


def _generated(text: str) -> str:
    """The generated parts of a document: the summary (RESULTS.md) and the sections."""
    parts = [text.split(BEGIN, 1)[1].split(END, 1)[0]]
    if SUMMARY_BEGIN in text:
        parts.append(text.split(SUMMARY_BEGIN, 1)[1].split(SUMMARY_END, 1)[0])
    return "\n".join(parts)


def _all_tables() -> str:
    """Every rendered table: RESULTS.md's and the archive's."""
    return _generated(RESULTS_MD.read_text()) + "\n" + _generated(ARCHIVE_MD.read_text())


def _prose(doc: str) -> str:
    text = (ROOT / doc).read_text()
    for begin, end in ((SUMMARY_BEGIN, SUMMARY_END), (BEGIN, END)):  # only what is outside the tables
        if begin in text:
            text = text.split(begin, 1)[0] + text.split(end, 1)[1]
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


def test_rendering_reproduces_the_committed_results_files(tmp_path: Path) -> None:
    target, archive = tmp_path / "RESULTS.md", tmp_path / "results-archive.md"
    target.write_text(RESULTS_MD.read_text())
    archive.write_text(ARCHIVE_MD.read_text())
    benchmark_module("render").render(RESULTS_DIR, target, archive)
    for rendered, committed in ((target, RESULTS_MD), (archive, ARCHIVE_MD)):
        assert rendered.read_text() == committed.read_text(), (
            f"docs/{committed.name} is not what benchmarks/results renders: run `python benchmarks/run.py render`"
        )


@pytest.mark.parametrize("doc", [RESULTS_MD, ARCHIVE_MD], ids=lambda p: p.name)
def test_no_two_headings_are_the_same(doc: Path) -> None:
    render = benchmark_module("render")
    titles = render.headings(doc.read_text())
    assert len(titles) > 3
    repeated = sorted({t for t in titles if titles.count(t) > 1})
    assert not repeated, f"{doc.name} repeats headings: {repeated}"
    anchors = [render.anchor(t) for t in titles]
    assert len(set(anchors)) == len(anchors), f"{doc.name}: two headings share an anchor"


def test_render_refuses_two_sections_with_one_heading(tmp_path: Path) -> None:
    render = benchmark_module("render")
    target = tmp_path / "RESULTS.md"
    target.write_text(f"# R\n\n## Accuracy and ablations\n\n{BEGIN}\n{END}\n")  # a topic heading twice
    with pytest.raises(ValueError, match="two headings give the anchor #accuracy-and-ablations"):
        render.render(RESULTS_DIR, target)


def test_results_opens_with_a_summary_per_shared_model_whose_cells_link_to_sections() -> None:
    render = benchmark_module("render")
    text = RESULTS_MD.read_text()
    summary = text.split(SUMMARY_BEGIN, 1)[1].split(SUMMARY_END, 1)[0]
    assert text.index(SUMMARY_BEGIN) < text.index(BEGIN)  # the summary comes first
    anchors = {render.anchor(t) for t in render.headings(text)}
    for model in SHARED_MODELS:
        assert re.search(rf"^### Summary: .*\({model}\)$", summary, re.M), f"no summary table of {model}"
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "W" in line.split("|")[2]]
    assert {line.split("|")[1].strip() for line in rows} >= {
        "repq (RepQ-ViT baseline)",
        "dopq",
        "dopq + GPTQ",
    }
    for line in rows:
        for cell in line.split("|")[3:-1]:
            cell = cell.strip()
            assert cell == "—" or "](#" in cell or cell.startswith("+"), f"unlinked summary cell {cell!r}"
    links = re.findall(r"\]\(#([^)]+)\)", summary)
    assert links and not [a for a in links if a not in anchors], "summary links to a missing section"


def test_summary_reads_every_deploy_file_by_recipe_and_width(tmp_path: Path) -> None:
    """A new deploy*.json (another runtime, another width) slots into the summary without code."""
    results = tmp_path / "results"
    results.mkdir()
    for name in ("deploy.json", "q4/ablation_deit.json"):
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text((RESULTS_DIR / name).read_text())
    new = {"command": "probe", "threads": 2, "rows": [
        {"model": "deit_tiny_patch16_224", "method": "dopq", "w_bits": 4, "a_bits": 8, "runtime": "openvino",
         "recipe": {"softmax_quantizer": "uniform"}, "onnx_top1": 0.7391, "throughput_ratio": 2.345,
         "latency_ratio": 1.876, "size_ratio": 0.167, "sim_top1": 0.7412, "calib_seconds": 3.21},
        {"model": "deit_tiny_patch16_224", "method": "dopq", "w_bits": 4, "a_bits": 8, "runtime": "openvino",
         "recipe": {"softmax_quantizer": "tanq"}, "onnx_top1": 0.5, "throughput_ratio": 9.99},
    ]}  # fmt: skip
    (results / "deploy_openvino.json").write_text(json.dumps(new))
    timing_only = {"command": "probe", "threads": 2, "rows": [  # --deploy-parts timing: speed, no top-1
        {"model": "deit_tiny_patch16_224", "method": "dopq", "w_bits": 4, "a_bits": 8, "runtime": "openvino",
         "recipe": {"softmax_quantizer": "uniform"}, "throughput_ratio": 2.468, "latency_ratio": 1.357,
         "size_ratio": 0.167},
    ]}  # fmt: skip
    (results / "deploy_timing_only.json").write_text(json.dumps(timing_only))
    target = tmp_path / "RESULTS.md"
    benchmark_module("render").render(results, target)
    summary = target.read_text().split(SUMMARY_BEGIN, 1)[1].split(SUMMARY_END, 1)[0]
    (row,) = [line for line in summary.splitlines() if line.startswith("| dopq | W4/A8 |")]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2].startswith("[74.1](#") and cells[3] == "—"  # the deploy run's own simulation
    assert cells[4].startswith("[73.9](#") and cells[4].endswith(" (openvino)")
    assert cells[5].startswith("[2.35 / 1.88](#") and cells[6].startswith("[0.17](#")
    assert "[2.47 / 1.36](#" in cells[5] and "—" not in cells[4]  # the timing-only run: a speed, no top-1
    assert "9.99" not in summary  # a row with another post-Softmax quantizer than the preset's is not dopq
    assert "| dopq + GPTQ |" not in summary  # not measured in these files: no row at all
    assert "| repq (RepQ-ViT baseline) | W3/A3 | [59.7](#" in summary


def test_render_refuses_nothing_silently_a_changed_result_changes_the_file(tmp_path: Path) -> None:
    """The reproduction check above can fail: one changed value in one JSON file changes the render."""
    results = tmp_path / "results"
    results.mkdir()
    source = RESULTS_DIR / "save_size.json"
    data = json.loads(source.read_text())
    (results / source.name).write_text(json.dumps(data))
    first, second = tmp_path / "a.md", tmp_path / "b.md"
    benchmark_module("render").render(results, first)
    data["rows"][0]["save_bytes"] += 10_000_000
    (results / source.name).write_text(json.dumps(data))
    benchmark_module("render").render(results, second)
    assert first.read_text() != second.read_text()


@pytest.mark.parametrize("doc", PROSE_DOCS)
def test_every_figure_in_the_docs_has_a_results_file_behind_it(doc: str) -> None:
    missing = unbacked_figures(_prose(doc), _all_tables())
    assert not missing, f"{doc} quotes figures that are in no rendered results table:\n" + "\n".join(missing)


def _section(text: str, heading: str) -> str:
    """A README section: from its ``## `` heading to the next one."""
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("heading", ["What the `dopq` preset does", "Deployment: ONNX on onnxruntime"])
def test_readme_sections_point_at_the_summary_instead_of_quoting_numbers(heading: str) -> None:
    """These sections would repeat the summary's numbers, which drift as results are re-measured."""
    render = benchmark_module("render")
    text = _section((ROOT / "README.md").read_text(), heading)
    summary = {render.anchor(t) for t in render.headings(RESULTS_MD.read_text()) if t.startswith("Summary")}
    assert any(f"docs/RESULTS.md#{a})" in text for a in summary), (
        f"README '{heading}' does not link the summary"
    )
    prose = re.sub(r"```.*?```", " ", text, flags=re.S)
    assert not _FIGURE.findall(re.sub(r"`[^`\n]*`", " ", prose)), (
        f"README '{heading}' quotes measured figures"
    )


def test_every_link_into_the_results_names_an_existing_heading() -> None:
    render = benchmark_module("render")
    anchors = {
        doc.name: {render.anchor(t) for t in render.headings(doc.read_text())}
        for doc in (RESULTS_MD, ARCHIVE_MD)
    }
    broken = []
    for doc in ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]:
        text = (ROOT / doc).read_text()
        for name, anchor in re.findall(r"\]\((?:[\w./]*/)?(RESULTS\.md|results-archive\.md)#([^)]+)\)", text):
            if anchor not in anchors[name]:
                broken.append(f"{doc}: {name}#{anchor}")
        own = Path(doc).name
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            if own in anchors and anchor not in anchors[own]:
                broken.append(f"{doc}: #{anchor}")
    assert not broken, "links to missing headings:\n" + "\n".join(broken)


def test_the_figure_check_catches_invented_and_misrounded_numbers() -> None:
    tables = "| dopq | 69.9 | 74.7 |\n| p=0.057 | 731 s | +92 / -67 |"
    assert unbacked_figures("dopq scores 69.9 % and 74.7, p = 0.06, 731 s, +92 / -67", tables) == []
    bad = unbacked_figures("dopq scores 72.7 %, 80 %, 1.5x faster, +90 / -67", tables)
    assert [b.split()[0] for b in bad] == ["72.7", "80", "1.5", "+90"]


def test_seeds_pool_by_recipe_fields_not_by_name() -> None:
    """A later run's seeds join an earlier run's rows of the same recipe under another name, and
    never those of a different recipe under the same name (a preset whose rule changed)."""
    render = benchmark_module("render")

    def row(method: str, seed: int, top1: float, centers: list[float]) -> dict:
        recipe = {"w_bits": 3, "a_bits": 3, "tanq_centers": centers}
        return {"method": method, "seed": seed, "quant_top1": top1, "recipe": recipe}

    wide, narrow = [0.35, 0.5, 0.65], [0.35, 0.5]
    earlier = [row("recommended", 0, 0.10, narrow), row("preset+wide", 0, 0.70, wide)]
    lines = render._pooled_lines([row("recommended", 1, 0.72, wide)], [("earlier_run", earlier)])
    assert "| W3/A3 | recommended | 0, 1 | 71.00 | 1.41 |" in lines
    assert not any("10.00" in line or "41.00" in line for line in lines)  # the narrow row stays out
    assert any("rows of preset+wide, the same recipe" in line for line in lines)


def test_a_larger_test_subset_is_split_into_the_protocols_images_and_the_others() -> None:
    """A run on more test images pairs each recipe with dopq on the protocol's strided 1000 and, apart,
    on the images the protocol never sees; a subset that does not hold all 1000 gets no split."""
    render = benchmark_module("render")
    flags = render._in_protocol(5000)  # every second image: the protocol's are every fifth of these
    assert len(flags) == 5000 and sum(flags) == 1000
    assert all(flag == (j % 5 == 0) for j, flag in enumerate(flags))

    def row(method: str, n: int, correct: str) -> dict:
        fp = "1" * n
        return dict(method=method, seed=0, w_bits=4, a_bits=4, eval_images=n, fp_top1_correct=fp, quant_top1_correct=correct)  # fmt: skip

    # on 2000 images the protocol's are the even positions: the recipe is right on all of them and
    # wrong on every odd one, dopq the other way round; the float model right everywhere
    recipe, dopq = "10" * 1000, "01" * 1000
    lines = render._beyond_protocol_lines([row("dopq", 2000, dopq), row("recommended", 2000, recipe)])
    assert "| W4/A4 | dopq | 0 | strided 1000 | 100.00 | 0.00 | 100.00 |  |" in lines
    assert (
        "| W4/A4 | recommended | 0 | strided 1000 | 100.00 | 100.00 | 0.00 | +1000 / -0 (p=1.9e-301) |"
        in lines
    )
    assert (
        "| W4/A4 | recommended | 0 | other 1000 | 100.00 | 0.00 | 100.00 | +0 / -1000 (p=1.9e-301) |" in lines
    )
    # without dopq's row the gap to FP stays; a strided 1500 steps by 6.67 images and misses image
    # 10, one of the protocol's, so it gets no split
    assert "| W4/A4 | recommended | 0 | other 1000 | 100.00 | 0.00 | 100.00 |  |" in render._beyond_protocol_lines([row("recommended", 2000, recipe)])  # fmt: skip
    assert render._beyond_protocol_lines([row("dopq", 1500, "1" * 1500)]) == []


def test_benchmark_results_record_their_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = benchmark_module("run")
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


def test_cpu_headings_name_the_family_and_model_numbers_where_recorded() -> None:
    render = benchmark_module("render")
    generic = {"model": "Intel(R) Xeon(R) Processor", "integer_isa": ["avx2", "amx_int8"]}
    assert render._cpu_label({"cpu": generic}) == "Intel(R) Xeon(R) Processor, avx2, amx_int8"  # older files
    numbered = {**generic, "signature": {"family": 6, "model": 207, "stepping": 2}}
    assert (
        render._cpu_label({"cpu": numbered})
        == "Intel(R) Xeon(R) Processor family 6 model 207, avx2, amx_int8"
    )
    assert (
        render._cpu_label({"cpu": {"model": "AMD EPYC", "integer_isa": []}})
        == "AMD EPYC, no integer ISA extension"
    )


def test_a_calib_gains_run_over_seeds_shows_every_seed_whatever_its_suffix(tmp_path: Path) -> None:
    """``calib-gains --seeds 0 1`` under a suffix the renderer does not list (``_edge``) got the
    one-column table, which showed the first seed's rows alone: seed 1 was in no table."""
    render = benchmark_module("render")

    def row(method: str, seed: int, top1: float, correct: str) -> dict:
        return dict(model="deit_tiny_patch16_224", method=method, w_bits=3, a_bits=3, seed=seed,
                    fp_top1=0.75, quant_top1=top1, eval_images=4, calib_seconds=2.0 + seed,
                    calib_forward_equivalents=5.0, quant_top1_correct=correct, recipe={"w_bits": 3, "a_bits": 3})  # fmt: skip

    rows = [row("dopq", 0, 0.5, "1100"), row("recommended", 0, 0.75, "1110"),
            row("dopq", 1, 0.25, "1000"), row("recommended", 1, 0.625, "1011")]  # fmt: skip
    results = tmp_path / "results"
    results.mkdir()
    data = {
        "command": "run.py calib-gains --seeds 0 1 --suffix _probe",
        "threads": 1,
        "seeds": [0, 1],
        "rows": rows,
    }
    (results / "calib_gains_deit_probe.json").write_text(json.dumps(data))
    target = tmp_path / "RESULTS.md"
    render.render(results, target)
    text = target.read_text()
    assert "| W3/A3 | recommended | 75.0, +1 / -0 (p=1) | 62.5, +2 / -0 (p=0.5) | 68.75 |" in text
    assert "| W3/A3 | dopq | 50.0 | 25.0 | 37.50 |" in text


def test_every_result_file_gets_a_table_or_the_render_says_which_has_none(tmp_path: Path) -> None:
    """``calib-gains-timing --widths 3/3`` without ``--suffix`` writes ``calib_gains_timing_w3a3.json``,
    which no pattern matched: it was in the provenance table only, and so would any misnamed file be."""
    render = benchmark_module("render")
    results = tmp_path / "results"
    results.mkdir()
    timing = {"command": "run.py calib-gains-timing --widths 3/3", "threads": 1, "model": "deit_tiny_patch16_224",
              "bits": 3, "a_bits": 3, "recipes": {
                  "dopq": {"calib_seconds": [2.0], "median": 2.0, "over_dopq": 1.0},
                  "recommended": {"calib_seconds": [5.0], "median": 5.0, "over_dopq": 2.5}}}  # fmt: skip
    (results / "calib_gains_timing_w3a3.json").write_text(json.dumps(timing))
    target = tmp_path / "RESULTS.md"
    render.render(results, target)
    assert "- recommended: calibration 5.0 s, median 5.0 s, 2.50x dopq" in target.read_text()
    (results / "sub").mkdir()
    (results / "sub" / "my_probe.json").write_text(json.dumps({"command": "probe", "rows": []}))
    with pytest.raises(ValueError, match=r"no table renders sub/my_probe\.json"):
        render.render(results, target)


def test_the_calibration_median_over_an_even_number_of_seeds_is_the_median() -> None:
    """The preset tables' "median over seeds" took the upper of the two middle values (median_high):
    over 2, 4 or 10 seeds it was the slower seed's time, not the median the caption names."""
    render = benchmark_module("render")

    def row(seed: int, forwards: float, seconds: float) -> dict:
        return dict(model="deit_tiny_patch16_224", method="dopq", w_bits=3, a_bits=3, seed=seed, fp_top1=0.75,
                    quant_top1=0.5, eval_images=2, calib_seconds=seconds, calib_forward_equivalents=forwards,
                    quant_top1_correct="10", recipe={"w_bits": 3, "a_bits": 3})  # fmt: skip

    data = {"command": "probe", "threads": 1, "rows": [row(0, 4.0, 2.0), row(1, 6.0, 3.0)]}
    assert "| W3/A3 | dopq | 50.0 | 50.0 | 50.00 |  | 5.0 (2.5 s) |" in render._preset_table(data)


def _recorded_run_commands() -> list[tuple[str, list[str]]]:
    """Each result file's recorded ``benchmarks/run.py`` commands, as argument lists."""
    found = []
    for path in sorted(RESULTS_DIR.rglob("*.json")):
        data = json.loads(path.read_text())
        parts = [data, *(v for v in data.values() if isinstance(v, dict))]  # deploy: per-part commands
        for command in dict.fromkeys(d["command"] for d in parts if isinstance(d.get("command"), str)):
            argv = shlex.split(command)
            argv = argv[1:] if argv and Path(argv[0]).name.startswith("python") else argv
            if argv and Path(argv[0]).name == "run.py":
                found.append((path.stem, argv[1:]))
    return found


def test_every_recorded_command_is_one_that_run_py_accepts_or_the_table_says_why_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command beside a table must be one a user can run again: deploy.json's named an option the
    deploy suite no longer has, with nothing saying so."""
    run, render = benchmark_module("run"), benchmark_module("render")
    refused = set()
    for stem, argv in _recorded_run_commands():
        try:
            run.parse_arguments(argv)
        except SystemExit:
            refused.add(stem)
    capsys.readouterr()
    assert refused == set(render.OLDER_SUITES), (
        "a recorded command that run.py refuses needs render.OLDER_SUITES"
    )
    text = RESULTS_MD.read_text()
    for note in render.OLDER_SUITES.values():
        assert f"Written by {note}." in text


def test_running_render_py_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python benchmarks/render.py`` imported the module, rendered nothing and exited 0."""
    import runpy
    import sys
    import types

    calls: list[list[str]] = []
    monkeypatch.setitem(sys.modules, "run", types.SimpleNamespace(main=calls.append))
    runpy.run_path(str(ROOT / "benchmarks" / "render.py"), run_name="__main__")
    assert calls == [["render"]]
