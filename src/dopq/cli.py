"""Command line: ``dopq quantize``, ``dopq evaluate``, ``dopq export``, ``dopq plot``. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from dopq import __version__, distributed, environment
from dopq.config import (
    FLOAT_DTYPES,
    GPTQ_TARGETS,
    LN_SCALE_RULES,
    LN_SHIFTS,
    RANGE_OBJECTIVES,
    RECOMMENDED,
    ROUNDINGS,
    RUNTIMES,
    SOFTMAX_CHOICES,
    SOFTMAX_GRID_BITS_RANGE,
    SYMMETRIC_ATTENTION,
    TANQ_OBJECTIVES,
    WEIGHT_ROUNDINGS,
    WEIGHT_TYPES,
    QuantConfig,
    ReconstructConfig,
    get_preset,
    list_presets,
)
from dopq.errors import ConfigError, DopqError

__all__ = ["build_parser", "main"]

log = logging.getLogger("dopq")


def _output_file(text: str) -> Path:
    """A file to write: a name ending in a slash means a folder (a Path would drop the slash and
    write a file of the folder's name)."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} names a folder; give a file name")
    return Path(text)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help="timm architecture, e.g. deit_tiny_patch16_224, or hf:FOLDER (a transformers save_pretrained folder)",
    )
    g.add_argument(
        "--checkpoint", help="local .safetensors/.pth weights (a JSON card beside it sets preprocessing)"
    )
    g.add_argument("--num-classes", type=int, help="classifier size (default: from the checkpoint)")
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="use timm's hub weights (network once, or the local Hugging Face cache; the head must have --num-classes classes)",
    )


def _add_data_args(p: argparse.ArgumentParser, calib: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", required=True, help="ImageFolder root or .tar/.tar.gz with <split>/<class>/<img>"
    )
    if calib:
        g.add_argument("--calib-split", default="train")
        g.add_argument("--calib-size", type=int, default=32)
        g.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (randperm)")
    g.add_argument("--eval-split", help="default: val if present, else test")
    g.add_argument("--eval-subset", type=int, help="evaluate N evenly strided images")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument(
        "--workers",
        type=int,
        help="DataLoader worker processes (default: 1 per 8 CPUs on CPU, CPUs-1 up to 8 on CUDA; 0: none)",
    )
    g.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out images that cannot be decoded (counted, named in the result) instead of stopping",
    )
    g.add_argument("--mean", type=float, nargs=3)
    g.add_argument("--std", type=float, nargs=3)
    g.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])
    g.add_argument("--crop-pct", type=float)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op CPU threads, and onnxruntime's or OpenVINO's for --onnx (default: each "
        "library's choice)"
        if not calib
        else "torch intra-op CPU threads (default: torch's choice)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="CUDA: deterministic kernels only (slower; an op without one is an error). CPU runs repeat anyway",
    )
    p.add_argument(
        "--eval-dtype",
        choices=FLOAT_DTYPES,
        help="evaluate the quantized model in float32 or float64 (the function a float64 ONNX export "
        "reproduces exactly; slower). "
        + (
            "Default: float64 with --export-dtype float64, else float32"
            if calib
            else "Default: float32; with --onnx the simulation runs in the graph's own dtype"
        ),
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="evaluate through torch.compile: the fake-quantization passes fuse into few kernels "
        "(faster, mostly on a GPU; the first batch of each shape compiles; a CPU needs a C++ compiler)",
    )
    p.add_argument("--output", type=_output_file, help="write the result as JSON here (and .md beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe")
    g.add_argument(
        "--method",
        choices=list_presets(),
        default=RECOMMENDED,
        help="preset recipe: recommended (the default: dopq plus, by width, GPTQ rounding at 3 bits and "
        "below and at 4-bit weights (below 8-bit activations kept only where the calibration check "
        "shows it pays, --gptq-check), TanQ's wider centre grid with 3-bit activations, centred 8-bit "
        "weight grids, centred q/k/v with 8-bit activations), dopq (the paper's TanQ and MOSF, with an "
        "exact post-LayerNorm shift and bias correction) or repq (the "
        "RepQ-ViT baseline)",
    )
    g.add_argument("--w-bits", type=int, default=4)
    g.add_argument("--a-bits", type=int, default=4)
    g.add_argument(
        "--softmax-quantizer",
        choices=SOFTMAX_CHOICES,
        help="override the preset's; auto: per attention module the best of tanq, log2, logsqrt2",
    )
    g.add_argument(
        "--ln-scale",
        choices=LN_SCALE_RULES,
        help="override the preset's MOSF rule (with --ln-shift input and integer zero points, as in dopq "
        "and recommended, every rule gives each channel its own grid: the same model; docs/mosf.md)",
    )
    g.add_argument("--integer-zero-point", choices=["on", "off"], help="override the preset's")
    g.add_argument("--bias-correction", choices=["on", "off"], help="override the preset's")
    g.add_argument(
        "--symmetric-weights",
        choices=["on", "off"],
        help="override the preset's: weight grids centred on 0 (int8 kernels need no row-sum correction)",
    )
    g.add_argument(
        "--symmetric-attention",
        choices=SYMMETRIC_ATTENTION,
        help="override the preset's: attention operands on grids centred on 0 "
        "(qkv: OpenVINO fuses each attention into one integer kernel)",
    )
    g.add_argument(
        "--centre-values",
        choices=["on", "off"],
        help="override the preset's: per-channel calibration means of attention's v moved into the biases",
    )
    g.add_argument(
        "--ln-shift",
        choices=LN_SHIFTS,
        help="where the post-LN re-parameterization's shift goes: bias (RepQ-ViT) or input (exact)",
    )
    g.add_argument(
        "--tanq-objective",
        choices=TANQ_OBJECTIVES,
        help="how TanQ scores its candidates: the error of attn @ v (output) or of the attention (mse)",
    )
    g.add_argument(
        "--tanq-centers",
        type=float,
        nargs="+",
        help="TanQ's candidate centres m in (0, 1) (presets: 0.35 0.5; the wider 0.35 0.5 0.65 0.8 0.9 in "
        "recommended with 3-bit activations; docs/tanq.md)",
    )
    g.add_argument(
        "--softmax-grid-bits",
        type=int,
        help="TanQ's thresholds on the 2^-N grid of [0, 1] (default 16: the export reads each code from "
        "one table); 0 keeps the exact midpoints (docs/export.md)",
    )
    g.add_argument(
        "--edge-w-bits",
        type=int,
        help="weight bits of the patch embedding and the classifier head (default: the preset's; --w-bits)",
    )
    g.add_argument(
        "--act-percentiles",
        type=float,
        nargs="+",
        help="candidate upper quantiles of the activations' uniform range search (default: the recipe's "
        "percentiles, with --act-range-objective output its own grid 0.99 to 1; a log2 or log-sqrt2 "
        "post-Softmax quantizer keeps the recipe's)",
    )
    g.add_argument(
        "--act-range-objective",
        choices=list(RANGE_OBJECTIVES),
        help="per-tensor activation ranges by their own squared error (mse) or by the error of the "
        "product they enter (output: the next Linear's or the attention product's)",
    )


def _add_gptq_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weight rounding")
    g.add_argument(
        "--weight-rounding",
        choices=WEIGHT_ROUNDINGS,
        help="weight rounding: nearest, or gptq (second-order error feedback from the calibration inputs)",
    )
    g.add_argument("--gptq-damp", type=float, help="GPTQ damping, fraction of the mean Hessian diagonal")
    g.add_argument("--gptq-act-order", choices=["on", "off"], help="GPTQ: largest-input columns first")
    g.add_argument(
        "--gptq-target",
        choices=GPTQ_TARGETS,
        help="GPTQ objective: quantized (the layer's float weights on its quantized inputs) or float "
        "(the float model's output, GPTAQ); default: float at 3 bits and below, quantized above",
    )
    g.add_argument(
        "--gptq-target-shrink",
        type=float,
        help="GPTQ float target: fraction of the way from the float weight to the least-squares target "
        "(default 0.5)",
    )
    g.add_argument(
        "--gptq-check",
        choices=["on", "off"],
        help="keep GPTQ's rounding only where it lowers the calibration images' logit error against the "
        "float model significantly (signed-rank test), else round to nearest",
    )


def _add_reconstruction_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("reconstruction")
    r.add_argument("--reconstruct", action="store_true", help="block-wise reconstruction after calibration")
    r.add_argument("--recon-calib-size", type=int, default=_RECON_OPTIONS["recon_calib_size"])
    r.add_argument("--recon-iters", type=int, help="default 1000 at <=4 bits, 200 above")
    r.add_argument("--recon-batch-size", type=int, default=_RECON_OPTIONS["recon_batch_size"])
    r.add_argument(
        "--recon-grad-shards",
        type=int,
        default=_RECON_OPTIONS["recon_grad_shards"],
        help="sum each batch's gradient over this many fixed shards: 1 to N torchrun processes then give "
        "the same model, byte for byte (default 1: one backward of the whole batch, one process)",
    )
    r.add_argument(
        "--recon-drop-prob",
        type=float,
        help="QDrop probability (0: off; default 0.5 at <= 3 bits, off above)",
    )
    r.add_argument(
        "--recon-rounding",
        choices=ROUNDINGS,
        default=_RECON_OPTIONS["recon_rounding"],
        help="how the weight rounding is learned: ste (hard, straight-through) or adaround (soft, then hard)",
    )
    r.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="checkpoint reconstruction here after calibration and after every unit; a run stopped "
        "(SIGTERM, Ctrl-C, a crash) goes on from its last finished unit when the same command is run "
        "again, with the result of an uninterrupted run",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir (an error if there is none)",
    )


def _add_quantized_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantized model")
    g.add_argument(
        "--save", type=_output_file, help="save the quantized model for `dopq evaluate --quantized`"
    )
    g.add_argument(
        "--allow-partial",
        action="store_true",
        help="quantize a model with layers dopq cannot quantize, keeping those float (listed in the result)",
    )


# reconstruction and export options and their defaults (one table each for the parser and the check
# that refuses them where they would be ignored: without --reconstruct, without --export)
_RECON_OPTIONS = {"recon_calib_size": 1024, "recon_iters": None, "recon_batch_size": 64, "recon_drop_prob": None,
                  "recon_rounding": "ste", "recon_grad_shards": 1}  # fmt: skip
_EXPORT_OPTIONS = {"opset": 21, "integer_attention": False, "export_dtype": "float32",
                   "export_target": "onnxruntime", "export_weight_type": None}  # fmt: skip


def _add_export_args(p: argparse.ArgumentParser, flag: str, required: bool = False) -> None:
    g = p.add_argument_group("ONNX export")
    g.add_argument(
        flag, dest="export", type=Path, required=required, help="write the quantized model as ONNX (QDQ) here"
    )
    g.add_argument(
        "--opset",
        type=int,
        default=_EXPORT_OPTIONS["opset"],
        help="ONNX opset, 13..21 (INT4 weights need 21)",
    )
    g.add_argument(
        "--integer-attention",
        action="store_true",
        help="round post-Softmax levels to 8-bit fixed point so attn @ v is an integer MatMul too",
    )
    g.add_argument(
        "--export-dtype",
        choices=FLOAT_DTYPES,
        default=_EXPORT_OPTIONS["export_dtype"],
        help="float32: QDQ graph for onnxruntime's fused integer kernels (fast); float64: float parts "
        "in float64, products as MatMulInteger, the float64 simulation's logits exactly (slower)",
    )
    g.add_argument(
        "--export-target",
        choices=RUNTIMES,
        default=_EXPORT_OPTIONS["export_target"],
        help="the runtime whose integer kernels the float32 graph is shaped for (the same codes; "
        "openvino: every integer operand without zero points, as OpenVINO's int8 kernels need)",
    )
    g.add_argument(
        "--export-weight-type",
        choices=WEIGHT_TYPES,
        default=_EXPORT_OPTIONS["export_weight_type"],
        help="container of 8-bit weight codes for onnxruntime: int8 (uint8 x int8 kernels: fast, exact "
        "on CPUs with VNNI/AMX and on ARM) or uint8 (exact on AVX2-only CPUs, where uint8 x int8 sums "
        "saturate). Default: the exact one for the CPU that exports (uint8 on x86 without VNNI, else "
        "int8); uint8 for float64",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one ``dopq: error: ...`` line, exit status 2 (an
    unknown choice, a missing argument), instead of the usage block (subcommands inherit it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no prefixes of long options: `quantize --out x.onnx` was taken as --output
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dopq", description="Post-training quantization of ViTs (DopQ-ViT, RepQ-ViT)")
    parser.add_argument("--version", action="version", version=f"dopq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and evaluate FP vs quantized")
    _add_model_args(q)
    _add_data_args(q)
    _add_recipe_args(q)
    _add_gptq_args(q)
    _add_reconstruction_args(q)
    _add_quantized_model_args(q)
    _add_export_args(q, flag="--export")
    e = sub.add_parser(
        "evaluate",
        help="evaluate a saved quantized model and/or an exported ONNX model (onnxruntime or OpenVINO)",
    )
    e.add_argument("--quantized", type=Path, help="a model saved with `dopq quantize --save`")
    e.add_argument(
        "--onnx",
        type=Path,
        help="an exported model; with --quantized too, the two are compared image by image",
    )
    e.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="what runs the --onnx model (default onnxruntime); openvino needs pip install 'dopq[openvino]'",
    )
    e.add_argument("--model", help="refuse the file unless it was made for this architecture")
    _add_data_args(e, calib=False)
    x = sub.add_parser("export", help="export a model saved with `dopq quantize --save` to ONNX")
    x.add_argument("--quantized", type=Path, required=True)
    _add_export_args(x, flag="--out", required=True)
    x.add_argument(
        "--quiet", action="store_true", help="accepted as by the other commands (export draws no bars)"
    )
    x.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    pl = sub.add_parser("plot", help="plot attention histograms with quantizer levels, or post-LN scales")
    _add_model_args(pl)
    pl.add_argument("--data", required=True, help="ImageFolder root or .tar/.tar.gz: the images plotted")
    pl.add_argument("--calib-split", default="train", help="the split the images are drawn from")
    pl.add_argument("--calib-size", type=int, default=32, help="how many images, drawn as for calibration")
    pl.add_argument("--seed", type=int, default=0, help="seed of the draw (randperm)")
    pl.add_argument("--bits", type=int, default=4, help="width of the quantizers drawn and calibrated")
    pl.add_argument(
        "--block",
        type=int,
        default=0,
        help="0-based index in forward order of the attention module (attention) and of the LayerNorm -> "
        "Linear pair (ln-scales); a ViT block has two pairs (norm1 -> qkv, norm2 -> fc1), so pair N is "
        "not block N's",
    )
    # dopq.plots.PLOT_KINDS, written out: importing dopq.plots (matplotlib) would slow every command
    pl.add_argument(
        "--kind",
        choices=["attention", "ln-scales", "all"],
        default="all",
        help="attention: one block's post-Softmax histogram with each quantizer's levels; ln-scales: one "
        "pair's per-channel input scales with the MOSF targets; all: both",
    )
    pl.add_argument(
        "--out-dir",
        type=Path,
        default=Path("plots"),
        help="folder of the PNGs: attention_block{N}_a{BITS}.png, ln_scales_pair{N}_a{BITS}.png",
    )
    pl.add_argument("--device", default="cpu", help="cpu or cuda")
    pl.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    return parser


def _flag(name: str) -> str:
    """The command-line flag of an argument's or a recipe field's name: ``w_bits`` -> ``--w-bits``."""
    return "--" + name.replace("_", "-")


def _config_from(args: argparse.Namespace) -> QuantConfig:
    """The recipe the quantize flags describe; a config's refusal names the flag, not the field."""
    try:
        return _recipe_of(args)
    except ConfigError as exc:
        raise ConfigError(_in_flag_names(str(exc), args)) from None


# ReconstructConfig's fields, which its messages name as "recon <field>", and their flags
_RECON_FLAGS = {
    name: _flag(f"recon_{name}")
    for name in ("calib_size", "iters", "batch_size", "rounding", "drop_prob", "grad_shards")
}


def _in_flag_names(message: str, args: argparse.Namespace) -> str:
    """A config's message starts with the field it refuses (``w_bits must be ...``, ``recon
    grad_shards (8) must ...``); on the command line that is a flag (``--w-bits``). Fields without a
    flag (set through the Python API) keep their names."""
    match = re.match(r"(recon )?([a-z][a-z0-9_]*)\b", message)
    if match is None:
        return message
    recon, field = match.groups()
    flag = _RECON_FLAGS.get(field) if recon else (_flag(field) if hasattr(args, field) else None)
    return message if flag is None else flag + message[match.end() :]


def _recipe_of(args: argparse.Namespace) -> QuantConfig:
    overrides: dict[str, Any] = {
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "softmax_quantizer": args.softmax_quantizer,
        "ln_scale": args.ln_scale,
        "ln_shift": args.ln_shift,
        "tanq_objective": args.tanq_objective,
        "weight_rounding": args.weight_rounding,
        "gptq_damp": args.gptq_damp,
        "gptq_target": args.gptq_target,
        "gptq_target_shrink": args.gptq_target_shrink,
        "act_percentiles": tuple(args.act_percentiles) if args.act_percentiles else None,
        "act_range_objective": args.act_range_objective,
        "edge_w_bits": args.edge_w_bits,
        "tanq_centers": tuple(args.tanq_centers) if args.tanq_centers else None,
        "symmetric_attention": args.symmetric_attention,
    }
    for switch in (
        "integer_zero_point",
        "bias_correction",
        "gptq_act_order",
        "gptq_check",
        "symmetric_weights",
        "centre_values",
    ):
        if getattr(args, switch):
            overrides[switch] = getattr(args, switch) == "on"
    if args.reconstruct:
        overrides["reconstruct"] = ReconstructConfig(
            calib_size=args.recon_calib_size,
            iters=args.recon_iters,
            batch_size=args.recon_batch_size,
            rounding=args.recon_rounding,
            drop_prob=args.recon_drop_prob,
            seed=args.seed,
            grad_shards=args.recon_grad_shards,
        )
    grid_bits = args.softmax_grid_bits
    if grid_bits and not SOFTMAX_GRID_BITS_RANGE[0] <= grid_bits <= SOFTMAX_GRID_BITS_RANGE[1]:
        # the config's own message offers None, which the flag spells 0
        low, high = SOFTMAX_GRID_BITS_RANGE
        raise ConfigError(
            f"--softmax-grid-bits must be in {low}..{high}, or 0 for TanQ's exact midpoints; got {grid_bits}"
        )
    if grid_bits:
        overrides["softmax_grid_bits"] = grid_bits
    # only what was given: None would set a field that takes None (get_preset) over the recipe's rule
    config = get_preset(args.method, **{k: v for k, v in overrides.items() if v is not None})
    _check_gptq_options_apply(args, config)
    _check_tanq_options_apply(args, config)
    return config.replace(softmax_grid_bits=None) if grid_bits == 0 else config  # 0: exact midpoints


_GPTQ_OPTIONS = ("gptq_damp", "gptq_act_order", "gptq_target", "gptq_target_shrink", "gptq_check")


def _check_gptq_options_apply(args: argparse.Namespace, config: QuantConfig) -> None:
    """A GPTQ option given to a recipe that rounds to nearest would be ignored without a word, and so
    would the float target's shrink given to a GPTQ that aims at the quantized target."""
    given = [name for name in _GPTQ_OPTIONS if getattr(args, name) is not None]
    if given and config.weight_rounding != "gptq":
        flag = _flag(given[0])
        raise ConfigError(
            f"{flag} is for GPTQ rounding, which --method {args.method} at W{config.w_bits} does not "
            "use: add --weight-rounding gptq or drop it"
        )
    if args.gptq_target_shrink is not None and config.gptq_target_used != "float":
        # the shrink moves weights towards the float target's least-squares solution; the quantized
        # target (the width rule's at 4 bits and above) has none
        raise ConfigError(
            f"--gptq-target-shrink is for GPTQ's float target, which --method {args.method} at "
            f"W{config.w_bits}/A{config.a_bits} does not aim at (its target is {config.gptq_target_used}): "
            "add --gptq-target float or drop it"
        )


_TANQ_OPTIONS = ("tanq_centers", "tanq_objective", "softmax_grid_bits")


def _check_tanq_options_apply(args: argparse.Namespace, config: QuantConfig) -> None:
    """A TanQ option given to a recipe whose post-Softmax quantizer is not TanQ (nor auto, which
    tries it) would be ignored without a word (dopq's uniform grid at 8 bits, say)."""
    given = [name for name in _TANQ_OPTIONS if getattr(args, name) is not None]
    if given and config.softmax_quantizer not in ("tanq", "auto"):
        raise ConfigError(
            f"{_flag(given[0])} is for TanQ, which --method {args.method} at A{config.a_bits} "
            f"does not use (its post-Softmax quantizer is {config.softmax_quantizer}): add "
            "--softmax-quantizer tanq or drop it"
        )


def _settings_from(args: argparse.Namespace):
    from dopq.experiment import RunSettings, preprocess_overrides

    return RunSettings(
        model=args.model,
        data=args.data,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        pretrained=args.pretrained,
        calib_split=getattr(args, "calib_split", "train"),
        eval_split=getattr(args, "eval_split", None),
        calib_size=args.calib_size,
        seed=args.seed,
        eval_subset=getattr(args, "eval_subset", None),
        batch_size=getattr(args, "batch_size", 64),
        workers=getattr(args, "workers", None),
        skip_bad_images=getattr(args, "skip_bad_images", False),
        device=args.device,
        compile=getattr(args, "compile", False),
        **preprocess_overrides(args),
    )


def _print(text: str) -> None:
    """A line on stdout. A reader that went away (``dopq quantize ... | head -3``) does not stop the
    run: its files are still written. (The broken pipe stopped it with a traceback, before the JSON.)"""
    try:
        print(text, flush=True)  # flushed: a broken pipe is met here, not at exit
    except BrokenPipeError:
        # the rest of stdout goes nowhere: Python's own flush at exit would meet the pipe again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _write_outputs(result: dict[str, Any], output: Path | None) -> None:
    from dopq.report import result_table, write_result

    _print(result_table(result))
    if output is not None:
        json_path, md_path = write_result(result, output)
        _print(f"wrote {json_path} and {md_path}")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dopq.experiment import load_workload, run_recipe

    config = _config_from(args)
    if args.export is not None and not config.integer_zero_point:
        raise ConfigError(
            "--export needs integer zero points (integer kernels); add --integer-zero-point on "
            "(the dopq recipe's default)"
        )
    settings = _settings_from(args)
    work = load_workload(settings)
    # the hint covers the writing too: a stop there leaves no half-written file, and the
    # checkpoint, which then holds every unit, makes the resumed run skip straight to it
    with _stopped_with_resume_hint(args.checkpoint_dir):
        result, model = run_recipe(
            work,
            config,
            method=args.method,
            progress=_shows_progress(args),
            recon_size=args.recon_calib_size,
            allow_partial=args.allow_partial,
            eval_dtype=_eval_dtype(args),
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
        )
        if distributed.current().is_main:  # one process writes, the others have the same model
            _write_quantized(result, model, config, work, args)
    return 0


def _write_quantized(
    result: dict[str, Any], model: Any, config: QuantConfig, work: Any, args: argparse.Namespace
) -> None:
    """``--save``, ``--export`` and ``--output`` of a quantize run."""
    from dopq.serialize import save_quantized

    meta = {
        "preprocess": work.preprocess.to_dict(),
        "command": result["command"],
        # what the command does not say but the saved codes depend on (docs/design.md, Reproducibility)
        "threads": result["threads"],
        "versions": result["versions"],
        "checkpoint_sha256": result.get("checkpoint_sha256"),  # the float weights it was made from
        "quant_top1": result["quant_top1"],
        "eval_dtype": result["eval_dtype"],
        "allow_partial": args.allow_partial,
    }
    timings = result["timings"]  # the files' writing is a stage of the run too
    if args.save is not None:
        start = time.perf_counter()
        result["saved_to"] = str(save_quantized(model, args.save, config, meta))
        timings["save"] = time.perf_counter() - start
    if args.export is not None:
        start = time.perf_counter()
        result["export"] = _export(model, config, meta, args)
        timings["export"] = time.perf_counter() - start
    _write_outputs(result, args.output)


class _Stopped(Exception):
    """A checkpointed run stopped by a signal: the CLI says how to resume and exits 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def _resume_hint(directory: Path) -> str:
    from dopq.checkpoint import describe
    from dopq.environment import command_line

    group = distributed.current()
    if not group.is_main:  # process 0 writes the checkpoint: this machine may have no copy of it
        return f"process 0's {directory} keeps every unit finished; resume with the same torchrun command and --resume"
    if group.world_size > 1:
        return f"{describe(directory)}; resume with the same torchrun command and --resume"
    return f"{describe(directory)}; resume with: {command_line()} --resume"


@contextmanager
def _stopped_with_resume_hint(directory: Path | None) -> Iterator[None]:
    """With a checkpoint directory, SIGTERM (as SIGINT already does) stops the run with an
    exception: the unit in progress is dropped, the checkpoint of the last finished one is kept,
    and the run ends with one line naming the command that resumes it. Under torchrun SIGTERM is
    the process group's watcher's (``distributed.exit_with_one_line_on_sigterm``)."""
    if directory is None:
        yield
        return
    from dopq.checkpoint import Interrupted

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = None
    if distributed.current().world_size == 1:
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except distributed.DistributedError as exc:  # another process stopped: say how to go on
        raise distributed.DistributedError(f"{exc}; {_resume_hint(directory)}") from None
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM through stop()
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        raise _Stopped(signum, f"stopped by {name}: {_resume_hint(directory)}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _eval_dtype(args: argparse.Namespace) -> str:
    """``--eval-dtype``, by default the exported graph's: the accuracy printed is then the one the
    float64 graph reproduces."""
    if args.eval_dtype is not None:
        return args.eval_dtype
    exported64 = getattr(args, "export", None) is not None and args.export_dtype == "float64"
    return "float64" if exported64 else "float32"


# (argument, smallest allowed value); None values are left to their defaults
_LOWER_BOUNDS = {
    "batch_size": 1, "calib_size": 1, "eval_subset": 1, "threads": 1, "workers": 0, "num_classes": 1,
    "recon_calib_size": 1, "recon_batch_size": 1, "recon_iters": 0, "recon_grad_shards": 1, "bits": 2,
}  # fmt: skip


def _shows_progress(args: argparse.Namespace) -> bool:
    """Progress bars where a person watches: not with --quiet, nor where stderr is a file or a pipe
    (a log would get every redrawn frame); warnings, checkpoint lines and the result are printed
    either way. (A log gets no line per stage: a redirected run is silent until its result.)"""
    return not args.quiet and sys.stderr.isatty()


def _refuse_given(args: argparse.Namespace, options: dict[str, Any], flag: str, to_add: str) -> None:
    """An option of ``options`` (name -> default) given without ``flag``, which alone uses them, would
    be ignored without a word: refused instead."""
    given = [name for name, default in options.items() if getattr(args, name, default) != default]
    if given:
        raise ConfigError(f"{_flag(given[0])} is for {flag}: add {to_add} or drop it")


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model or image is loaded but the output locations
    (:func:`_check_outputs`): numbers, the device, combinations of options."""
    from dopq.devices import resolve_device

    for name, low in _LOWER_BOUNDS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"{_flag(name)} must be >= {low}, got {value}")
    if getattr(args, "checkpoint", None) and getattr(args, "pretrained", False):
        # build_model would take the checkpoint and drop --pretrained without a word
        raise ConfigError("--checkpoint and --pretrained are two sources of weights: give one")
    if getattr(args, "resume", False) and args.checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir DIR (where the checkpoint is)")
    if getattr(args, "checkpoint_dir", None) is not None and not args.reconstruct:
        raise ConfigError("--checkpoint-dir is for runs with --reconstruct")
    drop = getattr(args, "recon_drop_prob", None)
    if drop is not None and not 0.0 <= drop <= 1.0:
        raise ConfigError(f"--recon-drop-prob must be in [0, 1], got {drop}")
    if args.command == "quantize" and not args.reconstruct:
        _refuse_given(args, _RECON_OPTIONS, "--reconstruct", "--reconstruct")
    if getattr(args, "device", None):
        resolve_device(args.device)
    _check_distinct_files(args)
    if args.command == "quantize" and args.export is None:
        _refuse_given(args, _EXPORT_OPTIONS, "--export", "--export PATH")
    if getattr(args, "export", None) is not None:
        if args.export_target == "openvino" and args.export_dtype != "float32":
            raise ConfigError("--export-target openvino is a float32 graph: drop --export-dtype float64")
        if args.export_target == "openvino" and args.export_weight_type == "uint8":
            raise ConfigError("--export-target openvino takes int8 weights: drop --export-weight-type uint8")
    if getattr(args, "runtime", None) == "openvino":
        from dopq.export.openvino_runtime import require_openvino

        require_openvino()  # before any image is read


def _check_outputs(args: argparse.Namespace) -> None:
    """Every location the command writes (--output, --save, --export, --checkpoint-dir, --out-dir)
    can be written (folders are created)."""
    from dopq.files import check_output_dir, check_output_path
    from dopq.report import markdown_path

    if getattr(args, "checkpoint_dir", None) is not None:
        check_output_dir(args.checkpoint_dir, "--checkpoint-dir")
    for name, flag in (("output", "--output"), ("save", "--save")):
        if getattr(args, name, None) is not None:
            check_output_path(getattr(args, name), flag)
    if getattr(args, "output", None) is not None:
        # written after the JSON, at the very end: a folder there stopped the run with a traceback
        check_output_path(markdown_path(args.output), f"--output {args.output}: its Markdown twin")
    if getattr(args, "out_dir", None) is not None:
        check_output_dir(args.out_dir, "--out-dir")
    if getattr(args, "export", None) is not None:
        from dopq.export.onnx_export import check_export_target

        check_export_target(args.export, args.opset)


def _check_outputs_where_written(args: argparse.Namespace) -> None:
    """:func:`_check_outputs` in process 0 alone, the one that writes: under torchrun the others
    may run on machines without its folders (or without onnx). It runs after the process group is
    joined: a process that stopped before would leave the others on other machines waiting for it
    in the rendezvous until its timeout. Process 0's refusal stops every process with its line."""
    refusal = None
    if distributed.current().is_main:
        try:
            _check_outputs(args)
        except DopqError as exc:
            refusal = exc
    verdict = distributed.all_gather_objects(None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if verdict is not None:
        raise ConfigError(verdict)


_READ_FILES = (
    ("checkpoint", "--checkpoint"),
    ("quantized", "--quantized"),
    ("onnx", "--onnx"),
    ("data", "--data"),
)


def _check_distinct_files(args: argparse.Namespace) -> None:
    """No file a command writes (``--save``, ``--export``, ``--output`` and its ``.md``) may be one
    it reads or another it writes: the later write would replace the float checkpoint or the model."""
    from dopq.report import markdown_path

    written: dict[str, str] = {}
    output = getattr(args, "output", None)
    outputs = [
        ("--output", output),
        ("--output's Markdown twin", None if output is None else markdown_path(output)),
    ]
    for flag, path in [
        *outputs,
        ("--save", getattr(args, "save", None)),
        ("--out" if args.command == "export" else "--export", getattr(args, "export", None)),
    ]:
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in written:
            raise ConfigError(f"{flag} and {written[real]} name the same file {path}: give each its own")
        written[real] = flag
    for name, flag in _READ_FILES:
        path = getattr(args, name, None)
        if isinstance(path, str | Path) and os.path.realpath(path) in written:
            raise ConfigError(
                f"{written[os.path.realpath(path)]} {path} is the {flag} file this command reads: write elsewhere"
            )


def _export(
    model: Any, config: QuantConfig, meta: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    from dopq.environment import command_line
    from dopq.export import export_onnx

    # "command" stays the one that quantized the model (a saved file's); this one wrote the graph
    metadata = {**meta, "recipe": config.to_dict(), "export_command": command_line()}
    report = export_onnx(
        model,
        args.export,
        args.opset,
        args.integer_attention,
        metadata,
        float_dtype=args.export_dtype,
        target=args.export_target,
        weight_type=args.export_weight_type,
    )
    _print(
        f"wrote {report.path} ({report.bytes / 1e6:.2f} MB, {report.weight_storage} weights, "
        f"opset {report.opset}, {report.float_dtype}, for {report.target})"
    )
    return report.to_dict()


def _cmd_export(args: argparse.Namespace) -> int:
    from dopq.serialize import load_quantized

    model, config, meta = load_quantized(args.quantized)
    _export(model, config, meta, args)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dopq.experiment import preprocess_overrides
    from dopq.reevaluate import evaluate_onnx, evaluate_saved

    if args.quantized is None and args.onnx is None:
        raise ConfigError("dopq evaluate needs --quantized MODEL.pt, --onnx MODEL.onnx, or both")
    if args.onnx is not None and args.eval_dtype is not None:
        raise ConfigError(
            "--eval-dtype is for --quantized alone: with --onnx the simulation runs in the graph's own dtype"
        )
    if args.onnx is not None and args.compile:
        raise ConfigError("--compile is for --quantized alone: onnxruntime runs the --onnx model")
    if args.onnx is None and args.runtime is not None:
        raise ConfigError("--runtime is for --onnx: it names what runs the exported model")
    common = dict(
        eval_split=args.eval_split,
        eval_subset=args.eval_subset,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=_shows_progress(args),
        overrides=preprocess_overrides(args),
        skip_bad_images=args.skip_bad_images,
    )
    if args.onnx is not None:
        result = evaluate_onnx(
            args.onnx,
            args.data,
            quantized=args.quantized,
            threads=args.threads,
            runtime=args.runtime or "onnxruntime",
            **common,
        )
    else:
        result = evaluate_saved(
            args.quantized,
            args.data,
            arch=args.model,
            device=args.device,
            eval_dtype=_eval_dtype(args),
            compile=args.compile,
            **common,
        )
    if distributed.current().is_main:
        _write_outputs(result, args.output)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from dopq.api import check_model_runs
    from dopq.data import (
        build_transform,
        calibration_indices,
        load_batch,
        open_split,
        preprocess_for,
        single_line_errors,
    )
    from dopq.devices import resolve_device
    from dopq.models import build_model, example_input
    from dopq.plots import check_plot_request, write_plots

    device = resolve_device(args.device)
    model = build_model(args.model, args.checkpoint, args.num_classes, args.pretrained)
    check_model_runs(model, example_input(model))  # an input size it cannot take: one line
    check_plot_request(model, args.kind, args.block, args.bits)  # before touching the data
    pre, _ = preprocess_for(model, args.checkpoint)
    dataset = open_split(args.data, args.calib_split, build_transform(pre))
    with single_line_errors():
        images = load_batch(dataset, calibration_indices(len(dataset), args.calib_size, args.seed))[0]
    model = model.to(device)
    for path in write_plots(
        model, images.to(device), args.model, args.kind, args.block, args.bits, args.out_dir
    ):
        _print(f"wrote {path}")
    return 0


def _join_process_group(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Under torchrun: join the group, check every process got the same arguments, and let only
    process 0 print progress. Nothing happens in a plain one-process run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or args.command not in ("quantize", "evaluate"):
        return
    if args.command == "evaluate" and args.onnx is not None:
        raise ConfigError(
            "dopq evaluate --onnx runs in one process (onnxruntime has its own threads); start it without torchrun"
        )
    note = None
    if getattr(args, "checkpoint_dir", None) is not None:
        note = (
            f"the checkpoint in {args.checkpoint_dir} keeps every unit finished; resume with the same "
            "torchrun command and --resume"
        )
    distributed.exit_with_one_line_on_sigterm(note)  # before any thread of the process group starts
    group = distributed.init_from_environment(args.device)
    distributed.check_same("arguments", sys.argv[1:] if argv is None else list(argv))
    import torch

    # another torch computes other float bits: a machine with other versions would not give the
    # one-process result (the checkpoints refuse another torch for the same reason)
    versions = {"dopq": __version__, "torch": str(torch.__version__)}
    distributed.check_same("versions", versions, "install the same dopq and torch on every machine")
    if getattr(args, "reconstruct", False):
        from dopq.reconstruct import check_processes

        check_processes(args.recon_grad_shards)
    if not group.is_main:
        args.quiet = True
        # each warning is process 0's as well (the same model, listings and gathered records):
        # one copy of it, not one per process
        logging.getLogger("dopq").setLevel(logging.ERROR)


def _use_deterministic_kernels() -> None:
    """Process-wide switches for bit-repeatable CUDA runs (docs/design.md, Reproducibility)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: set first
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


class _LineHandler(logging.StreamHandler):
    """Log lines on stderr written through tqdm, which takes the progress bars off the screen and
    draws them again below the line: written straight to stderr, a warning during a bar ran on from
    the bar's last frame and left that frame behind as a stale copy of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dopq`` command; user errors print one line and exit with 2."""
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:
        distributed.closing_line(f"dopq: error: {' '.join(str(exc).split())}", 2)
        return 2
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[_LineHandler()]
    )
    commands = {
        "quantize": _cmd_quantize,
        "evaluate": _cmd_evaluate,
        "export": _cmd_export,
        "plot": _cmd_plot,
    }
    try:
        with environment.dopq_arguments(argv):
            return _run(args, argv, commands)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace, argv: list[str] | None, commands: dict[str, Any]) -> int:
    try:
        with _sigterm_stops():
            _check_args(args)
            _join_process_group(args, argv)
            _check_outputs_where_written(args)
            if getattr(args, "threads", None):
                import torch

                torch.set_num_threads(args.threads)
            if getattr(args, "deterministic", False):
                _use_deterministic_kernels()
            return commands[args.command](args)
    except DopqError as exc:
        message = " ".join(str(exc).split())  # always one line
        distributed.closing_line(f"dopq: error: {message}", 2)
        return 2
    except _Stopped as exc:
        distributed.closing_line(f"dopq: {exc}", 128 + exc.signum)
        return 128 + exc.signum
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)  # SIGTERM through _sigterm_stops
        stopped = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        distributed.closing_line(f"dopq: {stopped}", 128 + signum)
        return 128 + signum


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """In one process SIGTERM (kill, timeout, a scheduler's preemption) stops a command as Ctrl-C
    does, by an exception: the temporaries of the files being written are removed on the way out
    and one line says why it stopped. Its default action killed the process where it stood and left
    them beside the outputs (a hidden ``.q.onnx.*`` folder with a partial graph, a ``.q.pt.*.tmp``).
    Under torchrun a watcher thread takes SIGTERM (``distributed.exit_with_one_line_on_sigterm``)."""
    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    from dopq.checkpoint import Interrupted

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
