"""The quantization recipe: one typed, serializable config; presets are plain instances."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from dopq.errors import ConfigError
from dopq.quantizers.tanq import DEFAULT_CENTERS, TANQ_OBJECTIVES
from dopq.quantizers.uniform import RANGE_OBJECTIVES

__all__ = [
    "GPTQ_FLOAT_TARGET_MAX_BITS",
    "GPTQ_TARGETS",
    "LN_SCALE_RULES",
    "LN_SHIFTS",
    "RANGE_OBJECTIVES",
    "RECIPE_ATTRIBUTE",
    "RECOMMENDED",
    "SOFTMAX_CHOICES",
    "SOFTMAX_GRID_BITS",
    "SOFTMAX_GRID_BITS_RANGE",
    "SOFTMAX_QUANTIZERS",
    "SYMMETRIC_ATTENTION",
    "TANQ_CENTERS",
    "TANQ_CENTERS_WIDE",
    "TANQ_OBJECTIVES",
    "WEIGHT_ROUNDINGS",
    "WEIGHT_TYPES",
    "QuantConfig",
    "ReconstructConfig",
    "get_preset",
    "list_presets",
]

SOFTMAX_QUANTIZERS = ("uniform", "log2", "logsqrt2", "tanq")
# "auto": per attention module, the family among tanq / log2 / logsqrt2 with the lowest attn @ v error
SOFTMAX_CHOICES = (*SOFTMAX_QUANTIZERS, "auto")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
# GPTQ's objective: the layer's own float output on its quantized inputs, or the float model's output
GPTQ_TARGETS = ("quantized", "float")
# GPTQ aims at the float model's output by default at and below this width (QuantConfig.gptq_target_used)
GPTQ_FLOAT_TARGET_MAX_BITS = 3
LN_SCALE_RULES = ("mean", "median", "mad", "search")
LN_SHIFTS = ("bias", "input")
# which operands of the attention products sit on grids centred on 0: none, q and k, or q, k and v
SYMMETRIC_ATTENTION = ("off", "qk", "qkv")
MIN_BITS, MAX_BITS = 2, 8
# TanQ's candidate centres m: dopq's grid, and a wider one (--tanq-centers). Centres above 1/2 put
# more levels near 0, where most attention values lie: on every attention module of the shared
# DeiT-Tiny and Swin-Tiny the wider grid cut the attn @ v error 2-2.6x at 3 and 4 bits; top-1 rose on
# DeiT-Tiny at both, fell on Swin-Tiny at 4 bits and tied it at 3 over six seeds (docs/tanq.md)
TANQ_CENTERS = DEFAULT_CENTERS  # (0.35, 0.5)
TANQ_CENTERS_WIDE = (0.35, 0.5, 0.65, 0.8, 0.9)
# 2^-16: TanQ's thresholds move by <= 7.6e-6, under 2 % of the smallest level gap of the shared
# models' 4-bit tables (>= 6e-4); a 65537-entry table per attention module in the export
SOFTMAX_GRID_BITS = 16
SOFTMAX_GRID_BITS_RANGE = (8, 20)  # the grids softmax_grid_bits may name (None: exact midpoints)
# where dopq.quantize (and load_quantized) leave the recipe, as a dict, on the model they return: the
# recipe save_quantized records must be that one (its fields beyond the quantizers' kinds and widths
# leave no trace in the model's structure)
RECIPE_ATTRIBUTE = "dopq_recipe"
# float dtypes a quantized model is evaluated or exported in (float64: docs/export.md)
FLOAT_DTYPES = ("float32", "float64")
# what runs an exported ONNX model (dopq evaluate --onnx --runtime)
RUNTIMES = ("onnxruntime", "openvino")
# The container of 8-bit weight codes for onnxruntime. int8: its uint8 x int8 kernels, fast and exact on
# CPUs with VNNI (AVX-512 VNNI, AVX-VNNI, AMX), on ARM and GPUs; on x86 CPUs without VNNI (AVX2 only)
# their int16 pair sums saturate once both operands span their 8-bit range (W8/A8 DeiT-Tiny: 98.9 %
# of predictions as simulated). uint8: uint8 x uint8 kernels, exact on every CPU, the fast choice on
# AVX2 and much slower than int8 on a VNNI/AMX Xeon (docs/export.md); the export picks the exact one for
# the CPU it runs on unless told. Below 8 bits weights are int8/int4 with either (centred codes cannot
# saturate).
WEIGHT_TYPES = ("int8", "uint8")


def _check_bits(name: str, value: int) -> None:
    if not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type: strict bools (a string "off" is not False),
    integers that are not bools, finite numbers for floats, tuples (or lists) of the element type;
    text is left to the choice checks."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:  # every text field is a choice, whose own check lists the choices
        return True
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple | list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_field_types(config: Any) -> None:
    """Refuse a field whose value is not of its annotated type (configs read from JSON or YAML):
    checked before any range, so that a wrong type is named as such."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _fits(value, hints[field.name]):
            expected = str(hints[field.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{field.name} must be {expected}, got {value!r}")


def _construct(cls: type, fields: dict[str, Any], where: str) -> Any:
    """``cls(**fields)``, with unknown field names one ConfigError (not the TypeError of __init__)."""
    if not isinstance(fields, dict):
        raise ConfigError(f"{where} must be a dict of field names and values, got {type(fields).__name__}")
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {where} fields: {', '.join(sorted(unknown))}")
    return cls(**fields)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


ROUNDINGS = ("ste", "adaround")

# Learning rates that follow the schedule: Adam moves a variable by about ``lr`` per step, so
# ``lr = travel / iters`` lets a variable cover the same distance in a short or a long run.
# Travel values and bounds measured on DeiT-Tiny W3/A3 (docs/reconstruction.md).
_LR_RULES: dict[str, tuple[float, float, float]] = {  # name: (travel, min lr, max lr)
    "weight": (6.0, 1e-3, 1e-1),  # AdaRound alpha: a rounding flip needs a travel of 2-4
    "act": (0.6, 4e-5, 1e-2),  # activation step sizes (QDrop: 4e-5 x 20 000 steps = 0.8)
    "bias": (1.8, 1e-4, 3e-2),
}


def _schedule_lr(kind: str, override: float | None, iters: int) -> float:
    if override is not None:
        return override
    travel, lo, hi = _LR_RULES[kind]
    return min(hi, max(lo, travel / max(1, iters)))


QDROP_MAX_BITS = 3  # QDrop by default at and below this width (ReconstructConfig.drop_prob_for)
QDROP_DEFAULT = 0.5


@dataclass
class ReconstructConfig:
    """Block reconstruction settings (the optimisation stage after calibration).

    Learning rates left at None follow the schedule, ``clamp(travel / iters, lo, hi)``: Adam moves
    a variable by about ``lr`` per step, so a short run needs larger steps (docs/reconstruction.md).

    Args:
        calib_size: images whose block inputs are cached for the optimisation.
        iters: optimisation steps per block; None picks 1000 at <= 4 bits and 200 above.
        batch_size: images per step.
        rounding: how the weight rounding is learned: "ste" (hard rounding throughout, the gradient
            through AdaRound's soft function) or "adaround" (soft rounding with a regularizer, made
            hard at the end). "ste" had the lower held-out block loss at 60 and 300 iterations
            (docs/reconstruction.md).
        lr_weight: learning rate of the rounding variables (None: ``clamp(6 / iters,
            1e-3, 0.1)``).
        lr_act: learning rate of the activation step sizes, LSQ-style (None: ``clamp(0.6 / iters,
            4e-5, 1e-2)``).
        learn_bias: also learn the float biases of the quantized layers.
        lr_bias: their learning rate (None: ``clamp(1.8 / iters, 1e-4, 3e-2)``).
        learn_weight_scale: also learn each weight channel's step size (as a log-gain, with
            ``lr_weight_scale``); measured without gain on DeiT-Tiny, so off by default.
        lr_weight_scale: learning rate of those log-gains.
        drop_prob: QDrop probability of keeping an activation in float during optimisation (None:
            0.5 at <= ``QDROP_MAX_BITS`` bits, off above; on an H200 at the full schedule it gained
            +48 / -31 images on DeiT-Tiny W3/A3 and tied at W4/A4 (+18 / -20) while costing time).
        learn_softmax: also learn the post-Softmax quantizer's parameters (TanQ's, also as ``auto``'s
            candidate). Off by default: measured on the shared DeiT-Tiny it made block losses worse
            (docs/reconstruction.md). A uniform post-Softmax quantizer's step is an activation step,
            learned with the others either way; log2 and log-sqrt2 learn nothing.
        seed: seed of the image order and the QDrop masks (the images are the caller's; the CLI
            sets it to ``--seed``, which also draws its calibration subset).
        grad_shards: each batch's gradient as the sum, in order, of this many fixed contiguous
            shards' gradients, computed one after another or spread over up to this many torchrun
            processes: the model is then the same, byte for byte, on 1 to ``grad_shards`` processes.
            1: one backward of the whole batch (one process only).
    """

    calib_size: int = 1024
    iters: int | None = None
    batch_size: int = 64
    rounding: str = "ste"
    lr_weight: float | None = None
    lr_act: float | None = None
    learn_bias: bool = True
    lr_bias: float | None = None
    learn_weight_scale: bool = False
    lr_weight_scale: float = 1e-3
    drop_prob: float | None = None
    learn_softmax: bool = False
    seed: int = 0
    grad_shards: int = 1

    def __post_init__(self) -> None:
        _check_field_types(self)
        for name in ("calib_size", "batch_size", "grad_shards"):
            if getattr(self, name) < 1:
                raise ConfigError(f"recon {name} must be >= 1, got {getattr(self, name)}")
        if self.grad_shards > self.batch_size:
            raise ConfigError(
                f"recon grad_shards ({self.grad_shards}) must be at most the batch size ({self.batch_size})"
            )
        if self.iters is not None and self.iters < 0:
            raise ConfigError(f"recon iters must be >= 0, got {self.iters}")
        _check_choice("rounding", self.rounding, ROUNDINGS)
        if self.drop_prob is not None and not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"recon drop_prob must be in [0, 1], got {self.drop_prob}")
        for name in ("lr_weight", "lr_act", "lr_bias", "lr_weight_scale"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"recon {name} must be > 0, got {value}")

    def lr_weight_for(self, iters: int) -> float:
        """The rounding variables' learning rate for a schedule of ``iters`` steps."""
        return _schedule_lr("weight", self.lr_weight, iters)

    def lr_act_for(self, iters: int) -> float:
        """The activation step-size learning rate for a schedule of ``iters`` steps."""
        return _schedule_lr("act", self.lr_act, iters)

    def lr_bias_for(self, iters: int) -> float:
        """The bias learning rate for a schedule of ``iters`` steps."""
        return _schedule_lr("bias", self.lr_bias, iters)

    def drop_prob_for(self, bits: int) -> float:
        """QDrop's probability at ``bits``: the given one, else 0.5 up to ``QDROP_MAX_BITS`` and 0 above."""
        if self.drop_prob is not None:
            return self.drop_prob
        return QDROP_DEFAULT if bits <= QDROP_MAX_BITS else 0.0

    def iters_for(self, bits: int) -> int:
        """The paper family's default: 1000 iterations at 3-4 bits, 200 at 6 bits and above."""
        if self.iters is not None:
            return self.iters
        return 1000 if bits <= 4 else 200


def _check_percentiles(name: str, values: Any) -> tuple[float, ...]:
    values = tuple(float(p) for p in values)
    if not values or not all(0.5 < p <= 1.0 for p in values):
        raise ConfigError(f"{name} must be in (0.5, 1], got {values}")
    return values


@dataclass
class QuantConfig:
    """A PTQ recipe for a timm ViT/DeiT/Swin.

    Args:
        w_bits: weight bits (per output channel), 2..8.
        a_bits: activation bits, 2..8 (also the post-Softmax quantizer's bits).
        softmax_quantizer: post-Softmax quantizer: uniform, log2, logsqrt2 (RepQ-ViT), tanq, or
            auto (per attention module, whichever of tanq, log2 and logsqrt2 gives the smallest
            ``attn @ v`` error on the calibration data; docs/gptq.md).
        ln_scale: target-scale rule of the post-LayerNorm re-parameterization: mean (RepQ-ViT),
            median, mad or search (DopQ-ViT's MOSF variants).
        integer_zero_point: round the re-parameterized zero point to an integer (deployable);
            RepQ-ViT leaves it fractional.
        ln_shift: where the re-parameterization's per-channel shift goes: "bias" (folded with the
            float weights, RepQ-ViT) or "input" (an input offset the quantized weights multiply:
            the quantized layer is then exactly per-channel asymmetric, see docs/mosf.md).
        bias_correction: subtract from every quantized Linear's bias the mean output error its
            quantization causes on the calibration images (empirical bias correction).
        patch_embed_input_bits: bits of the image fed to the patch embedding.
        edge_w_bits: weight bits of the layers before the first attention block and after the last
            (the patch embedding and the classifier head, found from the model's units); None: ``w_bits``.
            They hold a few percent of the weights but feed, and read, every token.
        percentiles: candidate upper quantiles of the uniform range search.
        symmetric_weights: weight grids centred on 0 per output channel (zero point ``2^(b-1)``:
            signed codes without zero point, what OpenVINO's and TensorRT's int8 kernels take
            without a row-sum correction; docs/export.md). False: asymmetric ranges (RepQ-ViT).
        symmetric_attention: which operands of ``q @ k^T`` and ``attn @ v`` sit on per-tensor grids
            centred on 0 (signed codes without zero point): ``"off"`` (asymmetric ranges, RepQ-ViT),
            ``"qk"`` or ``"qkv"``. The openvino export then needs no zero-point correction for those
            products; with ``"qkv"`` OpenVINO fuses each attention's products and Softmax into one
            integer kernel (docs/export.md).
        centre_values: before calibration, take each channel's calibration mean out of attention's
            ``v`` (the v rows of its projection's bias) and give it back in the bias of the Linear
            reading ``attn @ v``: exact in float because every Softmax row sums to 1. A grid centred on
            0 (``symmetric_attention="qkv"``) then sits on the bulk of v (:mod:`dopq.centring`).
        act_percentiles: candidate upper quantiles of the activations' uniform range search
            (None: ``percentiles``, or with the output objective its own grid
            ``OUTPUT_PERCENTILES``, 0.99 to the full range). At 3 bits a tighter clip (0.99, 0.995)
            can pay (docs/gptq.md).
        act_range_objective: how a per-tensor activation quantizer picks its range: "mse" (its own
            squared error, RepQ-ViT's search) or "output" (the error it causes in the product it
            enters: the next Linear's output, or the attention product; docs/gptq.md). Operands on
            grids centred on 0 (``symmetric_attention``) keep the squared error.
        tanq_objective: "output" (error of attn @ v) or "mse" (error of the attention values).
        tanq_centers: TanQ's candidate centres ``m`` (each in (0, 1)); ``TANQ_CENTERS_WIDE`` lowers the
            attn @ v error of every shared model and won on DeiT-Tiny, but lost on Swin-Tiny at 4 bits
            (docs/tanq.md), so only the recommended preset's 3-bit activations use it.
        softmax_grid_bits: TanQ's thresholds snapped onto the ``2^-bits`` grid of ``[0, 1]`` (each moves
            by at most ``2^-(bits + 1)``, a few percent of the smallest level gap at 16), so that the
            exported code is one table read per element instead of a comparison per threshold: the
            onnxruntime export's fast form (docs/export.md). None: the exact midpoints (slower export).
        weight_rounding: how weights are rounded onto their calibrated per-channel grid:
            "nearest", or "gptq" (column by column with second-order error feedback from each
            layer's calibration inputs, after the re-parameterization; docs/gptq.md).
        gptq_damp: GPTQ's damping, a fraction of the Hessian's mean diagonal added to it.
        gptq_act_order: GPTQ quantizes columns in order of decreasing Hessian diagonal.
        gptq_target: "quantized" (``||X_q (W - W_q)^T||^2``) or "float" (``||X_fp W^T - X_q W_q^T||^2``,
            the float model's inputs ``X_fp``: GPTAQ's asymmetric objective, which also compensates
            the error of the layers before; docs/gptq.md); None: "float" at
            ``min(w_bits, a_bits) <= GPTQ_FLOAT_TARGET_MAX_BITS``, else "quantized"
            (:attr:`gptq_target_used`). Half way to the float target gains over both at W3/A3 on
            DeiT-Tiny and Swin-Tiny; at W4/A4 the float target gains nothing and costs a float pass.
        gptq_target_shrink: with the float target, the fraction of the way each weight moves from
            its float value to the least-squares target before rounding (1: all the way, which
            loses on Swin-Tiny at W3/A3 where half way wins; docs/gptq.md).
        gptq_check: keep GPTQ's rounding only when it lowers the calibration images' logit KL
            divergence from the float model significantly (two-sided Wilcoxon signed-rank test on the
            per-image differences, :mod:`dopq.rounding_check`), else round to nearest (bit for bit
            the model without GPTQ):
            a copy of the model, a float forward of the calibration batch, a second bias correction
            and about 1.5 quantized forwards more. False: always keep GPTQ's rounding.
        reconstruct: block reconstruction settings, or None for calibration only.

    Example:
        >>> QuantConfig(w_bits=4, a_bits=4).softmax_quantizer
        'tanq'
    """

    w_bits: int = 4
    a_bits: int = 4
    softmax_quantizer: str = "tanq"
    ln_scale: str = "median"
    integer_zero_point: bool = True
    ln_shift: str = "input"
    bias_correction: bool = True
    patch_embed_input_bits: int = 8
    edge_w_bits: int | None = None
    percentiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)
    act_percentiles: tuple[float, ...] | None = None
    act_range_objective: str = "mse"
    symmetric_weights: bool = False
    symmetric_attention: str = "off"
    centre_values: bool = False
    tanq_objective: str = "output"
    tanq_centers: tuple[float, ...] = TANQ_CENTERS
    softmax_grid_bits: int | None = SOFTMAX_GRID_BITS
    weight_rounding: str = "nearest"
    # 0.1 rather than the literature's 0.01: with 32 calibration images (6k correlated tokens) the
    # Hessian is noisy; held-out DeiT-Tiny W3/A3 logit error 0.210 at 0.1, 0.251 at 0.01 (docs/gptq.md)
    gptq_damp: float = 0.1
    gptq_act_order: bool = False
    gptq_target: str | None = None
    gptq_target_shrink: float = 0.5
    gptq_check: bool = False
    reconstruct: ReconstructConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reconstruct, dict):
            self.reconstruct = _construct(ReconstructConfig, self.reconstruct, "reconstruct")
        _check_field_types(self)
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        _check_bits("patch_embed_input_bits", self.patch_embed_input_bits)
        if self.edge_w_bits is not None:
            _check_bits("edge_w_bits", self.edge_w_bits)
        _check_choice("softmax_quantizer", self.softmax_quantizer, SOFTMAX_CHOICES)
        _check_choice("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        _check_choice("act_range_objective", self.act_range_objective, RANGE_OBJECTIVES)
        if not 0.0 < self.gptq_damp <= 1.0:
            raise ConfigError(f"gptq_damp must be in (0, 1], got {self.gptq_damp}")
        if self.gptq_target is not None:
            _check_choice("gptq_target", self.gptq_target, GPTQ_TARGETS)
        if not 0.0 <= self.gptq_target_shrink <= 1.0:
            raise ConfigError(f"gptq_target_shrink must be in [0, 1], got {self.gptq_target_shrink}")
        _check_choice("ln_scale", self.ln_scale, LN_SCALE_RULES)
        _check_choice("ln_shift", self.ln_shift, LN_SHIFTS)
        _check_choice("symmetric_attention", self.symmetric_attention, SYMMETRIC_ATTENTION)
        _check_choice("tanq_objective", self.tanq_objective, TANQ_OBJECTIVES)
        self.percentiles = _check_percentiles("percentiles", self.percentiles)
        if self.act_percentiles is not None:
            self.act_percentiles = _check_percentiles("act_percentiles", self.act_percentiles)
        low, high = SOFTMAX_GRID_BITS_RANGE
        if self.softmax_grid_bits is not None and not low <= self.softmax_grid_bits <= high:
            raise ConfigError(
                f"softmax_grid_bits must be in {low}..{high} or None, got {self.softmax_grid_bits}"
            )
        self.tanq_centers = tuple(float(m) for m in self.tanq_centers)
        if not self.tanq_centers or not all(0.0 < m < 1.0 for m in self.tanq_centers):
            raise ConfigError(f"tanq_centers must be in (0, 1), got {self.tanq_centers}")

    @property
    def gptq_target_used(self) -> str:
        """The GPTQ objective this recipe runs: the given one, else the width rule (see
        ``gptq_target``); read at use, so a ``replace`` of the widths moves it too."""
        if self.gptq_target is not None:
            return self.gptq_target
        return "float" if min(self.w_bits, self.a_bits) <= GPTQ_FLOAT_TARGET_MAX_BITS else "quantized"

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again). The presets' width rules are not applied
        again: for a preset at other widths, ``get_preset(name, w_bits=..., a_bits=...)``."""
        return _construct(
            QuantConfig,
            {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes},
            "config",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        data = dataclasses.asdict(self)
        data["percentiles"] = list(self.percentiles)
        data["tanq_centers"] = list(self.tanq_centers)
        if self.act_percentiles is not None:
            data["act_percentiles"] = list(self.act_percentiles)
        return data

    def checked(self) -> QuantConfig:
        """A validated copy: fields assigned after construction (``config.w_bits = 9``) are checked
        as the constructor checks them, the reconstruction settings' too."""
        recon = self.reconstruct
        if isinstance(recon, ReconstructConfig):
            recon = _construct(ReconstructConfig, dataclasses.asdict(recon), "reconstruct")
        return self.replace(reconstruct=recon)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return _construct(cls, data, "config")


# the fields whose type takes None, read once from the annotations
_NULLABLE_FIELDS = frozenset(
    name for name, hint in typing.get_type_hints(QuantConfig).items() if type(None) in typing.get_args(hint)
)

_PRESETS: dict[str, dict[str, Any]] = {
    "repq": dict(
        softmax_quantizer="logsqrt2",
        ln_scale="mean",
        integer_zero_point=False,
        ln_shift="bias",
        bias_correction=False,
    ),
    "dopq": dict(
        softmax_quantizer="tanq",
        ln_scale="median",
        integer_zero_point=True,
        ln_shift="input",
        bias_correction=True,
    ),
}


# The recommended recipe: dopq plus the calibration-time components that won or tied it at every
# width and model measured (benchmarks/run.py calib-gains --suffix _preset, docs/RESULTS.md
# "Recommended preset"); the rule below is the only difference, read from the widths when the
# preset is built: GPTQ rounds the weights at and below RECOMMENDED_GPTQ_MAX_BITS (min of the
# widths), aiming half way at the float model's output there (gptq_target_used). At 4 bits GPTQ tied
# or lost and doubled calibration time. With activations of RECOMMENDED_WIDE_TANQ_MAX_BITS or fewer
# TanQ searches its wider centre grid (TANQ_CENTERS_WIDE): at W3/A3 it won on DeiT-Tiny over ten
# seeds (+0.75 mean), tied on its outlier-stressed copy (ten seeds) and on Swin-Tiny (six), where
# three seeds had first shown a loss; at W4/A4 it lost on Swin-Tiny, so it stays off above 3 bits
# (docs/tanq.md). Left out: the per-module post-Softmax choice (auto: lost on Swin-Tiny at W4/A4).
# 8-bit weights are centred on 0 (RECOMMENDED_SYMMETRIC_W_BITS): signed codes without zero points,
# so OpenVINO's int8 kernels need no row-sum correction (docs/export.md); at 8 bits that tied dopq,
# at 4 bits it lost 0.5 on DeiT-Tiny.
# With 8-bit activations (RECOMMENDED_SYMMETRIC_A_BITS) q, k and v sit on grids centred on 0, so
# OpenVINO runs each attention (q @ k^T, Softmax, attn @ v) as one integer kernel with no zero-point
# correction, and v is first centred on its calibration mean (centre_values, exact in float): centring
# v's grid without that lost 0.3-0.5 on Swin-Tiny at W4/A8 at two of three seeds (docs/export.md).
# 4-bit weights under 8-bit activations (where the weights carry nearly all the error) are rounded by
# GPTQ with the strongest damping (RECOMMENDED_W4_GPTQ_DAMP: the Hessian's mean diagonal added to
# it): Swin-Tiny's W4/A8 within 0.3 of FP at three seeds, DeiT-Tiny and its outlier-stressed copy
# within 0.3 of dopq (docs/gptq.md); GPTQ's default damping lost 0.4 there at three of six seeds.
# 4-bit weights under narrower activations get the same rounding, kept only where the calibration
# images show it pays (gptq_check: a signed-rank test on their logit KL against the float model;
# measured at W4/A4):
# at W4/A4 it brought Swin-Tiny within 0.5 of FP at three seeds, where on the DeiT-Tiny models, which
# round-to-nearest already keeps at FP, unchecked GPTQ lost up to 1.3 at single seeds (docs/gptq.md).
RECOMMENDED = "recommended"
RECOMMENDED_GPTQ_MAX_BITS = 3
RECOMMENDED_WIDE_TANQ_MAX_BITS = 3
RECOMMENDED_W4_GPTQ_DAMP = 1.0
RECOMMENDED_SYMMETRIC_W_BITS = 8
RECOMMENDED_SYMMETRIC_A_BITS = 8


def _recommended_rules(w_bits: int, a_bits: int) -> dict[str, Any]:
    """The fields the recommended preset sets on top of dopq's at these widths."""
    rules: dict[str, Any] = {}
    if w_bits >= RECOMMENDED_SYMMETRIC_W_BITS:
        rules["symmetric_weights"] = True
    if a_bits >= RECOMMENDED_SYMMETRIC_A_BITS:
        rules["symmetric_attention"] = "qkv"
        rules["centre_values"] = True
    if a_bits <= RECOMMENDED_WIDE_TANQ_MAX_BITS:
        rules["tanq_centers"] = TANQ_CENTERS_WIDE
    if min(w_bits, a_bits) <= RECOMMENDED_GPTQ_MAX_BITS:
        rules["weight_rounding"] = "gptq"
    elif w_bits == 4:
        rules["weight_rounding"] = "gptq"
        rules["gptq_damp"] = RECOMMENDED_W4_GPTQ_DAMP
        rules["gptq_check"] = a_bits < RECOMMENDED_SYMMETRIC_A_BITS
    return rules


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return sorted([*_PRESETS, RECOMMENDED])


# TanQ's warped grid pays below 8 bits; at 8 bits the uniform grid ties or beats it (DeiT-Tiny and
# Swin-Tiny, docs/RESULTS.md "Deployment") and runs on integer kernels without TanQ's per-element
# closed form, which makes the exported model 4x slower (docs/export.md)
TANQ_MAX_BITS = 7


def get_preset(name: str, **overrides: Any) -> QuantConfig:
    """The named recipe with optional field overrides (given fields always win over the rules; None
    leaves a field that cannot be None to the recipe, and sets one that can).

    ``dopq`` (the paper's TanQ and MOSF, with the exact post-LayerNorm shift and bias correction)
    quantizes post-Softmax activations with TanQ up to ``TANQ_MAX_BITS`` and uniformly above. ``recommended`` is dopq plus GPTQ rounding at
    <= ``RECOMMENDED_GPTQ_MAX_BITS`` bits (aimed half way at the float model's output), TanQ's wider
    centre grid with <= ``RECOMMENDED_WIDE_TANQ_MAX_BITS``-bit activations, GPTQ rounding at 4-bit
    weights (damping ``RECOMMENDED_W4_GPTQ_DAMP``; below 8-bit activations kept only where the
    calibration images show it pays, ``gptq_check``), weight grids centred on 0
    at ``RECOMMENDED_SYMMETRIC_W_BITS`` bits, and q, k and (mean-centred) v on grids centred on 0
    with ``RECOMMENDED_SYMMETRIC_A_BITS``-bit activations.
    ``repq`` is the RepQ-ViT baseline.

    Example:
        >>> get_preset("repq", w_bits=3, a_bits=3).softmax_quantizer
        'logsqrt2'
        >>> get_preset("dopq", a_bits=4).softmax_quantizer, get_preset("dopq", a_bits=8).softmax_quantizer
        ('tanq', 'uniform')
        >>> c = get_preset("recommended", w_bits=3, a_bits=3)
        >>> c.weight_rounding, c.gptq_target_used, c.softmax_quantizer, c.tanq_centers == TANQ_CENTERS_WIDE
        ('gptq', 'float', 'tanq', True)
        >>> c = get_preset("recommended", w_bits=4, a_bits=4)
        >>> c.weight_rounding, c.gptq_damp, c.gptq_check
        ('gptq', 1.0, True)
        >>> c.replace(weight_rounding="nearest", gptq_damp=0.1, gptq_check=False) == get_preset("dopq")
        True
        >>> c = get_preset("recommended", w_bits=8, a_bits=8)
        >>> c.symmetric_weights, c.symmetric_attention, c.centre_values
        (True, 'qkv', True)
    """
    if name not in list_presets():
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(list_presets())}")
    # None leaves a field that cannot be None to the recipe (a caller's unset option); a field that
    # takes None (softmax_grid_bits=None: the exact TanQ midpoints) it sets like any other value
    given = {k: v for k, v in overrides.items() if v is not None or k in _NULLABLE_FIELDS}
    base = _PRESETS["dopq" if name == RECOMMENDED else name]
    w_bits = given.get("w_bits", QuantConfig.w_bits)
    a_bits = given.get("a_bits", QuantConfig.a_bits)
    _check_bits("w_bits", w_bits)
    _check_bits("a_bits", a_bits)
    rules: dict[str, Any] = {}
    if name in ("dopq", RECOMMENDED) and a_bits > TANQ_MAX_BITS:
        rules["softmax_quantizer"] = "uniform"
    if name == RECOMMENDED:
        rules.update(_recommended_rules(w_bits, a_bits))
    return _construct(QuantConfig, {**base, **rules, **given}, "config")
