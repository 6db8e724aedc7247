"""Result formatting: the CLI's short table, JSON and Markdown files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dopq.files import atomic_path

__all__ = ["TIMING_FIELDS", "markdown_report", "result_table", "without_timings", "write_result"]

TIMING_FIELDS = frozenset(
    {
        "calib_seconds",
        "eval_images_per_second",
        "fp_eval_images_per_second",
        "timings",
        "seconds",
        "cache_seconds",
    }
)
"""Result fields that measure time; on the CPU everything else repeats exactly with the same arguments."""


def without_timings(result: Any) -> Any:
    """``result`` with the :data:`TIMING_FIELDS` removed at every level (to compare two runs)."""
    if isinstance(result, dict):
        return {k: without_timings(v) for k, v in result.items() if k not in TIMING_FIELDS}
    if isinstance(result, list):
        return [without_timings(v) for v in result]
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def result_table(result: dict[str, Any]) -> str:
    """A few aligned lines: FP vs quantized accuracy and the stage timings."""
    label = f"{result.get('method', 'quantized')} W{result['w_bits']}/A{result['a_bits']}"
    if result.get("eval_dtype") == "float64":
        label += " (float64)"
    if result.get("runtime"):
        label += f" on {result['runtime']}"
    fp = (
        "fp32",
        _pct(result.get("fp_top1")),
        _pct(result.get("fp_top5")),
        _rate(result.get("fp_eval_images_per_second")),
    )
    rows = [
        ("", "top-1", "top-5", "images/s"),
        *([fp] if result.get("fp_top1") is not None else []),  # dopq evaluate runs no float model
        (
            label,
            _pct(result["quant_top1"]),
            _pct(result["quant_top5"]),
            _rate(result.get("eval_images_per_second")),
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.get("timings", {}).items())
    summary = f"{result['model']} on {result['eval_images']} images"
    if result.get("calib_seconds") is not None:
        summary += f"; calib_seconds {result['calib_seconds']:.2f}"
    lines.append(summary)
    lines += _comparison_lines(result)
    if timings:
        lines.append(f"timings: {timings}")
    if result.get("coverage_summary"):
        lines.append(f"quantized: {result['coverage_summary']}")
        left = [name for names in result["coverage"]["left_float"].values() for name in names]
        if left:
            lines.append(f"left float (--allow-partial): {', '.join(left)}")
    return "\n".join(lines)


def _comparison_lines(result: dict[str, Any]) -> list[str]:
    """``dopq evaluate --onnx --quantized``: how the graph agrees with the simulation."""
    c = result.get("comparison")
    if not c:
        return []
    return [
        f"against the {c['simulation_dtype']} simulation of {c['quantized_path']}: identical top-1 on "
        f"{100 * c['identical_top1']:.2f}% of {c['images']} images, max logit difference {c['max_logit_diff']:.3g}"
    ]


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _runtime_lines(result: dict[str, Any]) -> list[str]:
    """The runtime an exported model ran on (``dopq evaluate --onnx``), with its threads."""
    if not result.get("runtime"):
        return []
    threads = result.get("threads")
    return [
        f"Runtime: {result['runtime']} ({_count(threads, 'thread') if threads else 'its default threads'})",
        "",
    ]


def _code(text: str) -> str:
    """``text`` as a Markdown code span that shows it as it is: a command or folder may hold
    backticks (shell-quoted, in a path), which would end a span in single backticks. CommonMark:
    the fence is a run of backticks that the text does not hold, and one space pads a text that
    starts or ends with a backtick (the renderer strips it)."""
    runs = {len(run) for run in re.findall(r"`+", text)}
    fence = "`" * next(n for n in range(1, len(runs) + 2) if n not in runs)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _in_folder(result: dict[str, Any]) -> str:
    folder = result.get("working_directory")
    return f" (in {_code(folder)})" if folder else ""


def _origin_lines(result: dict[str, Any]) -> list[str]:
    """``dopq evaluate``: the commands that made the evaluated file, as its metadata recorded them,
    so that the report leads back to the quantization it measures. (Not their folders: a saved
    file holding one would differ by folder, where the same arguments write the same bytes.)"""
    meta = result.get("onnx_metadata") or {}
    exported = meta.get("export_command")
    recorded = [
        ("Quantized by", result.get("recorded_command") or meta.get("command")),
        ("Exported by", exported if exported != meta.get("command") else None),  # not quantize --export's
    ]
    return [part for what, command in recorded if command for part in (f"{what}: {_code(command)}", "")]


def _count(n: int, noun: str) -> str:
    """``1 torch thread``, ``2 torch threads``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _setting_lines(result: dict[str, Any]) -> list[str]:
    """What the result depends on beyond the command: torch's threads (without ``--threads``, the
    machine's default), the device, the software and commit, and which weights."""
    parts = []
    if result.get("threads") and not result.get("runtime"):  # a runtime's threads: its own line
        parts.append(_count(result["threads"], "torch thread"))
    group = result.get("distributed") or {}
    if group.get("world_size", 1) > 1:  # the command is dopq's own: say what started it
        parts.append(
            f"in {group['world_size']} processes"
            + (f" ({group['launcher']})" if group.get("launcher") else "")
        )
    device = result.get("device_name") or (result.get("cpu") or {}).get("model")
    if device:
        parts.append(f"on {device}")
    versions = result.get("versions") or {}
    names = ("dopq", "torch", "timm", result.get("runtime"))
    software = ", ".join(f"{name} {versions[name]}" for name in names if name and versions.get(name))
    git = result.get("git")
    if git:
        software += f"; git {git['commit'][:12]}" + (" with uncommitted changes" if git.get("dirty") else "")
    weights = result.get("checkpoint_sha256")
    named = f" ({result['pretrained_weights']})" if result.get("pretrained_weights") else ""
    text = "; ".join(
        p for p in (" ".join(parts), software, weights and f"weights{named} SHA-256 {weights}") if p
    )
    return [f"Run with: {text}.", ""] if text else []


def markdown_report(result: dict[str, Any]) -> str:
    """The result as a Markdown section with the exact command that produced it."""
    lines = [
        f"## {result['model']}: {result.get('method')} W{result['w_bits']}/A{result['a_bits']}",
        "",
        f"Command: {_code(result.get('command', ''))}" + _in_folder(result),
        "",
        *_setting_lines(result),
        *_origin_lines(result),
        *_runtime_lines(result),
        "| | top-1 | top-5 |",
        "|---|---|---|",
        *(
            [f"| FP32 | {_pct(result['fp_top1'])} | {_pct(result.get('fp_top5'))} |"]
            if result.get("fp_top1") is not None
            else []
        ),
        f"| quantized | {_pct(result['quant_top1'])} | {_pct(result['quant_top5'])} |",
        "",
        *[f"{line[0].upper()}{line[1:]}.\n" for line in _comparison_lines(result)],
        f"Evaluated on {result['eval_images']} images"
        + ("." if result.get("calib_seconds") is None else f"; calibration {result['calib_seconds']:.2f} s."),
        "",
    ]
    if result.get("timings"):
        lines += ["Stage timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items()), ""]
    return "\n".join(lines)


def markdown_path(path: str | Path) -> Path:
    """Where :func:`write_result` writes the Markdown twin of the JSON ``path``: its stem with ``.md``."""
    return Path(path).with_suffix(".md")


def write_result(result: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """Write ``path`` (JSON) and its Markdown twin (:func:`markdown_path`), each atomically."""
    path, md = Path(path), markdown_path(path)
    for target, text in (
        (path, json.dumps(result, indent=2, default=str) + "\n"),
        (md, markdown_report(result)),
    ):
        with atomic_path(target) as tmp:
            # UTF-8 whatever the locale: a non-ASCII path in the command stopped the run at its end
            # under cp1252 or an ASCII locale; surrogateescape writes back the bytes of a path
            # Python could not decode there
            tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    return path, md
