"""Reconstruction error of every post-Softmax quantizer on real attention maps and a power-law stress case."""

from __future__ import annotations

import copy
from typing import Any

import torch

from dopq.config import get_preset
from dopq.models import prepare_model
from dopq.models.adapters import quantized_attention_classes
from dopq.modules import removing_hooks, set_quantization
from dopq.quantizers import build_quantizer
from dopq.stress import powerlaw_attention

QUANTIZERS = {
    "uniform": {},
    "log2": {},
    "logsqrt2": {},
    "tanq-mse": {"objective": "mse"},
    "tanq-output": {"objective": "output"},
}


@torch.no_grad()
def attention_and_values(
    model: torch.nn.Module, images: torch.Tensor
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, attention map, v) at every ``attn @ v`` of a float model, on ``images``."""
    model = copy.deepcopy(model)
    prepare_model(model, get_preset("repq"))
    set_quantization(model, False, False)
    found: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.matmul_av.register_forward_pre_hook(
            lambda mod, a, name=f"{name}.matmul_av": found.append((name, a[0].clone(), a[1].clone()))
        )
        for name, m in model.named_modules()
        if isinstance(m, quantized_attention_classes())
    ]
    with removing_hooks(hooks):
        model(images)
    return found


def errors(attn: torch.Tensor, v: torch.Tensor, bits: int) -> dict[str, dict[str, float]]:
    ref = attn @ v
    out = {}
    for label, kw in QUANTIZERS.items():
        name = label.split("-")[0]
        q = build_quantizer(name, bits, **kw)
        q.observing = True
        a_hat = q(attn, v) if name == "tanq" else q(attn)
        out[label] = {
            "mse": float((a_hat - attn).pow(2).mean()),
            "attn_v_rel_err": float((a_hat @ v - ref).pow(2).sum() / ref.pow(2).sum()),
            "levels_above_0.5": int((torch.unique(a_hat) > 0.5).sum()),
        }
    return out


def suite_softmax_error(args: Any, workload: Any, save: Any) -> None:
    rows = []
    for arch in args.models:
        work = workload(args, arch)
        maps = attention_and_values(work.model, work.calib_images[:8])
        picks = [maps[0], maps[len(maps) // 2], maps[-1]]
        for name, attn, v in picks:
            for bits in args.bits:
                rows.append({"source": f"{arch}:{name}", "bits": bits, "max_attn": float(attn.max()),
                             "errors": errors(attn, v, bits)})  # fmt: skip
                print(
                    f"  {arch}:{name} W{bits}",
                    {k: round(e["attn_v_rel_err"], 5) for k, e in rows[-1]["errors"].items()},
                    flush=True,
                )
    attn = powerlaw_attention((8, 3, 64, 64), seed=0)
    v = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    for bits in args.bits:
        rows.append(
            {
                "source": "powerlaw-stress",
                "bits": bits,
                "max_attn": float(attn.max()),
                "errors": errors(attn, v, bits),
            }
        )
        print(
            f"  powerlaw W{bits}",
            {k: round(e["attn_v_rel_err"], 5) for k, e in rows[-1]["errors"].items()},
            flush=True,
        )
    save("softmax_error", {"rows": rows})


TANQ_GRIDS = {
    "tanq (default grid)": {},
    "tanq +centers 0.1/0.2": {"centers": (0.1, 0.2, 0.35, 0.5)},
    "tanq +clips q0.99/q0.98": {"clip_quantiles": (1.0, 0.9999, 0.999, 0.99, 0.98)},
    "tanq +centers 0.65/0.8": {"centers": (0.35, 0.5, 0.65, 0.8)},
    "tanq +centers 0.65/0.8/0.9": {"centers": (0.35, 0.5, 0.65, 0.8, 0.9)},
    "tanq +centers 0.65/0.8/0.9, sharpness to 64": {
        "centers": (0.35, 0.5, 0.65, 0.8, 0.9),
        "sharpness": (0.01, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0),
    },
}


def suite_tanq_grid(args: Any, workload: Any, save: Any) -> None:
    """Does a wider TanQ search grid close the gap to log2 on low-valued maps? Mean ``attn @ v``
    relative error over every attention module of each model (8 calibration images)."""
    rows = []
    for arch in args.models:
        work = workload(args, arch)
        maps = attention_and_values(work.model, work.calib_images[:8])
        for bits in args.bits:
            errs: dict[str, list[float]] = {}
            for _, attn, v in maps:
                ref = attn @ v
                for label in ("log2", "logsqrt2", *TANQ_GRIDS):
                    kw = TANQ_GRIDS.get(label, {})
                    q = build_quantizer("tanq" if label.startswith("tanq") else label, bits, **kw)
                    q.observing = True
                    a_hat = q(attn, v) if label.startswith("tanq") else q(attn)
                    errs.setdefault(label, []).append(
                        float((a_hat @ v - ref).pow(2).sum() / ref.pow(2).sum())
                    )
            best = [min(e[i] for e in errs.values()) for i in range(len(maps))]
            row = {
                "model": arch,
                "bits": bits,
                "modules": len(maps),
                "mean_attn_v_rel_err": {k: sum(e) / len(e) for k, e in errs.items()},
                "modules_best": {
                    k: sum(x <= b for x, b in zip(e, best, strict=True)) for k, e in errs.items()
                },
            }
            rows.append(row)
            print(
                f"  {arch} W{bits}",
                {k: round(x, 5) for k, x in row["mean_attn_v_rel_err"].items()},
                flush=True,
            )
            save("tanq_grid", {"rows": rows})
