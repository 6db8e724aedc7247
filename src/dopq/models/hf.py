"""Hugging Face ``transformers`` image classifiers (ViT, DeiT, Swin, BEiT, DINOv2) as dopq models.

Importing this module imports ``transformers`` (the optional ``hf`` extra) and registers one
adapter per supported ``*ForImageClassification`` class. :class:`HFImageClassifier` wraps a
``transformers`` model so that the rest of dopq sees ``forward(images) -> logits`` and a timm-like
``pretrained_cfg`` (preprocessing from the image processor config). The attention modules of the
five families share one form in ``transformers`` 5 (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``head_dim``, ``scaling``; Swin adds a ``relative_position_bias`` module); the adapter swaps each for
:class:`QuantHFAttention` / :class:`QuantHFWindowAttention`, built from those public attributes, so
the ``eager`` and ``sdpa`` implementations become the same explicit, quantized computation.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopq.errors import CheckpointError, ModelError
from dopq.models.adapters import ModelAdapter, register_adapter
from dopq.models.attention import ValuePath, _MatMulSlots
from dopq.modules import replace_module

try:
    import transformers
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.beit.modeling_beit import BeitAttention, BeitRelativePositionBias
    from transformers.models.deit.modeling_deit import DeiTAttention
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention
    from transformers.models.swin.modeling_swin import SwinAttention, SwinPatchMerging
    from transformers.models.vit.modeling_vit import ViTAttention
    from transformers.utils import logging as hf_logging
except ImportError as exc:  # the extra is missing, or a transformers without these classes
    raise ModelError(
        f"Hugging Face models need the transformers extra ({exc}): pip install 'dopq[hf]'"
    ) from None
try:  # how transformers 5 collects output_attentions: a forward hook on the attention modules
    from transformers.utils.output_capturing import install_output_capuring_hook
except ImportError:  # another version: the quantized model returns no attention maps
    install_output_capuring_hook = None

__all__ = [
    "HF_PREFIX",
    "HFImageClassifier",
    "QuantHFAttention",
    "QuantHFWindowAttention",
    "folder_architecture",
    "load_hf_model",
    "preprocess_from_processor",
    "rebuild_hf_model",
    "supported_architectures",
    "wrap_hf_model",
]

HF_PREFIX = "hf:"
# PIL resampling codes as image processor configs store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_DEFAULT_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}

log = logging.getLogger(__name__)


def _captures(module: nn.Module) -> bool:
    """Whether ``transformers`` has put its output-capturing hook on ``module`` (a second one would
    record every map twice)."""
    return any(
        getattr(hook, "__qualname__", "").endswith("output_capturing_hook")
        for hook in module._forward_hooks.values()
    )


class QuantHFAttention(_MatMulSlots):
    """Quantized version of the ``transformers`` 5 ViT / DeiT / BEiT / DINOv2 attention.

    The additive ``attention_mask`` the layer passes (BEiT: its relative position bias) is added in
    float after ``q @ k^T``, as Swin's bias in timm's form. Returns ``(output, attention map)`` like
    the ``transformers`` eager module; the map is what ``output_attentions=True`` collects (through
    the hook ``transformers`` would have put on the module this one replaces).

    Args:
        attn: the ``transformers`` attention module; its ``q_proj``/``k_proj``/``v_proj``/``o_proj``
            Linear layers are reused.
        qk: quantizers for the two operands of ``q @ k^T``.
        av: quantizers for the attention map (post-Softmax) and ``v``.
    """

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        super().__init__()
        missing = [
            a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling") if not hasattr(attn, a)
        ]
        if missing:
            raise ModelError(
                f"{type(attn).__name__} has no {', '.join(missing)}: dopq supports the attention of "
                f"transformers >= 5.18 (installed: {transformers.__version__})"
            )
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
        )
        self.attn_drop = nn.Dropout(getattr(attn, "attention_dropout", 0.0))
        self._init_matmuls(qk, av)
        # transformers records attentions from modules of the replaced class (hooked at the first
        # forward that asks for them): without a hook of its own, output_attentions=True gave an
        # empty tuple. One the replaced module already has moves here with it (replace_module)
        if install_output_capuring_hook is not None and self.records_attentions and not _captures(attn):
            install_output_capuring_hook(self, "attentions", 1)

    records_attentions = True  # Swin records them from its stages' outputs instead

    def value_path(self) -> ValuePath | None:
        return ValuePath(self.v_proj, slice(None), self.o_proj)

    def _heads(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return proj(x).view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def bias(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return attention_mask

    def window_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (self._heads(p, hidden_states) for p in (self.q_proj, self.k_proj, self.v_proj))
        bias, window_mask = self.bias(attention_mask), self.window_mask(attention_mask)
        out, attn = self._attend_with_map(q, k, v, bias, window_mask)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), attn


class QuantHFWindowAttention(QuantHFAttention):
    """Quantized version of the ``transformers`` 5 Swin attention: the relative position bias (its
    public ``relative_position_bias`` module) and the shift mask are added in float."""

    records_attentions = False  # transformers takes Swin's maps from its stages' outputs

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        super().__init__(attn, qk, av)
        self.relative_position_bias = attn.relative_position_bias

    def bias(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.relative_position_bias()  # (1, heads, n, n)

    def window_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return attention_mask  # the shift mask, (windows, n, n)


class HFImageClassifier(nn.Module):
    """A ``transformers`` image classifier seen as ``forward(images) -> logits``.

    The logits are the model output's ``logits`` (DeiT with a distillation head: the mean of the class
    and distillation logits, as ``transformers`` computes them). ``pretrained_cfg`` holds the
    architecture (``hf:<class>``) and the preprocessing, in timm's keys.

    Args:
        model: a ``transformers`` ``*ForImageClassification`` model.
        preprocess: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` (timm's
            meaning); by default the model's image size with ``transformers``' ViT processor defaults.
    """

    def __init__(self, model: nn.Module, preprocess: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(model.config.num_labels)
        size = _image_size(model.config)
        cfg = {"input_size": (_channels(model.config), *size), **_DEFAULT_PREPROCESS, "crop_pct": 1.0}
        cfg.update(preprocess or {})
        self.pretrained_cfg = {"architecture": HF_PREFIX + type(model).__name__, **cfg}
        _use_exportable_modules(model)
        # the wrapper in its model's mode: a new Module is in training mode, and a caller that
        # restores it (model.train(model.training)) switched on Swin's drop path
        self.train(model.training)

    @property
    def class_names(self) -> list[str] | None:
        """The class names in output order (``config.id2label``); None where they are
        ``transformers``' placeholders (``LABEL_0``, ...), which name no data's classes."""
        id2label = getattr(self.model.config, "id2label", None) or {}
        names = [str(id2label.get(i, "")) for i in range(self.num_classes)]
        return None if all(not n or n == f"LABEL_{i}" for i, n in enumerate(names)) else names

    @property
    def wrapped_model(self) -> nn.Module:
        """The ``transformers`` model (adapters are keyed by its class)."""
        return self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


def _channels(config: Any) -> int:
    """The channels the model reads (``num_channels``; 3 where a config has none)."""
    return int(getattr(config, "num_channels", 3))


def _image_size(config: Any) -> tuple[int, int]:
    size = config.image_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class MeanPool1d(nn.Module):
    """``nn.AdaptiveAvgPool1d(1)`` as a mean over the last axis: the same values, exported as
    ``ReduceMean``, which onnxruntime runs in float64 too (its ``GlobalAveragePool`` has no float64
    kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1, keepdim=True)


class IndexedRelativePositionBias(nn.Module):
    """``transformers``' BEiT relative position bias, the same values, with its index held as a buffer.

    ``transformers`` resizes the table with a bilinear interpolation on every call (an identity at the
    trained window, but a ``Resize`` that onnxruntime has no float64 kernel for) and caches the index
    process-wide: an index first built under ``torch.inference_mode`` (an evaluation) then breaks every
    forward with gradients (dopq's structure walk). Here the trained window reads the table directly;
    another window resizes it as ``transformers`` does, with an index built on each call. The table is
    the original parameter, under the same state-dict key.
    """

    def __init__(self, original: BeitRelativePositionBias) -> None:
        super().__init__()
        self.relative_position_bias_table = original.relative_position_bias_table
        self.window_size = (int(original.window_size[0]), int(original.window_size[1]))
        self._index_of = inspect.unwrap(type(original).generate_relative_position_index)  # no cache
        with torch.inference_mode(False):
            index = self._index_of(self.window_size).clone()
        self.register_buffer("index", index, persistent=False)

    def _resized_table(self, window: tuple[int, int]) -> torch.Tensor:
        """The table for another window: the relative-distance grid resized bilinearly (transformers'
        layout, width before height), the three class-token entries kept."""
        table = self.relative_position_bias_table
        old_h, old_w = 2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1
        new_h, new_w = 2 * window[0] - 1, 2 * window[1] - 1
        grid = table[: old_h * old_w].reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(new_h, new_w), mode="bilinear")
        return torch.cat([grid.permute(0, 2, 3, 1).reshape(new_h * new_w, -1), table[old_h * old_w :]])

    def forward(
        self,
        window_size: tuple[int, int],
        interpolate_pos_encoding: bool = False,
        dim_size: int | None = None,
    ) -> torch.Tensor:
        window = (int(window_size[0]), int(window_size[1]))
        if window == self.window_size:
            table, index = self.relative_position_bias_table, self.index
        else:
            table, index = self._resized_table(window), self._index_of(window).to(self.index.device)
        tokens = window[0] * window[1] + 1
        bias = table[index.reshape(-1)].reshape(tokens, tokens, -1).permute(2, 0, 1).contiguous()
        if interpolate_pos_encoding:
            bias = nn.functional.interpolate(
                bias.unsqueeze(1), size=(dim_size, dim_size), mode="bilinear", align_corners=False
            ).squeeze(1)
        return bias.unsqueeze(0)


def _exportable(module: nn.Module) -> nn.Module | None:
    """A torch module computing the same function as ``module`` that the export knows, or None."""
    if type(module) is nn.AdaptiveAvgPool1d and module.output_size in (1, (1,)):
        return MeanPool1d()  # Swin's pooler
    if type(module) is BeitRelativePositionBias:
        return IndexedRelativePositionBias(module)
    return None


def _use_exportable_modules(model: nn.Module) -> None:
    """Swap Swin's average pooling and BEiT's relative position bias for equal modules the float64
    export can run."""
    for name, module in list(model.named_modules()):
        new = _exportable(module)
        if new is not None:
            replace_module(model, name, new)


def wrap_hf_model(model: nn.Module, preprocess: dict[str, Any] | None = None) -> HFImageClassifier:
    """Wrap a ``transformers`` model object (put in eval mode) for :func:`dopq.quantize`."""
    if isinstance(model, HFImageClassifier):
        return model
    if type(model) not in _ADAPTED:
        names = ", ".join(supported_architectures())
        raise ModelError(f"unsupported transformers model {type(model).__name__}: dopq supports {names}")
    return HFImageClassifier(model.float().eval(), preprocess)


def preprocess_from_processor(path: str | Path, config: Any) -> dict[str, Any]:
    """timm-style preprocessing from an image processor config (``preprocessor_config.json``).

    ``size`` (``height``/``width`` or ``shortest_edge``) and ``crop_size`` give the input size and
    ``crop_pct`` (crop / resize); ``resample`` the interpolation; ``image_mean``/``image_std`` the
    normalization (none when ``do_normalize`` is false). Images are resized with their aspect ratio
    kept, as timm does: for square images (CIFAR) the same as the processor's resize to a fixed size.
    """
    path = Path(path)
    try:
        proc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read image processor config {path}: {exc}") from None
    if not isinstance(proc, dict):
        raise CheckpointError(f"image processor config {path} must hold a JSON object")
    resize = _edge(proc.get("size") if proc.get("do_resize", True) else None) or _image_size(config)[0]
    crop = _edge(proc.get("crop_size")) if proc.get("do_center_crop", False) else None
    rescale = proc.get("rescale_factor", 1 / 255) if proc.get("do_rescale", True) else 1.0
    if abs(float(rescale) - 1 / 255) > 1e-9:
        raise CheckpointError(f"{path}: rescale_factor {rescale} is not 1/255, which dopq's loader assumes")
    out: dict[str, Any] = {
        "input_size": (_channels(config), crop or resize, crop or resize),
        "crop_pct": (crop or resize) / resize,
    }
    if proc.get("do_normalize", True):
        out["mean"] = _per_channel(proc.get("image_mean", _DEFAULT_PREPROCESS["mean"]), config)
        out["std"] = _per_channel(proc.get("image_std", _DEFAULT_PREPROCESS["std"]), config)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    out["interpolation"] = _RESAMPLE.get(proc.get("resample", 2), "bilinear")
    return out


def _per_channel(value: Any, config: Any) -> tuple:
    """A processor's ``image_mean`` / ``image_std``: a list, or one number for every channel
    (``transformers`` writes what the processor was given, ``ViTImageProcessor(image_mean=0.5)``)."""
    return (value,) * _channels(config) if isinstance(value, int | float) else tuple(value)


def _edge(size: Any) -> int | None:
    """The square edge of a processor ``size``: an int, ``{"height", "width"}`` or ``{"shortest_edge"}``."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise CheckpointError(f"non-square processor size {size} is not supported")
            return int(size["height"])
    return None


def _architecture_class(name: str | None, where: str) -> type[nn.Module]:
    cls = getattr(transformers, name, None) if name else None
    if cls not in _ADAPTED:
        names = ", ".join(supported_architectures())
        raise ModelError(f"{where}: unknown or unsupported architecture {name!r}; dopq supports {names}")
    return cls


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No ``transformers`` progress bar while loading (dopq prints its own) and no load report (dopq
    refuses what it would warn about, in one line); the settings come back."""
    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _some(keys: Any) -> str:
    """A few of ``keys``, sorted, for an error line."""
    names = sorted(keys)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Refuse weights that do not cover the model: ``transformers`` initializes missing or reshaped
    layers at random (and only warns), which no post-training quantization can repair. Its lists
    already leave out what the model declares optional (tied weights, ignorable buffers). Weights
    the model does not use only warn: hub folders can carry a base model's pooler."""
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = {entry[0]: entry[1:] for entry in info.get("mismatched_keys") or ()}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_some(missing)})")
    if mismatched:
        key = sorted(mismatched)[0]
        stored, expected = (tuple(shape) for shape in mismatched[key])  # (weights', model's)
        problems.append(
            f"{len(mismatched)} of another shape ({key}: {stored} in the weights, {expected} in the model)"
        )
    if unexpected:  # weights the model does not use (a base model's pooler): nothing left random
        log.warning(
            "hf: %d weight(s) in %s are not used by the model: %s", len(unexpected), folder, _some(unexpected)
        )
    if problems:
        raise CheckpointError(
            f"hf: weights in {folder} do not fit the model of its config.json: {'; '.join(problems)}"
        )


def _folder_config(folder: Path) -> tuple[Any, type[nn.Module]]:
    """The ``transformers`` config of a ``save_pretrained`` folder and its supported class."""
    if folder.is_file():
        raise ModelError(
            f"hf: {folder} is a file, not a save_pretrained folder; for a timm weights file use "
            "--model ARCH --checkpoint FILE"
        )
    if not folder.is_dir():
        raise ModelError(f"hf: folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelError(f"hf: folder {folder} has no config.json (write it with save_pretrained)")
    try:
        # never the folder's own Python (auto_map): transformers would otherwise ask on stdin and run it
        config = transformers.AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # an unknown model_type or an unreadable file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"hf: {folder}/config.json could not be read: {first}") from None
    return config, _architecture_class((config.architectures or [None])[0], f"hf:{folder}")


def folder_architecture(folder: str | Path) -> str:
    """``hf:<class>`` of a ``save_pretrained`` folder, the architecture its quantized files record."""
    return HF_PREFIX + _folder_config(Path(folder).expanduser())[1].__name__


def load_hf_model(folder: str | Path, num_classes: int | None = None) -> HFImageClassifier:
    """Load a ``save_pretrained`` folder (``config.json``, weights, ``preprocessor_config.json``).

    Args:
        folder: the local folder (nothing is downloaded).
        num_classes: when given, the class count the caller expects; another head is refused.

    Returns:
        The wrapped float32 model in eval mode, its preprocessing from the processor config.
    """
    folder = Path(folder).expanduser()
    config, cls = _folder_config(folder)
    if num_classes is not None and num_classes != config.num_labels:
        raise CheckpointError(
            f"--num-classes {num_classes} does not match {folder}, whose head has {config.num_labels}"
        )
    try:
        with _quiet_loading():
            # mismatched shapes come back in the loading info (checked below) instead of an error
            # that points at the load report
            model, info = cls.from_pretrained(
                folder,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                trust_remote_code=False,
            )
    except Exception as exc:  # missing or unreadable weight files
        from dopq.models.loading import refused_globals

        if names := refused_globals(exc):  # torch's first line advised weights_only=False: running them
            raise CheckpointError(
                f"hf: weights in {folder} hold pickled Python objects ({', '.join(names[:3])}): dopq does "
                "not unpickle them (that can run code); save the model with save_pretrained (safetensors)"
            ) from None
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"hf: weights in {folder} could not be loaded: {first}") from None
    _check_loading_info(folder, info)
    proc = folder / "preprocessor_config.json"
    preprocess = preprocess_from_processor(proc, config) if proc.is_file() else None
    wrapped = HFImageClassifier(model.float().eval(), preprocess)
    if preprocess is None:  # model.save_pretrained writes none; DeiT, Swin, DINOv2 used other means
        cfg = wrapped.pretrained_cfg
        log.warning(
            "hf: %s has no preprocessor_config.json (the image processor's save_pretrained writes it): "
            "its preprocessing is transformers' ViT default (mean %s, std %s, %s, %d pixels); give "
            "--mean, --std, --interpolation and --crop-pct if it was trained otherwise",
            folder, cfg["mean"], cfg["std"], cfg["interpolation"], cfg["input_size"][-1],
        )  # fmt: skip
    return wrapped


def hf_config_dict(model: HFImageClassifier) -> dict[str, Any]:
    """The model's ``transformers`` config as plain JSON types (saved with quantized models)."""
    return json.loads(model.model.config.to_json_string(use_diff=False))


def rebuild_hf_model(
    arch: str, config: dict[str, Any], preprocess: dict[str, Any] | None
) -> HFImageClassifier:
    """An untrained ``arch`` (``hf:<class>``) from a saved config dict, for loading a saved state."""
    cls = _architecture_class(arch.removeprefix(HF_PREFIX), "saved model")
    hf_config = cls.config_class.from_dict(config)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's state
        model = cls(hf_config)
    return HFImageClassifier(model.float().eval(), preprocess)


def _hf_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Patch embedding, the transformer layers (and Swin's patch merging) and the head Linear layers,
    in registration order, which is forward order in these models."""
    units: list[tuple[str, nn.Module]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        is_layer = isinstance(module, GradientCheckpointingLayer) and not any(
            isinstance(m, GradientCheckpointingLayer) for m in list(module.modules())[1:]
        )
        is_embed = any(isinstance(m, nn.Conv2d) for m in module.children())
        if is_layer or is_embed or isinstance(module, (SwinPatchMerging, nn.Linear)):
            units.append((name, module))
            covered.append(name)
    return units


_ADAPTED: dict[type[nn.Module], ModelAdapter] = {}


def _register(
    model_cls: type[nn.Module], family: str, attention: type[nn.Module], quant: type[nn.Module]
) -> None:
    adapter = ModelAdapter(family, {attention: quant}, _hf_units)
    _ADAPTED[model_cls] = adapter
    register_adapter(model_cls, adapter)


def supported_architectures() -> list[str]:
    """The ``transformers`` classes dopq quantizes."""
    return sorted(cls.__name__ for cls in _ADAPTED)


_FAMILIES: tuple[tuple[str, str, type[nn.Module], type[nn.Module]], ...] = (
    ("ViTForImageClassification", "hf-vit", ViTAttention, QuantHFAttention),
    ("DeiTForImageClassification", "hf-deit", DeiTAttention, QuantHFAttention),
    ("DeiTForImageClassificationWithTeacher", "hf-deit", DeiTAttention, QuantHFAttention),
    ("SwinForImageClassification", "hf-swin", SwinAttention, QuantHFWindowAttention),
    ("BeitForImageClassification", "hf-beit", BeitAttention, QuantHFAttention),
    ("Dinov2ForImageClassification", "hf-dinov2", Dinov2Attention, QuantHFAttention),
)
for _name, _family, _attn, _quant in _FAMILIES:
    _register(getattr(transformers, _name), _family, _attn, _quant)
