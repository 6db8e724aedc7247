"""The ``families`` suite: every supported timm family, small random-init configurations, W4/A4 dopq.

Per family: calibration time, the largest float-logit change of the re-parameterization, and the
coverage (Linear, Conv2d and attention modules quantized / present; LayerNorms re-parameterized).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import timm
import torch

from dopq.api import quantize_with_report
from dopq.config import get_preset

_SMALL = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "ViT": ("vit_base_patch16_224", dict(img_size=64, **_SMALL)),
    "ViT, registers + average pooling": (
        "vit_base_patch16_224", dict(reg_tokens=4, class_token=False, global_pool="avg", img_size=64, **_SMALL)),
    "DeiT (distilled)": ("deit_tiny_distilled_patch16_224", dict(img_size=64, **_SMALL)),
    "DeiT-III (LayerScale)": ("deit3_small_patch16_224", dict(img_size=64, **_SMALL)),
    "DINOv2 (patch 14)": ("vit_small_patch14_dinov2", dict(img_size=56, **_SMALL)),
    "CLIP ViT (norm_pre)": ("vit_base_patch16_clip_224", dict(img_size=64, **_SMALL)),
    "BEiT (relative position bias)": ("beit_base_patch16_224", dict(img_size=64, **_SMALL)),
    "EVA-02 (RoPE, SwiGLU)": ("eva02_tiny_patch14_224", dict(img_size=56, **_SMALL)),
    "Swin": ("swin_tiny_patch4_window7_224",
             dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=56, num_classes=10)),
    "Swin-V2 (cosine attention, post-norm)": ("swinv2_tiny_window8_256",
             dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=8, num_classes=10)),
}  # fmt: skip


def suite_families(args: argparse.Namespace, workload, save) -> None:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for family, (arch, kwargs) in FAMILIES.items():
        model = timm.create_model(arch, **kwargs).eval()
        images = torch.randn(8, 3, *model.patch_embed.img_size, generator=gen)
        t0 = time.perf_counter()
        _, report = quantize_with_report(
            model, images, get_preset("dopq", w_bits=4, a_bits=4), progress=False
        )
        cov = report.coverage
        kinds = ("Linear", "Conv2d", "attention")
        quantized = sum(cov.quantized.get(k, 0) for k in kinds)
        total = sum(cov.total.get(k, 0) for k in kinds)
        row = {
            "family": family, "arch": arch, "kwargs": kwargs, "class": type(model).__name__,
            "calib_seconds": report.calib_seconds, "wall_seconds": time.perf_counter() - t0,
            "reparam_max_logit_change": report.reparam.max_logit_change,
            "coverage": cov.to_dict(), "coverage_summary": cov.summary(), "quantized_share": quantized / total,
        }  # fmt: skip
        rows.append(row)
        print(f"  {family}: {cov.summary()}, reparam change {row['reparam_max_logit_change']:.2e}, "
              f"calib {row['calib_seconds']:.2f} s", flush=True)  # fmt: skip
        save("families", {"rows": rows})
