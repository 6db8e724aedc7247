"""Render the measured tables of docs/RESULTS.md from benchmarks/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _load(results: Path, name: str) -> dict[str, Any] | None:
    """Rows of ``name.json`` in the results folder and its subfolders (runs split across processes)."""
    parts = [json.loads(p.read_text()) for p in sorted(results.rglob(f"{name}.json"))]
    if not parts:
        return None
    merged = dict(parts[0])
    merged["rows"] = [row for part in parts for row in part.get("rows", [])]
    merged["command"] = "`; `".join(dict.fromkeys(part["command"] for part in parts))
    return merged


def _accuracy_table(data: dict[str, Any], title: str) -> list[str]:
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"### {title}", "", f"Command: `{data['command']}` ({data['threads']} torch threads)", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        bits = sorted({r["w_bits"] for r in sub})
        fp = sub[0]["fp_top1"]
        lines += [
            f"**{model}** (FP32 top-1 {_pct(fp)}%)",
            "",
            "| method | " + " | ".join(f"W{b}/A{b}" for b in bits) + " |",
        ]
        lines.append("|---" * (len(bits) + 1) + "|")
        for m in methods:
            cells = []
            for b in bits:
                hit = [r for r in sub if r["method"] == m and r["w_bits"] == b]
                cells.append(_pct(hit[0]["quant_top1"]) if hit else "")
            if any(cells):
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
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


def _timing(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("timing_*threads.json")):
        d = json.loads(path.read_text())
        lines += [f"- {path.stem}: repq median {d['repq']['median']:.2f} s, dopq median {d['dopq']['median']:.2f} s "
                  f"(dopq/repq = {d['dopq_over_repq']:.2f}); runs {d['repq']['calib_seconds']} / {d['dopq']['calib_seconds']}; "
                  f"command `{d['command']}`"]  # fmt: skip
    return ["### Calibration time (DeiT-Tiny, 32 images, W4/A4)", "", *lines, ""] if lines else []


def _recon(data: dict[str, Any], title: str) -> list[str]:
    lines = _accuracy_table(data, title)
    for r in data["rows"]:
        rec = r.get("reconstruction")
        if rec:
            lines.append(
                f"- {r['model']} W{r['w_bits']}/A{r['a_bits']}: {rec['images']} images, {rec['iters_per_unit']} iters/unit, "
                f"batch {rec['batch_size']}, reconstruction {rec['seconds']:.0f} s"
            )
    return [*lines, ""]


def render(results: Path, target: Path) -> None:
    parts: list[str] = []
    for name, title in (("foundation", "RepQ-ViT baseline"), ("ablation_deit", "Ablation, DeiT-Tiny (calibration only)"),
                        ("ablation_swin", "Ablation, Swin-Tiny (calibration only)"),
                        ("stress", "Outlier-stressed DeiT-Tiny (4 channels per LayerNorm x10-40)")):  # fmt: skip
        data = _load(results, name)
        if data:
            parts += _accuracy_table(data, title)
    data = _load(results, "softmax_error")
    if data:
        parts += _softmax_table(data)
    parts += _timing(results)
    for path in sorted(results.glob("recon_*.json")):
        parts += _recon(json.loads(path.read_text()), f"Reconstruction ({path.stem})")
    text = target.read_text() if target.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    target.write_text(head + BEGIN + "\n" + "\n".join(parts) + "\n" + END + tail)
