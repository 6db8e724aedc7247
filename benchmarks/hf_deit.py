"""The shared DeiT-Tiny (timm) in ``transformers`` form: weight mapping, then timm vs transformers.

    python benchmarks/run.py hf-deit --threads 2 --bits 4 --suffix _w4
    python benchmarks/run.py hf-deit --threads 2 --bits 3 --suffix _w3 --hf-skip-fp

``convert`` maps the timm checkpoint into ``transformers``' ``ViTForImageClassification`` (no
download) and writes a ``save_pretrained`` folder with a ``preprocessor_config.json`` built from the
model card (default: a temporary folder; weights are never committed). The mapping, for each of
the 12 blocks ``i``::

    cls_token, pos_embed            -> vit.embeddings.cls_token, .position_embeddings
    patch_embed.proj.{weight,bias}  -> vit.embeddings.patch_embeddings.projection.*
    blocks.i.norm1 / norm2          -> vit.layers.i.layernorm_before / layernorm_after
    blocks.i.attn.qkv (3C rows)     -> vit.layers.i.attention.{q,k,v}_proj (rows 0:C, C:2C, 2C:3C)
    blocks.i.attn.proj              -> vit.layers.i.attention.o_proj
    blocks.i.mlp.fc1 / fc2          -> vit.layers.i.mlp.fc1 / fc2
    norm, head                      -> vit.layernorm, classifier

with ``layer_norm_eps=1e-6`` (timm's) and exact GELU. ``run`` then evaluates both forms on the
same workload (32 calibration images, seed 0, the strided test images): FP top-1 and per-image
predictions, dopq at each ``--bits`` with a paired sign test timm vs transformers, and the ONNX
export of each on onnxruntime compared image by image with its simulation. Writes
``benchmarks/results/hf_deit_tiny<suffix>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dopq.api import quantize_with_report
from dopq.config import get_preset
from dopq.evaluate import compare
from dopq.experiment import RunSettings, load_workload
from dopq.export import OnnxModel, export_onnx
from dopq.models import build_model, card_for
from dopq.stats import fixed_broken, sign_test_p

ARCH = "deit_tiny_patch16_224"
CHECKPOINT = "deit_tiny_patch16_224.cifar10.safetensors"
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def vit_config(timm_model: torch.nn.Module) -> dict[str, Any]:
    """``ViTConfig`` fields of a timm ``VisionTransformer`` with a class token and a linear head."""
    block = timm_model.blocks[0]
    return {
        "hidden_size": timm_model.embed_dim,
        "num_hidden_layers": len(timm_model.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "layer_norm_eps": block.norm1.eps,
        "image_size": timm_model.patch_embed.img_size[0],
        "patch_size": timm_model.patch_embed.patch_size[0],
        "num_channels": 3,
        "qkv_bias": block.attn.qkv.bias is not None,
        "num_labels": timm_model.num_classes,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def vit_state(timm_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The ``ViTForImageClassification`` state dict of a timm ViT/DeiT state dict (the mapping above)."""
    out = {
        "vit.embeddings.cls_token": timm_state["cls_token"],
        "vit.embeddings.position_embeddings": timm_state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "vit.layernorm.weight": timm_state["norm.weight"],
        "vit.layernorm.bias": timm_state["norm.bias"],
        "classifier.weight": timm_state["head.weight"],
        "classifier.bias": timm_state["head.bias"],
    }
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"vit.layers.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = timm_state[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = timm_state[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{dst}attention.{name}.{kind}"] = part.contiguous()
    return out


def processor_config(card: dict[str, Any]) -> dict[str, Any]:
    """A ``ViTImageProcessor`` config with the card's preprocessing (a resize to the input size, no
    crop: the card's ``crop_pct`` is 1.0)."""
    if card.get("crop_pct", 0.875) != 1.0:
        raise ValueError("this mapping writes a resize-only processor; the card asks for a center crop")
    size = card["input_size"][1]
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": _RESAMPLE[card["interpolation"]],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": card["mean"],
        "image_std": card["std"],
    }


def convert(checkpoint: Path, out: Path) -> Path:
    """Write the timm checkpoint as a ``transformers`` ``save_pretrained`` folder at ``out``."""
    from transformers import ViTConfig, ViTForImageClassification

    timm_model = build_model(ARCH, checkpoint)
    config = ViTConfig(**vit_config(timm_model), architectures=["ViTForImageClassification"])
    hf = ViTForImageClassification(config).eval()
    missing, unexpected = hf.load_state_dict(
        vit_state(timm_model.state_dict(), len(timm_model.blocks)), strict=True
    )
    assert not missing and not unexpected  # strict=True raised otherwise
    hf.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(processor_config(card_for(checkpoint)), indent=1)
    )
    return out


def _quantized_row(work: Any, bits: int, onnx_path: Path, threads: int) -> dict[str, Any]:
    """dopq at ``bits`` on the workload's model, exported; the simulation and onnxruntime compared
    image by image (one pass over the images each, which also gives both accuracies)."""
    config = get_preset("dopq", w_bits=bits, a_bits=bits)
    model, report = quantize_with_report(copy.deepcopy(work.model), work.calib_images, config, progress=False)
    export_onnx(model, onnx_path, metadata={"preprocess": work.preprocess.to_dict()})
    onnx = OnnxModel(onnx_path, threads=threads)
    agree = compare(model, onnx, work.eval_loader(), progress=False)
    return {
        "quant_top1": agree.top1_a,
        "quant_top1_correct": agree.top1_correct_a,
        "calib_seconds": report.calib_seconds,
        "coverage": report.coverage.summary(),
        "onnx": {
            "top1": agree.top1_b,
            "top1_correct": agree.top1_correct_b,
            "identical_top1_vs_simulation": agree.identical_top1,
            "max_logit_diff_vs_simulation": agree.max_logit_diff,
        },
    }


def _paired(a: str, b: str) -> dict[str, Any]:
    gained, lost = fixed_broken(a, b)
    return {"hf_right_timm_wrong": gained, "timm_right_hf_wrong": lost, "p": sign_test_p(gained, lost)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Path(args.shared)
    checkpoint = shared / "models" / CHECKPOINT
    folder = Path(args.hf_folder) if args.hf_folder else Path(tempfile.mkdtemp(prefix="dopq-hf-deit-"))
    t0 = time.perf_counter()
    convert(checkpoint, folder)
    common = dict(data=str(shared / "data" / args.data_file), calib_size=32, seed=0, fp_eval=False,
                  eval_subset=args.eval_subset, batch_size=args.batch_size, device=args.device)  # fmt: skip
    works = {
        "timm": load_workload(RunSettings(model=ARCH, checkpoint=str(checkpoint), **common)),
        "hf": load_workload(RunSettings(model=f"hf:{folder}", **common)),
    }
    out: dict[str, Any] = {
        "suite": "hf_deit_tiny",
        "hf_folder_written": str(folder),
        "same_preprocess": works["timm"].preprocess == works["hf"].preprocess,
        "same_calibration_images": torch.equal(works["timm"].calib_images, works["hf"].calib_images),
        "rows": [],
    }
    if not args.hf_skip_fp:  # the float comparison, once per set of runs
        fp = compare(works["timm"].model, works["hf"].model, works["timm"].eval_loader(), progress=False)
        out["fp"] = {
            "timm_top1": fp.top1_a,
            "hf_top1": fp.top1_b,
            "identical_top1_predictions": fp.identical_top1,
            "max_logit_diff": fp.max_logit_diff,
            "same_top1_correct": fp.top1_correct_a == fp.top1_correct_b,
            "images": fp.images,
        }
    for bits in args.bits:
        row: dict[str, Any] = {"method": "dopq", "w_bits": bits, "a_bits": bits}
        for name, work in works.items():
            row[name] = _quantized_row(work, bits, folder / f"{name}_w{bits}a{bits}.onnx", args.threads)
        row["top1_gap_points"] = 100 * (row["hf"]["quant_top1"] - row["timm"]["quant_top1"])
        row["paired"] = _paired(row["hf"]["quant_top1_correct"], row["timm"]["quant_top1_correct"])
        row["onnx_top1_gap_points"] = 100 * (row["hf"]["onnx"]["top1"] - row["timm"]["onnx"]["top1"])
        row["onnx_paired"] = _paired(row["hf"]["onnx"]["top1_correct"], row["timm"]["onnx"]["top1_correct"])
        out["rows"].append(row)
    out["seconds"] = time.perf_counter() - t0
    return out


def suite_hf_deit(args: argparse.Namespace, workload: Any, save: Any) -> None:
    """``benchmarks/run.py hf-deit``: writes ``hf_deit_tiny.json`` (``save`` adds the environment)."""
    out = run(args)
    save(f"hf_deit_tiny{args.suffix}", out)
    fp = out.get("fp")  # none with --hf-skip-fp
    if fp:
        print(
            f"FP timm {fp['timm_top1']:.4f} hf {fp['hf_top1']:.4f} identical {fp['identical_top1_predictions']:.4f}"
        )
    for row in out["rows"]:
        print(
            f"W{row['w_bits']}A{row['a_bits']} timm {row['timm']['quant_top1']:.4f} hf {row['hf']['quant_top1']:.4f} "
            f"paired {row['paired']} onnx timm {row['timm']['onnx']['top1']:.4f} hf {row['hf']['onnx']['top1']:.4f}"
        )
