"""Tests of the Markdown twin of a result (:func:`dopq.report.markdown_report`)."""

from __future__ import annotations

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
