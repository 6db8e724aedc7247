"""Build timm models by name, with weights from a local checkpoint or the timm hub."""

from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dopq.errors import CheckpointError, ModelError

__all__ = [
    "HF_PREFIX",
    "as_dopq_model",
    "build_model",
    "card_for",
    "is_transformers_model",
    "load_state_dict",
    "model_preprocess",
]

log = logging.getLogger(__name__)
_HEAD_KEYS = ("head.weight", "head.fc.weight")
HF_PREFIX = "hf:"  # --model hf:FOLDER, a transformers save_pretrained folder


def model_preprocess(model: nn.Module) -> dict[str, Any]:
    """The evaluation preprocessing a model records in its ``pretrained_cfg`` (timm's defaults fill
    the gaps) as JSON types: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``."""
    cfg = timm.data.resolve_data_config(model=model)
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct")
    out = {k: list(cfg[k]) if isinstance(cfg[k], tuple | list) else cfg[k] for k in keys}
    built_for = _built_input_size(model)
    if built_for is not None:  # created with img_size=...: its pretrained_cfg still names the default
        out["input_size"] = [out["input_size"][0], *built_for]
    return out


def _built_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The fixed image size a timm patch embedding was built for (``img_size``), if it has one."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False):
        return None
    return tuple(int(v) for v in size) if isinstance(size, tuple | list) else (int(size), int(size))


def is_transformers_model(model: object) -> bool:
    """Whether ``model`` is a ``transformers`` model object (false, without importing it, when
    ``transformers`` was never imported: no such object can exist then)."""
    lib = sys.modules.get("transformers")
    return lib is not None and isinstance(model, lib.PreTrainedModel)


def _hf() -> Any:
    """``dopq.models.hf``, imported on demand: it imports the optional ``transformers``."""
    from dopq.models import hf

    return hf


def as_dopq_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or a ``transformers`` model wrapped as ``forward(images) -> logits``."""
    return _hf().wrap_hf_model(model) if is_transformers_model(model) else model


def card_for(checkpoint: str | Path) -> dict[str, Any] | None:
    """The JSON model card beside a checkpoint (same stem, ``.json``), if any."""
    path = Path(checkpoint).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"model card {path} is not valid JSON: {exc}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` state dict safely (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoder failure means the file is unusable
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} could not be read as a state dict ({type(exc).__name__}: {first})"
        ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classes_in(state: dict[str, torch.Tensor]) -> int | None:
    for key in _HEAD_KEYS:
        if key in state:
            return int(state[key].shape[0])
    return None


def _check_arch(arch: str) -> None:
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelError(f"unknown timm model {arch!r}{hint}")


@contextmanager
def _seeded_init(seed: int) -> Iterator[None]:
    """timm initializes weights from torch's global CPU generator: give it a forked, seeded one, so
    random-init models are reproducible and the caller's random state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(
    arch: str,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    init_seed: int = 0,
) -> nn.Module:
    """Create ``arch`` with timm and load weights.

    Args:
        arch: timm model name, e.g. ``"deit_tiny_patch16_224"``, or ``hf:FOLDER``, a ``transformers``
            ``save_pretrained`` folder (config, weights, ``preprocessor_config.json``).
        checkpoint: local ``.safetensors``/``.pth`` state dict; takes precedence over ``pretrained``.
        num_classes: classifier size; by default taken from the checkpoint's head.
        pretrained: download timm's weights when no checkpoint is given (needs the network once).
        init_seed: seed of timm's random initialization, which is what a model without checkpoint or
            pretrained weights keeps; drawn from a forked generator, so the caller's is untouched.

    Returns:
        The float32 model in eval mode.
    """
    if arch.startswith(HF_PREFIX):
        if checkpoint is not None or pretrained:
            raise ModelError(
                f"{arch}: a transformers folder holds its weights; drop --checkpoint/--pretrained"
            )
        return _hf().load_hf_model(arch.removeprefix(HF_PREFIX), num_classes)
    _check_arch(arch)
    if checkpoint is None:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        try:
            with _seeded_init(init_seed):
                model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        except Exception as exc:
            raise ModelError(
                f"could not create {arch} with pretrained weights ({type(exc).__name__}); "
                "without network access pass --checkpoint PATH"
            ) from None
        return model.eval()
    state = load_state_dict(checkpoint)
    found = _classes_in(state)
    if num_classes is not None and found is not None and num_classes != found:
        raise CheckpointError(
            f"--num-classes {num_classes} does not match checkpoint {checkpoint}, whose head has {found} classes"
        )
    with _seeded_init(init_seed):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes or found or 1000)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: a checkpoint of another size or variant
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
        raise CheckpointError(f"checkpoint {checkpoint} does not fit {arch}: {detail}") from None
    missing = [k for k in result.missing_keys if "relative_position_index" not in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    log.info("loaded %s from %s", arch, checkpoint)
    return model.float().eval()
