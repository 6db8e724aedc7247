"""Tests of the Markdown twin of a result (:func:`dopq.report.markdown_report`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dopq.report import markdown_report

RESULT = {"model": "test_vit", "method": "dopq", "w_bits": 4, "a_bits": 4, "quant_top1": 0.5, "quant_top5": 1.0,
          "eval_images": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("command", "folder"),
    [
        ("dopq quantize --data data", "/work/runs"),
        ("dopq quantize --data 'a `b` c'", "/work/it's `here`"),
        ("dopq quantize --data 'x``y'", "`/start"),
    ],
)
def test_commands_and_folders_with_backticks_are_one_code_span_each(command: str, folder: str) -> None:
    """A command (shell-quoted) or folder with a backtick ended the report's `...` span early and
    showed a mangled command."""
    markdown_it = pytest.importorskip("markdown_it")
    report = markdown_report({**RESULT, "command": command, "working_directory": folder})
    line = next(line for line in report.splitlines() if line.startswith("Command:"))
    (inline,) = [t for t in markdown_it.MarkdownIt().parse(line) if t.type == "inline"]
    assert [t.content for t in inline.children if t.type == "code_inline"] == [command, folder]


def test_the_report_names_what_the_command_does_not_say() -> None:
    """The Markdown twin had the command alone: a run without ``--threads`` (torch's default, the
    machine's core count), another torch or other weights under the same path gave another result
    from the same printed command, with nothing in the report to tell them apart."""
    result = {**RESULT, "command": "dopq quantize", "threads": 4, "device_name": "Some CPU",
              "versions": {"dopq": "0.1.0", "torch": "2.14.1", "timm": "1.0.31", "onnxruntime": None},
              "git": {"commit": "0123456789abcdef" * 2, "dirty": True}, "checkpoint_sha256": "ab" * 32}  # fmt: skip
    assert (
        "Run with: 4 torch threads on Some CPU; dopq 0.1.0, torch 2.14.1, timm 1.0.31; git 0123456789ab "
        f"with uncommitted changes; weights SHA-256 {'ab' * 32}.\n"
    ) in markdown_report(result)
    assert "Run with: 1 torch thread on Some CPU;" in markdown_report(
        {**result, "threads": 1}
    )  # not "1 threads"
    onnx = {**result, "runtime": "onnxruntime", "versions": {**result["versions"], "onnxruntime": "1.32.0"}}
    assert (
        "Run with: on Some CPU; dopq 0.1.0, torch 2.14.1, timm 1.0.31, onnxruntime 1.32.0;"
        in markdown_report(onnx)
    )


def test_reports_are_utf8_in_any_locale(tmp_path: Path) -> None:
    """The Markdown was written in the locale's encoding: under an ASCII locale (or Windows' cp1252)
    a command with a non-ASCII path ended a finished run with a UnicodeEncodeError traceback."""
    code = (
        "import sys; from dopq.report import write_result; "
        "write_result({**eval(sys.argv[1]), 'command': 'dopq quantize --data caf\\u00e9'}, sys.argv[2])"
    )
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C"}
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-c", code, repr(RESULT), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dopq quantize --data caf\u00e9" in out.with_suffix(".md").read_text(encoding="utf-8")


def test_an_evaluation_without_a_float_model_has_no_float_row() -> None:
    """``dopq evaluate`` runs no float model: its table and Markdown showed an FP32 row of dashes."""
    from dopq.report import result_table

    evaluated = {**RESULT, "method": "saved"}
    assert "FP32" not in markdown_report(evaluated) and "fp32" not in result_table(evaluated)
    quantized = {**RESULT, "fp_top1": 0.75, "fp_top5": 1.0}
    assert "| FP32 | 75.00% | 100.00% |" in markdown_report(quantized)
    assert result_table(quantized).splitlines()[1].startswith("fp32  ")
