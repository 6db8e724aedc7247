"""Save a quantized model and load it back for evaluation without redoing the work.

The file (``torch.save`` of plain types only, loaded with ``weights_only=True``) holds the timm
architecture name and the keyword arguments it was created with (or ``hf:<class>`` and the
``transformers`` config as JSON types), the class count, the recipe, the preprocessing, each uniform quantizer's
granularity, every quantized weight as its integer codes (uint8, two 4-bit codes per byte at
W <= 4: the weight quantizer's own ``codes``) and every other parameter and quantizer buffer.
Loading rebuilds the architecture with timm, inserts quantizers with the same recipe, loads the
state and sets each weight to ``dequantize(codes)``, a point of its grid, so the model computes
what was saved. Schema 1 files (float weights) still load.

Each file holds the SHA-256 of its contents (:func:`payload_digest`), checked on load (torch's zip
reader checks no CRC), and a save first rebuilds the model from what the file holds and refuses one
that computes other logits (an argument the model was created with and not given).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dopq.config import RECIPE_ATTRIBUTE, QuantConfig
from dopq.devices import resolve_device
from dopq.errors import CheckpointError
from dopq.files import atomic_path
from dopq.models import prepare_model
from dopq.models.loading import HF_PREFIX, as_dopq_model, hf_folder, model_preprocess
from dopq.modules import QuantLinear, quantized_weight, quantizers_of
from dopq.quantizers import PerChannel, PerTensor, UniformQuantizer

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "granularities",
    "load_quantized",
    "match_state",
    "pack_codes",
    "payload_digest",
    "save_quantized",
    "unpack_codes",
]

FORMAT = "dopq-quantized"
SCHEMA_VERSION = 2
_READABLE_SCHEMAS = (1, 2)


def _arch_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise CheckpointError("cannot save: the model has no timm architecture name (pretrained_cfg)")
    return arch


def _hf_config(model: nn.Module) -> dict[str, Any]:
    """A ``transformers`` model's config (plain JSON types), which rebuilds its architecture."""
    from dopq.models.hf import hf_config_dict

    return hf_config_dict(model)


_TIMM_LOADING_ARGUMENTS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
)


def _build(payload: dict[str, Any]) -> nn.Module:
    """The saved architecture, untrained: timm by name, ``transformers`` from the saved config."""
    preprocess = payload["metadata"].get("preprocess")
    if payload["arch"].startswith(HF_PREFIX):
        from dopq.models.hf import rebuild_hf_model

        return rebuild_hf_model(payload["arch"], payload["hf_config"], preprocess)
    kwargs = payload.get("model_kwargs", {})
    # timm.create_model's own loading arguments: a file from elsewhere naming one made the load read
    # (checkpoint_path) or download (cache_dir, pretrained_cfg) weights of the file's choosing
    loading = sorted(set(kwargs) & _TIMM_LOADING_ARGUMENTS)
    if loading:
        raise CheckpointError(
            f"the file's model_kwargs name {', '.join(loading)}: timm's loading arguments, which no "
            "file dopq saves holds (it was edited); dopq does not follow them"
        )
    try:
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's state
            model = timm.create_model(
                payload["arch"], pretrained=False, num_classes=payload["num_classes"], **kwargs
            )
    except (RuntimeError, TypeError, ValueError) as exc:  # a newer timm's name or argument
        raise CheckpointError(
            f"this timm ({timm.__version__}) cannot build {payload['arch']} with {kwargs}: "
            f"{' '.join(str(exc).split())}; load the file with the timm that saved it"
        ) from None
    if isinstance(preprocess, dict):  # what the saved model was evaluated with, not timm's default
        model.pretrained_cfg = {**model.pretrained_cfg, **_as_cfg(preprocess)}
    return model


def _as_cfg(preprocess: dict[str, Any]) -> dict[str, Any]:
    """Saved preprocessing (JSON lists) in ``pretrained_cfg``'s types (tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()}


def _plain(value: Any) -> bool:
    """Whether ``value`` is made of the types a ``weights_only`` load reads back."""
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _built_by_name(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``arch`` built without memory or initialization where its constructor allows (the meta
    device), else on the CPU (a constructor that reads a tensor's value)."""
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except (RuntimeError, NotImplementedError):
        with torch.random.fork_rng(devices=[]):  # the random init is thrown away; keep the caller's state
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _shape_mismatch(model: nn.Module, arch: str, num_classes: int, kwargs: dict[str, Any]) -> str | None:
    """The first parameter or buffer (non-persistent ones too: Swin's attention masks follow the
    image size) whose shape differs between ``model`` and ``arch`` built from its name, class count
    and ``kwargs`` (:func:`_built_by_name`); None when all agree."""
    try:
        built = _built_by_name(arch, num_classes, kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"cannot save: {arch} cannot be built with model_kwargs {kwargs} ({type(exc).__name__}: {exc})"
        ) from None
    ours = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in itertools.chain(built.named_parameters(), built.named_buffers()):
        mine = ours.get(name)
        if mine is not None and mine.shape != tensor.shape:
            return f"{name} is {tuple(mine.shape)} here, {tuple(tensor.shape)} in {arch} built by name"
    return None


def _timm_kwargs(model: nn.Module, arch: str, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model``'s timm architecture, checked: a model created with
    arguments that change its shapes (``img_size``, ``window_size``, ...) would not load back, or, where
    only buffers differ, would load and compute something else."""
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k not in ("num_classes", "pretrained")}
    if not _plain(list(kwargs.values())):
        raise CheckpointError(
            f"cannot save: model_kwargs must be numbers, strings or lists of them, got {kwargs}"
        )
    mismatch = _shape_mismatch(model, arch, int(model.num_classes), kwargs)
    if mismatch is not None:
        raise CheckpointError(
            f"cannot save: {mismatch}; pass the arguments the model was created with as model_kwargs "
            "(e.g. model_kwargs={'img_size': 384})"
        )
    return kwargs


def granularities(model: nn.Module) -> dict[str, int | None]:
    """Each uniform quantizer's channel axis (None: per tensor), by name: what a prepared model
    needs besides its state to take a calibrated model's state (:func:`match_state`)."""
    return {name: q.channel_axis for name, q in quantizers_of(model) if isinstance(q, UniformQuantizer)}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in ``[0, 2^bits - 1]`` as a flat uint8 tensor, two per byte when ``bits <= 4``.

    Example:
        >>> pack_codes(torch.tensor([1, 2, 15]), 4).tolist()
        [33, 15]
        >>> unpack_codes(pack_codes(torch.tensor([1, 2, 15]), 4), 4, 3).tolist()
        [1, 2, 15]
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as int64."""
    if bits > 4:
        return packed[:count].long()
    pairs = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return pairs[:count].long()


def _quantized_weights(model: nn.Module) -> dict[str, tuple[nn.Module, UniformQuantizer]]:
    """Layers whose weight is stored as codes: an enabled uniform weight quantizer."""
    found = {}
    for name, module in model.named_modules():
        q = quantized_weight(module)
        if q is not None and q.is_ready():
            found[f"{name}.weight" if name else "weight"] = (module, q)
    return found


def _weight_codes(model: nn.Module) -> dict[str, dict[str, Any]]:
    out = {}
    for key, (module, q) in _quantized_weights(model).items():
        codes = q.codes(module.weight.detach())
        out[key] = {"bits": q.bits, "shape": list(codes.shape), "packed": pack_codes(codes.cpu(), q.bits)}
    return out


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns its storage: ``torch.save`` writes a view's whole storage,
    so without the copy the bytes of a file would depend on how each tensor was made (e.g. a
    quantizer parameter indexed out of its search grid), not just on the values."""
    return tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


def save_quantized(
    model: nn.Module,
    path: str | Path,
    config: QuantConfig,
    metadata: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized model to ``path``.

    Args:
        model: a model returned by :func:`dopq.quantize` (or the ``transformers`` model it quantized).
        path: output file (``.pt``).
        config: the recipe it was quantized with.
        metadata: extra JSON information (e.g. the command line), stored as JSON holds it (tuples
            become lists); its ``preprocess`` entry defaults to the model's own
            (:func:`dopq.models.loading.model_preprocess`), which the reloaded model takes.
        model_kwargs: for a timm model, the keyword arguments it was created with besides its name
            and class count (e.g. ``{"img_size": 384}``); the save refuses a model whose shapes its
            name and these arguments do not rebuild.
    """
    # the transformers object dopq.quantize quantized in place, as the model it returned
    model = as_dopq_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # as plain JSON values: load_quantized's weights-only unpickler refuses any other class, so a
    # str subclass such as torch.__version__ wrote a file that could not be loaded again
    try:
        metadata = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata must hold JSON values only: {exc}") from None
    codes = _weight_codes(model)
    state = {k: _compact(v) for k, v in model.state_dict().items() if k not in codes}
    arch = _arch_of(model)
    payload = {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "arch": arch,
        "num_classes": int(model.num_classes),
        "config": config.to_dict(),
        "granularity": granularities(model),
        "metadata": {"preprocess": metadata.get("preprocess") or model_preprocess(model), **metadata},
        "state_dict": state,
        "weight_codes": codes,
    }
    if arch.startswith(HF_PREFIX):
        payload["hf_config"] = _hf_config(model)
    else:
        payload["model_kwargs"] = _timm_kwargs(model, arch, model_kwargs)
    payload["digest"] = payload_digest(payload)
    _check_rebuilds(model, payload)
    _check_recorded_recipe(model, config)
    # Serialized in memory first: torch.save names the archive after the file it writes, and the
    # temporary name would make two saves of the same model differ. Same model -> same bytes.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:  # an interrupted save leaves no half file
        tmp.write_bytes(buffer.getvalue())
    return path


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of everything a file holds but its digest: torch's zip reader checks no CRC, so a
    flipped byte in a tensor would load and compute something else."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in payload.items() if k not in ("digest", "state_dict", "weight_codes")}
    digest.update(json.dumps(rest, sort_keys=True, default=str).encode())
    for name, tensor in sorted(payload["state_dict"].items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    for name, entry in sorted(payload.get("weight_codes", {}).items()):
        digest.update(f"{name} {entry['bits']} {entry['shape']}".encode())
        digest.update(_tensor_bytes(entry["packed"]))
    return digest.hexdigest()


def _check_recipe_matches(model: nn.Module, rebuilt: nn.Module) -> None:
    """Refuse a ``config`` other than the one the model was quantized with, naming the first
    quantizer whose kind or width it changes (its logits would differ too, which the model_kwargs
    message blamed on the model's arguments)."""
    theirs = dict(quantizers_of(rebuilt))
    for name, ours in quantizers_of(model):
        other = theirs.get(name)
        if other is not None and (type(other), other.bits) != (type(ours), ours.bits):
            raise CheckpointError(
                f"cannot save: the config gives {name} a {other.bits}-bit {type(other).__name__}, the "
                f"model has a {ours.bits}-bit {type(ours).__name__}; pass the config the model was "
                "quantized with (quantize_with_report's report.config)"
            )


def _check_recorded_recipe(model: nn.Module, config: QuantConfig) -> None:
    """Refuse a ``config`` other than the one :func:`dopq.quantize` (or :func:`load_quantized`) left on
    the model: a field that changes no quantizer's kind or width (GPTQ, bias correction, the MOSF rule)
    rebuilds the same model, so the file, ``dopq evaluate`` and the export would name a recipe the
    model was not made with."""
    made = getattr(model, RECIPE_ATTRIBUTE, None)
    if not isinstance(made, dict):
        return  # quantized without dopq.quantize (prepare_model and calibrate): nothing to hold it to
    given = config.to_dict()
    differ = [name for name, value in given.items() if name in made and made[name] != value]
    if differ:
        name = differ[0]
        raise CheckpointError(
            f"cannot save: the model was quantized with {name}={made[name]!r}, the config gives "
            f"{given[name]!r}; pass the config the model was quantized with (quantize_with_report's "
            "report.config)"
        )


def _check_rebuilds(model: nn.Module, payload: dict[str, Any]) -> None:
    """Refuse to save what would load back as another function: the loader rebuilds the model from
    its name, class count and arguments, and an argument that changes no shape (``act_layer``,
    ``global_pool``) would otherwise be lost silently. Compares the logits of two random images
    (of a calibrated model: an uncalibrated one has none to compare, and its export refuses it)."""
    if any(q.enabled and not q.is_ready() for _, q in quantizers_of(model)):
        return
    rebuilt, _ = _from_payload(payload, Path("<the file being saved>"))
    _check_recipe_matches(model, rebuilt)
    size = payload["metadata"]["preprocess"]["input_size"]
    images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    parameter = next(model.parameters())
    images = images.to(parameter.device, parameter.dtype)
    training = model.training
    with torch.no_grad():
        ours, theirs = model.eval()(images), rebuilt.to(parameter.device)(images)
    model.train(training)
    gap = float((ours - theirs).abs().max())
    if not gap <= 1e-4 * (1 + float(ours.abs().max())):
        raise CheckpointError(
            f"cannot save: the model rebuilt from {payload['arch']} and model_kwargs "
            f"{payload.get('model_kwargs', {})} computes other logits (by up to {gap:.3g}); pass every "
            "argument the model was created with as model_kwargs (e.g. {'global_pool': 'avg'})"
        )


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise CheckpointError(f"quantized model {path} is a folder, not a file saved by dopq quantize --save")
    if not path.is_file():
        raise CheckpointError(f"quantized model {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable dopq file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dopq quantized model (made by `dopq quantize --save`)")
    if payload.get("schema") not in _READABLE_SCHEMAS:
        raise CheckpointError(
            f"{path} has schema {payload.get('schema')}, this dopq reads {_READABLE_SCHEMAS}"
        )
    _check_entries(payload, path)
    if "digest" in payload and payload["digest"] != payload_digest(payload):  # files before it have none
        raise CheckpointError(f"{path} is corrupt: its contents do not match the digest it was saved with")
    return payload


# a file's entries and their types: an edited or crafted file stopped the load with a raw KeyError or
# AttributeError (only the digest's own entry is optional: files before it have none)
_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "arch": str,
    "num_classes": int,
    "config": dict,
    "granularity": dict,
    "metadata": dict,
    "state_dict": dict,
}


def _codes_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("bits"), int)
        and isinstance(entry.get("shape"), list)
        and all(isinstance(n, int) for n in entry["shape"])
        and isinstance(entry.get("packed"), torch.Tensor)
    )


def _check_entries(payload: dict[str, Any], path: Path) -> None:
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a usable dopq quantized model: {what}")

    for key, kind in _ENTRIES.items():
        if not isinstance(payload.get(key), kind) or isinstance(payload.get(key), bool):
            raise refuse(
                f"its {key!r} entry is {type(payload.get(key)).__name__ if key in payload else 'missing'}"
            )
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["state_dict"].items()):
        raise refuse("its state_dict holds other than tensors")
    codes = payload.get("weight_codes", {})
    if not isinstance(codes, dict) or not all(_codes_entry(e) for e in codes.values()):
        raise refuse("its weight_codes are not entries of bits, shape and packed codes")
    extra = "hf_config" if payload["arch"].startswith(HF_PREFIX) else "model_kwargs"
    if not isinstance(payload.get(extra, {}), dict):
        raise refuse(f"its {extra!r} entry is {type(payload[extra]).__name__}")


def match_state(model: nn.Module, granularity: dict[str, int | None], state: dict[str, torch.Tensor]) -> None:
    """Make a freshly prepared ``model`` able to load ``state`` (a calibrated model's): give quantizer
    buffers the saved shapes and ``granularity`` (:func:`granularities`), and add folded biases
    and input offsets."""
    for name, q in quantizers_of(model):
        if isinstance(q, UniformQuantizer) and name in granularity:
            axis = granularity[name]
            q.granularity = PerTensor() if axis is None else PerChannel(axis)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear) and module.bias is None and f"{prefix}bias" in state:
            module.bias = nn.Parameter(torch.zeros(module.out_features))
        if isinstance(module, QuantLinear) and f"{prefix}input_offset" in state:
            module.input_offset = torch.empty_like(state[f"{prefix}input_offset"])
        for key, buf in list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + key)
            if saved is not None and saved.shape != buf.shape:
                setattr(module, key, torch.empty_like(saved))


def _architecture(arch: str, saved: str) -> str:
    """The architecture ``arch`` names: ``hf:FOLDER``, as ``quantize --model`` took it, names its
    config's class, which a file made from it records (it was refused as another architecture)."""
    folder = hf_folder(arch)
    if not arch.startswith(HF_PREFIX) or arch == saved or not folder.is_dir():
        return arch
    from dopq.models.hf import folder_architecture

    return folder_architecture(folder)


def load_quantized(
    path: str | Path, arch: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, QuantConfig, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`.

    Args:
        path: the saved file.
        arch: when given, the architecture the caller expects (a timm name, ``hf:<class>`` or an
            ``hf:FOLDER``, whose config names the class); a file for another one is refused.
        device: where to put the model.

    Returns:
        ``(model, config, metadata)``.
    """
    path = Path(path)
    device = resolve_device(str(device))
    payload = _read(path)
    if arch is not None and _architecture(arch, payload["arch"]) != payload["arch"]:
        raise CheckpointError(f"{path} was made for {payload['arch']}, not {arch}")
    model, config = _from_payload(payload, path)
    return model.to(device), config, payload["metadata"]


def _from_payload(payload: dict[str, Any], path: Path) -> tuple[nn.Module, QuantConfig]:
    """The model a read file describes (on the CPU, in eval mode) and its recipe."""
    config = QuantConfig.from_dict(payload["config"])
    model = _build(payload)
    # layers left float are allowed: the saved state says what was quantized, and a quantizer it
    # lacks or holds beyond what this model gets stops the load below
    prepare_model(model.eval(), config, allow_partial=True)
    match_state(model, payload["granularity"], payload["state_dict"])
    codes = payload.get("weight_codes", {})
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path} does not match {payload['arch']}: {first}") from None
    missing = set(result.missing_keys) - set(codes)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match {payload['arch']}: missing {sorted(missing)[:2]}, "
            f"unexpected {result.unexpected_keys[:2]}"
        )
    _set_weights_from_codes(model, codes, path)
    setattr(model, RECIPE_ATTRIBUTE, config.to_dict())  # saved again, it keeps this recipe
    return model.eval(), config


@torch.no_grad()
def _set_weights_from_codes(model: nn.Module, codes: dict[str, dict[str, Any]], path: Path) -> None:
    layers = _quantized_weights(model)
    for key, entry in codes.items():
        if key not in layers:
            raise CheckpointError(f"{path}: {key} has codes but no quantized layer in the model")
        module, q = layers[key]
        shape = tuple(entry["shape"])
        if shape != tuple(module.weight.shape) or entry["bits"] != q.bits:
            raise CheckpointError(
                f"{path}: codes of {key} do not fit the layer ({shape}, {entry['bits']} bits)"
            )
        values = unpack_codes(entry["packed"], entry["bits"], module.weight.numel()).reshape(shape)
        module.weight.copy_(q.dequantize(values))
