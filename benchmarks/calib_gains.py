"""Calibration-time gains beyond the paper: GPTQ weight rounding and a per-module post-Softmax choice.

    python benchmarks/run.py calib-gains --threads 2 --models deit_tiny_patch16_224 stress --bits 3 4 6

``--models`` takes the shared architectures and ``stress`` (the outlier-stressed DeiT-Tiny of the
``stress`` suite). Each model writes ``calib_gains_<model><suffix>.json`` after every row: dopq,
dopq+gptq, dopq+auto and dopq+gptq+auto (``--recipes`` picks some), with the post-Softmax kind chosen
per module, the calibration time and a paired sign test against dopq on the same images.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from deploy import _width
from dopq.config import TANQ_CENTERS_WIDE, QuantConfig, get_preset
from dopq.data import calibration_indices, load_images
from dopq.experiment import Workload, run_recipe
from dopq.stats import paired_sign_test
from dopq.stress import rescale_layernorm_channels

STRESS = "stress"
STRESS_ARCH = "deit_tiny_patch16_224"
ACT_WIDE = (0.99, 0.995, 0.999, 0.9999, 0.99999)
DEFAULT_DAMP = QuantConfig.gptq_damp  # GPTQ's damping where the preset's W4/A8 rule does not set it
TAGS = {"deit_tiny_patch16_224": "deit", "swin_tiny_patch4_window7_224": "swin", STRESS: "stress"}


# rows that change a TanQ setting of dopq: where dopq's post-Softmax grid is uniform (8-bit
# activations) they would run dopq's model again under a TanQ label (the CLI refuses the same flags)
TANQ_ROWS = ("dopq+tanq-wide", "dopq+gptq+tanq-wide", "dopq+exact-midpoints")


def calib_gain_recipes(w_bits: int, a_bits: int | None = None) -> dict[str, QuantConfig]:
    """The presets (recommended, dopq, repq) and dopq with each calibration-time switch, alone and
    together. GPTQ's objective is named, not left to the width rule: ``gptq`` is the quantized-input
    target the earlier rows measured, ``gptq-float`` the float model's output all the way,
    ``gptq-float-half`` half way (what ``--weight-rounding gptq`` runs at 3 bits and below). The
    :data:`TANQ_ROWS` only where dopq's post-Softmax quantizer is TanQ."""
    a_bits = w_bits if a_bits is None else a_bits
    widths = {"w_bits": w_bits, "a_bits": a_bits}
    dopq = get_preset("dopq", **widths)
    both = dopq.replace(weight_rounding="gptq", gptq_target="quantized", softmax_quantizer="auto")
    recipes = {
        "dopq": dopq,  # first: every other row is paired with it
        "recommended": get_preset("recommended", **widths),
        "repq": get_preset("repq", **widths),
        "dopq+gptq": dopq.replace(weight_rounding="gptq", gptq_target="quantized"),
        "dopq+auto": dopq.replace(softmax_quantizer="auto"),
        "dopq+gptq+auto": both,
        # tighter activation clips in the range search (0.99, 0.995), alone and with both switches
        "dopq+act-wide": dopq.replace(act_percentiles=ACT_WIDE),
        "dopq+gptq+auto+act-wide": both.replace(act_percentiles=ACT_WIDE),
        # GPTQ against the float model's output (GPTAQ's asymmetric objective), alone and with auto
        "dopq+gptq-float": dopq.replace(weight_rounding="gptq", gptq_target="float", gptq_target_shrink=1.0),
        "dopq+gptq-float+auto": both.replace(gptq_target="float", gptq_target_shrink=1.0),
        # half way from the float weight to the least-squares target (the library's default at 3 bits)
        "dopq+gptq-float-half": dopq.replace(
            weight_rounding="gptq", gptq_target="float", gptq_target_shrink=0.5
        ),
        "dopq+gptq-float-half+auto": both.replace(gptq_target="float", gptq_target_shrink=0.5),
        # TanQ's wider centre grid (opt-in, docs/tanq.md), alone and with GPTQ at its width rule
        "dopq+tanq-wide": dopq.replace(tanq_centers=TANQ_CENTERS_WIDE),
        "dopq+gptq+tanq-wide": dopq.replace(weight_rounding="gptq", tanq_centers=TANQ_CENTERS_WIDE),
        # TanQ's exact midpoints (the paper's rule) instead of the 2^-16 grid the export reads from
        "dopq+exact-midpoints": dopq.replace(softmax_grid_bits=None),
        # patch embedding and head weights at 8 bits, alone and with the recommended preset's rules
        "dopq+edge8": dopq.replace(edge_w_bits=8),
        "recommended+edge8": get_preset("recommended", **widths).replace(edge_w_bits=8),
        # GPTQ at every width with its default damping (the preset's W4/A8 rule uses 1.0)
        "recommended+gptq": get_preset(
            "recommended", weight_rounding="gptq", gptq_damp=DEFAULT_DAMP, **widths
        ),
        # the same with GPTQ's columns in order of decreasing Hessian diagonal (act-order), or with
        # the strongest damping (the Hessian's mean diagonal added to it: the preset's W4/A8 rule)
        "recommended+gptq-ao": get_preset(
            "recommended", weight_rounding="gptq", gptq_act_order=True, gptq_damp=DEFAULT_DAMP, **widths
        ),
        "recommended+gptq-d1": get_preset("recommended", weight_rounding="gptq", gptq_damp=1.0, **widths),
        # the same, kept only where the calibration images show it pays (the check's test on their logit KL)
        "recommended+gptq-d1-check": get_preset(
            "recommended", weight_rounding="gptq", gptq_damp=1.0, gptq_check=True, **widths
        ),
        # per-tensor activation ranges by the error of the products they enter (act_range_objective)
        "recommended+output-ranges": get_preset("recommended", act_range_objective="output", **widths),
        # weight grids centred on 0 (no zero point: int8 kernels without a row-sum correction)
        "dopq+sym": dopq.replace(symmetric_weights=True),
    }
    if dopq.softmax_quantizer != "tanq":
        recipes = {label: config for label, config in recipes.items() if label not in TANQ_ROWS}
    return recipes


def paired(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """Images ``row`` fixes / breaks against ``base`` and the two-sided exact sign-test p."""
    return None if base is None else paired_sign_test(row["quant_top1_correct"], base["quant_top1_correct"])


def fp_forward_seconds(model: torch.nn.Module, images: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of one float forward of the calibration batch: the unit calibration times
    are divided by, so that a ratio survives a loaded machine (measured just before each row)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_calibration_seed(work: Workload, seed: int, calib_size: int | None = None) -> Workload:
    """The workload with the calibration images of another seed, and of another count where
    ``calib_size`` is given (same model, evaluation set and float result, so that every seed's rows
    are paired on the same test images). A seed's smaller set is the start of its larger one."""
    size = work.settings.calib_size if calib_size is None else calib_size
    if seed == work.settings.seed and size == work.settings.calib_size:
        return work
    idx = calibration_indices(len(work.calib_dataset), size, seed)
    images = load_images(work.calib_dataset, idx, num_workers=work.settings.workers).images
    settings = dataclasses.replace(work.settings, seed=seed, calib_size=size)
    return dataclasses.replace(work, settings=settings, calib_images=images)


def _row(work: Workload, label: str, config: QuantConfig, model_label: str) -> dict[str, Any]:
    fp_forward = fp_forward_seconds(work.model, work.calib_images)
    result, _ = run_recipe(work, config, method=label, progress=False)
    keep = ("model", "method", "w_bits", "a_bits", "fp_top1", "quant_top1", "calib_seconds", "eval_images",
            "timings", "fp_top1_correct", "quant_top1_correct", "coverage_summary")  # fmt: skip
    row = {k: result[k] for k in keep}
    row["model"] = model_label
    row["seed"] = work.settings.seed
    row["calib_size"] = work.settings.calib_size
    row["recipe"] = config.to_dict()
    row["softmax_kinds"] = (result.get("coverage") or {}).get("softmax_kinds", {})
    row["gptq"] = result.get("gptq")  # with gptq_check: whether GPTQ's rounding was kept, and why
    row["fp_forward_seconds"] = fp_forward
    row["calib_forward_equivalents"] = result["calib_seconds"] / fp_forward
    return row


def _same_config_row(base: dict[str, Any], label: str) -> dict[str, Any]:
    """A recipe whose config equals dopq's at this width: dopq's row, not run again (same result)."""
    return {**base, "method": label, "same_config_as": "dopq"}


def widths_of(args: Any) -> list[tuple[int, int]]:
    """``--widths W/A ...`` as ``(w_bits, a_bits)`` pairs, else ``--bits`` as equal pairs."""
    if args.widths:
        return [_width(spec) for spec in args.widths]
    return [(b, b) for b in args.bits]


def _stressed(work: Workload) -> dict[str, Any]:
    """The outlier-stressed DeiT-Tiny: the stress suite's function-preserving LayerNorm rescale."""
    info = rescale_layernorm_channels(work.model, n_channels=4, factor_range=(10.0, 40.0), seed=0)
    work.fp_result = None
    return {"rescale": {"channels_per_layernorm": 4, "factors": [10, 40], "layernorms": len(info)}}


def suite_calib_gains(args: Any, workload: Any, save: Any) -> None:
    seeds = args.seeds or [0]
    for name in args.models:
        arch = STRESS_ARCH if name == STRESS else name
        base_work = workload(args, arch)
        model_label = f"{arch} (outlier-stressed)" if name == STRESS else name
        extra: dict[str, Any] = _stressed(base_work) if name == STRESS else {}
        extra["seeds"] = seeds
        extra["calib_size"] = args.calib_size
        rows: list[dict[str, Any]] = []
        for seed in seeds:
            work = with_calibration_seed(base_work, seed, args.calib_size)
            for w_bits, a_bits in widths_of(args):
                absent = [
                    label for label in args.recipes or () if label not in calib_gain_recipes(w_bits, a_bits)
                ]
                if absent:
                    print(
                        f"  W{w_bits}A{a_bits}: no {', '.join(absent)} (dopq has no TanQ there)", flush=True
                    )
                base = None
                for label, cfg in calib_gain_recipes(w_bits, a_bits).items():
                    if args.recipes and label not in args.recipes:
                        continue
                    if base is not None and cfg == get_preset("dopq", w_bits=w_bits, a_bits=a_bits):
                        row = _same_config_row(base, label)
                    else:
                        row = _row(work, label, cfg, model_label)
                    base = row if label == "dopq" else base
                    row["paired_with_dopq"] = None if label == "dopq" else paired(row, base)
                    rows.append(row)
                    kinds = list(row["softmax_kinds"].values())
                    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
                    print(f"  {model_label} seed {seed} {label:16s} W{w_bits}A{a_bits} top1 {row['quant_top1']:.4f} "
                          f"(fp {row['fp_top1']}) calib {row['calib_seconds']:.1f}s "
                          f"= {row['calib_forward_equivalents']:.0f} fwd, paired {row['paired_with_dopq']} "
                          f"softmax {counts}", flush=True)  # fmt: skip
                    save(f"calib_gains_{TAGS.get(name, name)}{args.suffix}", {"rows": rows, **extra})
            base_work.fp_result = work.fp_result  # evaluated once, shared by every seed


def suite_calib_gains_timing(args: Any, workload: Any, save: Any) -> None:
    """Calibration time of each recipe (DeiT-Tiny, W3/A3 unless ``--widths``), repeats interleaved so
    that load from anything else running falls on every recipe alike: medians, the ratio to dopq,
    and the time in float forwards of the calibration batch (one timed just before each
    calibration, so each ratio is measured back to back)."""
    import copy

    from dopq.api import quantize_with_report

    work = workload(args, args.models[0] if args.widths else STRESS_ARCH)
    for w_bits, a_bits in widths_of(args) if args.widths else [(3, 3)]:
        recipes = calib_gain_recipes(w_bits, a_bits)
        recipes = {k: v for k, v in recipes.items() if not args.recipes or k in args.recipes}
        times: dict[str, list[float]] = {label: [] for label in recipes}
        forwards: dict[str, list[float]] = {label: [] for label in recipes}
        for _ in range(args.repeats):
            for label, cfg in recipes.items():
                fp_forward = fp_forward_seconds(work.model, work.calib_images)
                _, report = quantize_with_report(
                    copy.deepcopy(work.model), work.calib_images, cfg, progress=False
                )
                times[label].append(report.calib_seconds)
                forwards[label].append(report.calib_seconds / fp_forward)
                print(f"  W{w_bits}A{a_bits} {label}: calib {report.calib_seconds:.2f}s = "
                      f"{forwards[label][-1]:.1f} forwards", flush=True)  # fmt: skip
        medians = {label: statistics.median(t) for label, t in times.items()}
        fwd = {label: statistics.median(f) for label, f in forwards.items()}
        out = {
            label: {"calib_seconds": t, "median": medians[label], "over_dopq": medians[label] / medians["dopq"],
                    "forward_equivalents": forwards[label], "median_forwards": fwd[label],
                    "forwards_over_dopq": fwd[label] / fwd["dopq"]}
            for label, t in times.items()
        }  # fmt: skip
        name = f"calib_gains_timing{args.suffix}" + (f"_w{w_bits}a{a_bits}" if args.widths else "")
        save(name, {"model": work.settings.model, "bits": w_bits, "a_bits": a_bits, "recipes": out})
