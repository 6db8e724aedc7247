"""Tests of the ``dopq`` command: one-line errors with exit code 2, and an end-to-end run on DeiT-Tiny.

Every user error must end in exactly one ``dopq: error: ...`` line on stderr (no traceback) and exit
code 2; the end-to-end run quantizes the shared CIFAR-10 DeiT-Tiny at W8/A8 and reloads the result.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dopq
from dopq.cli import _settings_from, build_parser, main
from dopq.config import get_preset
from dopq.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEIT = SHARED / "models" / "deit_tiny_patch16_224.cifar10.safetensors"
CIFAR = SHARED / "data" / "cifar10-jpeg.tar.gz"
DOPQ = Path(sys.executable).parent / "dopq"
SMALL_RUN = ("--calib-size", "2", "--eval-subset", "2", "--quiet")

needs_deit = pytest.mark.skipif(not DEIT.is_file(), reason=f"shared checkpoint {DEIT} is not present")
needs_cifar = pytest.mark.skipif(
    not (DEIT.is_file() and CIFAR.is_file()), reason=f"shared files under {SHARED} are not present"
)


def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ImageFolder trees: ``good`` (train and test), ``empty_class`` (test holds one empty class
    folder) and ``no_classes`` (test is an empty folder)."""
    base = tmp_path_factory.mktemp("cli")
    out = {}
    for name in ("good", "empty_class", "no_classes", "missing_class", "swapped_class"):
        root = out.setdefault(name, base / name)
        for cls in ("a", "b"):
            _write_images(root / "train" / cls, 2)
        (root / "test").mkdir()
    for cls in ("a", "b"):
        _write_images(out["good"] / "test" / cls, 2, seed=1)
    (out["empty_class"] / "test" / "a").mkdir()
    _write_images(out["missing_class"] / "test" / "b", 2, seed=1)  # no test/a: b's label would be 0
    for cls in ("b", "c"):  # no test/a but an extra c: b's label would be 0 all the same
        _write_images(out["swapped_class"] / "test" / cls, 2, seed=1)
    return out


def _assert_one_error(code: int, err: str, match: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dopq: error: ")
    assert match in lines[0], lines[0]
    return lines[0]


def _quantize_argv(data: Path, *extra: str) -> list[str]:
    """A small ``dopq quantize`` command line; the model is timm's tiny ``test_vit`` unless ``extra``
    names one."""
    model = [] if "--model" in extra else ["--model", "test_vit"]
    return ["quantize", *model, "--data", str(data), *SMALL_RUN, *extra]


def _evaluate_argv(saved: Path, data: Path, output: Path) -> list[str]:
    """A quiet ``dopq evaluate`` of a saved model writing ``output``."""
    return ["evaluate", "--quantized", str(saved), "--data", str(data), "--quiet", "--output", str(output)]


def _garbage(
    name: str, data: bytes = b"\x00\x01 this is not a checkpoint \xff\xfe"
) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    return write


# (argv after the data root, given a tmp folder; text the error line must contain)
MODEL_ERRORS = [
    pytest.param(lambda t: ["--model", "deit_tiny_patch16_2244"], "did you mean deit_tiny_patch16_224",
                 id="unknown-arch"),
    pytest.param(lambda t: ["--checkpoint", str(t / "nope.safetensors")], "does not exist", id="missing-checkpoint"),
    pytest.param(lambda t: ["--checkpoint", str(_garbage("x.safetensors")(t))], "could not be read",
                 id="corrupt-safetensors"),
    pytest.param(lambda t: ["--checkpoint", str(_garbage("x.pth")(t))], "could not be read", id="corrupt-pth"),
    pytest.param(lambda t: ["--checkpoint", str(_garbage("x.pth", b"PK\x03\x04" + bytes(60))(t))],
                 "could not be read", id="truncated-zip-pth"),
    pytest.param(lambda t: ["--w-bits", "9"], "--w-bits must be an integer in 2..8, got 9", id="w-bits-9"),
    pytest.param(lambda t: ["--a-bits", "1"], "--a-bits must be an integer in 2..8, got 1", id="a-bits-1"),
    pytest.param(lambda t: ["--edge-w-bits", "16"], "--edge-w-bits must be an integer in 2..8, got 16",
                 id="edge-w-bits-16"),
    pytest.param(lambda t: ["--model", "resnet18"], "unsupported model family ResNet", id="unsupported-family"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "match"), MODEL_ERRORS)
def test_model_and_recipe_errors(
    extra: Callable[[Path], list[str]],
    match: str,
    roots: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = _quantize_argv(roots["good"], *extra(tmp_path))
    _assert_one_error(main(argv), capsys.readouterr().err, match)


@needs_deit
def test_num_classes_mismatch(roots: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--model", "deit_tiny_patch16_224", "--checkpoint", str(DEIT), "--num-classes", "100"]
    argv = _quantize_argv(roots["good"], *extra)
    _assert_one_error(main(argv), capsys.readouterr().err, "--num-classes 100 does not match")


@pytest.mark.parametrize(
    ("root", "extra", "match"),
    [
        ("missing", [], "does not exist"),
        ("good", ["--eval-split", "nope"], "split 'nope' not found"),
        ("good", ["--calib-split", "nope"], "split 'nope' not found"),
        ("empty_class", [], "split 'test'"),
        ("no_classes", [], "split 'test'"),
        ("good", ["--calib-size", "5"], "calibration size 5 exceeds the 4 images"),
        (
            "good",
            ["--num-classes", "1"],
            "the evaluation split 'test' has 2 classes but the model has 1 outputs",
        ),
        (
            "missing_class",
            [],
            "the evaluation split 'test' lacks the class folder(s) a that the calibration split",
        ),
        (
            "swapped_class",
            [],
            "the evaluation split 'test' lacks the class folder(s) a that the calibration split",
        ),
    ],
    ids=[
        "missing-path",
        "missing-eval-split",
        "missing-calib-split",
        "empty-class",
        "no-classes",
        "calib-too-big",
        "more-classes-than-outputs",
        "missing-class-folder",
        "missing-class-folder-and-an-extra-one",
    ],
)
def test_data_errors(
    root: str,
    extra: list[str],
    match: str,
    roots: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = roots.get(root, tmp_path / "nope")
    line = _assert_one_error(main(_quantize_argv(data, *extra)), capsys.readouterr().err, match)
    if root in ("empty_class", "no_classes"):
        assert "has no images" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_refused_without_cuda(roots: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = _quantize_argv(roots["good"], "--device", "cuda")
    _assert_one_error(main(argv), capsys.readouterr().err, "CUDA is not available")


def test_evaluate_refuses_missing_and_corrupt_files(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["evaluate", "--data", str(roots["good"]), "--quiet", "--quantized"]
    _assert_one_error(main([*base, str(tmp_path / "q.pt")]), capsys.readouterr().err, "does not exist")
    bad = _garbage("q_bad.pt")(tmp_path)
    _assert_one_error(main([*base, str(bad)]), capsys.readouterr().err, "is not a readable dopq file")


def test_compile_is_for_the_pytorch_model(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--data", str(roots["good"]), "--onnx", str(tmp_path / "m.onnx"), "--compile"]
    _assert_one_error(main(argv), capsys.readouterr().err, "--compile is for --quantized alone")
    args = build_parser().parse_args(_quantize_argv(roots["good"], "--compile"))
    assert _settings_from(args).compile


def test_evaluate_with_compile_records_it_and_gives_the_eager_result(
    roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compile`` reaches the evaluation (aot_eager here: the traced graph without fusing, so the
    same numbers, and no C++ compiler needed) and the result records it."""
    import functools

    import dopq.experiment
    from dopq.evaluate import CompiledModel

    monkeypatch.setattr(
        dopq.experiment, "CompiledModel", functools.partial(CompiledModel, backend="aot_eager")
    )
    saved = tmp_path / "q.pt"
    assert main(_quantize_argv(roots["good"], "--save", str(saved))) == 0
    results = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"eval{len(extra)}.json"
        assert main([*_evaluate_argv(saved, roots["good"], out), *extra]) == 0
        results.append(json.loads(out.read_text()))
    assert [r["compiled"] for r in results] == [False, True]
    assert results[0]["quant_top1"] == results[1]["quant_top1"]


def test_entry_point_exit_code_and_single_line(roots: dict[str, Path]) -> None:
    assert DOPQ.is_file(), f"the dopq entry point is not installed at {DOPQ}"
    proc = subprocess.run(
        [str(DOPQ), *_quantize_argv(roots["good"], "--w-bits", "9")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["dopq: error: --w-bits must be an integer in 2..8, got 9"]


def test_a_reader_that_goes_away_does_not_stop_the_run(roots: dict[str, Path], tmp_path: Path) -> None:
    """stdout into a pipe whose reader is gone (``dopq evaluate ... | head -1``): the result files
    are written all the same and the run ends as it would, without a BrokenPipeError traceback
    (it stopped at the table, before the JSON)."""
    saved = tmp_path / "q.pt"
    assert main([*_quantize_argv(roots["good"], "--method", "repq"), "--save", str(saved)]) == 0
    out = tmp_path / "ev.json"
    argv = _evaluate_argv(saved, roots["good"], out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dopq", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert json.loads(out.read_text())["eval_images"] == 4 and out.with_suffix(".md").is_file()


_STOPPED_WHILE_SAVING = """
import contextlib, os, signal, sys, time
import dopq.serialize
from dopq.cli import main

written = dopq.serialize.atomic_path


@contextlib.contextmanager
def terminated_before_the_rename(path):
    with written(path) as tmp:
        yield tmp
        os.kill(os.getpid(), signal.SIGTERM)  # the bytes are in the temporary, not yet renamed
        time.sleep(5)


dopq.serialize.atomic_path = terminated_before_the_rename
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_stops_a_run_in_one_line_and_leaves_no_temporary(
    roots: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM (kill, timeout, a scheduler) stops any command as Ctrl-C does: one line, status
    128 + 15, and the temporaries of the files being written removed. By default it killed the
    process where it stood, leaving them (here a .q.pt.*.tmp) beside the outputs."""
    out = tmp_path / "out"
    argv = [*_quantize_argv(roots["good"], "--method", "repq"), "--save", str(out / "q.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", _STOPPED_WHILE_SAVING, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (proc.returncode, proc.stderr.splitlines()[-1:]) == (143, ["dopq: stopped by SIGTERM"]), (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


class _Writes:
    """A stderr that records each write call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_error_line_is_one_write(roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun all processes can fail at the same moment on one pipe: a line written as
    text then newline (print) interleaves with the others' (seen in CI), one write does not."""
    for argv in (_quantize_argv(roots["good"], "--w-bits", "9"), ["quantize", "--no-such-flag"]):
        stderr = _Writes()
        monkeypatch.setattr(sys, "stderr", stderr)
        assert main(argv) == 2
        assert len(stderr.calls) == 1 and stderr.calls[0].startswith("dopq: error: "), stderr.calls
        assert stderr.calls[0].endswith("\n") and stderr.calls[0].count("\n") == 1


def test_version_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """``dopq --version`` and ``python -m dopq --version``: the version on stdout, exit status 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"dopq {dopq.__version__}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "dopq", "--version"], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"dopq {dopq.__version__}\n", "")


@pytest.mark.slow
@needs_cifar
def test_quantize_then_evaluate_deit_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(CIFAR), "--eval-subset", "40", "--quiet"]
    argv = ["quantize", "--model", "deit_tiny_patch16_224", "--checkpoint", str(DEIT), *data,
            "--method", "repq", "--w-bits", "8", "--a-bits", "8", "--calib-size", "8",
            "--output", str(tmp_path / "res.json"), "--save", str(tmp_path / "q.pt")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "res.json").read_text())
    fields = ["model", "method", "w_bits", "a_bits", "fp_top1", "quant_top1", "fp_top5", "quant_top5",
              "calib_seconds", "eval_images", "config", "command"]  # fmt: skip
    assert not [f for f in fields if f not in result]
    expected = {
        "model": "deit_tiny_patch16_224",
        "method": "repq",
        "w_bits": 8,
        "a_bits": 8,
        "eval_images": 40,
    }
    assert {k: result[k] for k in expected} == expected
    assert result["config"]["recipe"]["softmax_quantizer"] == "logsqrt2"
    for key in ("fp_top1", "quant_top1", "fp_top5", "quant_top5"):
        assert 0.0 <= result[key] <= 1.0
    assert result["fp_top1"] >= 0.6
    assert abs(result["quant_top1"] - result["fp_top1"]) <= 2 / 40 + 1e-9  # at most two of the 40 images
    assert result["calib_seconds"] > 0

    capsys.readouterr()
    argv = ["evaluate", "--quantized", str(tmp_path / "q.pt"), *data, "--output", str(tmp_path / "ev.json")]
    assert main(argv) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["quant_top1"] == result["quant_top1"]
    accuracy = {k for k in result if k.startswith(("fp_", "quant_", "eval_images"))}
    assert accuracy <= set(again)  # the same accuracy fields (fp_top1_correct was missing)
    assert again["eval_images"] == 40
    # what produced the evaluation, as a quantize run records it; its own command, not the save's
    from dopq.environment import file_sha256

    assert (
        again["quantized_sha256"] == file_sha256(tmp_path / "q.pt") and len(again["quant_top1_correct"]) == 40
    )
    assert again["recorded_command"] == result["command"] and again["command"].startswith("dopq evaluate")
    assert again["recorded_checkpoint_sha256"] == file_sha256(DEIT) == result["checkpoint_sha256"]
    assert {"versions", "git", "cpu", "threads", "device_name"} <= set(again)
    markdown = (tmp_path / "ev.md").read_text()
    assert (
        "Evaluated on 40 images." in markdown
        and "calibration" not in markdown
        and "Stage timings (s): load" in markdown
    )

    capsys.readouterr()
    argv = [
        "evaluate",
        "--quantized",
        str(tmp_path / "q.pt"),
        "--model",
        "swin_tiny_patch4_window7_224",
        *data,
    ]
    _assert_one_error(main(argv), capsys.readouterr().err, "was made for deit_tiny_patch16_224")


def test_preprocess_overrides_reach_the_run_settings() -> None:
    from dopq.cli import _settings_from, build_parser
    from dopq.experiment import preprocess_overrides

    argv = ["quantize", "--model", "deit_tiny_patch16_224", "--data", "x",
            "--mean", "0.5", "0.5", "0.5", "--crop-pct", "1.0"]  # fmt: skip
    args = build_parser().parse_args(argv)
    expected = {"mean": (0.5, 0.5, 0.5), "crop_pct": 1.0}
    assert preprocess_overrides(args) == expected
    settings = _settings_from(args)
    assert (settings.mean, settings.std, settings.crop_pct) == ((0.5, 0.5, 0.5), None, 1.0)
    assert preprocess_overrides(settings) == expected


def test_the_default_method_is_the_recommended_preset() -> None:
    from dopq.cli import _config_from

    base = ["quantize", "--model", "deit_tiny_patch16_224", "--data", "x"]
    for widths in (["--w-bits", "3", "--a-bits", "3"], ["--w-bits", "4", "--a-bits", "8"]):
        config = _config_from(build_parser().parse_args(base + widths))
        w, a = int(widths[1]), int(widths[3])
        assert config == get_preset("recommended", w_bits=w, a_bits=a)
    paper = _config_from(
        build_parser().parse_args([*base, "--method", "dopq", "--tanq-centers", "0.5", "0.9"])
    )
    assert paper == get_preset("dopq", tanq_centers=(0.5, 0.9))
    for flag, grid in (("0", None), ("12", 12)):
        config = _config_from(build_parser().parse_args([*base, "--softmax-grid-bits", flag]))
        assert config == get_preset("recommended").replace(softmax_grid_bits=grid)
    edge = _config_from(build_parser().parse_args([*base, "--edge-w-bits", "8"]))
    assert edge == get_preset("recommended").replace(edge_w_bits=8)
    ranges = _config_from(build_parser().parse_args([*base, "--act-range-objective", "output"]))
    assert ranges == get_preset("recommended").replace(act_range_objective="output")
    with pytest.raises(ConfigError, match="invalid choice: 'kl'"):  # main() prints it as one line
        build_parser().parse_args([*base, "--act-range-objective", "kl"])
    # the centred attention operands of 8-bit activations: the preset's q, k and mean-centred v, or
    # any choice
    w8a8 = [*base, "--w-bits", "8", "--a-bits", "8"]
    preset = _config_from(build_parser().parse_args(w8a8))
    assert (preset.symmetric_attention, preset.centre_values) == ("qkv", True)
    for choice in ("off", "qk"):
        chosen = _config_from(build_parser().parse_args([*w8a8, "--symmetric-attention", choice]))
        assert chosen == get_preset("recommended", w_bits=8, a_bits=8).replace(symmetric_attention=choice)
    plain_v = _config_from(build_parser().parse_args([*w8a8, "--centre-values", "off"]))
    assert plain_v == get_preset("recommended", w_bits=8, a_bits=8).replace(centre_values=False)
    centred = _config_from(build_parser().parse_args([*base, "--method", "dopq", "--centre-values", "on"]))
    assert centred == get_preset("dopq", centre_values=True)


def test_unset_options_leave_a_rule_that_sets_a_field_taking_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_preset sets a field that takes None when given None; the CLI passes only the options
    given, so a width rule that set such a field (edge layers, activation clips) stays the recipe's."""
    from dopq import config as config_module
    from dopq.cli import _config_from

    rules = config_module._recommended_rules
    extra = {"edge_w_bits": 8, "act_percentiles": (0.99, 1.0), "gptq_target": "quantized"}
    monkeypatch.setattr(config_module, "_recommended_rules", lambda w, a: {**rules(w, a), **extra})
    config = _config_from(
        build_parser().parse_args(["quantize", "--model", "deit_tiny_patch16_224", "--data", "x"])
    )
    assert {k: getattr(config, k) for k in extra} == extra


def test_reconstruction_flags_reach_the_recipe() -> None:
    from dopq.cli import _config_from, build_parser

    argv = ["quantize", "--model", "deit_tiny_patch16_224", "--data", "x", "--reconstruct",
            "--recon-iters", "60", "--recon-calib-size", "128", "--recon-rounding", "adaround", "--recon-drop-prob", "0", "--seed", "3"]  # fmt: skip
    rcfg = _config_from(build_parser().parse_args(argv)).reconstruct
    assert (rcfg.iters, rcfg.calib_size, rcfg.rounding, rcfg.drop_prob, rcfg.seed) == (
        60,
        128,
        "adaround",
        0.0,
        3,
    )
    assert _config_from(build_parser().parse_args(argv[:5])).reconstruct is None


# (extra argv given a tmp folder holding a file "f"; text of the one error line). The model does not
# exist, so each check must fire before anything is loaded.
EARLY_ERRORS = [
    pytest.param(lambda t: ["--batch-size", "0"], "--batch-size must be >= 1, got 0", id="batch-size-0"),
    pytest.param(lambda t: ["--workers", "-1"], "--workers must be >= 0, got -1", id="workers-negative"),
    pytest.param(lambda t: ["--threads", "-1"], "--threads must be >= 1, got -1", id="threads-negative"),
    pytest.param(lambda t: ["--calib-size", "0"], "--calib-size must be >= 1, got 0", id="calib-size-0"),
    pytest.param(lambda t: ["--eval-subset", "0"], "--eval-subset must be >= 1, got 0", id="eval-subset-0"),
    pytest.param(lambda t: ["--recon-drop-prob", "1.5"], "--recon-drop-prob must be in [0, 1]", id="drop-prob"),
    pytest.param(lambda t: ["--device", "tpu"], "--device must be cpu or cuda", id="device-tpu"),
    pytest.param(lambda t: ["--device", "cuda:7"], "cuda", id="device-cuda-7"),
    pytest.param(lambda t: ["--output", str(t)], "is a folder", id="output-folder"),
    pytest.param(lambda t: ["--output", str(t / "f" / "r.json")], "cannot create its folder", id="output-unwritable"),
    pytest.param(lambda t: ["--save", str(t / "f" / "q.pt")], "cannot create its folder", id="save-unwritable"),
    pytest.param(lambda t: ["--checkpoint", str(t / "w.pth"), "--save", str(t / "w.pth")],
                 "--save {t}/w.pth is the --checkpoint file this command reads", id="save-over-checkpoint"),
    pytest.param(lambda t: ["--save", str(t / "r.json"), "--output", str(t / "r.json")],
                 "--save and --output name the same file", id="save-over-output"),
    pytest.param(lambda t: ["--save", str(t / "r.md"), "--output", str(t / "r.json")],
                 "--save and --output's Markdown twin name the same file", id="save-over-markdown"),
    pytest.param(lambda t: ["--export", str(t / "q.onnx"), "--save", str(t / "q.onnx")],
                 "--export and --save name the same file", id="export-over-save"),
    pytest.param(lambda t: ["--out", str(t / "m.onnx")], "unrecognized arguments: --out", id="no-abbreviations"),
    pytest.param(lambda t: ["--output", f"{t}/new/"], "names a folder; give a file name", id="output-trailing-slash"),
    pytest.param(lambda t: ["--export-target", "openvino"], "--export-target is for --export", id="export-flag-alone"),
    pytest.param(lambda t: ["--opset", "99"], "--opset is for --export", id="opset-alone"),
    pytest.param(lambda t: ["--recon-iters", "5"], "--recon-iters is for --reconstruct", id="recon-flag-alone"),
    pytest.param(lambda t: ["--reconstruct", "--recon-batch-size", "4", "--recon-grad-shards", "8"],
                 "--recon-grad-shards (8) must be at most the batch size (4)", id="more-shards-than-images"),
    # the recipe's own checks, in the flags' names (they named the config's fields: w_bits, gptq_damp)
    pytest.param(lambda t: ["--gptq-damp", "2"], "--gptq-damp must be in (0, 1], got 2.0", id="gptq-damp-2"),
    pytest.param(lambda t: ["--tanq-centers", "0.5", "1.5"], "--tanq-centers must be in (0, 1)", id="tanq-centers"),
    pytest.param(lambda t: ["--method", "dopq", "--gptq-damp", "0.5"],
                 "--gptq-damp is for GPTQ rounding, which --method dopq at W4 does not use", id="gptq-option-ignored"),
    pytest.param(lambda t: ["--w-bits", "8", "--gptq-check", "on"],
                 "--gptq-check is for GPTQ rounding, which --method recommended at W8 does not use",
                 id="gptq-check-at-w8"),
    pytest.param(lambda t: ["--weight-rounding", "gptq", "--gptq-target-shrink", "0.3"],
                 "--gptq-target-shrink is for GPTQ's float target, which --method recommended at W4/A4 does "
                 "not aim at (its target is quantized)", id="gptq-shrink-with-quantized-target"),
    pytest.param(lambda t: ["--w-bits", "3", "--gptq-target", "quantized", "--gptq-target-shrink", "1"],
                 "--gptq-target-shrink is for GPTQ's float target, which --method recommended at W3/A4",
                 id="gptq-shrink-with-target-quantized"),
    pytest.param(lambda t: ["--method", "dopq", "--a-bits", "8", "--tanq-centers", "0.5", "0.8"],
                 "--tanq-centers is for TanQ, which --method dopq at A8 does not use (its post-Softmax "
                 "quantizer is uniform)", id="tanq-option-at-a8"),
    pytest.param(lambda t: ["--softmax-quantizer", "log2", "--softmax-grid-bits", "12"],
                 "--softmax-grid-bits is for TanQ, which --method recommended at A4 does not use (its "
                 "post-Softmax quantizer is log2)", id="tanq-option-with-log2"),
    pytest.param(lambda t: ["--softmax-grid-bits", "7"],
                 "--softmax-grid-bits must be in 8..20, or 0 for TanQ's exact midpoints; got 7", id="grid-bits-7"),
    pytest.param(lambda t: ["--softmax-grid-bits", "-1"],
                 "--softmax-grid-bits must be in 8..20, or 0 for TanQ's exact midpoints; got -1", id="grid-bits-negative"),
    pytest.param(lambda t: ["--checkpoint", str(t / "w.pth"), "--pretrained"],
                 "--checkpoint and --pretrained are two sources of weights: give one", id="two-weight-sources"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "match"), EARLY_ERRORS)
def test_arguments_are_checked_before_any_work(
    extra: Callable[[Path], list[str]], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("a file, not a folder")
    argv = ["quantize", "--model", "no_such_model", "--data", str(tmp_path / "nothing"), *extra(tmp_path)]
    line = _assert_one_error(main(argv), capsys.readouterr().err, match.format(t=tmp_path))
    assert "no_such_model" not in line  # the model was never looked up


def test_too_many_reconstruction_images_is_refused_before_any_evaluation(
    roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--reconstruct`` on a calibration split smaller than ``--recon-calib-size`` (the default 1024
    on the demo bundle's 256 train images): the run evaluated the float model first and then stopped
    with "calibration size 1024 exceeds ...", naming neither the flag nor what the images were for."""
    import dopq.experiment

    def no_evaluation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the float model was evaluated before the refusal")

    monkeypatch.setattr(dopq.experiment, "fp_baseline", no_evaluation)
    argv = _quantize_argv(roots["good"], "--reconstruct", "--recon-calib-size", "8", "--recon-iters", "1")
    _assert_one_error(main(argv), capsys.readouterr().err, "--recon-calib-size 8 exceeds the 4 images")


def test_main_called_from_python_records_its_own_arguments(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not the host program's sys.argv (pytest's here) as "the exact command", and the folder it ran
    in, where its relative paths start."""
    argv = _quantize_argv(roots["good"], "--method", "repq", "--output", str(tmp_path / "r.json"))
    assert main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["command"] == "dopq " + " ".join(argv)
    assert result["working_directory"] == str(Path.cwd())
    assert f"Command: `{result['command']}` (in `{Path.cwd()}`)" in (tmp_path / "r.md").read_text()
    from dopq.environment import command_line

    assert not command_line().startswith("dopq quantize")  # the host's own again afterwards


def test_evaluate_reports_lead_back_to_the_quantize_command(
    roots: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The evaluation's Markdown did not name the command that made the file it measured, and its
    hash was the file's at the end of the evaluation."""
    monkeypatch.chdir(tmp_path)
    assert (
        main(_quantize_argv(roots["good"], "--method", "repq", "--save", "q.pt", "--output", "r.json")) == 0
    )
    quantized = json.loads((tmp_path / "r.json").read_text())
    monkeypatch.chdir(roots["good"])  # evaluated from elsewhere
    argv = ["evaluate", "--quantized", str(tmp_path / "q.pt"), "--data", ".", "--quiet", "--output", str(tmp_path / "e.json")]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["recorded_command"] == quantized["command"]
    # and the threads and versions the saved codes came from (the file had the command alone)
    assert result["recorded_threads"] == quantized["threads"] == 1
    assert result["recorded_versions"] == quantized["versions"]
    # the hash is the file's that was evaluated, though another run overwrites it meanwhile
    import dopq.reevaluate

    evaluated = dopq.environment.file_sha256(tmp_path / "q.pt")

    def overwriting(*args, **kwargs):
        (tmp_path / "q.pt").write_bytes(b"another run's file")
        return evaluate(*args, **kwargs)

    evaluate = dopq.reevaluate.evaluate
    monkeypatch.setattr(dopq.reevaluate, "evaluate", overwriting)
    assert main(argv) == 0
    assert json.loads((tmp_path / "e.json").read_text())["quantized_sha256"] == evaluated
    assert f"Quantized by: `{quantized['command']}`\n" in (tmp_path / "e.md").read_text()


def test_the_result_names_the_calibration_images_the_seed_drew(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The result had the seed and the size but not the images: another copy of the data (an image
    added) draws others under the same seed without a trace. The names are the split's own, the
    same for a folder and a tar of it."""
    import tarfile

    from dopq.data import calibration_indices

    archive = tmp_path / "good.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(roots["good"] / "train", "train")
        tar.add(roots["good"] / "test", "test")
    listing = ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    expected = [listing[i] for i in calibration_indices(4, 3, seed=5)]
    for data in (roots["good"], archive):
        out = tmp_path / f"{data.name}.json"
        argv = _quantize_argv(
            data, "--method", "repq", "--calib-size", "3", "--seed", "5", "--output", str(out)
        )
        assert main(argv) == 0
        assert json.loads(out.read_text())["data"]["calibration_images"] == expected


def test_the_result_hashes_the_checkpoint_it_read_not_the_file_there_at_the_end(
    roots: dict[str, Path], tmp_path: Path
) -> None:
    """The hash was taken when the result was written: a training job overwriting its checkpoint
    during a long run had its new weights named as the ones quantized."""
    import timm

    from dopq.environment import file_sha256
    from dopq.experiment import RunSettings, load_workload, run_recipe

    checkpoint = tmp_path / "last.pth"
    torch.save(timm.create_model("test_vit", num_classes=2).state_dict(), checkpoint)
    read = file_sha256(checkpoint)
    settings = RunSettings(
        "test_vit", str(roots["good"]), str(checkpoint), calib_size=2, eval_subset=2, workers=0
    )
    work = load_workload(settings)
    torch.save(timm.create_model("test_vit", num_classes=2).state_dict(), checkpoint)  # the next epoch
    result, _ = run_recipe(work, get_preset("repq", w_bits=4, a_bits=4), progress=False)
    assert result["checkpoint_sha256"] == read != file_sha256(checkpoint)


def test_the_result_says_where_the_preprocessing_came_from(
    roots: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a card beside the checkpoint the architecture's default is used: said, and recorded."""
    import timm

    torch.manual_seed(0)
    checkpoint = tmp_path / "m.pth"
    torch.save(timm.create_model("test_vit", num_classes=2).state_dict(), checkpoint)
    argv = _quantize_argv(roots["good"], "--method", "repq", "--checkpoint", str(checkpoint))
    with caplog.at_level("WARNING", logger="dopq"):
        assert main([*argv, "--output", str(tmp_path / "a.json")]) == 0
    assert f"no model card beside {checkpoint}: its preprocessing is test_vit's default" in caplog.text
    assert (
        json.loads((tmp_path / "a.json").read_text())["config"]["preprocess_source"]
        == "the model's pretrained_cfg"
    )
    card = {"input_size": [3, 160, 160], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert main([*argv, "--output", str(tmp_path / "b.json"), "--crop-pct", "1.0"]) == 0
    source = json.loads((tmp_path / "b.json").read_text())["config"]["preprocess_source"]
    assert source == f"card {tmp_path / 'm.json'}, with crop_pct given"


def test_a_model_without_weights_is_said_to_be_randomly_initialised(
    roots: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forgotten --checkpoint or --pretrained quantizes timm's random initialisation: said, not
    only seen in a near-chance accuracy; a checkpoint is not warned about."""
    import timm

    argv = _quantize_argv(roots["good"], "--method", "repq")
    with caplog.at_level("WARNING", logger="dopq"):
        assert main([*argv, "--output", str(tmp_path / "a.json")]) == 0
    assert "test_vit has no --checkpoint or --pretrained weights: it keeps timm's random" in caplog.text
    caplog.clear()
    checkpoint = tmp_path / "m.pth"
    torch.save(timm.create_model("test_vit", num_classes=2).state_dict(), checkpoint)
    with caplog.at_level("WARNING", logger="dopq"):
        assert main([*argv, "--checkpoint", str(checkpoint), "--output", str(tmp_path / "b.json")]) == 0
    assert "random initialisation" not in caplog.text


def test_export_needs_out_and_plot_checks_its_folder_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _assert_one_error(
        main(["export", "--quantized", str(tmp_path / "q.pt")]), capsys.readouterr().err, "required: --out"
    )
    (tmp_path / "f").write_text("a file, not a folder")
    argv = ["plot", "--model", "no_such_model", "--data", str(tmp_path), "--out-dir", str(tmp_path / "f")]
    line = _assert_one_error(main(argv), capsys.readouterr().err, "--out-dir")
    assert "is a file; give a folder" in line and "no_such_model" not in line  # before any work


def test_progress_bars_stay_out_of_logs(roots: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """stderr is not a terminal here, as in a log file: no redrawn tqdm frames."""
    argv = [a for a in _quantize_argv(roots["good"], "--method", "repq") if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "img/s" not in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_warning_during_a_progress_bar_starts_on_its_own_line(
    roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, a warning logged while a bar is drawn (reconstruction warns about single units)
    goes through tqdm: it starts on a line of its own, where written straight to stderr it ran on
    from the bar's frame ('... 12.3img/s]WARNING dopq...') and left the frame behind."""
    import dopq.evaluate

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a plain process: main configures logging
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    counts = dopq.evaluate.accuracy_counts

    def warning_mid_bar(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        logging.getLogger("dopq.evaluate").warning("something to say mid-bar")
        return counts(logits, targets)

    monkeypatch.setattr(dopq.evaluate, "accuracy_counts", warning_mid_bar)
    argv = [a for a in _quantize_argv(roots["good"], "--method", "repq") if a != "--quiet"]
    assert main(argv) == 0
    err = terminal.getvalue()
    assert "img/s" in err  # bars were drawn
    starts = [m.start() for m in re.finditer("WARNING dopq.evaluate: something to say mid-bar", err)]
    assert starts and all(err[i - 1] in "\r\n" for i in starts), err


def test_the_timings_name_every_stage_of_a_run(roots: dict[str, Path], tmp_path: Path) -> None:
    """The result's timings (seconds) name each stage that takes time: loading, both evaluations,
    the quantization's stages and the files written; the evaluations' are the times behind their
    images per second."""
    out = tmp_path / "r.json"
    argv = _quantize_argv(roots["good"], "--method", "dopq", "--w-bits", "8", "--a-bits", "8")
    extra = ["--output", str(out), "--save", str(tmp_path / "q.pt"), "--export", str(tmp_path / "q.onnx")]
    assert main([*argv, *extra]) == 0
    result = json.loads(out.read_text())
    timings = result["timings"]
    assert list(timings)[:2] == ["load", "fp_evaluation"]
    assert list(timings)[-3:] == ["evaluation", "save", "export"]
    assert {"prepare", "calibration", "reparameterization", "bias_correction"} <= set(timings)
    assert all(seconds > 0 for seconds in timings.values())
    images = result["eval_images"]
    assert timings["fp_evaluation"] == pytest.approx(images / result["fp_eval_images_per_second"])
    assert timings["evaluation"] == pytest.approx(images / result["eval_images_per_second"])
    assert "evaluation" in (tmp_path / "r.md").read_text().split("Stage timings (s): ")[1]


def test_a_folder_in_the_place_of_the_markdown_twin_is_refused_before_any_work(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--output r.json writes r.md beside it at the end: a folder named r.md is one error line at the
    start (it stopped the run after all its work with a raw IsADirectoryError, the JSON written)."""
    (tmp_path / "r.md").mkdir()
    argv = _quantize_argv(roots["good"], "--model", "no_such_model", "--output", str(tmp_path / "r.json"))
    line = _assert_one_error(main(argv), capsys.readouterr().err, "Markdown twin")
    assert f"{tmp_path / 'r.md'} is a folder" in line and "no_such_model" not in line  # before any work
    argv = [*_quantize_argv(roots["good"], "--method", "repq"), "--output", str(tmp_path / "r.json")]
    _assert_one_error(main(argv), capsys.readouterr().err, "Markdown twin")
    assert not (tmp_path / "r.json").exists()


def test_evaluations_time_their_stages_under_the_names_of_a_quantize_run(
    roots: dict[str, Path], tmp_path: Path
) -> None:
    """dopq evaluate's results have timings too (seconds): loading, the evaluation (the time behind
    its images per second) and, comparing a graph with its saved model, the comparison's pass over
    both, which took as long as the evaluation again and was nowhere."""
    argv = _quantize_argv(roots["good"], "--method", "dopq", "--w-bits", "8", "--a-bits", "8")
    saved, graph = tmp_path / "q.pt", tmp_path / "q.onnx"
    assert main([*argv, "--save", str(saved), "--export", str(graph)]) == 0
    data = ["--data", str(roots["good"]), "--quiet"]
    for extra, stages in (
        (["--quantized", str(saved)], ["load", "evaluation"]),
        (["--onnx", str(graph), "--quantized", str(saved)], ["load", "evaluation", "comparison"]),
    ):
        out = tmp_path / "ev.json"
        assert main(["evaluate", *extra, *data, "--output", str(out)]) == 0
        result = json.loads(out.read_text())
        assert list(result["timings"]) == stages and all(t > 0 for t in result["timings"].values())
        images = result["eval_images"]
        assert result["timings"]["evaluation"] == pytest.approx(images / result["eval_images_per_second"])
        assert "Stage timings (s): load" in (tmp_path / "ev.md").read_text()


def test_evaluate_onnx_names_the_widths_of_a_graph_exported_from_python(
    roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dopq.export.export_onnx(qmodel, path)``, the README's Python API, records no recipe:
    ``dopq evaluate --onnx`` printed ``onnx WNone/ANone`` and wrote null widths. The graph records
    the widths of the model's layers (8-bit head beside 4-bit blocks: the blocks' width)."""
    import timm

    from dopq.export import export_onnx, read_metadata

    model = timm.create_model("test_vit", num_classes=2).eval()
    config = get_preset("dopq", w_bits=4, a_bits=8, edge_w_bits=8)
    qmodel = dopq.quantize(model, torch.randn(4, 3, 160, 160), config, progress=False)
    path = tmp_path / "api.onnx"
    export_onnx(qmodel, path)
    assert "recipe" not in read_metadata(path)
    out = tmp_path / "r.json"
    code = main(
        ["evaluate", "--onnx", str(path), "--data", str(roots["good"]), "--quiet", "--output", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["w_bits"], result["a_bits"]) == (4, 8)
    assert result["fp_top1_correct"] is None and result["fp_eval_images_per_second"] is None
    assert "onnx W4/A8 on onnxruntime" in capsys.readouterr().out
    assert out.with_suffix(".md").read_text().startswith("## test_vit: onnx W4/A8")
    # without --threads onnxruntime ran its own default pool, not torch's one thread (recorded before)
    assert result["threads"] is None
    assert "Runtime: onnxruntime (its default threads)" in out.with_suffix(".md").read_text()


def test_help_names_every_width_rule_of_the_default_preset_and_what_threads_sets() -> None:
    """``--method``'s help said the recommended preset rounds by GPTQ "at 3 bits and below and at
    W4/A8"; it does at W4/A4 too (kept only where the calibration check shows it pays), and its
    wider TanQ grid at 3-bit activations went unnamed. ``--threads`` also sets the ONNX runtime's
    threads under ``dopq evaluate --onnx`` (docs/export.md), which its help did not say."""
    quantize = " ".join(_subparser("quantize").format_help().split())
    assert "4-bit weights (below 8-bit activations kept only where the calibration check" in quantize
    assert "TanQ's wider centre grid with 3-bit activations" in quantize
    assert get_preset("recommended", w_bits=4, a_bits=4).gptq_check
    evaluate = " ".join(_subparser("evaluate").format_help().split())
    assert "onnxruntime's or OpenVINO's for --onnx" in evaluate


@pytest.mark.parametrize("command", ["quantize", "evaluate", "export", "plot"])
def test_help_names_only_options_its_command_has(command: str) -> None:
    """Help texts are shared between subcommands: ``dopq evaluate --help`` said ``--eval-dtype``
    defaults to float64 "with --export-dtype float64", and ``dopq quantize --help`` that ``--threads``
    sets the runtime's threads "for --onnx", options those commands do not have."""
    parser = _subparser(command)
    options = {s for a in parser._actions for s in a.option_strings}
    texts = [re.sub(r"`[^`]*`", "", a.help or "") for a in parser._actions]  # `dopq other --x`: another's
    named = {m for text in texts for m in re.findall(r"--[a-z][a-z0-9-]*", text)}
    assert named <= options, f"{command} --help names {sorted(named - options)}"


def _subparser(name: str):
    import argparse

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[name]


def test_quantize_help_lists_each_option_in_its_own_group() -> None:
    """``--save`` and ``--allow-partial`` were listed under "reconstruction" in ``dopq quantize
    --help``, where a user looking for how to save a model without reconstruction would not look."""
    groups = {g.title: {a.dest for a in g._group_actions} for g in _subparser("quantize")._action_groups}
    assert {"save", "allow_partial"} <= groups["quantized model"]
    assert groups["reconstruction"] == {
        "reconstruct",
        "recon_calib_size",
        "recon_iters",
        "recon_batch_size",
        "recon_grad_shards",
        "recon_drop_prob",
        "recon_rounding",
        "checkpoint_dir",
        "resume",
    }
    assert {"weight_rounding", "gptq_damp", "gptq_check"} <= groups["weight rounding"]


# QuantConfig fields that `dopq quantize` has no flag for: README names them as set through the API
API_ONLY_FIELDS = {"patch_embed_input_bits", "percentiles"}


def test_every_recipe_field_has_a_flag_or_is_named_as_api_only() -> None:
    """A field neither reachable from the command line nor documented as API-only is a switch a
    CLI user cannot find (two were: the patch embedding's input bits, the weights' clip quantiles)."""
    import dataclasses

    from dopq.config import QuantConfig, ReconstructConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["quantize"]._actions}
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    assert fields - dests == API_ONLY_FIELDS  # reconstruct: --reconstruct and the --recon-* flags
    recon = {f.name for f in dataclasses.fields(ReconstructConfig)}
    recon_flags = {f for f in recon if f"recon_{f}" in dests or f == "seed"}  # --seed seeds it too
    assert recon_flags == {
        "calib_size",
        "iters",
        "batch_size",
        "rounding",
        "drop_prob",
        "grad_shards",
        "seed",
    }
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "finer settings are `dopq.ReconstructConfig` fields" in readme  # the other recon fields
    for name in API_ONLY_FIELDS:
        assert f"`{name}`" in readme, name
    assert "Two recipe fields have no flag and are set through the Python API" in readme
