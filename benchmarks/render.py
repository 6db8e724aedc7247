"""Render the measured tables of docs/RESULTS.md from benchmarks/results/*.json."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def _pct(x: float | None, decimals: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{decimals}f}"


def _decimals(rows: list[dict[str, Any]]) -> int:
    """Two decimals where one image is under 0.05 points (5000 images and more), else one."""
    return 2 if min((r.get("eval_images") or 0) for r in rows) >= 5000 else 1


def _load(results: Path, name: str) -> dict[str, Any] | None:
    """Rows of ``name.json`` in the results folder and its subfolders (runs split across processes)."""
    parts = [json.loads(p.read_text()) for p in sorted(results.rglob(f"{name}.json"))]
    if not parts:
        return None
    merged = dict(parts[0])
    merged["rows"] = [row for part in parts for row in part.get("rows", [])]
    merged["command"] = "`; `".join(dict.fromkeys(part["command"] for part in parts))
    return merged


def sign_test_p(gained: int, lost: int) -> float:
    """Two-sided exact sign (McNemar) test of ``gained`` vs ``lost`` discordant images."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _paired_rows(sub: list[dict[str, Any]], bits: list[int], methods: list[str], base: str) -> list[str]:
    """Per method and bit setting: images it gets right that ``base`` gets wrong, and the reverse."""
    lines = []
    for m in methods:
        cells = []
        for b in bits:
            ref = [r for r in sub if r["method"] == base and r["w_bits"] == b and r.get("quant_top1_correct")]
            hit = [r for r in sub if r["method"] == m and r["w_bits"] == b and r.get("quant_top1_correct")]
            if not ref or not hit or len(ref[0]["quant_top1_correct"]) != len(hit[0]["quant_top1_correct"]):
                cells.append("")
                continue
            pairs = list(zip(hit[0]["quant_top1_correct"], ref[0]["quant_top1_correct"], strict=True))
            gained, lost = pairs.count(("1", "0")), pairs.count(("0", "1"))
            cells.append(f"+{gained} / -{lost} (p={sign_test_p(gained, lost):.2g})")
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


def _timing(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("timing_*threads.json")):
        d = json.loads(path.read_text())
        lines += [f"- {path.stem}: repq median {d['repq']['median']:.2f} s, dopq median {d['dopq']['median']:.2f} s "
                  f"(dopq/repq = {d['dopq_over_repq']:.2f}); runs {d['repq']['calib_seconds']} / {d['dopq']['calib_seconds']}; "
                  f"command `{d['command']}`"]  # fmt: skip
    return ["### Calibration time (DeiT-Tiny, 32 images, W4/A4)", "", *lines, ""] if lines else []


def _gap_closed(rows: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """Share of the calibration-only gap to FP that reconstruction closed, e.g. ``closes 2.5 of 4.9 points (51 %)``."""
    base = next((r for r in rows if r["method"] == "dopq" and r["w_bits"] == row["w_bits"]), None)
    if base is None:
        return ""
    gap, gain = 100 * (row["fp_top1"] - base["quant_top1"]), 100 * (row["quant_top1"] - base["quant_top1"])
    # under a point of gap the share is noise (a few images either way)
    return f", closes {gain:.1f} of {gap:.1f} points to FP ({100 * gain / gap:.0f} %)" if gap >= 1 else ""


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
             "| file | git commit | uncommitted changes | torch threads | dopq | torch | timm | onnxruntime | device |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in sorted(results.rglob("*.json")):
        d = json.loads(path.read_text())
        git, versions = d.get("git") or {}, d.get("versions") or {}
        dirty = {True: "yes", False: "no"}.get(git.get("dirty"), "-")
        cells = [git.get("commit", "-")[:10], dirty, str(d.get("threads", "-")),
                 *(versions.get(k) or "-" for k in ("dopq", "torch", "timm", "onnxruntime")), d.get("device_name") or "-"]  # fmt: skip
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
    lines = [f"### Speed on the {where} (simulated quantization, `{name}.json`)", "",
             f"Command: `{data['command']}` ({data['device_name']}, {data['threads']} threads). Images/s of the "
             f"model alone over {rows[0]['images']} strided test images held in memory, batch {rows[0]['batch']}, "
             f"median of {settings['repeats']} passes after a warm-up pass; calibration wall time at W4/A4 on "
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


def _paired_cell(row: dict[str, Any], a: str, b: str) -> str:
    x, y = row.get(a), row.get(b)
    if not x or not y or len(x) != len(y):
        return ""
    pairs = list(zip(x, y, strict=True))
    gained, lost = pairs.count(("1", "0")), pairs.count(("0", "1"))
    return f"+{gained} / -{lost} (p={sign_test_p(gained, lost):.2g})"


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
             "max logit diff | sim32 vs sim64 identical % | threads: identical % (images) | float64 images/s (b32) | "
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
    bits = sorted({r["w_bits"] for r in rows})
    lines = [f"### Calibration-time gains: {model}{note}", "",
             f"Command: `{data['command']}` ({data['threads']} torch threads). FP32 top-1 {_pct(rows[0]['fp_top1'])}%. "
             "Cells: top-1 %, images fixed / broken against dopq (sign-test p), calibration s.", "",
             "| recipe | " + " | ".join(f"W{b}/A{b}" for b in bits) + " |", "|---" * (len(bits) + 1) + "|"]  # fmt: skip
    kinds = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in bits:
            r = next((r for r in rows if r["method"] == method and r["w_bits"] == b), None)
            if r is None:
                cells.append("")
                continue
            pair = r.get("paired_with_dopq")
            test = f", +{pair['gained']} / -{pair['lost']} (p={pair['p']:.2g})" if pair else ""
            cells.append(f"{_pct(r['quant_top1'])}{test}, {r['calib_seconds']:.1f} s")
            chosen = list(r.get("softmax_kinds", {}).values())
            if "auto" in method and chosen:
                counts = ", ".join(f"{k} {chosen.count(k)}" for k in dict.fromkeys(chosen))
                kinds.append(f"- {method} W{b}/A{b}: post-Softmax {counts}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, "", *kinds, ""]


def _calib_gains_timing(data: dict[str, Any]) -> list[str]:
    lines = [f"- {label}: calibration {', '.join(f'{t:.1f}' for t in r['calib_seconds'])} s, median "
             f"{r['median']:.1f} s, {r['over_dopq']:.2f}x dopq" for label, r in data["recipes"].items()]  # fmt: skip
    head = [f"### Calibration time with GPTQ / auto ({data['model']}, W{data['bits']}/A{data['bits']})", "",
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


def render(results: Path, target: Path) -> None:
    parts: list[str] = []
    extra = sorted({p.stem for p in results.rglob("ablation_*_*.json")})  # other protocols, e.g. _eval5000
    for name, title in (("foundation", "RepQ-ViT baseline"), ("ablation_deit", "Ablation, DeiT-Tiny (calibration only)"),
                        ("ablation_swin", "Ablation, Swin-Tiny (calibration only)"),
                        *((n, _protocol_title(n)) for n in extra),
                        ("stress", "Outlier-stressed DeiT-Tiny (4 channels per LayerNorm x10-40)")):  # fmt: skip
        data = _load(results, name)
        if data:
            parts += _accuracy_table(data, title)
    data = _load(results, "softmax_error")
    if data:
        parts += _softmax_table(data)
    data = _load(results, "tanq_grid")
    if data:
        parts += _tanq_grid_table(data)
    parts += _timing(results)
    for name in ("calib_gains_deit", "calib_gains_stress", "calib_gains_swin", "calib_gains_deit_actwide",
                 "calib_gains_stress_actwide", "calib_gains_deit_actwide_w46", "calib_gains_stress_actwide_w46",
                 "calib_gains_swin_w4", "calib_gains_swin_w6", "calib_gains_swin_actwide",
                 "calib_gains_deit_asym", "calib_gains_stress_asym", "calib_gains_deit_asym_w46",
                 "calib_gains_swin_asym", "calib_gains_deit_half", "calib_gains_stress_half",
                 "calib_gains_swin_half", "calib_gains_deit_half_w4"):  # fmt: skip
        data = _load(results, name)
        if data:
            note = ", tighter activation clips" if "_actwide" in name else ""
            note = ", GPTQ's float target" if "_asym" in name else note
            note = ", GPTQ's float target half way" if "_half" in name else note
            parts += _calib_gains_table(data, note)
    for name in ("calib_gains_timing", "calib_gains_timing_float"):
        data = _load(results, name)
        if data:
            parts += _calib_gains_timing(data)
    for name, table in (("deploy", _deploy_table), ("deploy_sensitivity", _sensitivity_table),
                        ("deploy_float64", _float64_table), ("save_size", _save_size_table), ("families", _families_table),
                        ("data", _data_table)):  # fmt: skip
        data = _load(results, name)
        if data:
            parts += table(data)
    for path in sorted(results.glob("recon_*.json")):
        if path.stem == "recon_unit":
            parts += _recon_unit_table(json.loads(path.read_text()))
        elif not path.stem.startswith("recon_gpu_"):  # one GPU table below
            parts += _recon(json.loads(path.read_text()), f"Reconstruction ({path.stem})")
    for name, table in (("large_models", _large_models_table), ("distributed", _distributed_table)):
        data = _load(results, name)
        if data:
            parts += table(data)
    parts += _resume_table(results)
    parts += _recon_runs_paired(results)
    parts += _gpu_recon_table(results)
    for path in sorted(results.glob("speed_*.json")):
        parts += _speed_table(json.loads(path.read_text()), path.stem)
    parts += _provenance_table(results)
    text = target.read_text() if target.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    target.write_text(head + BEGIN + "\n" + "\n".join(parts) + "\n" + END + tail)
