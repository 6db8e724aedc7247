"""Tests of float model loading: timm checkpoints (formats, wrappers, prefixes, derived buffers,
unreadable files), timm hub weights (tags, class counts, no network) and ``hf:`` folders.

Every refusal is one dopq error naming what is wrong; nothing loads with layers at random.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dopq.cli import main
from dopq.errors import CheckpointError, DataError, ModelError
from dopq.models import build_model, load_state_dict, loading

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
        (
            lambda sd: {**sd, "classifier.weight": torch.zeros(5, 32), "classifier.bias": torch.zeros(5)},
            "2 of another shape (classifier.bias: ",
        ),
    ],
    ids=["no-classifier", "no-q-proj", "other-head-size"],
)
def test_hf_incomplete_weights_are_refused(edit, match: str, tmp_path: Path) -> None:
    folder, _ = _hf_folder(tmp_path, edit=edit)
    with pytest.raises(CheckpointError, match=r"do not fit the model of its config\.json") as info:
        build_model(f"hf:{folder}")
    assert match in str(info.value)


def test_hf_weights_the_model_does_not_use_only_warn(tmp_path: Path, caplog) -> None:
    """A hub folder can carry a base model's pooler: nothing of the model is left random."""
    folder, _ = _hf_folder(tmp_path, edit=lambda sd: {**sd, "extra.weight": torch.zeros(2)})
    with caplog.at_level("WARNING", logger="dopq.models.hf"):
        build_model(f"hf:{folder}")
    assert "1 weight(s) in" in caplog.text and "are not used by the model: extra.weight" in caplog.text


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


# --- timm hub weights -------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty Hugging Face cache; the hub's offline mode off unless a test sets it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def _cache_test_vit(cache: Path) -> nn.Module:
    """Stand-in weights for timm's ``test_vit`` hub repo, written as a hub download leaves them."""
    repo = cache / f"models--timm--{HUB_TAG}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    hub = _test_vit(num_classes=1000, seed=1)
    save_file(
        {k: v.contiguous() for k, v in hub.state_dict().items()},
        repo / "snapshots" / ("0" * 40) / "model.safetensors",
    )
    return hub


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_hub_reachable", lambda *args, **kwargs: False, raising=False)


def test_pretrained_with_another_class_count_is_refused(hub_cache: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    hub = _cache_test_vit(hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the real hub
    with pytest.raises(
        ModelError, match=f"--num-classes 10 does not match the pretrained weights of {HUB_TAG}"
    ):
        build_model("test_vit", pretrained=True, num_classes=10)
    model = build_model("test_vit", pretrained=True, num_classes=1000)  # the hub head's own size
    assert _same_weights(model, hub)


def test_pretrained_without_network_loads_the_cached_weights(hub_cache: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    hub = _cache_test_vit(hub_cache)

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked for weights the cache holds")

    monkeypatch.setattr(loading, "_hub_reachable", no_network)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a download would fail
    start = time.monotonic()
    model = build_model("test_vit", pretrained=True)
    assert _same_weights(model, hub) and time.monotonic() - start < 15


def test_a_pretrained_run_names_and_hashes_the_hub_weights(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, image_folder, tmp_path: Path
) -> None:
    """Which weights ``--pretrained`` used: the result recorded the bare model name and no hash, so
    other weights under the same name (another cached revision, timm's default tag moved) gave
    results that read as the same model's."""
    from huggingface_hub import constants

    from dopq.environment import file_sha256

    _cache_test_vit(hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the real hub
    (weights,) = hub_cache.rglob("model.safetensors")
    out = tmp_path / "r.json"
    argv = ["quantize", "--model", "test_vit", "--pretrained", "--data", str(image_folder(per_class=2)),
            "--method", "repq", "--calib-size", "2", "--eval-subset", "2", "--quiet", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["pretrained_weights"] == HUB_TAG
    assert result["checkpoint_sha256"] == file_sha256(weights)


def test_a_reconstruction_checkpoint_of_pretrained_weights_is_tied_to_them(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, image_folder
) -> None:
    """A checkpoint's identity held the --checkpoint file's hash only: with --pretrained it held
    none, so a resume after the cached hub weights changed went on from the other weights' units."""
    from huggingface_hub import constants

    from dopq.config import ReconstructConfig, get_preset
    from dopq.environment import file_sha256
    from dopq.experiment import RunSettings, checkpoint_identity, load_workload

    _cache_test_vit(hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never the real hub
    (weights,) = hub_cache.rglob("model.safetensors")
    settings = RunSettings(
        "test_vit", str(image_folder(per_class=2)), pretrained=True, calib_size=2, workers=0
    )
    config = get_preset("repq", w_bits=4, a_bits=4, reconstruct=ReconstructConfig(calib_size=2, iters=1))
    identity = checkpoint_identity(load_workload(settings), config, 2, allow_partial=False)
    assert identity.weights_sha256 == file_sha256(weights)


def test_pretrained_without_network_or_cache_fails_fast(hub_cache: Path, monkeypatch) -> None:
    _no_network(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and the hub is unreachable"):
        build_model("test_vit", pretrained=True)
    assert time.monotonic() - start < 10  # huggingface_hub alone retries for about 45 s


def test_hub_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.delenv("https_proxy", raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("NO_PROXY", "")
        assert loading._hub_reachable("https://hub.invalid", timeout=2)  # through the proxy
    monkeypatch.delenv("HTTPS_PROXY")
    assert not loading._hub_reachable(f"http://127.0.0.1:{port}", timeout=2)  # closed now


@pytest.mark.parametrize("extra", [{}, {"pretrained": True}, {"checkpoint": "unused.pth"}])
def test_unknown_pretrained_tag_is_refused(extra: dict) -> None:
    with pytest.raises(
        ModelError, match=f"unknown pretrained tag 'nosuchtag' for test_vit: timm knows {HUB_TAG}"
    ):
        build_model("test_vit.nosuchtag", **extra)


def test_known_tag_builds_and_bad_tag_cli_error(image_folder, capsys) -> None:
    assert build_model(HUB_TAG, num_classes=10).num_classes == 10
    data = image_folder("tag", size=32, per_class=1)
    line = _one_cli_error(_quantize_argv(data, "test_vit.nosuchtag"), capsys)
    assert "unknown pretrained tag 'nosuchtag'" in line


# --- timm checkpoints -------------------------------------------------------------------------------


def test_swin_state_dict_with_derived_buffers_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10).eval()
    derived = {n: b for n, b in ref.named_buffers() if n.endswith(("relative_position_index", "attn_mask"))}
    assert derived and not derived.keys() & ref.state_dict().keys()  # non-persistent in this timm
    path = tmp_path / "swin.pth"
    torch.save({**ref.state_dict(), **derived}, path)
    assert _same_weights(build_model("swin_tiny_patch4_window7_224", path), ref)


def test_derived_buffer_name_the_model_lacks_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save({**_test_vit().state_dict(), "blocks.0.attn.relative_position_index": torch.zeros(4)}, path)
    with pytest.raises(CheckpointError, match="1 unexpected"):
        build_model("test_vit", path)


def _wrapped(sd: dict) -> dict[str, dict]:
    prefixed = lambda p: {p + k: v for k, v in sd.items()}  # noqa: E731
    return {
        "state_dict_ema": {"state_dict_ema": sd, "epoch": 1},
        "ema": {"ema": sd},
        "module": {"module": sd},
        "_orig_mod.": prefixed("_orig_mod."),
        "model.": prefixed("model."),
        "module._orig_mod.": prefixed("module._orig_mod."),
        "model-in-dict": {"model": sd, "optimizer": {"lr": 0.1}},
    }


@pytest.mark.parametrize("layout", list(_wrapped({})))
def test_wrapped_and_prefixed_checkpoints_load(layout: str, tmp_path: Path) -> None:
    ref = _test_vit()
    path = tmp_path / "c.pth"
    torch.save(_wrapped(ref.state_dict())[layout], path)
    assert _same_weights(build_model("test_vit", path), ref)


def test_unknown_wrapper_names_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save({"weights": _test_vit().state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="top-level keys are 'weights', 'epoch'"):
        build_model("test_vit", path)


@pytest.mark.parametrize("prefix", ["net.", "partial"])
def test_prefix_is_stripped_only_when_it_gives_the_model_keys(prefix: str, tmp_path: Path) -> None:
    sd = _test_vit().state_dict()
    if prefix == "partial":  # only some keys carry a known prefix: no guess
        state = {("model." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    else:
        state = {prefix + k: v for k, v in sd.items()}
    path = tmp_path / "c.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit test_vit"):
        build_model("test_vit", path)


def test_a_checkpoint_without_a_classifier_head_is_named_as_such(tmp_path: Path) -> None:
    """A feature extractor's weights (DINOv2's hub weights are headless) missing only the head's
    keys: said so, not as a bare count of missing keys; other missing keys stay a misfit."""
    sd = _test_vit().state_dict()
    path = tmp_path / "c.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, path)
    with pytest.raises(CheckpointError, match=r"has no classifier head \(head\.weight, head\.bias missing\)"):
        build_model("test_vit", path)
    torch.save({k: v for k, v in sd.items() if k != "norm.weight" and not k.startswith("head.")}, path)
    with pytest.raises(CheckpointError, match="does not fit test_vit: 3 missing keys"):
        build_model("test_vit", path)


@pytest.mark.parametrize("name", ["w.SAFETENSORS", "w.bin", "w.pth"])
def test_safetensors_file_is_read_by_content(name: str, tmp_path: Path) -> None:
    ref = _test_vit()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / name))
    assert _same_weights(build_model("test_vit", tmp_path / name), ref)


def test_torch_file_named_safetensors_is_read_by_content(tmp_path: Path) -> None:
    ref = _test_vit()
    torch.save(ref.state_dict(), tmp_path / "w.safetensors")
    assert _same_weights(build_model("test_vit", tmp_path / "w.safetensors"), ref)


@pytest.mark.parametrize(
    "content",
    [
        lambda: _test_vit(),
        lambda: {"model": _test_vit().state_dict(), "best_acc": np.float64(0.9), "epoch": np.int64(3)},
    ],
    ids=["whole-module", "numpy-objects"],
)
def test_pickled_objects_get_a_short_clear_message(content, tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save(content(), path)
    with pytest.raises(CheckpointError, match="it holds pickled Python objects") as info:
        build_model("test_vit", path)
    text = str(info.value)
    assert "torch.save(model.state_dict(), PATH)" in text and "\x1b" not in text
    assert "two options" not in text


class _Payload:
    """Unpickling it would write a marker file: code run from a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_with_code_is_refused_without_running_it(tmp_path: Path, zipped: bool) -> None:
    """The legacy torch.save format's refusal began with torch's advice to load it with
    weights_only=False (that runs the file's code), cut off, without naming what it holds."""
    path, marker = tmp_path / "c.pth", tmp_path / "ran"
    torch.save({"state_dict": _Payload(marker)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=r"it holds pickled Python objects \(\w") as info:
        build_model("test_vit", path)
    assert "weights_only" not in str(info.value) and not marker.exists()
    with pytest.raises(CheckpointError, match="not a readable dopq file"):
        from dopq.serialize import load_quantized

        load_quantized(path)
    assert not marker.exists()


def test_unknown_format_is_named(tmp_path: Path) -> None:
    path = tmp_path / "random.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"neither a safetensors file nor a torch\.save file"):
        build_model("test_vit", path)


def test_folder_as_checkpoint_says_folder(tmp_path: Path) -> None:
    (tmp_path / "weights.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"is a folder, not a weights file$"):
        build_model("test_vit", tmp_path / "weights.pth")
    (tmp_path / "weights.pth" / "config.json").write_text(json.dumps({}))
    with pytest.raises(CheckpointError, match="use --model hf:"):
        build_model("test_vit", tmp_path / "weights.pth")


def test_dopq_quantized_file_as_checkpoint_is_recognised(tmp_path: Path) -> None:
    import dopq
    from dopq.serialize import save_quantized

    model = _test_vit()
    config = dopq.get_preset("repq", w_bits=8, a_bits=8)
    quantized = dopq.quantize(model, torch.randn(2, 3, 160, 160), config, progress=False)
    path = save_quantized(quantized, tmp_path / "q.pt", config)
    with pytest.raises(CheckpointError, match=r"is a dopq quantized model .* use dopq evaluate --quantized"):
        build_model("test_vit", path)
    with pytest.raises(CheckpointError, match="is a dopq quantized model"):
        load_state_dict(path)


def test_load_state_dict_strips_a_ddp_prefix(tmp_path: Path) -> None:
    sd = _test_vit().state_dict()
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "c.pth")
    assert load_state_dict(tmp_path / "c.pth").keys() == sd.keys()


def test_stray_entry_of_a_state_dict_is_named(tmp_path: Path) -> None:
    torch.save({**_test_vit().state_dict(), "epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="its entry 'epoch' is a int, not a tensor"):
        build_model("test_vit", tmp_path / "c.pth")


def test_a_card_beside_the_checkpoint_sets_the_models_own_preprocessing(tmp_path: Path) -> None:
    """The API's save and export read the model's pretrained_cfg: they now get the card's
    preprocessing, as the CLI does (timm's default for the architecture before)."""
    from dopq.models.loading import model_preprocess

    path = tmp_path / "m.pth"
    torch.save(_test_vit().state_dict(), path)
    default = model_preprocess(build_model("test_vit", path))
    card = {
        "input_size": [3, 160, 160],
        "mean": [0.1] * 3,
        "std": [0.2] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert model_preprocess(build_model("test_vit", path)) == card != default
    (tmp_path / "m.json").write_text(json.dumps({"epochs": 300}))  # not a card
    assert model_preprocess(build_model("test_vit", path)) == default


@pytest.mark.parametrize("content", [b"\xff\xfe{", b"[" * 100_000 + b"]" * 100_000])
def test_a_card_that_is_not_utf8_or_nested_too_deep_is_one_error(tmp_path: Path, content: bytes) -> None:
    """A card from elsewhere: bytes that are not UTF-8 and JSON nested deeper than the parser goes
    stopped the load with a raw UnicodeDecodeError / RecursionError."""
    from dopq.data import preprocess_from_card

    path = tmp_path / "m.pth"
    torch.save(_test_vit().state_dict(), path)
    (tmp_path / "m.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model card .*m\.json is not valid JSON"):
        build_model("test_vit", path)
    with pytest.raises(DataError, match=r"model card .*m\.json is not valid JSON"):
        preprocess_from_card(tmp_path / "m.json")
