"""Evaluation preprocessing of a model, from its JSON card or its timm config, and timm's transform."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import create_transform
from torch import Tensor, nn

from dopq.data.archives import logger
from dopq.errors import DataError
from dopq.models.loading import built_input_size, model_preprocess

__all__ = [
    "Preprocess",
    "build_transform",
    "card_path_for",
    "preprocess_for",
    "preprocess_from_card",
    "preprocess_from_model",
]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_CARD_KEYS = ("input_size", "mean", "std", "interpolation")


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing of a model: resize, center crop, normalize.

    Args:
        input_size: model input ``(channels, height, width)``, e.g. ``(3, 224, 224)``.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting ``mean``.
        interpolation: PIL resampling filter name (``bilinear``, ``bicubic``, ...).
        crop_pct: fraction of the resized image kept by the center crop; 1.0 means no crop.

    Example:
        >>> pre = Preprocess((3, 224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", crop_pct=1.0)
        >>> pre.to_dict()["input_size"]
        [3, 224, 224]
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        fields = {"input_size": (self.input_size, int), "mean": (self.mean, float), "std": (self.std, float)}
        for name, (value, kind) in fields.items():
            try:
                coerced = tuple(kind(v) for v in value)
            except (TypeError, ValueError):
                coerced = ()
            if len(coerced) != 3:
                raise DataError(f"preprocess {name} must be 3 numbers, got {value!r}")
            object.__setattr__(self, name, coerced)
        # NaN or infinity would pass the checks below, reach the result as a token strict JSON
        # has not (std inf even runs: every pixel of that channel becomes 0)
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise DataError(f"preprocess mean and std must be finite, got {self.mean}, {self.std}")
        if min(self.input_size) < 1 or min(self.std) <= 0:
            raise DataError(
                f"preprocess input_size and std must be positive, got {self.input_size}, {self.std}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise DataError(
                f"unknown interpolation {self.interpolation!r}; use one of {', '.join(_INTERPOLATIONS)}"
            )
        try:
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError):
            crop_pct = float("nan")
        if not 0 < crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def preprocess_from_card(path: str | os.PathLike[str]) -> Preprocess:
    """Read the preprocessing of a model from its JSON card.

    Args:
        path: JSON card with ``input_size``, ``mean``, ``std``, ``interpolation`` and optionally
            ``crop_pct`` (0.875 when absent).

    Returns:
        The card's preprocessing.

    Raises:
        DataError: the card is missing, not JSON, or lacks a key.
    """
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"cannot read model card {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # nested too deep: RecursionError
        raise DataError(f"model card {path} is not valid JSON: {str(e)[:160]}") from None
    if not isinstance(card, dict):
        raise DataError(f"model card {path} must hold a JSON object")
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        raise DataError(f"model card {path} lacks {', '.join(missing)}")
    return Preprocess(
        input_size=card["input_size"],
        mean=card["mean"],
        std=card["std"],
        interpolation=card["interpolation"],
        crop_pct=card.get("crop_pct", 0.875),
    )


def card_path_for(checkpoint_path: str | os.PathLike[str]) -> Path | None:
    """Return the JSON card beside a checkpoint, or None when there is none.

    The card has the checkpoint's name with its last suffix replaced by ``.json``:
    ``deit_tiny_patch16_224.cifar10.safetensors`` -> ``deit_tiny_patch16_224.cifar10.json``.

    Args:
        checkpoint_path: path of the checkpoint file.

    Returns:
        The card path if that file exists, else None. A JSON object there that holds none of a
        card's keys (training arguments, say) is not a card: None, with a warning.
    """
    card = Path(checkpoint_path).with_suffix(".json")
    if not card.is_file():
        return None
    try:
        content = json.loads(card.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return card  # preprocess_from_card says what is wrong with it
    if isinstance(content, dict) and not any(k in content for k in _CARD_KEYS):
        logger.warning("%s is not a model card (it has none of %s): not read", card, ", ".join(_CARD_KEYS))
        return None
    return card


def preprocess_from_model(model: nn.Module) -> Preprocess:
    """Read the evaluation preprocessing from a timm model's pretrained config.

    timm's ``crop_mode`` is not kept: :func:`build_transform` always center-crops, as timm does for
    ViT, DeiT and Swin configs.

    Args:
        model: a timm model (its ``pretrained_cfg`` is used; timm defaults fill the gaps).

    Returns:
        The model's preprocessing.
    """
    return Preprocess(**model_preprocess(model))


def preprocess_for(
    model: nn.Module, checkpoint: str | os.PathLike[str] | None = None
) -> tuple[Preprocess, Path | None]:
    """A model's preprocessing: the card beside its checkpoint where there is one (the weights were
    trained with it), else the architecture's ``pretrained_cfg``; and the card read (None without).

    Args:
        model: the float model.
        checkpoint: its checkpoint file, if it came from one.
    """
    card = card_path_for(checkpoint) if checkpoint else None
    if not card:
        return preprocess_from_model(model), None
    pre = preprocess_from_card(card)
    # checked before any image is resized to it: a card's size runs on no fixed-size model, and a
    # huge one (a card from elsewhere) took all the memory resizing the first images
    built = built_input_size(model)
    if built is not None and tuple(pre.input_size[1:]) != built:
        raise DataError(
            f"model card {card} gives input_size {tuple(pre.input_size)}, but the model was built for "
            f"{built[0]}x{built[1]} images: fix the card's input_size"
        )
    return pre, card


def build_transform(pre: Preprocess) -> Callable[[Image.Image], Tensor]:
    """Build timm's evaluation transform: resize, center crop, to tensor, normalize.

    timm resizes the shorter side to ``floor(size / crop_pct)`` and then center-crops ``size``. For a
    square image and ``crop_pct=1.0`` this is exactly a plain resize to ``size x size`` with no crop
    (the CIFAR-10 cards: 32x32 -> 224x224 bilinear). Non-square images keep their aspect ratio and
    lose the borders of their longer side.

    Args:
        pre: the preprocessing.

    Returns:
        A callable mapping an RGB PIL image to a float tensor of shape ``input_size``.

    Raises:
        DataError: a model input of other than 3 channels, which RGB images cannot fill.
    """
    if pre.input_size[0] != 3:  # the model would stop at its first layer, in a traceback
        raise DataError(
            f"the model reads {pre.input_size[0]}-channel images and dopq's loader decodes images as RGB "
            "(3 channels): give the images as tensors to the Python API (dopq.quantize)"
        )
    return create_transform(
        input_size=pre.input_size,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
        is_training=False,
    )
