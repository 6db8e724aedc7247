"""Tests of float model loading: timm checkpoints (formats, wrappers, prefixes, derived buffers,
unreadable files), timm hub weights (tags, class counts, no network) and ``hf:`` folders.

Every refusal is one dopq error naming what is wrong; nothing loads with layers at random.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dopq.cli import main
from dopq.errors import CheckpointError, ModelError
from dopq.models import build_model

HUB_TAG = "test_vit.r160_in1k"  # timm's tiny ViT and its hub repo


def _test_vit(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=num_classes).eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The single ``dopq: error:`` line of a command that must fail with exit status 2."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("dopq: error: ")
    return lines[0]


def _quantize_argv(data: Path, *model: str) -> list[str]:
    return ["quantize", "--model", *model, "--data", str(data), "--calib-size", "2", "--eval-subset", "2"]


# --- hf: folders ------------------------------------------------------------------------------------

_VIT_LIKE = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _hf_model(family: str = "vit", num_labels: int = 3) -> nn.Module:
    """A tiny random ``transformers`` classifier of ``family`` (small weights perturbed, so a layer
    that is re-initialized changes the logits)."""
    transformers = pytest.importorskip("transformers")  # the optional hf extra
    configs = {
        "vit": (transformers.ViTConfig, "ViTForImageClassification", dict(_VIT_LIKE, intermediate_size=64)),
        "deit": (
            transformers.DeiTConfig,
            "DeiTForImageClassificationWithTeacher",
            dict(_VIT_LIKE, intermediate_size=64),
        ),
        "beit": (
            transformers.BeitConfig,
            "BeitForImageClassification",
            dict(_VIT_LIKE, intermediate_size=64, use_relative_position_bias=True),
        ),
        "dinov2": (transformers.Dinov2Config, "Dinov2ForImageClassification", dict(_VIT_LIKE)),
        "swin": (
            transformers.SwinConfig,
            "SwinForImageClassification",
            dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
        ),
    }
    config_cls, name, kwargs = configs[family]
    config = config_cls(num_labels=num_labels, architectures=[name], **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _hf_folder(root: Path, family: str = "vit", edit=None) -> tuple[Path, nn.Module]:
    """A ``save_pretrained`` folder of a tiny model; ``edit`` rewrites its weights dict."""
    folder = root / f"hf-{family}"
    model = _hf_model(family)
    model.save_pretrained(folder)
    if edit is not None:
        weights = folder / "model.safetensors"
        save_file(edit(load_file(str(weights))), str(weights), metadata={"format": "pt"})
    return folder, model


@pytest.mark.parametrize("family", ["vit", "deit", "beit", "dinov2", "swin"])
def test_hf_complete_folder_loads_unchanged(family: str, tmp_path: Path) -> None:
    folder, ref = _hf_folder(tmp_path, family)
    model = build_model(f"hf:{folder}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(pixel_values=x).logits, atol=1e-5)


def _without(*prefixes: str):
    return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_without("classifier."), "2 missing (classifier.bias, classifier.weight)"),
        (
            _without("vit.encoder.layer.0.attention.attention.query.weight"),  # its saved name
            "1 missing (vit.layers.0.attention.q_proj.weight)",
        ),
        (lambda sd: {**sd, "extra.weight": torch.zeros(2)}, "1 unexpected (extra.weight)"),
        (
            lambda sd: {**sd, "classifier.weight": torch.zeros(5, 32), "classifier.bias": torch.zeros(5)},
            "2 of another shape (classifier.bias: ",
        ),
    ],
    ids=["no-classifier", "no-q-proj", "unexpected", "other-head-size"],
)
def test_hf_incomplete_weights_are_refused(edit, match: str, tmp_path: Path) -> None:
    folder, _ = _hf_folder(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=r"do not fit the model of its config\.json") as info:
        build_model(f"hf:{folder}")
    assert match in str(info.value)


def test_hf_missing_weights_cli_error_is_one_line(tmp_path: Path, image_folder, capsys) -> None:
    folder, _ = _hf_folder(tmp_path, edit=_without("classifier."))
    data = image_folder("hf-missing", size=32, per_class=1)
    capsys.readouterr()  # drop save_pretrained's progress bar
    line = _one_cli_error([*_quantize_argv(data, f"hf:{folder}"), "--quiet"], capsys)
    assert "classifier.weight" in line and "LOAD REPORT" not in line


def test_hf_prefix_on_a_file_says_it_is_a_file(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ModelError, match="is a file, not a save_pretrained folder"):
        build_model(f"hf:{path}")
