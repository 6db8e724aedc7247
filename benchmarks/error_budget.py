"""Where does a recipe's error come from? Each kind of quantizer, and each block, kept float in turn.

    python benchmarks/run.py error-budget --threads 2 --models deit_tiny_patch16_224 stress \
        --widths 4/4 3/3 --recipes dopq recommended --eval-subset 250

For each model, width and recipe (default: dopq and recommended) the model is quantized once; then
every kind of quantizer (weights, Linear/Conv inputs, the q / k / v operands of the attention
products, post-Softmax) and every unit (patch embedding, blocks, head) is switched back to float on
its own, and the test images are run again. Per switch: top-1, agreement of the top-1 class with
the float model and the mean squared logit error against it; the error a switch removes is what
that kind of quantizer or that block costs. Kinds are found from module types, not names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dopq.api import quantize_with_report
from dopq.config import get_preset
from dopq.models import get_adapter
from dopq.modules import QuantConv2d, QuantLinear, QuantMatMul
from dopq.quantizers import Quantizer
from dopq.quantizers.levels import LevelQuantizer

KINDS = ("weights", "linear inputs", "attention operands", "post-Softmax")


def quantizer_kinds(model: nn.Module) -> dict[str, list[Quantizer]]:
    """Every quantizer of ``model`` by what it quantizes, from the type of the module that owns it."""
    kinds: dict[str, list[Quantizer]] = {k: [] for k in KINDS}
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            pairs = (("weights", module.weight_quantizer), ("linear inputs", module.input_quantizer))
        elif isinstance(module, QuantMatMul):
            a_kind = (
                "post-Softmax" if isinstance(module.quantizer_a, LevelQuantizer) else "attention operands"
            )
            pairs = ((a_kind, module.quantizer_a), ("attention operands", module.quantizer_b))
        else:
            continue
        for kind, q in pairs:
            if isinstance(q, Quantizer):
                kinds[kind].append(q)
    return kinds


@contextmanager
def kept_float(quantizers: list[Quantizer]) -> Iterator[None]:
    """These quantizers off inside the block, each one's own state back afterwards."""
    saved = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, on in zip(quantizers, saved, strict=True):
            q.enabled = on


@torch.no_grad()
def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(x).float() for x in batches])


def _measure(logits: torch.Tensor, fp: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "top1": float((logits.argmax(1) == labels).float().mean()),
        "agree_fp": float((logits.argmax(1) == fp.argmax(1)).float().mean()),
        "logit_mse": float((logits - fp).pow(2).mean()),
    }


def _budget(
    model: nn.Module, batches: list[torch.Tensor], fp: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    full = _measure(_logits(model, batches), fp, labels)
    kinds = {}
    for kind, quantizers in quantizer_kinds(model).items():
        with kept_float(quantizers):
            kinds[kind] = {"quantizers": len(quantizers), **_measure(_logits(model, batches), fp, labels)}
    units = {}
    for name, unit in get_adapter(model).units(model):
        quantizers = [m for m in unit.modules() if isinstance(m, Quantizer)]
        if quantizers:
            with kept_float(quantizers):
                units[name] = _measure(_logits(model, batches), fp, labels)
    return {"all quantized": full, "kinds kept float": kinds, "units kept float": units}


def _images(work: Any, n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    from dopq.data import load_images

    idx = work.eval_indices[:: max(1, len(work.eval_indices) // n)][:n]
    loaded = load_images(work.eval_dataset, idx, num_workers=work.settings.workers)
    labels = torch.tensor([work.eval_dataset.targets[i] for i in idx])
    return list(loaded.images.split(50)), labels


def suite_error_budget(args: Any, workload: Any, save: Any) -> None:
    from calib_gains import STRESS, STRESS_ARCH, TAGS, _stressed, widths_of

    widths = widths_of(args)
    recipes = args.recipes or ["dopq", "recommended"]
    rows = []
    for name in args.models:
        work = workload(args, STRESS_ARCH if name == STRESS else name)
        if name == STRESS:
            _stressed(work)
        batches, labels = _images(work, args.eval_subset)
        fp = _logits(work.model, batches)
        for w_bits, a_bits in widths:
            for recipe in recipes:
                config = get_preset(recipe, w_bits=w_bits, a_bits=a_bits)
                model, _ = quantize_with_report(
                    copy.deepcopy(work.model), work.calib_images, config, progress=False
                )
                row = {"model": name, "recipe": recipe, "w_bits": w_bits, "a_bits": a_bits, "images": len(labels),
                       "fp_top1": float((fp.argmax(1) == labels).float().mean()), **_budget(model, batches, fp, labels)}  # fmt: skip
                rows.append(row)
                kinds = {k: round(v["logit_mse"], 4) for k, v in row["kinds kept float"].items()}
                print(f"  {name} W{w_bits}A{a_bits} {recipe}: all {row['all quantized']}, logit mse with one kind "
                      f"float {kinds}", flush=True)  # fmt: skip
                save(f"error_budget{args.suffix}", {"rows": rows, "tags": TAGS})
