"""Build timm models by name, with weights from a local checkpoint or the timm hub."""

from __future__ import annotations

import difflib
import json
import logging
import pickle
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from dopq.errors import CheckpointError, DopqError, ModelError

__all__ = [
    "HF_PREFIX",
    "PREPROCESS_KEYS",
    "as_dopq_model",
    "build_model",
    "built_input_size",
    "card_for",
    "hf_folder",
    "is_transformers_model",
    "load_state_dict",
    "model_preprocess",
    "pretrained_weights",
    "weights_dtype",
]

log = logging.getLogger(__name__)
_HEAD_KEYS = ("head.weight", "head.fc.weight")
# where training code nests the state dict, in the order tried (the first holding tensors is taken)
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "ema", "module")
# key prefixes of wrapped models: DDP/DeepSpeed, torch.compile, a Lightning-style `self.model`
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.")
# buffers timm derives at init; timm < 0.9 and Microsoft's Swin checkpoints saved them
_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
HF_PREFIX = "hf:"  # --model hf:FOLDER, a transformers save_pretrained folder


def hf_folder(arch: str) -> Path:
    """The folder of ``hf:FOLDER``, ``~`` expanded: the shell expands it at a word's start only,
    so ``--model hf:~/vit`` reached dopq as written and was a folder that does not exist."""
    return Path(arch.removeprefix(HF_PREFIX)).expanduser()


# the evaluation preprocessing a model records and a card may set (model_preprocess)
PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def model_preprocess(model: nn.Module) -> dict[str, Any]:
    """The evaluation preprocessing a model records in its ``pretrained_cfg`` (timm's defaults fill
    the gaps) as JSON types: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``."""
    cfg = timm.data.resolve_data_config(model=model)
    out = {k: list(cfg[k]) if isinstance(cfg[k], tuple | list) else cfg[k] for k in PREPROCESS_KEYS}
    built_for = built_input_size(model)
    if built_for is not None:  # created with img_size=...: its pretrained_cfg still names the default
        out["input_size"] = [out["input_size"][0], *built_for]
    return out


def built_input_size(model: nn.Module) -> tuple[int, int] | None:
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


def weights_dtype(model: nn.Module, error: type[DopqError]) -> torch.dtype:
    """The dtype of ``model``'s weights, for the callers that need float32 (quantizing, the export);
    a model on the meta device (shapes without values) is ``error``: its values are not there to read."""
    parameter = next(model.parameters())
    if parameter.is_meta:
        raise error(
            "the model's parameters are on the meta device (shapes without values): load its weights "
            "first, e.g. model.to_empty(device='cpu') and model.load_state_dict(...)"
        )
    return parameter.dtype


def card_for(checkpoint: str | Path) -> dict[str, Any] | None:
    """The JSON model card beside a checkpoint (same stem, ``.json``), if any."""
    path = Path(checkpoint).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    # a card from elsewhere: not UTF-8 (UnicodeDecodeError), or nested too deep for the parser
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"model card {path} is not valid JSON: {str(exc)[:160]}") from None


def _file_format(path: Path) -> str:
    """``safetensors``, ``zip`` (``torch.save``), ``pickle`` (legacy ``torch.save``) or ``unknown``,
    from the first bytes: the suffix is only a name (``.bin``, ``.SAFETENSORS`` hold either)."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    return "pickle" if head[:1] == b"\x80" else "unknown"  # legacy torch.save: pickle protocol 2


def _unreadable(path: Path, exc: Exception, fmt: str) -> CheckpointError:
    """The error for a file the decoder refused: what it holds when that is known, else the decoder's
    first line (without terminal escape codes)."""
    if isinstance(exc, pickle.UnpicklingError):
        if fmt == "zip":
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # the archive itself is damaged: report the decoder's error
                names = []
        else:  # legacy torch.save: torch's message names the class it refused, after advice to run
            # torch.load with weights_only=False (running the file's code), which was its first line
            names = refused_globals(exc)
        if names:
            return CheckpointError(
                f"checkpoint {path} could not be read as a state dict: it holds pickled Python objects "
                f"({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''}), as a whole model or "
                "training state saved with torch.save does; dopq does not unpickle them (that can run code): "
                "save the weights alone with torch.save(model.state_dict(), PATH)"
            )
    return CheckpointError(
        f"checkpoint {path} could not be read as a state dict ({type(exc).__name__}: {_first_line(exc)})"
    )


_REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")


def refused_globals(exc: Exception) -> list[str]:
    """The classes and functions a weights-only ``torch.load`` refused to unpickle, named in its error."""
    return sorted(set(_REFUSED_GLOBAL.findall(str(exc)))) if isinstance(exc, pickle.UnpicklingError) else []


def _first_line(exc: Exception) -> str:
    """The first line of a library's error, without terminal escape codes, for a one-line message."""
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:160] if text else ""


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself or one of the known wrapper entries."""
    if _is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict):
        from dopq.serialize import FORMAT  # lazy: serialize imports this module

        if obj.get("format") == FORMAT:
            raise CheckpointError(
                f"{path} is a dopq quantized model (made by dopq quantize --save), not float weights: "
                f"use dopq evaluate --quantized {path}"
            )
        for key in _WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(key)):
                log.info("checkpoint %s: using its %r entry", path, key)
                return obj[key]
        odd = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if any(isinstance(v, torch.Tensor) for v in obj.values()):  # a state dict with a stray entry
            found = f"its entry {odd!r} is a {type(obj[odd]).__name__}, not a tensor"
        else:
            keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
            found = f"its top-level keys are {keys}; dopq looks under {', '.join(_WRAPPER_KEYS)}"
    else:
        found = f"it holds a {type(obj).__name__}"
    raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors ({found})")


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a file, its keys as stored (see :func:`load_state_dict`)."""
    path = Path(path)
    if path.is_dir():
        hint = (
            f"; for a transformers folder use --model hf:{path}" if (path / "config.json").is_file() else ""
        )
        raise CheckpointError(f"checkpoint {path} is a folder, not a weights file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} could not be read: the file is empty")
    fmt = _file_format(path)
    if fmt == "unknown":
        raise CheckpointError(
            f"checkpoint {path} could not be read: it is neither a safetensors file nor a torch.save file"
        )
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:  # an open file: torch.load would pass any *.safetensors path to safetensors
            with path.open("rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoder failure means the file is unusable
        raise _unreadable(path, exc, fmt) from None
    return _unwrap(obj, path)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or ``torch.save`` state dict safely (no pickled code), recognised by its
    content. A state dict nested under a known key (``model``, ``state_dict``, ``model_ema``,
    ``state_dict_ema``, ``ema``, ``module``) is taken from there; a ``module.`` prefix (DDP) that every
    key has is dropped."""
    state = _read_state(path)
    if state and all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _prefix_variants(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state``, then ``state`` with a known wrapper prefix that every key has removed, repeatedly
    (``module._orig_mod.``): the candidates for the model's own keys."""
    variants = [state]
    while len(variants) <= len(_KEY_PREFIXES):
        keys = variants[-1].keys()
        prefix = next((p for p in _KEY_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        variants.append({k.removeprefix(prefix): v for k, v in variants[-1].items()})
    return variants


def _is_derived(key: str) -> bool:
    return key.rpartition(".")[2] in _DERIVED_BUFFERS


def _drop_derived_buffers(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without entries for the model's non-persistent derived buffers (relative position
    index, shift mask): the model computes them itself, as timm's own checkpoint filters assume."""
    persistent = model.state_dict().keys()
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if not (_is_derived(k) and k in buffers and k not in persistent)}


def _model_keys(model: nn.Module, variants: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The variant whose keys are exactly the model's (derived buffers aside); the most stripped one
    when none is, so that the error names the model's own keys."""
    expected = set(model.state_dict())
    cleaned = [_drop_derived_buffers(v, model) for v in variants]
    for state in cleaned:
        keys = set(state)
        if keys <= expected and all(_is_derived(k) for k in expected - keys):
            return state
    return cleaned[-1]


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


def _cached_weights(cfg: Any) -> str | None:
    """The local file of the hub weights timm would download, where an earlier download left it in
    the Hugging Face cache (read through ``huggingface_hub``'s public cache lookup)."""
    if not cfg.hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for filename in (cfg.hf_hub_filename or "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants
    except ImportError:
        return "https://huggingface.co"
    return constants.ENDPOINT


def _pretrained_cfg(arch: str) -> Any:
    """timm's pretrained config of ``arch`` (its default tag when none is given)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    full = f"{cfg.architecture}.{cfg.tag}" if cfg is not None and cfg.tag else arch
    if cfg is None or full not in timm.list_pretrained(full):
        raise ModelError(f"timm has no pretrained weights for {arch}; pass --checkpoint PATH")
    return cfg


def pretrained_weights(arch: str) -> tuple[str, str | None]:
    """What ``--pretrained`` loads for ``arch``: the ``arch.tag`` name of timm's weights (its
    default tag when ``arch`` names none, which a timm release may change) and their file in the
    local Hugging Face cache (None where there is none, e.g. weights timm fetched from a URL)."""
    cfg = _pretrained_cfg(arch)
    return (f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture), _cached_weights(cfg)


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
    """``arch`` with timm's pretrained weights, from the local Hugging Face cache where they are."""
    cfg = _pretrained_cfg(arch)
    _check_pretrained_head(cfg, num_classes)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    # weights already in the local cache load from there: no network, no retries (huggingface_hub
    # retries an unreachable hub for about 45 s before it looks in its cache)
    cached = _cached_weights(cfg)
    if cached is None and not _hub_reachable(_hub_endpoint()):
        raise ModelError(
            f"pretrained weights of {arch} are not in the local Hugging Face cache and the hub is "
            "unreachable; pass --checkpoint PATH"
        )
    if cached is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": cached, "source": "timm"}  # timm reads the file
    try:
        with _seeded_init(init_seed):
            return timm.create_model(arch, pretrained=True, **kwargs).eval()
    except Exception as exc:
        raise ModelError(
            f"could not create {arch} with pretrained weights ({type(exc).__name__}: {_first_line(exc)}); "
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
        return _hf().load_hf_model(hf_folder(arch), num_classes)
    _check_arch(arch)
    if checkpoint is None and pretrained:
        return _pretrained_model(arch, num_classes, init_seed)
    if checkpoint is None:
        with _seeded_init(init_seed):
            model = timm.create_model(arch, **({} if num_classes is None else {"num_classes": num_classes}))
        return model.eval()
    variants = _prefix_variants(_read_state(checkpoint))
    found = next((n for v in variants if (n := _classes_in(v)) is not None), None)
    if num_classes is not None and found is not None and num_classes != found:
        raise CheckpointError(
            f"--num-classes {num_classes} does not match checkpoint {checkpoint}, whose head has {found} classes"
        )
    with _seeded_init(init_seed):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes or found or 1000)
    state = _model_keys(model, variants)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: a checkpoint of another size or variant
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc))
        raise CheckpointError(f"checkpoint {checkpoint} does not fit {arch}: {detail}") from None
    missing = [k for k in result.missing_keys if not _is_derived(k)]
    if missing and not result.unexpected_keys and set(missing) <= _classifier_keys(model):
        # a feature extractor's weights (DINOv2's and EVA-02's hub weights are headless)
        raise CheckpointError(
            f"checkpoint {checkpoint} has no classifier head ({', '.join(missing)} missing): dopq "
            f"quantizes and evaluates classifiers; give {arch} weights with a trained head"
        )
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    log.info("loaded %s from %s", arch, checkpoint)
    _take_card_preprocessing(model, card_for(checkpoint))
    return model.float().eval()


def _classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's classifier (timm's ``get_classifier()``), if it has one."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return set()
    prefix = next((name for name, module in model.named_modules() if module is head), None)
    if not prefix:
        return set()
    return {f"{prefix}.{key}" for key in head.state_dict()}


def _take_card_preprocessing(model: nn.Module, card: dict[str, Any] | None) -> None:
    """The card's preprocessing into the model's ``pretrained_cfg``: what the API's save, export and
    data helpers read (:func:`model_preprocess`), as the CLI reads the card itself."""
    if not isinstance(card, dict):
        return
    found = {k: tuple(v) if isinstance(v, list) else v for k, v in card.items() if k in PREPROCESS_KEYS}
    if found:
        model.pretrained_cfg = {**model.pretrained_cfg, **found}
