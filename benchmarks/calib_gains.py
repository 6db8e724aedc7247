"""Calibration-time gains beyond the paper: GPTQ weight rounding and a per-module post-Softmax choice.

    python benchmarks/run.py calib-gains --threads 2 --models deit_tiny_patch16_224 stress --bits 3 4 6

``--models`` takes the shared architectures and ``stress`` (the outlier-stressed DeiT-Tiny of the
``stress`` suite). Each model writes ``calib_gains_<model><suffix>.json`` after every row: dopq,
dopq+gptq, dopq+auto and dopq+gptq+auto (``--recipes`` picks some), with the post-Softmax kind chosen
per module, the calibration time and a paired sign test against dopq on the same images.
"""

from __future__ import annotations

from typing import Any

from dopq.config import QuantConfig, get_preset
from dopq.experiment import run_recipe
from dopq.stress import rescale_layernorm_channels
from render import sign_test_p

STRESS = "stress"
STRESS_ARCH = "deit_tiny_patch16_224"
ACT_WIDE = (0.99, 0.995, 0.999, 0.9999, 0.99999)
TAGS = {"deit_tiny_patch16_224": "deit", "swin_tiny_patch4_window7_224": "swin", STRESS: "stress"}


def calib_gain_recipes(bits: int) -> dict[str, QuantConfig]:
    """dopq and the two calibration-time switches, alone and together. GPTQ's objective is named, not
    left to the width rule: ``gptq`` is the quantized-input target the earlier rows measured,
    ``gptq-float`` the float model's output all the way, ``gptq-float-half`` half way (what
    ``--weight-rounding gptq`` runs at 3 bits and below)."""
    dopq = get_preset("dopq", w_bits=bits, a_bits=bits)
    both = dopq.replace(weight_rounding="gptq", gptq_target="quantized", softmax_quantizer="auto")
    return {
        "dopq": dopq,
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
    }


def paired(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """Images ``row`` fixes / breaks against ``base`` and the two-sided exact sign-test p."""
    if base is None or len(base["quant_top1_correct"]) != len(row["quant_top1_correct"]):
        return None
    pairs = list(zip(row["quant_top1_correct"], base["quant_top1_correct"], strict=True))
    gained, lost = pairs.count(("1", "0")), pairs.count(("0", "1"))
    return {"gained": gained, "lost": lost, "p": sign_test_p(gained, lost)}


def _row(work: Any, label: str, config: QuantConfig, model_label: str) -> dict[str, Any]:
    result, _ = run_recipe(work, config, method=label, progress=False)
    keep = ("model", "method", "w_bits", "a_bits", "fp_top1", "quant_top1", "calib_seconds", "eval_images",
            "timings", "fp_top1_correct", "quant_top1_correct", "coverage_summary")  # fmt: skip
    row = {k: result[k] for k in keep}
    row["model"] = model_label
    row["recipe"] = config.to_dict()
    row["softmax_kinds"] = (result.get("coverage") or {}).get("softmax_kinds", {})
    return row


def suite_calib_gains(args: Any, workload: Any, save: Any) -> None:
    for name in args.models:
        arch = STRESS_ARCH if name == STRESS else name
        work = workload(args, arch)
        model_label = name
        extra: dict[str, Any] = {}
        if name == STRESS:  # the same rescale as the stress suite
            info = rescale_layernorm_channels(work.model, n_channels=4, factor_range=(10.0, 40.0), seed=0)
            work.fp_result = None
            model_label = f"{arch} (outlier-stressed)"
            extra["rescale"] = {"channels_per_layernorm": 4, "factors": [10, 40], "layernorms": len(info)}
        rows: list[dict[str, Any]] = []
        for bits in args.bits:
            base = None
            for label, cfg in calib_gain_recipes(bits).items():
                if args.recipes and label not in args.recipes:
                    continue
                row = _row(work, label, cfg, model_label)
                base = row if label == "dopq" else base
                row["paired_with_dopq"] = None if label == "dopq" else paired(row, base)
                rows.append(row)
                kinds = list(row["softmax_kinds"].values())
                counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
                print(f"  {model_label} {label:16s} W{bits}A{bits} top1 {row['quant_top1']:.4f} "
                      f"(fp {row['fp_top1']}) calib {row['calib_seconds']:.1f}s "
                      f"paired {row['paired_with_dopq']} softmax {counts}", flush=True)  # fmt: skip
                save(f"calib_gains_{TAGS.get(name, name)}{args.suffix}", {"rows": rows, **extra})


def suite_calib_gains_timing(args: Any, workload: Any, save: Any) -> None:
    """Calibration time of each recipe on DeiT-Tiny W3/A3, repeats interleaved so that load from
    anything else running falls on every recipe alike; medians and the ratio to dopq."""
    import copy
    import statistics

    from dopq.api import quantize_with_report

    work = workload(args, STRESS_ARCH)
    recipes = {k: v for k, v in calib_gain_recipes(3).items() if not args.recipes or k in args.recipes}
    times: dict[str, list[float]] = {label: [] for label in recipes}
    for _ in range(args.repeats):
        for label, cfg in recipes.items():
            _, report = quantize_with_report(
                copy.deepcopy(work.model), work.calib_images, cfg, progress=False
            )
            times[label].append(report.calib_seconds)
            print(f"  {label}: calib {report.calib_seconds:.2f}s {report.timings}", flush=True)
    medians = {label: statistics.median(t) for label, t in times.items()}
    out = {
        label: {"calib_seconds": t, "median": medians[label], "over_dopq": medians[label] / medians["dopq"]}
        for label, t in times.items()
    }
    save(f"calib_gains_timing{args.suffix}", {"model": STRESS_ARCH, "bits": 3, "recipes": out})
