"""Build timm models by name, with weights from a local checkpoint or the timm hub."""

from __future__ import annotations

import difflib
import json
import logging
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlparse

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
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
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
    _check_tag(arch)


def _check_tag(name: str) -> None:
    """An ``arch.tag`` name must name a tag timm knows (``timm.is_model`` ignores the tag, and timm's
    own refusal is a bare RuntimeError)."""
    arch, tag = timm.models.split_model_name_tag(name)
    if not tag:
        return
    known = list(timm.models.get_arch_pretrained_cfgs(arch))
    if name not in known:
        listed = f"timm knows {', '.join(known[:10])}" if known else f"timm has no pretrained tags for {arch}"
        raise ModelError(f"unknown pretrained tag {tag!r} for {arch}: {listed}")


@contextmanager
def _seeded_init(seed: int) -> Iterator[None]:
    """timm initializes weights from torch's global CPU generator: give it a forked, seeded one, so
    random-init models are reproducible and the caller's random state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether one TCP connection to ``endpoint`` (or to the proxy the environment sets for it) opens
    within ``timeout`` seconds."""
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_access() -> Iterator[bool]:
    """Yields whether the Hugging Face hub may be asked. huggingface_hub retries an unreachable hub for
    about 45 s before it looks in its cache; when one quick connection fails, its offline mode is set
    for the call instead, so cached weights load at once and missing ones fail at once."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm then downloads by URL (torch.hub), which fails fast without network
        yield True
        return
    if constants.HF_HUB_OFFLINE:
        yield False
    elif _hub_reachable(constants.ENDPOINT):
        yield True
    else:
        with mock.patch.object(constants, "HF_HUB_OFFLINE", True):
            yield False


def _pretrained_cfg(arch: str) -> Any:
    """timm's pretrained config of ``arch`` (its default tag when none is given)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    full = f"{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else arch
    if cfg is None or full not in timm.list_pretrained(full):
        raise ModelError(f"timm has no pretrained weights for {arch}; pass --checkpoint PATH")
    return cfg


def _check_pretrained_head(cfg: Any, num_classes: int | None) -> None:
    """Refuse a class count the pretrained head does not have: timm would drop that head and start a
    random one, and post-training quantization never trains it."""
    offset = cfg.label_offset or 0  # e.g. 1001 outputs with a background class, which timm can drop
    if num_classes is not None and num_classes not in (cfg.num_classes, cfg.num_classes - offset):
        raise ModelError(
            f"--num-classes {num_classes} does not match the pretrained weights of "
            f"{cfg.architecture}.{cfg.tag}, whose head has {cfg.num_classes} classes; "
            "dopq does not train a new head: drop --num-classes or pass --checkpoint PATH"
        )


def _pretrained_model(arch: str, num_classes: int | None, init_seed: int) -> nn.Module:
    """``arch`` with timm's pretrained weights, from the local cache when the hub is unreachable."""
    cfg = _pretrained_cfg(arch)
    _check_pretrained_head(cfg, num_classes)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with _hub_access() as online:
        try:
            with _seeded_init(init_seed):
                return timm.create_model(arch, pretrained=True, **kwargs).eval()
        except Exception as exc:
            if not online:
                raise ModelError(
                    f"pretrained weights of {arch} are not in the local Hugging Face cache and the hub "
                    "is unreachable (or HF_HUB_OFFLINE is set); pass --checkpoint PATH"
                ) from None
            text = _ANSI.sub("", str(exc)).strip()
            first = text.splitlines()[0][:160] if text else ""
            raise ModelError(
                f"could not create {arch} with pretrained weights ({type(exc).__name__}: {first}); "
                "without network access pass --checkpoint PATH"
            ) from None


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
    if checkpoint is None and pretrained:
        return _pretrained_model(arch, num_classes, init_seed)
    if checkpoint is None:
        with _seeded_init(init_seed):
            model = timm.create_model(arch, **({} if num_classes is None else {"num_classes": num_classes}))
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
