"""Render the measured tables of docs/RESULTS.md from benchmarks/results/*.json."""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dopq.config import ReconstructConfig, get_preset
from dopq.data.sampling import strided_indices
from dopq.stats import paired_sign_test

BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


_SHORT_NAMES = {"deit_tiny_patch16_224": "DeiT-Tiny", "swin_tiny_patch4_window7_224": "Swin-Tiny"}


def _short(model: str) -> str:
    return _SHORT_NAMES.get(model, model)


def _widths(bits: list[int]) -> str:
    """``[4, 6]`` -> ``W4/A4 and W6/A6``."""
    names = [f"W{b}/A{b}" for b in bits]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _pct(x: float | None, decimals: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{decimals}f}"


def _decimals_for(images: int) -> int:
    """Two decimals of a top-1 % where one image is under 0.05 points (5000 images and more), else one."""
    return 2 if images >= 5000 else 1


def _decimals(rows: list[dict[str, Any]]) -> int:
    """:func:`_decimals_for` the fewest images any row was evaluated on."""
    return _decimals_for(min((r.get("eval_images") or 0) for r in rows))


def _load(results: Path, name: str) -> dict[str, Any] | None:
    """Rows of ``name.json`` in the results folder and its subfolders (runs split across processes)."""
    parts = [json.loads(p.read_text()) for p in sorted(results.rglob(f"{name}.json"))]
    if not parts:
        return None
    merged = dict(parts[0])
    merged["rows"] = [row for part in parts for row in part.get("rows", [])]
    merged["command"] = "`; `".join(dict.fromkeys(part["command"] for part in parts))
    return merged


def _paired_rows(sub: list[dict[str, Any]], bits: list[int], methods: list[str], base: str) -> list[str]:
    """Per method and bit setting: images it gets right that ``base`` gets wrong, and the reverse."""
    lines = []
    for m in methods:
        cells = []
        for b in bits:
            ref = [r for r in sub if r["method"] == base and r["w_bits"] == b and r.get("quant_top1_correct")]
            hit = [r for r in sub if r["method"] == m and r["w_bits"] == b and r.get("quant_top1_correct")]
            pair = (
                paired_sign_test(hit[0]["quant_top1_correct"], ref[0]["quant_top1_correct"])
                if ref and hit
                else None
            )
            cells.append(_pair_text(pair))
        if m != base and any(cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = ["", f"Paired with {base} on the same images: images fixed / broken (two-sided exact sign-test p)", "",
            "| method | " + " | ".join(f"W{b}/A{b}" for b in bits) + " |", "|---" * (len(bits) + 1) + "|"]  # fmt: skip
    return [*head, *lines]


def _accuracy_table(data: dict[str, Any], title: str, base: str = "repq") -> list[str]:
    rows = data["rows"]
    digits = _decimals(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"### {title}", "", f"Command: `{data['command']}` ({data['threads']} torch threads)", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        bits = sorted({r["w_bits"] for r in sub})
        fp = sub[0]["fp_top1"]
        lines += [
            f"**{model}** (FP32 top-1 {_pct(fp, digits)}%)",
            "",
            "| method | " + " | ".join(f"W{b}/A{b}" for b in bits) + " |",
        ]
        lines.append("|---" * (len(bits) + 1) + "|")
        for m in methods:
            cells = []
            for b in bits:
                hit = [r for r in sub if r["method"] == m and r["w_bits"] == b]
                cells.append(_pct(hit[0]["quant_top1"], digits) if hit else "")
            if any(cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += _paired_rows(sub, bits, methods, base)
        lines.append("")
    return lines


def _softmax_table(data: dict[str, Any]) -> list[str]:
    lines = ["### Post-Softmax quantizer error", "", f"Command: `{data['command']}`", "",
             "Relative error of `attn @ v`, ||(Â-A)V||²/||AV||² (MSE of the attention values in brackets, x1e-6).", ""]  # fmt: skip
    names = list(data["rows"][0]["errors"])
    lines += ["| source | bits | max attn | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for r in data["rows"]:
        cells = [f"{e['attn_v_rel_err']:.4f} ({1e6 * e['mse']:.2f})" for e in r["errors"].values()]
        lines.append(f"| {r['source']} | {r['bits']} | {r['max_attn']:.2f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _tanq_grid_table(data: dict[str, Any]) -> list[str]:
    names = list(data["rows"][0]["mean_attn_v_rel_err"])
    lines = ["### TanQ search grid", "", f"Command: `{data['command']}`", "",
             "Mean relative `attn @ v` error over every attention module (modules where it is the best in brackets).", "",
             "| model | bits | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]  # fmt: skip
    for r in data["rows"]:
        cells = [f"{r['mean_attn_v_rel_err'][n]:.5f} ({r['modules_best'][n]}/{r['modules']})" for n in names]
        lines.append(f"| {r['model']} | {r['bits']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _recon_unit_table(data: dict[str, Any]) -> list[str]:
    r0 = data["rows"][0]
    lines = ["### Reconstruction settings (one unit)", "",
             f"Command: `{data['command']}`. Unit {r0['unit']} of DeiT-Tiny dopq W3/A3, "
             f"batch {r0['batch_size']}, {r0['train_images']} training images, {r0['held_out_images']} held out. "
             "Block loss (summed squared error per image) with the rounding baked; 'soft' is before baking.", "",
             "| variant | iters | rounding | lr weight | lr act | lr bias | train before | train soft | train after | held out before | held out after | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        bias = "-" if r["lr_bias"] is None else f"{r['lr_bias']:.3g}"
        lines.append(f"| {r['variant']} | {r['iters']} | {r['rounding']} | {r['lr_weight']:.3g} | {r['lr_act']:.3g} | {bias} | {r['loss_before']:.0f} | "
                     f"{r['loss_soft']:.0f} | {r['loss_after']:.0f} | {r['held_out_before']:.0f} | "
                     f"**{r['held_out_after']:.0f}** | {r['seconds']:.0f} |")  # fmt: skip
    return [*lines, ""]


def _timing(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    line = (f"- {path.stem}: repq median {d['repq']['median']:.2f} s, dopq median {d['dopq']['median']:.2f} s "
            f"(dopq/repq = {d['dopq_over_repq']:.2f}); runs {d['repq']['calib_seconds']} / {d['dopq']['calib_seconds']}; "
            f"command `{d['command']}`")  # fmt: skip
    return [f"### Calibration time of repq and dopq (DeiT-Tiny, 32 images, W4/A4, {path.stem})", "", line, ""]


def _gap_closed(rows: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """Share of the calibration-only gap to FP that reconstruction closed, e.g. ``closes 2.5 of 4.9 points (51 %)``."""
    base = next((r for r in rows if r["method"] == "dopq" and r["w_bits"] == row["w_bits"]), None)
    if base is None:
        return ""
    gap, gain = 100 * (row["fp_top1"] - base["quant_top1"]), 100 * (row["quant_top1"] - base["quant_top1"])
    # under a point of gap the share is noise (a few images either way)
    return f", closes {gain:.1f} of {gap:.1f} points to FP ({100 * gain / gap:.0f} %)" if gap >= 1 else ""


def _recon_title(data: dict[str, Any], name: str) -> str:
    """What a CPU reconstruction run varied: images, iterations per unit, QDrop, test images."""
    row = next((r for r in data["rows"] if r.get("reconstruction")), None)
    if row is None:
        return f"Reconstruction ({name})"
    rec, recipe = row["reconstruction"], (row.get("recipe") or {}).get("reconstruct") or {}
    drop = recipe.get("drop_prob", rec.get("drop_prob"))
    title = (f"Reconstruction on the CPU: {_short(row['model'])}, {rec['images']} images, "
             f"{rec['iters_per_unit']} iterations per unit, QDrop {'default' if drop is None else f'{drop:g}'}")  # fmt: skip
    images = row.get("eval_images")
    return title if images == 1000 else f"{title}, {images} test images"


def _recon(data: dict[str, Any], title: str) -> list[str]:
    lines = _accuracy_table(data, title, base="dopq")
    for r in data["rows"]:
        rec = r.get("reconstruction")
        if rec:
            lines.append(
                f"- {r['model']} W{r['w_bits']}/A{r['a_bits']}: {rec['images']} images, {rec['iters_per_unit']} iters/unit, "
                f"batch {rec['batch_size']}, reconstruction {rec['seconds']:.0f} s{_gap_closed(data['rows'], r)}"
            )
    return [*lines, ""]


def _recon_runs_paired(results: Path, reference: str = "recon_cpu_deit") -> list[str]:
    """Every reconstruction run against the reference run's reconstructed model, on the same images."""
    ref_path = results / f"{reference}.json"
    if not ref_path.is_file():
        return []
    ref_rows = [r for r in json.loads(ref_path.read_text())["rows"] if r["method"] == "dopq+recon"]
    lines = []
    for path in sorted(results.glob("recon_*.json")):
        if path.stem in (reference, "recon_unit"):
            continue
        for r in json.loads(path.read_text())["rows"]:
            ref = next((x for x in ref_rows if x["model"] == r["model"] and x["w_bits"] == r["w_bits"]), None)
            if r["method"] != "dopq+recon" or ref is None:
                continue
            cell = _paired_cell(
                {"x": r.get("quant_top1_correct"), "y": ref.get("quant_top1_correct")}, "x", "y"
            )
            if cell:
                lines.append(f"| {path.stem} | {r['model']} | W{r['w_bits']}/A{r['a_bits']} | "
                             f"{_pct(r['quant_top1'])} | {_pct(ref['quant_top1'])} | {cell} |")  # fmt: skip
    if not lines:
        return []
    return ["### Reconstruction runs against each other", "",
            f"Each run's reconstructed model paired with `{reference}`'s on the same images.", "",
            "| run | model | bits | top-1 | reference top-1 | fixed / broken (p) |", "|---|---|---|---|---|---|",
            *lines, ""]  # fmt: skip


def _large_models_table(data: dict[str, Any]) -> list[str]:
    lines = ["### Large models on the CPU (random init, dopq W4/A4, 32 calibration images)", "",
             f"Command: `{data['command']}` ({data['threads']} torch threads; each model one `dopq quantize` "
             "under `/usr/bin/time -v`: peak RSS of the whole command, evaluation of 32 images included)", "",
             "| model | exit | peak RSS GB | wall s | calibration s | coverage |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        rss = "-" if r.get("peak_rss_bytes") is None else f"{r['peak_rss_bytes'] / 1e9:.2f}"
        calib = "-" if r.get("calib_seconds") is None else f"{r['calib_seconds']:.0f}"
        lines.append(f"| {r['model']} | {r['returncode']} | {rss} | {r['wall_seconds']:.0f} | {calib} | "
                     f"{r.get('coverage_summary') or '-'} |")  # fmt: skip
    return [*lines, ""]


def _distributed_table(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    lines = ["### One process against torchrun (gloo, CPU)", "",
             f"Command: `{data['command']}` (DeiT-Tiny dopq W3/A3; {data['threads']} torch threads in every "
             "process; wall time of the whole command, loading and both evaluations included)", "",
             "| run | processes x threads | FP top-1 | top-1 | same per-image record as 1 process | same --save bytes | "
             "paired with 1 process | wall s | reconstruction s | peak RSS GB (largest process) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ref = next((x for x in rows if x["run"] == r["run"] and x["processes"] == 1), None)
        same_record = same_save = pair = "-"
        if ref is not None and r is not ref and r.get("quant_top1_correct"):
            same_record = "yes" if r["quant_top1_correct"] == ref.get("quant_top1_correct") else "no"
            same_save = "yes" if r.get("save_sha256") == ref.get("save_sha256") else "no"
            pair = _paired_cell({"x": r["quant_top1_correct"], "y": ref.get("quant_top1_correct")}, "x", "y")
        rss = "-" if r.get("peak_rss_bytes") is None else f"{r['peak_rss_bytes'] / 1e9:.2f}"
        recon = r.get("reconstruction") or {}
        recon_s = f"{recon['seconds']:.0f}" if recon.get("seconds") is not None else "-"
        lines.append(f"| {r['run']} | {r['processes']} x {r['threads_per_process']} | {_pct(r.get('fp_top1'))} | "
                     f"{_pct(r.get('quant_top1'))} | {same_record} | {same_save} | {pair} | {r['wall_seconds']:.0f} | "
                     f"{recon_s} | {rss} |")  # fmt: skip
    return [*lines, ""]


def _resume_table(results: Path) -> list[str]:
    """Checkpointed reconstruction stopped and resumed against the uninterrupted run (``resume_*.json``)."""
    lines = []
    for path in sorted(results.glob("resume_*.json")):
        d = json.loads(path.read_text())
        lines += [f"### Reconstruction stopped and resumed (`{path.stem}.json`)", "",
                  f"Command: `{d['command']}` ({d['threads']} torch threads per process; {d['note']}). "
                  f"dopq command: `{d['dopq_command']}`", "",
                  "| signal | stopped after unit | units checkpointed at the stop | same --save bytes | top-1 "
                  "uninterrupted | top-1 resumed | same per-image record | dropped unit | its time, uninterrupted s | "
                  "work dropped s | restart s | uninterrupted wall s | stopped + resumed wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        yes = {True: "yes", False: "no"}
        # the resumed run's start to its first checkpoint, less that unit's own work: loading, the float
        # evaluation and restoring the model
        first = d["resumed"]["reconstruction"]["units"][d["stopped_after_unit"]]["seconds"]
        restart = d["restart_seconds_until_first_unit_done"] - first
        lines.append(
            f"| {d['signal']} | {d['stopped_after_unit']} | {d['units_done_before_stop']} | "
            f"{yes[d['save_byte_identical']]} | {_pct(d['whole_top1'])} | {_pct(d['resumed_top1'])} | "
            f"{yes[d['same_per_image_record']]} | {d['dropped_unit']} | {d['dropped_unit_seconds_whole_run']:.0f} | "
            f"{d['work_dropped_seconds']:.0f} | {restart:.0f} | {d['whole_wall_seconds']:.0f} | "
            f"{d['stopped_wall_seconds'] + d['resumed_wall_seconds']:.0f} |"
        )
        lines.append("")
    return lines


def _provenance_table(results: Path) -> list[str]:
    """Which code and software produced each result file (files written before a field existed show '-')."""
    lines = ["### Provenance of the result files", "",
             "| file | git commit | uncommitted changes | torch threads | dopq | torch | timm | onnxruntime | device | CPU integer ISA |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in sorted(results.rglob("*.json")):
        d = json.loads(path.read_text())
        git, versions = d.get("git") or {}, d.get("versions") or {}
        dirty = {True: "yes", False: "no"}.get(git.get("dirty"), "-")
        cpu = d.get("cpu") or {}  # dopq.environment.cpu_info(), recorded since issue 25
        isa, numbers = cpu.get("integer_isa"), _cpu_numbers(cpu)
        cells = [git.get("commit", "-")[:10], dirty, str(d.get("threads", "-")),
                 *(versions.get(k) or "-" for k in ("dopq", "torch", "timm", "onnxruntime")),
                 (d.get("device_name") or "-") + (f" ({numbers})" if numbers else ""), "-" if isa is None else ", ".join(isa) or "none"]  # fmt: skip
        lines.append(f"| {path.relative_to(results)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _gpu_recon_table(results: Path) -> list[str]:
    """The GPU reconstruction runs at the library's defaults, one row per run (``recon_gpu_*.json``)."""
    lines, commands, runs = [], [], []
    env: dict[str, Any] = {}  # device and versions: the first run's
    for path in sorted(results.glob("recon_gpu_*.json")):
        data = json.loads(path.read_text())
        env = env or data
        rows = {r["method"]: r for r in data["rows"]}
        base, rec_row = rows.get("dopq"), rows.get("dopq+recon")
        if base is None or rec_row is None:
            continue
        rec = rec_row["reconstruction"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in rec_row["timings"].items())
        drop = rec.get("drop_prob", rec_row["recipe"]["reconstruct"]["drop_prob"])
        lines.append(
            f"| {rec_row['model']} | W{rec_row['w_bits']}/A{rec_row['a_bits']} | {drop:g} | {_pct(base['quant_top1'])} | "
            f"**{_pct(rec_row['quant_top1'])}** | {_pct(rec_row['fp_top1'])} | "
            f"{_paired_cell({'x': rec_row['quant_top1_correct'], 'y': base['quant_top1_correct']}, 'x', 'y')} | "
            f"{rec['images']} / {rec['batch_size']} / {rec['iters_per_unit']} | {stages} | "
            f"{rec_row['peak_gpu_memory_mb'] / 1024:.1f} | {'yes' if path.stem.endswith('_alone') else 'no'} |"
        )  # fmt: skip
        commands.append(f"- `{path.stem}`: `{data['command']}`{_gap_closed(data['rows'], rec_row)}")
        runs.append((rec_row, drop))
    if not lines:
        return []
    for (a, drop_a), (b, drop_b) in itertools.combinations(runs, 2):
        if (a["model"], a["w_bits"]) == (b["model"], b["w_bits"]) and drop_a != drop_b:
            cell = _paired_cell({"x": a["quant_top1_correct"], "y": b["quant_top1_correct"]}, "x", "y")
            commands.append(
                f"- {a['model']} W{a['w_bits']}/A{a['a_bits']}, QDrop {drop_a:g} against {drop_b:g}: {cell}"
            )
    return ["### Reconstruction on a GPU at the defaults", "",
            f"{env['device_name']}; torch {env['versions'].get('torch')}, timm {env['versions'].get('timm')}. "
            "Stage times in seconds; 'alone' says whether the run had the GPU to itself (the others shared it, "
            "six reconstructions and the GPU tests side by side, so their times are longer than alone). "
            "Peak memory is that run's own allocator peak.", "",
            "| model | bits | QDrop | dopq | dopq+recon | FP32 | recon vs dopq | images / batch / iters | stage s | peak GPU GB | alone |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *lines, "", *commands, ""]  # fmt: skip


def _speed_cells(r: dict[str, Any], widths: list[int], compiled: bool) -> list[str]:
    cells = [r["model"], f"{r['fp_images_per_second']:.1f}"]
    cells += [
        f"{r[f'dopq_w{b}a{b}_images_per_second']:.1f} ({r[f'dopq_w{b}a{b}_over_fp']:.2f})" for b in widths
    ]
    if "fp_ops_per_forward" in r:
        cells.append(f"{r['fp_ops_per_forward']} / {r[f'dopq_w{widths[0]}a{widths[0]}_ops_per_forward']}")
    if compiled:
        fp, q = r.get("compiled_fp"), r.get(f"compiled_dopq_w{widths[0]}a{widths[0]}")
        cells += [f"{fp['images_per_second']:.1f}" if fp else "not measured",
                  f"{q['images_per_second']:.1f} ({q['over_compiled_fp']:.2f} / {q['over_eager_fp']:.2f})" if q else "not measured",
                  f"{100 * q['identical_top1']:.1f} % / {q['max_logit_diff']:.2g}" if q else ""]  # fmt: skip
    repq, dopq = (statistics.median(r["calib_seconds"][m]) for m in ("repq", "dopq"))
    return [*cells, f"{repq:.2f}", f"{dopq:.2f}", f"{r['dopq_over_repq_calibration']:.2f}"]


def _speed_table(data: dict[str, Any], name: str) -> list[str]:
    """Images/s of FP and simulated dopq (eager, and compiled where measured) and calibration times."""
    rows, settings = data["rows"], data["settings"]
    widths = [b for b in (4, 3, 2, 5, 6, 8) if f"dopq_w{b}a{b}_images_per_second" in rows[0]]
    compiled = any("compiled_fp" in r for r in rows)
    where = "GPU" if name.startswith("speed_cuda") else "CPU"
    kind = "eager and compiled" if compiled else "eager"
    # runs before the models' passes alternated timed each model's passes in a block of its own
    passes = "passes, the models' in turn," if rows[0].get("passes") == "interleaved" else "passes"
    lines = [f"### Speed on the {where}, simulated quantization, {kind} ({name})", "",
             f"Command: `{data['command']}` ({data['device_name']}, {data['threads']} threads). Images/s of the "
             f"model alone over {rows[0]['images']} strided test images held in memory, batch {rows[0]['batch']}, "
             f"median of {settings['repeats']} {passes} after a warm-up pass; calibration wall time at W4/A4 on "
             f"32 images, median of {settings['repeats']}.", ""]  # fmt: skip
    head = ["model", "FP32 img/s"] + [f"dopq W{b}/A{b} img/s (x FP)" for b in widths]
    if "fp_ops_per_forward" in rows[0]:
        head.append(f"operators per forward, FP / dopq W{widths[0]}/A{widths[0]}")
    if compiled:
        head += ["compiled FP32 img/s", f"compiled dopq W{widths[0]}/A{widths[0]} img/s (x compiled FP / x FP)",
                 "compiled vs eager dopq: same top-1 / max logit diff"]  # fmt: skip
    head += ["calibration repq s", "dopq s", "dopq / repq"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_speed_cells(r, widths, compiled)) + " |" for r in rows]
    return [*lines, ""]


def _pair_text(pair: dict[str, Any] | None) -> str:
    """A paired comparison (:func:`dopq.stats.paired_sign_test`) as a table cell; empty without one."""
    return f"+{pair['gained']} / -{pair['lost']} (p={pair['p']:.2g})" if pair else ""


def _paired_cell(row: dict[str, Any], a: str, b: str) -> str:
    x, y = row.get(a), row.get(b)
    return _pair_text(paired_sign_test(x, y) if x and y else None)


_DEPLOY_PAIRS = (
    ("dopq+uniform-softmax", "dopq"),
    ("dopq+uniform-softmax", "onnxruntime quantize_static"),
    ("dopq", "onnxruntime quantize_static"),
    ("dopq+integer-attention", "dopq"),
)


def _deploy_pairs(sub: list[dict[str, Any]]) -> list[str]:
    """Paired sign tests of onnxruntime top-1 between exported models, and of each export against
    its own simulation."""
    bits = sorted({r["w_bits"] for r in sub}, reverse=True)

    def row(method: str, b: int) -> dict[str, Any] | None:
        return next((r for r in sub if r["method"] == method and r["w_bits"] == b), None)

    lines = ["", "Paired on the same images: images fixed / broken (two-sided exact sign-test p)", "",
             "| comparison | " + " | ".join(f"W{b}/A{b}" for b in bits) + " |", "|---" * (len(bits) + 1) + "|"]  # fmt: skip
    for a, b in _DEPLOY_PAIRS:
        cells = []
        for w in bits:
            ra, rb = row(a, w), row(b, w)
            pair = {"x": ra and ra.get("onnx_top1_correct"), "y": rb and rb.get("onnx_top1_correct")}
            cells.append(_paired_cell(pair, "x", "y"))
        if any(cells):
            lines.append(f"| {a} vs {b} (onnxruntime) | " + " | ".join(cells) + " |")
    for method in dict.fromkeys(r["method"] for r in sub):
        cells = [_paired_cell(row(method, w) or {}, "onnx_top1_correct", "sim_top1_correct") for w in bits]
        if any(cells):
            lines.append(f"| {method}: onnxruntime vs simulation | " + " | ".join(cells) + " |")
    return lines


def _deploy_table(data: dict[str, Any]) -> list[str]:
    """Exported models on onnxruntime: agreement with the simulation, speed and size against FP32."""
    rows = data["rows"]
    lines = ["### Deployment: ONNX on onnxruntime (CPU)", "",
             f"Command: `{data['command']}` (onnxruntime {data['onnx_threads']} intra-op threads; "
             f"speed: medians of {rows[0]['repeats']} interleaved repeats, in one run)", ""]  # fmt: skip
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        r0 = sub[0]
        lines += [
            f"**{model}**: FP32 top-1 {_pct(r0.get('fp_top1'))}% (PyTorch), {_pct(r0['fp32_onnx_top1'])}% (FP32 ONNX); "
            f"FP32 ONNX {r0['fp32_images_per_second']:.1f} images/s at batch 32, {r0['fp32_latency_ms']:.1f} ms at "
            f"batch 1, {_mb(r0['fp32_bytes'])} MB",
            "",
            "| recipe | bits | simulated top-1 | onnxruntime top-1 | identical top-1 | max logit diff | images/s (b32) | "
            "x FP32 | latency ms (b1) | x FP32 | MB | x FP32 | weights | integer ops |",
            "|---" * 14 + "|",
        ]
        for r in sub:
            ops = ", ".join(f"{k} {v}" for k, v in sorted(r.get("integer_ops", {}).items())) or "-"
            identical = "-" if r.get("identical_top1") is None else f"{100 * r['identical_top1']:.1f}"
            diff = "-" if r.get("max_logit_diff") is None else f"{r['max_logit_diff']:.3f}"
            softmax = (r.get("recipe") or {}).get("softmax_quantizer")
            label = f"{r['method']} ({softmax} post-Softmax)" if softmax else r["method"]
            lines.append(
                f"| {label} | W{r['w_bits']}/A{r['a_bits']} | {_pct(r.get('sim_top1'))} | {_pct(r['onnx_top1'])} | "
                f"{identical} | {diff} | {r['images_per_second']:.1f} | {r['throughput_ratio']:.2f} | "
                f"{r['latency_ms']:.1f} | {r['latency_ratio']:.2f} | {_mb(r['bytes'])} | {r['size_ratio']:.2f} | "
                f"{r.get('weight_storage', 'int8')} | {ops} |"
            )
        lines += _deploy_pairs(sub)
        lines.append("")
    return lines


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def _kernels(r: dict[str, Any]) -> str:
    counts = r.get("integer_ops") or r.get("kernel_precisions") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "—"


def _runtime_pairs(sub: list[dict[str, Any]]) -> list[str]:
    """Each export against its own simulation, and dopq W8/A8 against the peer of each runtime (no
    table for a timing-only run)."""
    lines: list[str] = []
    for r in sub:
        cell = _paired_cell(r, "runtime_top1_correct", "sim_top1_correct")
        if cell:
            lines.append(f"| {r['label']} vs its simulation | {r['runtime']} | {cell} |")
    for r in sub:
        if r["method"] == "dopq" and (r["w_bits"], r["a_bits"]) == (8, 8):
            for peer in (
                p for p in sub if p["runtime"] == r["runtime"] and p["method"] not in ("dopq", "fp32")
            ):
                pair = {"x": r.get("runtime_top1_correct"), "y": peer.get("runtime_top1_correct")}
                cell = _paired_cell(pair, "x", "y")
                if cell:
                    lines.append(f"| {r['label']} vs {peer['label']} | {r['runtime']} | {cell} |")
    if not lines:
        return []
    return ["", "Paired on the same images: images fixed / broken (two-sided exact sign-test p)", "",
            "| comparison | runtime | result |", "|---|---|---|", *lines]  # fmt: skip


_DEPLOY_NOTES = {  # what a suffixed deploy run measured, beside its presets
    "deploy_runtimes_grid": ", TanQ's thresholds on the 2^-16 grid (one table read per element in onnxruntime)",
    "deploy_runtimes_swin_w48": ", Swin-Tiny at the 8-bit-activation widths",
    "deploy_runtimes_w78": ", W7/A8 beside W8/A8 (centred 7-bit weights: u8 x i8 pairs cannot saturate)",
    "deploy_runtimes_swin_mask": ", Swin-Tiny at the 8-bit-activation widths, shift mask and position bias kept apart",
    "deploy_runtimes_vnni": ", 8-bit weights in int8 (default) and in uint8 (onnxruntime rows), OpenVINO compiled per batch shape",
    "deploy_runtimes_vnni_recommended": ", centred 8-bit weights (no row-sum correction), OpenVINO compiled per batch shape; "
    "before centred q, k and graph-centred 4-bit weights (superseded by the _vnni_fused runs)",
    "deploy_runtimes_vnni_swin": ", Swin-Tiny, centred 8-bit weights, OpenVINO compiled per batch shape; "
    "before centred q, k and graph-centred 4-bit weights (superseded by the _vnni_fused runs)",
    "deploy_runtimes_vnni_fused": ", centred q and k with 8-bit activations, 4-bit weights centred by the graph, "
    "centred 8-bit weights; before centred v (superseded at W8/A8 and W4/A8 by the _vnni_vc runs)",
    "deploy_runtimes_vnni_fused_swin": ", Swin-Tiny, centred q and k with 8-bit activations, 4-bit weights centred by "
    "the graph, centred 8-bit weights; before centred v (superseded at W8/A8 and W4/A8 by the _vnni_vc runs, at "
    "W4/A4 by the _vnni_w44_swin run of the checked GPTQ rule)",
    "deploy_runtimes_vnni_vc": ", q, k and mean-centred v on centred grids with 8-bit activations (each attention one "
    "integer kernel in OpenVINO), 4-bit weights centred by the graph, centred 8-bit weights; before the Linear-input "
    "Q/DQ move (superseded by the _vnni_vcq runs)",
    "deploy_runtimes_vnni_vc_swin": ", Swin-Tiny, q, k and mean-centred v on centred grids with 8-bit activations, "
    "4-bit weights centred by the graph, centred 8-bit weights; before the Linear-input Q/DQ move (superseded by the "
    "_vnni_vcq runs)",
    "deploy_runtimes_vnni_vcq": ", q, k and mean-centred v on centred grids with 8-bit activations, Linear-input Q/DQ "
    "before the token rearrangements (openvino form), 4-bit weights centred by the graph, centred 8-bit weights; "
    "before one q/k/v scale (superseded by the _vnni_qkv runs)",
    "deploy_runtimes_vnni_vcq_swin": ", Swin-Tiny, q, k and mean-centred v on centred grids with 8-bit activations, "
    "Linear-input Q/DQ before the token rearrangements (openvino form), 4-bit weights centred by the graph, centred "
    "8-bit weights; before one q/k/v scale (superseded by the _vnni_qkv runs)",
    "deploy_runtimes_vnni_qkv": ", q, k and mean-centred v on centred grids with 8-bit activations, one q/k/v scale "
    "quantized once on the qkv output and Linear-input Q/DQ before the token rearrangements (openvino form), 4-bit "
    "weights centred by the graph, centred 8-bit weights",
    "deploy_runtimes_vnni_qkv_swin": ", Swin-Tiny, q, k and mean-centred v on centred grids with 8-bit activations, "
    "one q/k/v scale quantized once on the qkv output and Linear-input Q/DQ before the token rearrangements "
    "(openvino form), 4-bit weights centred by the graph, centred 8-bit weights",
    "deploy_runtimes_vnni_gptq_swin": ", Swin-Tiny, the recommended preset with GPTQ rounding at W4/A8 "
    "(--weight-rounding gptq, damping 0.1, before the preset's W4/A8 rule)",
    "deploy_runtimes_vnni_w48": ", the recommended preset's W4/A8 with GPTQ (damping 1.0, its rule), one q/k/v scale "
    "in the openvino form",
    "deploy_runtimes_vnni_w48_swin": ", Swin-Tiny, the recommended preset's W4/A8 with GPTQ (damping 1.0, its rule), "
    "one q/k/v scale in the openvino form",
    "deploy_runtimes_vnni_w44_swin": ", Swin-Tiny, the recommended preset's W4/A4 with GPTQ (damping 1.0) kept by its "
    "calibration check",
    "deploy_runtimes_epyc_vnni": ", the recommended preset at every width, on an AMD EPYC with AVX-512 VNNI and no AMX",
    "deploy_runtimes_epyc_vnni_swin": ", Swin-Tiny, the recommended preset at every width, on an AMD EPYC with AVX-512 "
    "VNNI and no AMX",
    "deploy_runtimes_epyc_vnni_fastgptq_swin": ", Swin-Tiny, the recommended preset's W8/A8 and W4/A8 with the faster GPTQ "
    "(nearest-plane sweep, sampled moments), on an AMD EPYC with AVX-512 VNNI and no AMX",
    "deploy_runtimes_epyc_vnni_signedrank_swin": ", Swin-Tiny, the recommended preset's W4/A4 with the faster GPTQ, kept "
    "by the signed-rank check, on an AMD EPYC with AVX-512 VNNI and no AMX",
    "deploy_runtimes_epyc_vnni_w44_all": ", the recommended preset's W4/A4 on all 10 000 test images (accuracy only), "
    "on an AMD EPYC with AVX-512 VNNI and no AMX",
    "deploy_runtimes_xeon_amx": ", the recommended preset at every width, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_swin": ", Swin-Tiny, the recommended preset at every width, on a second Intel Xeon with "
    "VNNI and AMX",
    "deploy_runtimes_xeon_amx_timing": ", the recommended preset at every width, timing again with 11 repeats (a noisy "
    "host), on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_timing2": ", the recommended preset at every width, timing a third time with 11 "
    "repeats, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_qgemm": ", the recommended preset at every width, the onnxruntime form's Linear layers "
    "with 8-bit inputs as QGemm with int32 biases, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_qgemm_swin": ", Swin-Tiny, the recommended preset at every width, the onnxruntime form's "
    "Linear layers with 8-bit inputs as QGemm with int32 biases, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_qgemm_timing": ", the recommended preset at every width, the onnxruntime form's Linear "
    "layers with 8-bit inputs as QGemm with int32 biases, timing again with 11 repeats, on a second Intel Xeon with "
    "VNNI and AMX",
    "deploy_runtimes_xeon_amx_qgemm_swin_timing": ", Swin-Tiny, the recommended preset at every width, the onnxruntime "
    "form's Linear layers with 8-bit inputs as QGemm with int32 biases, timing again with 11 repeats, on a second "
    "Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_contrib": ", the recommended preset at every width, the onnxruntime form's Linear "
    "layers with 4-bit inputs as onnxruntime's MatMulIntegerToFloat with the float bias, on a second Intel Xeon with "
    "VNNI and AMX",
    "deploy_runtimes_xeon_amx_contrib_swin": ", Swin-Tiny, the recommended preset at every width, the onnxruntime "
    "form's Linear layers with 4-bit inputs as onnxruntime's MatMulIntegerToFloat with the float bias, on a second "
    "Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_contrib_timing": ", the recommended preset at every width, the onnxruntime form's "
    "Linear layers with 4-bit inputs as onnxruntime's MatMulIntegerToFloat with the float bias, timing again with 11 "
    "repeats, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_codeclip": ", the recommended preset at every width, the onnxruntime form's 4-bit "
    "activations clipped on their uint8 codes and its Linear layers with 4-bit inputs as MatMulIntegerToFloat with "
    "the float bias, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_codeclip_swin": ", Swin-Tiny, the recommended preset at every width, the onnxruntime "
    "form's 4-bit activations clipped on their uint8 codes and its Linear layers with 4-bit inputs as "
    "MatMulIntegerToFloat with the float bias, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_codeclip_timing": ", the recommended preset at every width, the onnxruntime form's 4-bit "
    "activations clipped on their uint8 codes and its Linear layers with 4-bit inputs as MatMulIntegerToFloat with "
    "the float bias, timing again with 11 repeats, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_codeclip_swin_timing": ", Swin-Tiny, the recommended preset at every width, the "
    "onnxruntime form's 4-bit activations clipped on their uint8 codes and its Linear layers with 4-bit inputs as "
    "MatMulIntegerToFloat with the float bias, timing again with 11 repeats, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_tables": ", the recommended preset at every width, the onnxruntime form's post-Softmax "
    "cell tables stored as 4-bit codes and levels (folded at load), on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_tables_swin": ", Swin-Tiny, the recommended preset at every width, the onnxruntime "
    "form's post-Softmax cell tables stored as 4-bit codes and levels (folded at load), on a second Intel Xeon with "
    "VNNI and AMX",
    "deploy_runtimes_xeon_amx_low_widths": ", the recommended preset at the widths below 8 bits other than W4/A4 and "
    "W4/A8 (W2/A2, W3/A3, W5/A5, W6/A6, W7/A7), every weight of at most 4 bits stored as INT4, OpenVINO's "
    "post-Softmax levels above 4 bits read from the cell table, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_steps": ", the recommended preset's W4/A4 and W7/A7 with the post-Softmax cell tables "
    "stored as their levels and the cells where the code steps up (folded at load), on a second Intel Xeon with VNNI "
    "and AMX",
    "deploy_runtimes_xeon_amx_steps_timing": ", the recommended preset at every width, the post-Softmax cell tables "
    "stored as their steps, timing again with 11 repeats (a noisy host), on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_steps_timing_swin": ", Swin-Tiny, the recommended preset at every width, the post-Softmax "
    "cell tables stored as their steps (timing and sizes), on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_w88_swin": ", Swin-Tiny, the recommended preset's W8/A8 (accuracy only) after the "
    "INT4 packing and post-Softmax table changes, on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_vcodes": ", the recommended preset's W4/A4 and W3/A3 with OpenVINO's `v` of a float "
    "`attn @ v` in uint8 codes clipped on the codes (session 37), on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_vcodes_w44_all": ", the recommended preset's W4/A4 on all 10 000 test images "
    "(accuracy only) with OpenVINO's `v` of a float `attn @ v` in uint8 codes clipped on the codes (session 37), "
    "on a second Intel Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_vcodes_swin": ", Swin-Tiny, the recommended preset's W4/A4 and W3/A3 (accuracy only) "
    "with OpenVINO's `v` of a float `attn @ v` in uint8 codes clipped on the codes (session 37), on a second Intel "
    "Xeon with VNNI and AMX",
    "deploy_runtimes_xeon_amx_low_widths_swin": ", Swin-Tiny, the recommended preset at the widths below 8 bits "
    "other than W4/A4 and W4/A8 (W2/A2, W3/A3, W5/A5, W6/A6, W7/A7), every weight of at most 4 bits stored as INT4, "
    "OpenVINO's post-Softmax levels above 4 bits read from the cell table, on a second Intel Xeon with VNNI and AMX",
}


def _cpu_numbers(cpu: dict[str, Any]) -> str:
    """``family F model M`` where a results file recorded the CPU's signature (since session 32):
    a generic name such as "Intel(R) Xeon(R) Processor" hides the generation; "" otherwise."""
    signature = cpu.get("signature") or {}
    return f"family {signature['family']} model {signature['model']}" if {"family", "model"} <= set(signature) else ""  # fmt: skip


def _cpu_label(data: dict[str, Any]) -> str:
    """The CPU a results file ran on, its family and model numbers where recorded, and its integer
    ISA (dopq.environment.cpu_info()), for headings."""
    cpu = data.get("cpu", {})
    numbers = _cpu_numbers(cpu)
    isa = ", ".join(cpu.get("integer_isa", [])) or "no integer ISA extension"
    return f"{cpu.get('model', 'CPU')}{' ' + numbers if numbers else ''}, {isa}"


def _deploy_runtimes_table(data: dict[str, Any], what: str = "") -> list[str]:
    """Exports on onnxruntime and OpenVINO: agreement with the simulation, speed and size against
    the FP32 model on the same runtime, the peers' INT8 models, the CPU they ran on."""
    lines = [f"### Deployment on onnxruntime and OpenVINO{what} ({_cpu_label(data)})", ""]
    for part in ("accuracy", "timing"):
        if part in data:
            lines.append(f"{part.capitalize()}: `{data[part]['command']}` ({data[part]['threads']} threads)")
            lines.append("")
    # runs before the timing batch was recorded all timed 32 images
    batch = next((r["batch"] for r in data["rows"] if "batch" in r), 32)
    lines += [
        f"Speed: medians of interleaved repeats in one run, batch {batch} (throughput) and batch 1 (latency), "
        "against the FP32 ONNX model on the same runtime; sizes against the FP32 ONNX file. Integer "
        "kernels: the integer ops onnxruntime runs after its fusions, or OpenVINO's compiled "
        "FullyConnected / MatMul / Convolution layers by runtime precision.",
        "",
    ]
    rows = data["rows"]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model and r["method"] != "fp32"]
        fp = {r["runtime"]: r for r in rows if r["model"] == model and r["method"] == "fp32"}
        # deploy rows record the images as their per-image hit strings
        d = _decimals_for(min(len(r.get("runtime_top1_correct") or "") for r in rows if r["model"] == model))
        fp_text = "; ".join(
            f"{rt}: "
            + ("" if r.get("runtime_top1") is None else f"top-1 {_pct(r['runtime_top1'], d)}%, ")
            + f"{_fmt(r.get('images_per_second'), '.1f')} images/s"
            for rt, r in fp.items()
        )
        lines += [
            f"**{model}**: FP32 {fp_text}",
            "",
            "| model | runtime | simulated top-1 | runtime top-1 | identical top-1 % | max logit diff | "
            f"images/s (b{batch}) | x FP32 | latency ms (b1) | x FP32 | MB | x FP32 | integer kernels |",
            "|---" * 13 + "|",
        ]
        for r in sub:
            lines.append(
                f"| {r['label']} | {r['runtime']} | {_pct(r.get('sim_top1'), d)} | {_pct(r.get('runtime_top1'), d)} | "
                f"{_fmt(r.get('identical_top1'), '.1f', 100)} | {_fmt(r.get('max_logit_diff'), '.3f')} | "
                f"{_fmt(r.get('images_per_second'), '.1f')} | {_fmt(r.get('throughput_ratio'), '.2f')} | "
                f"{_fmt(r.get('latency_ms'), '.1f')} | {_fmt(r.get('latency_ratio'), '.2f')} | "
                f"{_mb(r.get('bytes'))} | {_fmt(r.get('size_ratio'), '.2f')} | {_kernels(r)} |"
            )
        lines += _runtime_pairs(sub)
        lines.append("")
    return lines


def _softmax_forms_table(data: dict[str, Any]) -> list[str]:
    """Per-op timings of the post-Softmax export forms on one attention map."""
    cpu = data.get("cpu", {})
    shape = "x".join(str(n) for n in data["map_shape"])
    lines = [f"### Post-Softmax export forms, one attention map (W{data['bits']}, {cpu.get('model', 'CPU')})", "",
             f"Command: `{data['command']}` ({data['threads']} threads; integer ISA: "
             f"{', '.join(cpu.get('integer_isa', [])) or 'none'}). `Softmax -> form` on a {shape} map of the "
             "shared DeiT-Tiny, medians of interleaved repeats in one run; identical: share of elements "
             "whose level equals the simulated quantizer's (closed form: the level formula's value, "
             "equal up to float rounding; counted, indexed: the table's value). counted: a comparison per "
             "decision point (the OpenVINO target's form up to 4 bits); indexed: thresholds on the 2^-16 "
             "grid, the level read from the table of the element's grid cell (the onnxruntime target's "
             "form, and OpenVINO's above 4 bits).", "",
             "| form | runtime | ms | x Softmax alone | identical to the simulation % |", "|---|---|---|---|---|"]  # fmt: skip
    base = {r["runtime"]: r["ms"] for r in data["rows"] if r["form"] == "softmax"}
    for r in data["rows"]:
        lines.append(f"| {r['form']} | {r['runtime']} | {r['ms']:.1f} | {r['ms'] / base[r['runtime']]:.2f} | "
                     f"{_fmt(r.get('identical_to_simulation'), '.2f', 100)} |")  # fmt: skip
    return [*lines, ""]


def _sensitivity_table(data: dict[str, Any]) -> list[str]:
    lines = ["### Deployment: the same quantized network computed four ways", "",
             f"Command: `{data['command']}` (onnxruntime {data['onnx_threads']} threads). Identical top-1 "
             "predictions and the largest logit difference between two computations that differ only in "
             "float rounding (dopq recipe, TanQ post-Softmax).", "",
             "| model | bits | computation A | computation B | identical top-1 % | max logit diff |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(f"| {r['model']} | W{r['w_bits']}/A{r['a_bits']} | {r['a']} | {r['b']} | "
                     f"{100 * r['identical_top1']:.1f} | {r['max_logit_diff']:.3f} |")  # fmt: skip
    return [*lines, ""]


def _noise_table(data: dict[str, Any]) -> list[str]:
    """``deploy_noise*.json``: the noisy simulations and the runtimes against the simulation."""
    lines = [f"### Deployment: the agreement floor ({_cpu_label(data)})", "",
             f"Command: `{data['command']}` (torch and runtimes on {data['onnx_threads']} threads). Identical "
             "top-1 predictions against the simulation of: the simulation itself with every activation "
             f"quantizer's input multiplied by 1 + {data['noise_relative']:g} x N(0, 1) (one run per noise seed: "
             "float32 rounding, nothing else), and the exported model on each runtime (its own form); last "
             "the two runtimes against each other. A runtime cannot be expected to agree with the simulation "
             "better than the noisy simulations do.", "",
             "| model | recipe | bits | computation A | computation B | identical top-1 % | mean / max logit diff | top-1 % of B |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['method']} | W{r['w_bits']}/A{r['a_bits']} | {r['a']} | {r['b']} | "
                     f"{100 * r['identical_top1']:.1f} | {r['mean_logit_diff']:.4f} / {r['max_logit_diff']:.3f} | "
                     f"{100 * r['top1_b']:.1f} |")  # fmt: skip
    return [*lines, ""]


_PROFILE_NOTES = {  # what each openvino-profile run measured
    "openvino_profile": ", before the Linear-input Q/DQ move",
    "openvino_profile_qdq": ", Linear-input Q/DQ before the token rearrangements; before one q/k/v scale",
    "openvino_profile_qkv": ", Linear-input Q/DQ before the token rearrangements, one q/k/v scale quantized once on "
    "the qkv output",
}


def _openvino_profile_table(data: dict[str, Any], what: str = "") -> list[str]:
    """OpenVINO's per-layer counters (``openvino_profile*.json``): per model, the time per layer type
    and kernel summed over layers for each exported model, and the stand-alone FakeQuantize layers."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["model"] == model]
        labels = [r["label"] for r in rows]
        lines += [f"### OpenVINO per-layer time: {model}{what} ({_cpu_label(data)})", "",
                  f"Command: `{data['command']}` ({data['threads']} threads). One batch of {data['batch']} "
                  "calibration images, compiled for "
                  + ("that static shape, as the deploy runs compile" if data.get("static_shape") else
                     "dynamic shapes (before session 35; OpenVINO fuses less than in the deploy runs' static-shape models)")
                  + ", `PERF_COUNT` on; wall time per batch (median of the repeats), then per "
                  "layer type and kernel the time summed over its layers (mean over repeats), ms (layers). "
                  "The twelve costliest kinds are shown.", "",
                  "| layer type (kernel) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|",
                  "| wall per batch | " + " | ".join(f"{r['wall_ms']:.0f} ms" for r in rows) + " |",
                  "| summed over layers | " + " | ".join(f"{r['summed_ms']:.0f} ms" for r in rows) + " |"]  # fmt: skip
        cost: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for r in rows:
            for entry in r["by_type"]:
                cost.setdefault((entry["type"], entry["kernel"]), {})[r["label"]] = entry
        top = sorted(cost, key=lambda k: -max(e["ms"] for e in cost[k].values()))[:12]
        for key in top:
            cells = [cost[key].get(label) for label in labels]
            text = [f"{e['ms']:.1f} ({e['layers']})" if e else "" for e in cells]
            lines.append(f"| {key[0]} ({key[1]}) | " + " | ".join(text) + " |")
        lines += ["", "Stand-alone FakeQuantize layers, by the layers around them: ms (layers).", "",
                  "| before -> after | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]  # fmt: skip
        places: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for r in rows:
            for entry in r["fake_quantize"]:
                places.setdefault((entry["before"], entry["after"]), {})[r["label"]] = entry
        for (before, after), found in places.items():
            text = [
                f"{found[label]['ms']:.1f} ({found[label]['layers']})" if label in found else ""
                for label in labels
            ]
            lines.append(f"| {before} -> {after} | " + " | ".join(text) + " |")
        lines.append("")
    return lines


def _float64_table(data: dict[str, Any]) -> list[str]:
    """The float64 export: agreement with the float64 simulation, thread independence, speed."""
    rows = data["rows"]
    r0 = rows[0]
    commands = {
        part: (data.get(part) or {}).get("command", data["command"]) for part in ("accuracy", "timing")
    }
    lines = ["### Deployment: the float64 export (`--export-dtype float64`)", "",
             f"Accuracy: `{commands['accuracy']}`; speed: `{commands['timing']}` (onnxruntime "
             f"{data['onnx_threads']} intra-op threads; dopq preset; speed: medians of {r0['repeats']} interleaved "
             "repeats against the FP32 ONNX export and the float32 export of the same model, in one run). "
             "`sim32` / `sim64`: the simulation in float32 / float64 "
             "(`--eval-dtype`); `threads`: the float64 simulation and graph again on another thread count.", "",
             "| model | bits | sim32 top-1 | sim64 top-1 | onnxruntime float64 top-1 | identical top-1 % (vs sim64) | "
             "max logit diff | sim32 vs sim64 identical % | threads: identical % (images) | "
             f"float64 images/s (b{r0.get('batch', 32)}) | "
             "x FP32 | float32 export images/s | x FP32 | float64 latency ms (b1) | x FP32 | MB | x FP32 |",
             "|---" * 17 + "|"]  # fmt: skip
    for r in rows:
        threads = "-"
        if r.get("thread_check_images"):
            a, b = r["thread_check_threads"]
            threads = (f"{a} vs {b}: sim {100 * r['sim64_threads_identical_top1']:.1f}, onnx "
                       f"{100 * r['onnx64_threads_identical_top1']:.1f} ({r['thread_check_images']})")  # fmt: skip
        lines.append(
            f"| {r['model']} | W{r['w_bits']}/A{r['a_bits']} | {_pct(r['sim32_top1'])} | {_pct(r['sim64_top1'])} | "
            f"{_pct(r['onnx64_top1'])} | {100 * r['identical_top1']:.1f} | {r['max_logit_diff']:.1e} | "
            f"{100 * r['sim32_vs_sim64_identical_top1']:.1f} | {threads} | {r['float64_images_per_second']:.1f} | "
            f"{r['float64_throughput_ratio']:.2f} | {r['float32_images_per_second']:.1f} | "
            f"{r['float32_throughput_ratio']:.2f} | {r['float64_latency_ms']:.1f} | {r['float64_latency_ratio']:.2f} | "
            f"{_mb(r['bytes'])} | {r['bytes'] / r['fp32_bytes']:.2f} |"
        )
    return [*lines, ""]


def _save_size_table(data: dict[str, Any]) -> list[str]:
    lines = ["### Compact `--save` files", "", f"Command: `{data['command']}`", "",
             "| model | bits | --save MB | x FP32 state dict | x shared checkpoint (fp16 safetensors) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(f"| {r['model']} | W{r['w_bits']} | {_mb(r['save_bytes'])} | "
                     f"{r['ratio_to_fp32_state_dict']:.3f} | {r['ratio_to_checkpoint']:.3f} |")  # fmt: skip
    return [*lines, ""]


def _families_table(data: dict[str, Any]) -> list[str]:
    lines = ["### Model families (small random-init configurations, dopq W4/A4)", "",
             f"Command: `{data['command']}` ({data['threads']} torch threads; 8 random calibration images)", "",
             "| family | timm class | coverage (quantized / present) | quantized share | max float-logit change of the re-parameterization | calibration s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        lines.append(f"| {r['family']} | {r['class']} | {r['coverage_summary']} | {100 * r['quantized_share']:.0f} % | "
                     f"{r['reparam_max_logit_change']:.1e} | {r['calib_seconds']:.2f} |")  # fmt: skip
    return [*lines, ""]


def _data_table(data: dict[str, Any]) -> list[str]:
    """Streamed evaluation against the model alone, and peak RSS of ``dopq evaluate`` (data suite)."""
    lines = ["### Data loading (streamed images, memory)", "", f"{data['cpus']} CPUs.", ""]

    def measured(part: dict[str, Any]) -> str:
        part = {**data, **part}  # parts measured before they carried their own command: the file's
        load = part.get("load_average_before") or part.get("load_average_at_start") or [float("nan")]
        return (f"Command: `{part['command']}` ({part['threads']} torch threads; load average {load[0]:.1f} "
                "before: other jobs running make the ratios noisy)")  # fmt: skip

    t = data.get("throughput")
    if t:
        lines += [measured(t), ""]
        model_only = " / ".join(f"{v:.1f}" for v in t["model_only_images_per_second"])
        lines += [f"DeiT-Tiny FP, {t['images']} CIFAR-10 test images from `{Path(t['data']).name}`, batch {t['batch_size']}:", "",
                  "| | images/s | / model alone |", "|---|---|---|",
                  f"| model alone on pre-made tensors (before / after) | {model_only} | 1 |",
                  f"| streamed, default workers ({t['default_workers']}) | {t['streamed_default_workers']['images_per_second']:.1f} | "
                  f"{t['ratio_default_workers']:.2f} |",
                  f"| streamed, decoded in the main process (0 workers) | {t['streamed_no_workers']['images_per_second']:.1f} | "
                  f"{t['ratio_no_workers']:.2f} |", ""]  # fmt: skip
    m = data.get("memory")
    if m:
        c, layout = m["cifar10_test_all"], m["imagenet_layout"]
        lines += [measured(m), ""]
        lines += ["| `dopq evaluate --quantized` | model | images | workers | peak RSS (MB) | wall s |", "|---|---|---|---|---|---|",
                  f"| CIFAR-10 test archive | {c['model']} | {c['eval_images']} | {c['workers']} | {c['peak_rss_mb']:.0f} | {c['wall_seconds']:.0f} |"]  # fmt: skip
        for n, r in layout["runs"].items():
            lines.append(f"| generated ImageNet-layout folder, {n} JPEGs | {layout['model']} | {r['eval_images']} | "
                         f"{r['workers']} | {r['peak_rss_mb']:.0f} | {r['wall_seconds']:.0f} |")  # fmt: skip
        lines += ["", f"Peak RSS (`{c['tool']}`, the largest process): 50 000 / 5 000 images = "
                  f"{layout['rss_ratio_50000_over_5000']:.3f}.", ""]  # fmt: skip
    return lines


def _calib_gains_table(data: dict[str, Any], note: str = "") -> list[str]:
    """GPTQ rounding and the per-module post-Softmax choice against dopq (benchmarks/calib_gains.py):
    top-1, the paired sign test against dopq and the calibration time per cell."""
    rows = data["rows"]
    model = rows[0]["model"]
    widths = sorted({(r["w_bits"], r["a_bits"]) for r in rows})  # W4/A8 beside W4/A4: pairs, not bits
    names = [f"W{w}/A{a}" for w, a in widths]
    title = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    lines = [f"### Calibration-time gains: {model}{note}, {title}", "",
             f"Command: `{data['command']}` ({data['threads']} torch threads). FP32 top-1 {_pct(rows[0]['fp_top1'])}%. "
             "Cells: top-1 %, images fixed / broken against dopq (sign-test p), calibration s.", "",
             "| recipe | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    kinds = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for w, a in widths:
            r = next(
                (r for r in rows if r["method"] == method and (r["w_bits"], r["a_bits"]) == (w, a)), None
            )
            if r is None:
                cells.append("")
                continue
            pair = r.get("paired_with_dopq")
            test = f", {_pair_text(pair)}" if pair else ""
            cells.append(f"{_pct(r['quant_top1'])}{test}, {r['calib_seconds']:.1f} s")
            chosen = list(r.get("softmax_kinds", {}).values())
            if "auto" in method and chosen:
                counts = ", ".join(f"{k} {chosen.count(k)}" for k in dict.fromkeys(chosen))
                kinds.append(f"- {method} W{w}/A{a}: post-Softmax {counts}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, "", *kinds, ""]


_PRESET_NOTES = {  # runs of the same recipes again elsewhere: what tells them apart
    "calib_gains_swin_xeon_preset": ", again on an Intel Xeon (AVX-512 VNNI; W3/A3 seed 2 alone, the other runs "
    "shared the CPU)",
    "_xeon_preset": ", again on an Intel Xeon (AVX-512 VNNI)",
    "_w44_gptq_d1": ", at W4/A4 on an Intel Xeon (AVX-512 VNNI)",
    "_w44_gptq_check": ", at W4/A4 with the calibration check (the preset's W4/A4 rule), on an Intel Xeon (AVX-512 VNNI)",
    "_w33_output": ", at W3/A3 on an Intel Xeon (AVX-512 VNNI)",
    "_epyc_vnni_preset": ", again on an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_w33_gptq_d1": ", at W3/A3 on an AMD EPYC with AVX-512 VNNI (no AMX)",
    # widths and calibration sizes are in the title already: only the CPU tells these apart
    **dict.fromkeys(
        ("_epyc_vnni_w44_preset", "_epyc_vnni_a8_preset", "_epyc_vnni_c16_preset", "_epyc_vnni_c8_preset"),
        ", on an AMD EPYC with AVX-512 VNNI (no AMX)",
    ),
    "_epyc_vnni_fastgptq_allrows_preset": ", with the faster GPTQ on every token row (a probe stopped after seed 0's "
    "W4/A4), on an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_fastgptq_preset": ", with the faster GPTQ (nearest-plane sweep, sampled moments), on an AMD EPYC "
    "with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_c16_signedrank_preset": ", with the faster GPTQ and the signed-rank check, on an AMD EPYC with "
    "AVX-512 VNNI (no AMX)",
    "_epyc_vnni_signedrank_preset": ", the calibration check by signed-rank test instead of sign test, on an AMD "
    "EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_seeds3to9_preset": ", seven more calibration seeds at W3/A3 (pooled below with seeds 0 to 2), on an AMD "
    "EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_seeds3to9_widetanq": ", TanQ's wider centre grid on the preset's W3/A3 (dopq+gptq+tanq-wide), seven "
    "more calibration seeds (pooled below with seeds 0 to 2), on an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_seeds3to5_widetanq": ", TanQ's wider centre grid on the preset's W3/A3 (dopq+gptq+tanq-wide), three "
    "more calibration seeds (pooled below with seeds 0 to 2), on an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_w33_widetanq": ", TanQ's wider centre grid on the preset's W3/A3 (dopq+gptq+tanq-wide), with the "
    "faster GPTQ, on an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_seeds6to9_preset": ", four more calibration seeds at W3/A3, the preset with TanQ's wider grid "
    "(pooled below with seeds 0 to 5), on an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_w44_seeds3to9_preset": ", seven more calibration seeds at W4/A4 (pooled below with seeds 0 to 2), on "
    "an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_epyc_vnni_w44_seeds3to5_preset": ", three more calibration seeds at W4/A4 (pooled below with seeds 0 to 2), on "
    "an AMD EPYC with AVX-512 VNNI (no AMX)",
    "_w33_all10k": ", W3/A3 on all 10 000 test images (how far under FP beyond the strided 1000; the run shared the "
    "CPU with the test suite, so its calibration time does not count), on an AMD EPYC with AVX-512 VNNI (no AMX)",
    # seeds where the preset fell more than 0.3 under dopq on the strided 1000, evaluated on more test images
    "_all10k": ", on all 10 000 test images (a seed where the preset fell under dopq on the strided 1000), on an AMD "
    "EPYC with AVX-512 VNNI (no AMX)",
    "_all5k": ", on the strided 5000 test images (seeds where the preset fell under dopq on the strided 1000), on an "
    "AMD EPYC with AVX-512 VNNI (no AMX)",
    "_xeon_amx_w33_preset": ", at W3/A3 with the code of session 32, on a second Intel Xeon with VNNI and AMX",
    "_xeon_amx_w33_ties": ", at W3/A3 over ten seeds with per-tensor scales moved off rounding ties (session 37), "
    "on a second Intel Xeon with VNNI and AMX",
}


# runs that add calibration seeds to earlier runs of the same recipes, CPU and code: their suffix and
# the earlier runs', whose seeds are pooled with theirs into one mean
_POOLED_WITH = {
    "_epyc_vnni_seeds3to9_preset": ("_epyc_vnni_fastgptq_preset",),
    "_epyc_vnni_seeds3to9_widetanq": ("_epyc_vnni_w33_widetanq",),
    "_epyc_vnni_seeds3to5_widetanq": ("_epyc_vnni_w33_widetanq",),
    "_epyc_vnni_seeds6to9_preset": ("_epyc_vnni_w33_widetanq", "_epyc_vnni_seeds3to5_widetanq"),
    "_epyc_vnni_w44_seeds3to9_preset": ("_epyc_vnni_signedrank_preset",),
    "_epyc_vnni_w44_seeds3to5_preset": ("_epyc_vnni_signedrank_preset",),
}


def _recipe_key(row: dict[str, Any]) -> str:
    """What a row computed: its recipe's fields (widths included), whatever name the run gave it."""
    return json.dumps(row["recipe"], sort_keys=True)


def _pooled_lines(rows: list[dict[str, Any]], earlier: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """Each recipe of ``rows`` over its seeds together with those of the same recipe (equal fields,
    under any name) in the ``(stem, rows)`` of earlier runs: the mean and the standard deviation
    over seeds (top-1 %)."""
    names = {_recipe_key(r): r["method"] for r in rows}
    pooled: dict[str, dict[int, float]] = {}
    aliases: dict[str, set[str]] = {}
    for r in [*(r for _, part in earlier for r in part), *rows]:
        key = _recipe_key(r)
        if key in names:
            pooled.setdefault(key, {})[r["seed"]] = r["quant_top1"]
            if r["method"] != names[key]:
                aliases.setdefault(names[key], set()).add(r["method"])
    stems = " and ".join(f"`{stem}`" for stem, _ in earlier)
    lines = [f"Pooled with the seeds of {stems} (same CPU, code and test images):", "",
             "| width | recipe | seeds | mean | standard deviation over seeds |", "|---|---|---|---|---|"]  # fmt: skip
    for key, by_seed in pooled.items():
        if len(by_seed) < 2:
            continue
        recipe, values = json.loads(key), list(by_seed.values())
        seeds = ", ".join(map(str, sorted(by_seed)))
        lines.append(f"| W{recipe['w_bits']}/A{recipe['a_bits']} | {names[key]} | {seeds} | "
                     f"{_pct(statistics.mean(values), 2)} | {_pct(statistics.stdev(values), 2)} |")  # fmt: skip
    for name, others in aliases.items():
        lines += [
            "",
            f"{name}: the earlier runs' rows of {', '.join(sorted(others))}, the same recipe field for field.",
        ]
    return [*lines, ""]


def _preset_table(data: dict[str, Any], note: str = "") -> list[str]:
    """The recommended preset against dopq and repq over widths and calibration seeds
    (``calib_gains_*_preset.json``): per width and recipe, top-1 per seed with the paired sign test
    against dopq on the same calibration images, the mean over seeds, the largest loss to dopq and the
    calibration time in float forwards of the calibration batch (median over seeds)."""
    rows = data["rows"]
    model, seeds = rows[0]["model"], sorted({r["seed"] for r in rows})
    widths = list(dict.fromkeys((r["w_bits"], r["a_bits"]) for r in rows))
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m != "dopq")  # dopq first
    others = " and ".join(m for m in methods if m not in ("dopq", "recommended", "wide-tanq rule"))
    if "recommended" in methods or "wide-tanq rule" in methods:
        what = "Recommended preset" if "recommended" in methods else "The wide-TanQ rule"
    else:  # switches over seeds (calib-gains --seeds without a preset row)
        what, others = others, ""
    # runs since TanQ's thresholds sit on the 2^-16 grid record the field; earlier ones used the exact midpoints
    grid = (
        ", TanQ thresholds on the 2^-16 grid" if "softmax_grid_bits" in (rows[0].get("recipe") or {}) else ""
    )
    if (
        what == "Recommended preset" and (3, 3) not in widths
    ):  # the W3/A3 runs came first and keep their titles
        grid += ", " + ", ".join(f"W{w}/A{a}" for w, a in widths)
    calib_size = data.get("calib_size", 32)  # runs before --calib-size used the protocol's 32
    if calib_size != 32:
        grid += f", {calib_size} calibration images (a stress case)"
    # runs without dopq's rows (more seeds of two other recipes) compare those with each other only
    against = (
        (" against dopq" + (" and " + others if others else ""))
        if "dopq" in methods
        else (f" and {others}" if others else "")
    )
    lines = [f"### {what}{against}: {model}{grid}{note}", "",
             f"Command: `{data['command']}` ({data['threads']} torch threads). FP32 top-1 {_pct(rows[0]['fp_top1'])}%. "
             f"Calibration seeds {', '.join(map(str, seeds))} ({calib_size} images each), the same test images for every row. "
             "Cells: top-1 %, images fixed / broken against dopq at the same seed (sign-test p); calibration time "
             "as float forwards of the calibration batch (median over seeds; the ratio survives a loaded machine), "
             "in brackets the median seconds. "
             "A row marked = has dopq's config at that width and is dopq's run.", "",
             "| width | recipe | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | worst vs dopq | calibration (forwards) |",
             "|---" * (len(seeds) + 5) + "|"]  # fmt: skip
    for w, a in widths:
        for method in methods:
            mine = {
                r["seed"]: r for r in rows if r["method"] == method and (r["w_bits"], r["a_bits"]) == (w, a)
            }
            if not mine:
                continue
            cells, deltas = [], []
            for seed in seeds:
                r = mine.get(seed)
                if r is None:
                    cells.append("")
                    continue
                pair = r.get("paired_with_dopq") or _pair_with_dopq(r, rows)
                same = " =" if r.get("same_config_as") else ""
                test = f", {_pair_text(pair)}" if pair and not same else ""
                cells.append(f"{_pct(r['quant_top1'])}{same}{test}")
                if pair:
                    deltas.append((pair["gained"] - pair["lost"]) / r["eval_images"])
            top1 = [r["quant_top1"] for r in mine.values()]
            fwd = statistics.median(r["calib_forward_equivalents"] for r in mine.values())
            secs = statistics.median(r["calib_seconds"] for r in mine.values())
            worst = f"{100 * min(deltas):+.1f}" if deltas else ""
            lines.append(f"| W{w}/A{a} | {method} | " + " | ".join(cells)
                         + f" | {_pct(sum(top1) / len(top1), 2)} | {worst} | {fwd:.1f} ({secs:.1f} s) |")  # fmt: skip
    return [*lines, "", *_gptq_check_lines(rows), *_beyond_protocol_lines(rows)]


def _pair_with_dopq(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The paired sign test of ``row`` against dopq's row of the same seed and width where dopq ran
    separately (a run split across result folders); None where there is none, or for dopq itself."""
    if row["method"] == "dopq":
        return None
    base = _dopq_rows(rows).get(_seed_and_width(row))
    return None if base is None else paired_sign_test(row["quant_top1_correct"], base["quant_top1_correct"])


def _seed_and_width(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["seed"], row["w_bits"], row["a_bits"]


def _dopq_rows(rows: list[dict[str, Any]]) -> dict[tuple[int, int, int], dict[str, Any]]:
    """dopq's rows by seed and width: what every other row of a run is paired with."""
    return {_seed_and_width(r): r for r in rows if r["method"] == "dopq"}


# calib-gains evaluates a strided subset of CIFAR-10's 10 000 test images; the protocol's is the strided 1000
_TEST_SPLIT, _PROTOCOL_IMAGES = 10_000, 1000


def _in_protocol(n: int) -> list[bool]:
    """For each image of a strided ``n`` of the test split, whether it is one of the protocol's
    strided 1000 (a larger strided subset holds them all when ``n`` divides the split evenly)."""
    protocol = set(strided_indices(_TEST_SPLIT, _PROTOCOL_IMAGES))
    return [i in protocol for i in strided_indices(_TEST_SPLIT, n)]


def _kept(correct: str, keep: list[bool]) -> str:
    """The per-image record ``correct`` ("1" right, "0" wrong) on the images ``keep`` marks."""
    return "".join(c for c, k in zip(correct, keep, strict=True) if k)


def _beyond_protocol_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Rows evaluated on more than the protocol's images, each on the protocol's strided 1000 and,
    apart, on the other images of the run, which the protocol never sees: top-1 of the float model
    and of the row, the gap between them, and the paired test against dopq at the same seed and width
    where dopq ran (a replication of the per-seed comparisons on images disjoint from the protocol's)."""
    dopq = _dopq_rows(rows)
    lines = []
    for r in rows:
        flags = _in_protocol(r["eval_images"]) if r["eval_images"] > _PROTOCOL_IMAGES else []
        if sum(flags) != _PROTOCOL_IMAGES:  # the protocol's images only, or a subset without all of them
            continue
        base = dopq.get(_seed_and_width(r))
        for inside in (True, False):
            keep = [flag == inside for flag in flags]
            fp, mine = (_kept(x, keep) for x in (r["fp_top1_correct"], r["quant_top1_correct"]))
            theirs = None if base is None or base is r else _kept(base["quant_top1_correct"], keep)
            pair = "" if theirs is None else _pair_text(paired_sign_test(mine, theirs))
            fp_top1, top1 = (x.count("1") / len(x) for x in (fp, mine))
            lines.append(f"| W{r['w_bits']}/A{r['a_bits']} | {r['method']} | {r['seed']} | "
                         f"{'strided 1000' if inside else f'other {len(fp)}'} | {_pct(fp_top1, 2)} | "
                         f"{_pct(top1, 2)} | {_pct(fp_top1 - top1, 2)} | {pair} |")  # fmt: skip
    return _captioned_table(
        "The same models on the protocol's strided 1000 test images and, apart, on the other images of this "
        "run, which the protocol never evaluates: top-1 % of the float model and of the row, how far the row "
        "is under FP, and images fixed / broken against dopq at the same seed (sign-test p).",
        ["width", "recipe", "seed", "test images", "FP", "top-1", "under FP", "vs dopq"], lines,
    )  # fmt: skip


def _captioned_table(caption: str, columns: list[str], rows: list[str]) -> list[str]:
    """A caption, then a table of ``columns`` over the rendered ``rows``; nothing without rows."""
    if not rows:
        return []
    return [caption, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", *rows, ""]


def _gptq_check_lines(rows: list[dict[str, Any]]) -> list[str]:
    """For rows whose recipe checked GPTQ's rounding on the calibration images (``gptq_check``): per
    recipe, width and seed, whether GPTQ was kept, the images on which its logit KL from the float
    model was lower / higher than round-to-nearest's, the p of the check's test (the sign test of
    the first runs, the signed-rank test since), the per-seed calibration ratio to dopq's (float
    forwards) and the two mean divergences."""
    dopq = _dopq_rows(rows)
    lines = []
    for r in rows:
        check = (r.get("gptq") or {}).get("check")
        if check is None:
            continue
        base = dopq.get(_seed_and_width(r))
        ratio = (
            f"{r['calib_forward_equivalents'] / base['calib_forward_equivalents']:.2f}x dopq's"
            if base
            else ""
        )
        lines.append(f"| {r['method']} | W{r['w_bits']}/A{r['a_bits']} | {r['seed']} | {'kept' if check['kept'] else 'round-to-nearest'} | "
                     f"{check['images_better']} / {check['images_worse']} ({check.get('test', 'sign')} p={check['p']:.2g}) | "
                     f"{check['kl_nearest']:.4f} -> {check['kl_gptq']:.4f} | {ratio} |")  # fmt: skip
    return _captioned_table(
        "GPTQ's calibration check per seed: the rounding kept, the calibration images on which GPTQ's logit KL "
        "from the float model is lower / higher than round-to-nearest's (the p of the check's test: the sign "
        "test of the first runs, the signed-rank test since), the mean KL of "
        "round-to-nearest -> GPTQ, and the calibration time against dopq's at the same seed.",
        ["recipe", "width", "seed", "rounding", "GPTQ lower / higher", "mean KL", "calibration vs dopq"], lines,
    )  # fmt: skip


def _error_budget_table(data: dict[str, Any]) -> list[str]:
    """What each kind of quantizer and each block costs (benchmarks/error_budget.py): the logit
    error against the float model with everything quantized, and with one kind or one unit float."""
    rows = data["rows"]
    kinds = list(rows[0]["kinds kept float"])
    models = ", ".join(dict.fromkeys(_short(r["model"]) for r in rows))
    lines = [f"### Error budget, {models}: each kind of quantizer and each block kept float in turn", "",
             f"Command: `{data['command']}` ({data['threads']} torch threads), {rows[0]['images']} strided test images. "
             "Cells: mean squared logit error against the float model (x1e-3); in brackets, top-1 agreement "
             "with the float model %. The three units whose float copy removes the most error are listed.", "",
             "| model | width | recipe | all quantized | " + " | ".join(f"{k} float" for k in kinds) + " | costliest units |",
             "|---" * (len(kinds) + 5) + "|"]  # fmt: skip

    def cell(m: dict[str, float]) -> str:
        return f"{1e3 * m['logit_mse']:.1f} ({100 * m['agree_fp']:.0f})"

    for r in rows:
        units = sorted(r["units kept float"].items(), key=lambda kv: kv[1]["logit_mse"])[:3]
        full = r["all quantized"]["logit_mse"]
        worst = ", ".join(f"{n} (-{100 * (1 - m['logit_mse'] / full):.0f} %)" for n, m in units)
        lines.append(f"| {_short(r['model'])} | W{r['w_bits']}/A{r['a_bits']} | {r['recipe']} | {cell(r['all quantized'])} | "
                     + " | ".join(cell(r["kinds kept float"][k]) for k in kinds) + f" | {worst} |")  # fmt: skip
    return [*lines, ""]


def _calib_gains_timing(data: dict[str, Any]) -> list[str]:
    def forwards(r: dict[str, Any]) -> str:
        if "median_forwards" not in r:
            return ""
        return f"; {r['median_forwards']:.1f} float forwards of the calibration batch, {r['forwards_over_dopq']:.2f}x dopq's"

    lines = [f"- {label}: calibration {', '.join(f'{t:.1f}' for t in r['calib_seconds'])} s, median "
             f"{r['median']:.1f} s, {r['over_dopq']:.2f}x dopq{forwards(r)}" for label, r in data["recipes"].items()]  # fmt: skip
    others = ", ".join(label for label in data["recipes"] if label != "dopq")
    w, a = data["bits"], data.get("a_bits", data["bits"])
    head = [f"### Calibration time of {others} against dopq ({data['model']}, W{w}/A{a})", "",
            f"Command: `{data['command']}` ({data['threads']} torch threads; repeats interleaved)", ""]  # fmt: skip
    return [*head, *lines, ""]


def _protocol_title(name: str) -> str:
    """``ablation_deit_eval5000`` -> ``Ablation, DeiT-Tiny, 5000 test images``."""
    _, model, protocol = name.split("_", 2)
    model = {"deit": "DeiT-Tiny", "swin": "Swin-Tiny"}.get(model, model)
    images = protocol.removeprefix("eval")
    return (
        f"Ablation, {model}, {images} test images" if images.isdigit() else f"Ablation, {model} ({protocol})"
    )


def _hf_deit_table(data: dict[str, Any]) -> list[str]:
    """The shared DeiT-Tiny as timm and as a transformers ViT (``hf_deit_tiny.json``)."""
    lines = [f"### The shared DeiT-Tiny in transformers form (`{data['command']}`)", ""]
    fp = data.get("fp")
    if fp:
        lines += [f"FP top-1: timm {100 * fp['timm_top1']:.1f} %, transformers {100 * fp['hf_top1']:.1f} %; identical "
                  f"top-1 predictions on {100 * fp['identical_top1_predictions']:.1f} % of {fp['images']} images, "
                  f"largest logit difference {fp['max_logit_diff']:.2g}.", ""]  # fmt: skip
    lines += [
             "| recipe | timm top-1 | transformers top-1 | gap (points) | transformers vs timm, images (sign test) "
             "| ONNX timm | ONNX transformers | ONNX gap | ONNX vs timm ONNX | ONNX = simulation (timm / transformers) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["rows"]:
        t, h, pr, po = r["timm"], r["hf"], r["paired"], r["onnx_paired"]
        agree = f"{100 * t['onnx']['identical_top1_vs_simulation']:.1f} / {100 * h['onnx']['identical_top1_vs_simulation']:.1f} %"
        lines.append(
            f"| {r['method']} W{r['w_bits']}/A{r['a_bits']} | {100 * t['quant_top1']:.1f} | {100 * h['quant_top1']:.1f} "
            f"| {r['top1_gap_points']:+.1f} | +{pr['hf_right_timm_wrong']} / -{pr['timm_right_hf_wrong']} (p={pr['p']:.2g}) "
            f"| {100 * t['onnx']['top1']:.1f} | {100 * h['onnx']['top1']:.1f} | {r['onnx_top1_gap_points']:+.1f} "
            f"| +{po['hf_right_timm_wrong']} / -{po['timm_right_hf_wrong']} (p={po['p']:.2g}) | {agree} |"
        )  # fmt: skip
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------
# Sections by topic, the archive of superseded ones
# --------------------------------------------------------------------------------------------------

TOPICS = (
    "Accuracy and ablations",
    "Post-Softmax quantizers",
    "Reconstruction",
    "Deployment",
    "Speed",
    "Scale and model families",
    "Data",
    "Provenance",
)

ARCHIVED = {
    # result file -> the later measurement that superseded it (its section goes to results-archive.md)
    "ablation_swin_eval250": "the Swin-Tiny ablation on 1000 test images (same recipes and widths)",
    "speed_cpu_2threads_before": "the speed_cpu_2threads runs of the current code (same settings)",
    "timing_1threads": "the calibration times of the speed_* runs (same width and images, later code)",
    "deploy_runtimes_swin_w48": "the Swin-Tiny run with the shift mask and position bias kept apart "
    "(deploy_runtimes_swin_mask: same widths and settings, a smaller file)",
}


OLDER_SUITES = {
    # result file -> what wrote it, where today's benchmarks/run.py refuses its recorded command
    "deploy": "the deploy suite before commit f588489, which replaced it with the onnxruntime and OpenVINO rows "
    "of `deploy_runtimes*.json` (today's `run.py deploy` refuses `--integer-attention`)",
}


@dataclass
class Section:
    """One generated section: its lines (the first is its ``###`` heading), the result files it
    renders and, for the summary, their rows as ``(file data, row)``."""

    topic: str
    lines: list[str]
    sources: tuple[str, ...]
    rows: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.lines[0].removeprefix("### ")

    @property
    def archived(self) -> bool:
        return all(name in ARCHIVED for name in self.sources)


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _rows_of(data: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(data, row) for row in data.get("rows", [])]


def _sections(results: Path) -> list[Section]:
    """Every section the result files give, in topic order."""
    out: list[Section] = []

    def add(topic: str, lines: list[str], sources: tuple[str, ...], data: Any = None) -> None:
        if lines:
            rows = [r for d in (data if isinstance(data, list) else [data]) if d for r in _rows_of(d)]
            out.append(Section(topic, lines, sources, rows))

    accuracy, softmax, recon, deploy, speed, scale = TOPICS[:6]
    extra = sorted({p.stem for p in results.rglob("ablation_*_*.json")})  # other protocols, e.g. _eval5000
    for name, title in (("foundation", "RepQ-ViT baseline"), ("ablation_deit", "Ablation, DeiT-Tiny (calibration only)"),
                        ("ablation_swin", "Ablation, Swin-Tiny (calibration only)"),
                        *((n, _protocol_title(n)) for n in extra),
                        ("stress", "Outlier-stressed DeiT-Tiny (4 channels per LayerNorm x10-40)")):  # fmt: skip
        data = _load(results, name)
        if data:
            add(accuracy, _accuracy_table(data, title), (name,), data)
    for path in sorted(results.glob("calib_gains_*.json")):
        data = json.loads(path.read_text())
        if "rows" not in data:  # the timing files
            continue
        note = ", tighter activation clips" if "_actwide" in path.stem else ""
        note = ", GPTQ's float target" if "_asym" in path.stem else note
        note = ", GPTQ's float target half way" if "_half" in path.stem else note
        note = ", patch embedding and head weights at 8 bits (edge_w_bits)" if "_edge" in path.stem else note
        note = (
            ", TanQ's thresholds on the 2^-16 grid (dopq) against its exact midpoints"
            if "_grid" in path.stem
            else note
        )
        over_seeds = path.stem.endswith(
            (
                "_preset",
                "_widetanq",
                "_w48",
                "_qkv_probe",
                "_gptq_d1",
                "_gptq_check",
                "_output",
                "_all10k",
                "_all5k",
                "_w33_ties",
            )
        )
        # the one-column table shows one row per recipe and width: a run over several seeds under
        # another suffix gets the table with a column per seed (it showed the first seed alone)
        merged = _load(results, path.stem)  # subfolders merge
        if over_seeds or len({r.get("seed") for r in merged["rows"]}) > 1:
            if over_seeds:
                note = next((n for suffix, n in _PRESET_NOTES.items() if path.stem.endswith(suffix)), "")
            lines, sources = _preset_table(merged, note), (path.stem,)
            pooled = next((p for p in _POOLED_WITH.items() if path.stem.endswith(p[0])), None)
            if pooled is not None:
                stems = [path.stem[: -len(pooled[0])] + suffix for suffix in pooled[1]]
                lines += _pooled_lines(
                    merged["rows"], [(stem, _load(results, stem)["rows"]) for stem in stems]
                )
                sources += tuple(stems)
            add(accuracy, lines, sources, merged)
            continue
        add(accuracy, _calib_gains_table(data, note), (path.stem,), data)
    for stem in sorted({p.stem for p in results.rglob("error_budget*.json")}):  # one table per model set
        add(accuracy, _error_budget_table(_load(results, stem)), (stem,))
    for name, table in (("softmax_error", _softmax_table), ("tanq_grid", _tanq_grid_table)):
        data = _load(results, name)
        if data:
            add(softmax, table(data), (name,))
    for path in sorted(results.glob("recon_*.json")):
        data = json.loads(path.read_text())
        if path.stem == "recon_unit":
            add(recon, _recon_unit_table(data), (path.stem,))
        elif not path.stem.startswith("recon_gpu_"):  # one GPU table below
            add(recon, _recon(data, _recon_title(data, path.stem)), (path.stem,), data)
    gpu = sorted(results.glob("recon_gpu_*.json"))
    add(
        recon, _gpu_recon_table(results), tuple(p.stem for p in gpu), [json.loads(p.read_text()) for p in gpu]
    )
    add(recon, _recon_runs_paired(results), tuple(p.stem for p in sorted(results.glob("recon_*.json"))))
    add(recon, _resume_table(results), tuple(p.stem for p in sorted(results.glob("resume_*.json"))))
    for name, table in (("deploy_runtimes", _deploy_runtimes_table), ("deploy", _deploy_table),
                        ("deploy_sensitivity", _sensitivity_table), ("deploy_float64", _float64_table),
                        ("save_size", _save_size_table)):  # fmt: skip
        data = _load(results, name)
        if data:
            add(deploy, table(data), (name,), data)
    for path in sorted(results.glob("softmax_forms*.json")):  # one per width (--bits, --suffix)
        data = json.loads(path.read_text())
        add(deploy, _softmax_forms_table(data), (path.stem,), data)
    for path in sorted(results.glob("deploy_noise*.json")):
        add(deploy, _noise_table(json.loads(path.read_text())), (path.stem,))
    for path in sorted(results.glob("openvino_profile*.json")):
        data = json.loads(path.read_text())
        add(deploy, _openvino_profile_table(data, _PROFILE_NOTES.get(path.stem, "")), (path.stem,), data)
    for path in sorted(results.glob("deploy_runtimes_*.json")):  # other presets (--deploy-methods --suffix)
        data = json.loads(path.read_text())
        methods = ", ".join(dict.fromkeys(r["method"] for r in data["rows"] if r["method"] not in ("fp32",)))
        add(
            deploy,
            _deploy_runtimes_table(data, f": {methods}{_DEPLOY_NOTES.get(path.stem, '')}"),
            (path.stem,),
            data,
        )
    for path in sorted(results.glob("speed_*.json")):
        add(speed, _speed_table(json.loads(path.read_text()), path.stem), (path.stem,))
    for path in sorted(results.glob("timing_*threads.json")):
        add(speed, _timing(path), (path.stem,))
    # calib-gains-timing writes calib_gains_timing<suffix>, and <suffix>_w<W>a<A> per --widths
    for name in sorted({p.stem for p in results.rglob("calib_gains_timing*.json")}):
        data = _load(results, name)
        if data:
            add(speed, _calib_gains_timing(data), (name,))
    for name, table in (("large_models", _large_models_table), ("distributed", _distributed_table),
                        ("families", _families_table)):  # fmt: skip
        data = _load(results, name)
        if data:
            add(scale, table(data), (name,))
    for path in sorted(results.glob("hf_deit_tiny*.json")):
        add(scale, _hf_deit_table(json.loads(path.read_text())), (path.stem,))
    data = _load(results, "data")
    if data:
        add("Data", _data_table(data), ("data",))
    add("Provenance", _provenance_table(results), tuple(sorted(p.stem for p in results.rglob("*.json"))))
    return out


def _by_topic(sections: list[Section], archived: bool) -> list[str]:
    """The current (or the archived) sections under one ``##`` heading per topic; an archived section
    says what superseded it."""
    lines: list[str] = []
    for topic in TOPICS:
        chosen = [s for s in sections if s.topic == topic and s.archived == archived]
        if chosen:
            lines += [f"## {topic}", ""]
        for section in chosen:
            lines += section.lines[:2]
            if archived:
                why = "; ".join(dict.fromkeys(ARCHIVED[n] for n in section.sources))
                lines += [f"Superseded by {why}.", ""]
            older = [OLDER_SUITES[n] for n in section.sources if n in OLDER_SUITES]
            if older and section.topic != "Provenance":
                lines += [f"Written by {'; '.join(older)}.", ""]
            lines += section.lines[2:]
    return lines


# --------------------------------------------------------------------------------------------------
# The summary: recommended recipes x widths per shared model
# --------------------------------------------------------------------------------------------------

SUMMARY_MODELS = ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")
SUMMARY_WIDTHS = ((8, 8), (4, 8), (4, 4), (3, 3))


@dataclass(frozen=True)
class SummaryRecipe:
    """A row group of the summary: the result files that measure it (glob patterns, preferred first)
    and the method names its rows carry at a given ``(w_bits, a_bits)``."""

    label: str
    sources: tuple[str, ...]
    methods: Callable[[int, int], tuple[str, ...]]
    preferred: Callable[[dict[str, Any], int, int], bool] = lambda row, w, a: True


def _dopq_softmax(w: int, a: int) -> str:
    return get_preset("dopq", w_bits=w, a_bits=a).softmax_quantizer


def _default_drop(row: dict[str, Any], w: int, a: int) -> bool:
    drop = ((row.get("recipe") or {}).get("reconstruct") or {}).get("drop_prob")
    return drop == ReconstructConfig().drop_prob_for(min(w, a))


SUMMARY_RECIPES = (
    SummaryRecipe("repq (RepQ-ViT baseline)", ("ablation_deit", "ablation_swin"), lambda w, a: ("repq",)),
    SummaryRecipe("dopq", ("ablation_deit", "ablation_swin"), lambda w, a: ("dopq",)),
    # the default recipe; its runs span three calibration seeds: the summary shows seed 0
    # (at W4/A8 and W4/A4 the rows that measured its GPTQ rules as recommended+gptq-d1 and
    # recommended+gptq-d1-check before they became the rules)
    SummaryRecipe("recommended (the default)", ("calib_gains_deit_w44_gptq_check", "calib_gains_swin_w44_gptq_check",
                                                "calib_gains_deit_gptq_d1", "calib_gains_swin_gptq_d1",
                                                "calib_gains_deit_preset", "calib_gains_swin_preset",
                                                "calib_gains_deit_vc_preset", "calib_gains_swin_vc_preset"),
                  lambda w, a: ("recommended", "recommended+gptq-d1", "recommended+gptq-d1-check"),
                  lambda row, w, a: row.get("seed", 0) == 0),
    # GPTQ's default target: half way to the float model's output at 3 bits and below (docs/gptq.md)
    SummaryRecipe("dopq + GPTQ", ("calib_gains_deit*", "calib_gains_swin*"),
                  lambda w, a: ("dopq+gptq-float-half",) if w <= 3 else ("dopq+gptq",)),
    SummaryRecipe("dopq + GPTQ + auto post-Softmax", ("calib_gains_deit*", "calib_gains_swin*"),
                  lambda w, a: ("dopq+gptq-float-half+auto",) if w <= 3 else ("dopq+gptq+auto",)),
    # the CPU recipe the reconstruction notes recommend first: no QDrop, twice the iterations
    SummaryRecipe("dopq + reconstruction, CPU", ("recon_cpu_deit_noqdrop_120", "recon_cpu_deit"),
                  lambda w, a: ("dopq+recon",)),
    SummaryRecipe("dopq + reconstruction, GPU", ("recon_gpu_*",), lambda w, a: ("dopq+recon",), _default_drop),
)  # fmt: skip


def _deploy_methods(recipe: SummaryRecipe, w: int, a: int) -> tuple[str, ...]:
    """Deployed rows of a recipe: its own method names; for dopq also the variant named after the
    post-Softmax quantizer the preset uses at that width."""
    methods = recipe.methods(w, a)
    return (*methods, "dopq+uniform-softmax") if methods == ("dopq",) else methods


def deploy_measures(row: dict[str, Any]) -> dict[str, Any] | None:
    """What the summary reads from a deployed row (a ``deploy*.json`` row with ``method``, ``w_bits``,
    ``a_bits``): the runtime (``runtime``, else onnxruntime), top-1, throughput, latency and size
    against FP32. None for rows that are not a deployed model (comparisons, sensitivity rows)."""
    if "method" not in row or row.get("throughput_ratio") is None:
        return None
    return {
        "runtime": row.get("runtime", "onnxruntime"),
        "top1": row.get("runtime_top1", row.get("onnx_top1", row.get("top1"))),
        "throughput": row["throughput_ratio"],
        "latency": row.get("latency_ratio"),
        "size": row.get("size_ratio"),
    }


def _summary_row_matches(recipe: SummaryRecipe, row: dict[str, Any], model: str, w: int, a: int) -> bool:
    if (row.get("model"), row.get("w_bits"), row.get("a_bits")) != (model, w, a):
        return False
    return row.get("method") in recipe.methods(w, a)


def _find(recipe: SummaryRecipe, sections: list[Section], model: str, w: int, a: int) -> tuple[Section, dict[str, Any], dict[str, Any]] | None:  # fmt: skip
    """The row measuring ``recipe`` at ``(w, a)``: from the first source pattern that has one,
    rows the recipe prefers first."""
    for pattern in recipe.sources:
        hits = [(s, d, r) for s in sections for d, r in s.rows
                if any(fnmatch.fnmatch(n, pattern) for n in s.sources) and _summary_row_matches(recipe, r, model, w, a)]  # fmt: skip
        if hits:
            return next((h for h in hits if recipe.preferred(h[2], w, a)), hits[0])
    return None


def _deployed(recipe: SummaryRecipe, results: Path, sections: list[Section], model: str, w: int, a: int) -> list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:  # fmt: skip
    """Every deployed row of ``recipe`` at ``(w, a)`` in any ``deploy*.json``, with the anchor of the
    section that renders its file (the Deployment topic where none does yet)."""
    methods = _deploy_methods(recipe, w, a)
    found = []
    for path in sorted(results.rglob("deploy*.json")):
        if path.stem in ARCHIVED:
            continue
        section = next((s for s in sections if path.stem in s.sources and not s.archived), None)
        link = anchor(section.title) if section else anchor("Deployment")
        data = json.loads(path.read_text())
        for row in data.get("rows", []):
            measures = deploy_measures(row)
            if measures is None or (row.get("model"), row.get("w_bits"), row.get("a_bits")) != (model, w, a):
                continue
            if row["method"] not in methods:
                continue
            softmax = (row.get("recipe") or {}).get("softmax_quantizer")
            if "dopq" in methods and softmax not in (None, _dopq_softmax(w, a)):
                continue  # another post-Softmax quantizer than the preset's at this width
            if (row.get("recipe") or {}).get("integer_attention") or row.get("integer_attention"):
                continue
            found.append((link, data, row, measures))
    # rows exported before TanQ's threshold grid (codes counted, recipes without the field) give
    # way to rows of the current form where there are any
    current = [f for f in found if "softmax_grid_bits" in (f[2].get("recipe") or {})]
    return current or found


def _link(text: str, target: str) -> str:
    return f"[{text}](#{target})"


def _where(data: dict[str, Any]) -> str:
    device = data.get("device_name") or ""
    if (data.get("settings") or {}).get("device", "cpu").startswith("cuda"):
        return device or "GPU"
    threads = data.get("threads")
    return f"{threads} thread{'s' if threads != 1 else ''}" if threads else "CPU"


def _calibration_cell(data: dict[str, Any], row: dict[str, Any]) -> str:
    seconds = row.get("calib_seconds")
    if seconds is None:
        return "—"
    if "seed" in row:  # a run over calibration seeds: the median (one seed's time can catch a loaded machine)
        key = ("model", "method", "w_bits", "a_bits")
        seconds = statistics.median(
            r["calib_seconds"]
            for r in data.get("rows", [])
            if r.get("calib_seconds") is not None and all(r.get(k) == row.get(k) for k in key)
        )
    recon = (row.get("reconstruction") or {}).get("seconds")
    extra = f" + {recon:.0f} s reconstruction" if recon else ""
    return f"{seconds:.1f} s{extra} ({_where(data)})"


def _deployed_cell(deployed: list[tuple[str, Any, Any, dict[str, Any]]], text: Callable[[dict[str, Any]], str]) -> str:  # fmt: skip
    """One linked value per deployed row; rows of another runtime than onnxruntime name it."""
    cells = [_link(text(m), link) + ("" if m["runtime"] == "onnxruntime" else f" ({m['runtime']})")
             for link, _, _, m in deployed]  # fmt: skip
    return "; ".join(cells) or "—"


def _speed_text(m: dict[str, Any]) -> str:
    return f"{m['throughput']:.2f}" + (f" / {m['latency']:.2f}" if m["latency"] is not None else "")


def _summary_cells(recipe: SummaryRecipe, results: Path, sections: list[Section], model: str, w: int, a: int, repq: Any) -> list[str] | None:  # fmt: skip
    """The cells of one summary row, or None where nothing measured the recipe at this width."""
    hit = _find(recipe, sections, model, w, a)
    deployed = _deployed(recipe, results, sections, model, w, a)
    if hit is None and not deployed:
        return None
    sim = pair = calib = "—"
    if hit is not None:
        section, data, row = hit
        target = anchor(section.title)
        sim = _link(_pct(row["quant_top1"], _decimals([row])), target)
        calib = _link(_calibration_cell(data, row), target)
        if repq is not None and repq[2] is not row:
            pair = _paired_cell({"x": row.get("quant_top1_correct"), "y": repq[2].get("quant_top1_correct")}, "x", "y") or "—"  # fmt: skip
    else:  # only deployed: the deployment run's own simulation and calibration
        link, data, row, _ = deployed[0]
        if row.get("sim_top1") is not None:
            sim = _link(_pct(row["sim_top1"]), link)
        if row.get("calib_seconds") is not None:
            calib = _link(_calibration_cell(data, row), link)
    measured = [d for d in deployed if d[3]["top1"] is not None]  # timing-only runs have no top-1
    top1 = _deployed_cell(measured, lambda m: _pct(m["top1"]))
    speed = _deployed_cell(deployed, _speed_text)
    size = _deployed_cell(deployed, lambda m: "—" if m["size"] is None else f"{m['size']:.2f}")
    return [recipe.label, f"W{w}/A{a}", sim, pair, top1, speed, size, calib]


def _summary_table(results: Path, sections: list[Section], model: str) -> list[str]:
    repq = {wa: _find(SUMMARY_RECIPES[0], sections, model, *wa) for wa in SUMMARY_WIDTHS}
    fp = next((hit[2].get("fp_top1") for hit in repq.values() if hit is not None), None)
    lines = []
    for recipe in SUMMARY_RECIPES:
        for w, a in SUMMARY_WIDTHS:
            cells = _summary_cells(recipe, results, sections, model, w, a, repq[(w, a)])
            if cells is not None:
                lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return []
    fp_text = f" FP32 top-1 {_pct(fp)} %." if fp is not None else ""
    return [f"### Summary: {_short(model)} ({model})", "",
            f"Recommended recipes at each width.{fp_text} Each cell links to the section that holds its command "
            "and result file; — : not measured. Simulated and deployed columns can come from different runs "
            "(the deployment section also shows each export's own simulation). GPTQ at 3 bits aims half way "
            "to the float model's output (its default there), above 3 bits at its quantized target; auto: the "
            "per-module post-Softmax choice. Reconstruction: the CPU run with the most iterations and no QDrop, "
            "the GPU run at the defaults where there is one. Speed and size: the deployed model against the "
            "FP32 ONNX export (above 1: faster).", "",
            "| recipe | bits | simulated top-1 % | vs repq: fixed / broken (p) | onnxruntime top-1 % | "
            "speed x FP32 (batch 32 / batch 1) | size x FP32 | calibration |",
            "|---|---|---|---|---|---|---|---|", *lines, ""]  # fmt: skip


def _summary(results: Path, sections: list[Section]) -> list[str]:
    current = [s for s in sections if not s.archived]
    tables = [line for model in SUMMARY_MODELS for line in _summary_table(results, current, model)]
    return ["## Summary", "", *tables] if tables else []


# --------------------------------------------------------------------------------------------------
# Writing the two documents
# --------------------------------------------------------------------------------------------------

SUMMARY_BEGIN, SUMMARY_END = "<!-- BEGIN GENERATED SUMMARY -->", "<!-- END GENERATED SUMMARY -->"
_ARCHIVE_HEAD = (
    "# Archived results\n\nSections of [RESULTS.md](RESULTS.md) that later measurements superseded, "
    "each naming what superseded it; the tables between the GENERATED markers are written by "
    "`python benchmarks/run.py render` from `benchmarks/results/*.json`, as in RESULTS.md.\n\n"
)


def headings(text: str) -> list[str]:
    """The Markdown headings of a document, outside code blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def _replace(text: str, begin: str, end: str, lines: list[str]) -> str:
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + tail


def _check_unique(text: str, path: Path) -> None:
    seen: set[str] = set()
    for title in headings(text):
        if anchor(title) in seen:
            raise ValueError(f"{path.name}: two headings give the anchor #{anchor(title)} ({title!r})")
        seen.add(anchor(title))


def _check_rendered(results: Path, sections: list[Section]) -> None:
    """Every result file has a table: one that none reads would sit in the provenance table alone,
    its numbers in no table (``deploy*.json`` rows also reach the summary without a section)."""
    shown = {name for s in sections if s.topic != "Provenance" for name in s.sources}
    missing = sorted(
        p.relative_to(results).as_posix()
        for p in results.rglob("*.json")
        if p.stem not in shown and not p.stem.startswith("deploy")
    )
    if missing:
        raise ValueError(
            f"no table renders {', '.join(missing)}: name the file as its suite does (benchmarks/run.py) "
            "or give it a table in benchmarks/render.py"
        )


def render(results: Path, target: Path, archive: Path | None = None) -> None:
    """Write the generated parts of ``target`` (RESULTS.md: the summary, then the current sections by
    topic) and of ``archive`` (default: ``results-archive.md`` beside it: the superseded sections).

    Raises:
        ValueError: two headings of one document would have the same anchor, or a result file
            has no table.
    """
    archive = archive or target.with_name("results-archive.md")
    sections = _sections(results)
    _check_rendered(results, sections)
    text = target.read_text() if target.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if SUMMARY_BEGIN not in text:
        text = text.replace(BEGIN, f"{SUMMARY_BEGIN}\n{SUMMARY_END}\n\n{BEGIN}", 1)
    text = _replace(text, SUMMARY_BEGIN, SUMMARY_END, _summary(results, sections))
    text = _replace(text, BEGIN, END, _by_topic(sections, archived=False))
    old = archive.read_text() if archive.is_file() else f"{_ARCHIVE_HEAD}{BEGIN}\n{END}\n"
    archived = _replace(old, BEGIN, END, _by_topic(sections, archived=True))
    for path, content in ((target, text), (archive, archived)):
        _check_unique(content, path)
    target.write_text(text)
    archive.write_text(archived)


# `python benchmarks/render.py` imported this module and exited 0 without rendering: it renders as
# `python benchmarks/run.py render` does
if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run

    run.main(["render"])
