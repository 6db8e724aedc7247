"""The Python API end to end: quantize, save, load, reconstruct; accuracy floors on shared models."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch

import dopq
from conftest import CIFAR, DEIT, require
from dopq.config import ReconstructConfig
from dopq.errors import CheckpointError
from dopq.modules import quantizers_of
from dopq.serialize import load_quantized, save_quantized


def _tiny():
    torch.manual_seed(0)  # the same random weights every time
    return timm.create_model("test_vit", num_classes=10).eval()


def test_quantize_accepts_tensors_and_loaders():
    images = torch.randn(6, 3, 160, 160)
    a = dopq.quantize(_tiny(), images, "repq")
    loader = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(3))]
    b = dopq.quantize(_tiny(), loader, dopq.get_preset("repq"))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert all(bool(q.initialized) for _, q in quantizers_of(a))


def test_quantizing_an_already_quantized_model_is_refused() -> None:
    """quantize works in place; calling it again on its result (another width in a notebook) ended
    in the re-parameterization check's RuntimeError, 'changed the float logits by 0.4'."""
    from dopq.errors import ConfigError

    images = torch.randn(4, 3, 160, 160)
    model = dopq.quantize(_tiny(), images, "dopq")
    with pytest.raises(ConfigError, match=r"already quantized .* a fresh float model"):
        dopq.quantize(model, images, dopq.get_preset("dopq", w_bits=8, a_bits=8))


def test_a_model_without_weights_or_inside_a_wrapper_is_one_clear_error() -> None:
    """A meta-device model ended in 'Tensor.item() cannot be called on meta tensors' from a
    quantizer; a DataParallel or torch.compile wrapper was an 'unsupported model family'."""
    from dopq.errors import ConfigError, ModelError

    images = torch.randn(2, 3, 160, 160)
    with torch.device("meta"):
        meta = timm.create_model("test_vit", num_classes=10).eval()
    with pytest.raises(ConfigError, match=r"on the meta device .* load its weights first"):
        dopq.quantize(meta, images, "repq")
    for wrapper, inner in ((torch.nn.DataParallel, "module"), (torch.compile, "_orig_mod")):
        with pytest.raises(
            ModelError, match=rf"is a wrapper: quantize the model it wraps \(model\.{inner}\)"
        ):
            dopq.quantize(wrapper(_tiny()), images, "repq")


def test_tied_weights_are_refused_by_name() -> None:
    """Two layers sharing a weight: it was folded twice, and the re-parameterization check's
    RuntimeError blamed 'a LayerNorm output read by something other than its paired Linear layers'."""
    from dopq.errors import ModelError

    model = _tiny()
    model.blocks[1].mlp.fc1.weight = model.blocks[0].mlp.fc1.weight
    with pytest.raises(
        ModelError, match=r"blocks\.0\.mlp\.fc1\.weight and blocks\.1\.mlp\.fc1\.weight .*\(tied weights\)"
    ):
        dopq.quantize(model, torch.randn(2, 3, 160, 160), "repq")


def test_a_parameter_shared_outside_the_quantized_layers_is_accepted() -> None:
    """Only parameters of the layers dopq changes must be their layer's own: a shared position
    embedding (registered twice) changes nothing dopq computes."""
    model = _tiny()
    model.register_parameter("pos_embed_alias", model.pos_embed)
    dopq.quantize(model, torch.randn(2, 3, 160, 160), "repq")


def test_the_callers_hooks_stay_on_the_layers_dopq_replaces() -> None:
    """Hooks on a Linear or an attention module vanished silently with the module dopq swapped in;
    they keep running on the replacement, and their handles still remove them."""
    model = _tiny()
    calls = []
    handles = [
        model.blocks[0].attn.register_forward_hook(lambda *_: calls.append("attn")),
        model.blocks[0].attn.qkv.register_forward_pre_hook(lambda *_: calls.append("qkv")),
        model.head.register_forward_hook(lambda m, i, o: o * 0),  # a hook that changes the output
    ]
    q = dopq.quantize(model, torch.randn(2, 3, 160, 160), "repq")
    calls.clear()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(q(x), torch.zeros(1, 10))
    assert calls == ["qkv", "attn"]
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        assert q(x).abs().sum() > 0
    assert calls == ["qkv", "attn"]


def test_calibration_data_forms_give_the_same_images():
    """Every form the docstring names stacks to the same float32 batch; PIL images go through the
    model's own preprocessing."""
    import numpy as np
    from PIL import Image

    from dopq.api import as_image_tensor
    from dopq.data import Preprocess, build_transform
    from dopq.models.loading import model_preprocess

    model = _tiny()
    images = torch.randn(4, 3, 160, 160)
    labels = torch.zeros(4, dtype=torch.long)
    dataset = torch.utils.data.TensorDataset(images, labels)
    forms = {
        "tensor": images,
        "float64": images.double(),
        "array": images.numpy(),
        "single images": list(images),
        "(images, labels) batches": [(images[:1], labels[:1]), (images[1:], labels[1:])],
        "one (images, labels) batch": (images, labels),
        "one batch, labels in a list": (images, labels.tolist()),
        "one batch, soft targets (mixup)": (images, torch.full((4, 10), 0.1)),
        "one batch, one-hot targets": (images, torch.nn.functional.one_hot(labels, 10)),
        "one batch, float targets": [images, torch.rand(4)],
        "next(iter(loader))": next(iter(torch.utils.data.DataLoader(dataset, batch_size=4))),
        "Dataset of (image, label)": dataset,
        "DataLoader": torch.utils.data.DataLoader(dataset, batch_size=3),
        "dicts": [{"pixel_values": images[:2]}, {"pixel_values": images[2:]}],
        "one dict": {"pixel_values": images},
        "datasets rows (nested lists)": [{"pixel_values": image.tolist(), "label": 0} for image in images],
        "generator": (b for b in images.split(3)),
    }
    for name, data in forms.items():
        got = as_image_tensor(data, "cpu", model)
        assert got.dtype == torch.float32 and torch.allclose(got, images, atol=1e-6, rtol=0), name
    pixels = [Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)) for i in range(3)]
    expected = torch.stack([build_transform(Preprocess(**model_preprocess(model)))(p) for p in pixels])
    assert torch.equal(as_image_tensor(pixels, "cpu", model), expected)


CALIBRATION_DATA_ERRORS = [
    (None, "calibration data is None"),
    (torch.zeros(0, 3, 160, 160), "calibration data is empty"),
    ([], "calibration data is empty"),
    (torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8), "of dtype torch.uint8"),
    (torch.rand(2, 3, 160, 160) * 255, "raw pixel values?"),
    (torch.randn(2, 160, 160, 3), "channels last?"),
    (torch.randn(2, 1, 160, 160), "have 1 channels, the model reads 3"),
    ([torch.randn(1, 3, 160, 160), torch.randn(1, 3, 128, 128)], "of different shapes"),
    ([{"image": torch.randn(1, 3, 160, 160)}], "needs 'pixel_values'; it has ['image']"),
    (["image.png"], "calibration data holds a str"),
    (
        torch.randn(2, 3, 100, 100),
        "the model cannot run on calibration images of shape (3, 100, 100): Input height",
    ),
]


@pytest.mark.parametrize(("data", "match"), CALIBRATION_DATA_ERRORS)
def test_calibration_data_that_cannot_be_the_models_input_is_refused(data, match):
    from dopq.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(match)):
        dopq.quantize(_tiny(), data, "repq", progress=False)


def test_unnormalized_looking_calibration_images_warn_and_half_models_are_refused(caplog):
    from dopq.errors import ConfigError

    with caplog.at_level("WARNING", logger="dopq.api"):
        dopq.quantize(_tiny(), torch.rand(2, 3, 160, 160), "repq", progress=False)
    assert "calibration images are all >= 0" in caplog.text
    with pytest.raises(ConfigError, match=r"dopq quantizes float32 models; this one is torch\.float16"):
        dopq.quantize(_tiny().half(), torch.randn(2, 3, 160, 160).half(), "repq", progress=False)


def test_recommended_preset_is_the_default_recipe():
    images = torch.randn(6, 3, 160, 160)  # the fewest on which GPTQ's check can keep it (it runs)
    _, report = dopq.quantize_with_report(_tiny(), images, progress=False)
    assert report.config == dopq.get_preset("recommended", w_bits=4, a_bits=4)
    _, report = dopq.quantize_with_report(_tiny(), images, "recommended", progress=False)
    # at W4/A4 GPTQ's rounding, kept only where the calibration images show it pays
    assert report.config.weight_rounding == "gptq" and report.config.gptq_check
    assert set(report.gptq["check"]) == {
        "kept",
        "kl_nearest",
        "kl_gptq",
        "images_better",
        "images_worse",
        "rank_share",
        "p",
        "test",
    }


def test_w8a8_is_close_to_float():
    model = _tiny()
    images = torch.randn(16, 3, 160, 160)
    ref = copy.deepcopy(model)
    q = dopq.quantize(model, images, dopq.get_preset("dopq", w_bits=8, a_bits=8))
    with torch.no_grad():
        y, y_ref = q(images), ref(images)
    err = float((y - y_ref).pow(2).mean() / y_ref.pow(2).mean())
    assert err < 0.02


def test_save_load_round_trip_is_exact(tmp_path):
    model = _tiny()
    images = torch.randn(8, 3, 160, 160)
    cfg = dopq.get_preset("dopq", w_bits=4, a_bits=4)
    q = dopq.quantize(model, images, cfg)
    path = save_quantized(q, tmp_path / "q.pt", cfg, {"note": "x"})
    loaded, cfg2, meta = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    # the model's own preprocessing is recorded unless the caller gives one, and reloaded with it
    recorded = {"input_size": [3, 160, 160], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    assert cfg2 == cfg and meta == {"note": "x", "preprocess": {**recorded, "crop_pct": 0.95}}
    q.pretrained_cfg = {**q.pretrained_cfg, "mean": (0.25, 0.25, 0.25)}
    loaded, _, meta = load_quantized(save_quantized(q, tmp_path / "q2.pt", cfg))
    assert meta["preprocess"]["mean"] == [0.25] * 3 and loaded.pretrained_cfg["mean"] == (0.25, 0.25, 0.25)
    with pytest.raises(CheckpointError, match="made for test_vit, not deit_tiny_patch16_224"):
        load_quantized(path, arch="deit_tiny_patch16_224")
    junk = tmp_path / "junk.pt"
    torch.save({"x": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="not a dopq quantized model"):
        load_quantized(junk)
    with pytest.raises(CheckpointError, match="is a folder, not a file saved by dopq quantize --save"):
        load_quantized(tmp_path)


def test_saved_metadata_loads_again_or_is_refused_at_the_save(tmp_path) -> None:
    """``torch.__version__`` (a str subclass) in the metadata wrote a file that load_quantized then
    refused as "not a readable dopq file"; an object JSON cannot hold did the same."""
    cfg = dopq.get_preset("repq", w_bits=4, a_bits=4)
    q = dopq.quantize(_tiny(), torch.randn(2, 3, 160, 160), cfg)
    path = save_quantized(q, tmp_path / "q.pt", cfg, {"torch": torch.__version__, "shape": (1, 2)})
    _, _, meta = load_quantized(path)
    assert meta["torch"] == str(torch.__version__) and type(meta["torch"]) is str
    assert meta["shape"] == [1, 2]  # as JSON holds it
    with pytest.raises(CheckpointError, match="metadata must hold JSON values only"):
        save_quantized(q, tmp_path / "q2.pt", cfg, {"path": tmp_path})


def test_saving_with_another_config_names_the_quantizer_it_changes(tmp_path) -> None:
    """A config whose activation width differs from the model's was blamed on missing model_kwargs."""
    config = dopq.get_preset("repq", w_bits=4, a_bits=4)
    q = dopq.quantize(_tiny(), torch.randn(2, 3, 160, 160), config)
    with pytest.raises(
        CheckpointError, match=r"config gives .* a 8-bit UniformQuantizer, the model has a 4-bit"
    ):
        save_quantized(q, tmp_path / "q.pt", config.replace(a_bits=8))


def test_saving_records_only_the_recipe_the_model_was_quantized_with(tmp_path) -> None:
    """Fields that change no quantizer's kind or width (GPTQ, bias correction) rebuild the same model:
    a model quantized with GPTQ and bias correction was saved as dopq without either, and the file,
    dopq evaluate and the export named that recipe."""
    used = dopq.get_preset("dopq", weight_rounding="gptq")
    q = dopq.quantize(_tiny(), torch.randn(4, 3, 160, 160), used, progress=False)
    with pytest.raises(
        CheckpointError, match="quantized with weight_rounding='gptq', the config gives 'nearest'"
    ):
        save_quantized(q, tmp_path / "q.pt", dopq.get_preset("dopq"))
    loaded, recorded, _ = load_quantized(save_quantized(q, tmp_path / "q.pt", used))
    assert recorded == used
    with pytest.raises(CheckpointError, match="quantized with bias_correction=True, the config gives False"):
        save_quantized(loaded, tmp_path / "again.pt", used.replace(bias_correction=False))
    assert (
        save_quantized(loaded, tmp_path / "again.pt", recorded).read_bytes()
        == (tmp_path / "q.pt").read_bytes()
    )


def test_a_timm_model_created_with_other_shapes_saves_with_its_arguments_or_not_at_all(tmp_path):
    """A Swin created with its own image and window size: its name alone rebuilds other shapes. Only
    the attention masks (buffers) follow the image size, so with the dimensions but not ``img_size``
    a reload would load and compute something else: the save refuses both and takes the arguments."""
    dims = dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=4)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, num_classes=10, **dims).eval()
    images = torch.randn(8, 3, 64, 64)
    cfg = dopq.get_preset("dopq", w_bits=8, a_bits=8)
    q = dopq.quantize(model, images, cfg, progress=False)
    with pytest.raises(
        CheckpointError, match=r"patch_embed.proj.weight is \(32, 3, 4, 4\) here.*model_kwargs"
    ):
        save_quantized(q, tmp_path / "q.pt", cfg)
    with pytest.raises(CheckpointError, match=r"attn_mask is .* here"):
        save_quantized(q, tmp_path / "q.pt", cfg, model_kwargs=dims)
    with pytest.raises(CheckpointError, match="model_kwargs must be numbers"):
        save_quantized(q, tmp_path / "q.pt", cfg, model_kwargs={"img_size": 64, "act_layer": torch.nn.GELU})
    loaded, _, _ = load_quantized(
        save_quantized(q, tmp_path / "q.pt", cfg, model_kwargs={"img_size": 64, **dims})
    )
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))


def _quantized_tiny(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, **kwargs).eval()
    cfg = dopq.get_preset("dopq", w_bits=4, a_bits=4)
    return dopq.quantize(model, torch.randn(4, 3, 160, 160), cfg, progress=False), cfg


def test_a_saved_file_with_flipped_bytes_is_refused(tmp_path):
    """torch's zip reader checks no CRC: without the digest the file loaded and computed other logits."""
    import zipfile

    q, cfg = _quantized_tiny()
    path = save_quantized(q, tmp_path / "q.pt", cfg)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with archive.open(record) as data:
            start = raw.index(data.read(64))
    raw[start : start + 64] = bytes(b ^ 0xFF for b in raw[start : start + 64])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is corrupt: its contents do not match the digest"):
        load_quantized(bad)
    load_quantized(path)  # the intact file


def test_save_refuses_a_model_its_name_rebuilds_into_another_function(tmp_path):
    """Arguments that change no shape (the pooling, the head's norm) would be lost silently."""
    q, cfg = _quantized_tiny(global_pool="avg", fc_norm=False)
    with pytest.raises(CheckpointError, match=r"computes other logits .*pass every argument"):
        save_quantized(q, tmp_path / "q.pt", cfg)
    path = save_quantized(q, tmp_path / "q.pt", cfg, model_kwargs={"global_pool": "avg", "fc_norm": False})
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(load_quantized(path)[0](images), q(images))


def test_a_file_this_timm_cannot_build_or_a_bad_device_is_one_clear_error(tmp_path):
    from dopq.errors import ConfigError
    from dopq.serialize import payload_digest

    q, cfg = _quantized_tiny()
    payload = torch.load(save_quantized(q, tmp_path / "q.pt", cfg), weights_only=True)
    payload["arch"] = "vit_from_a_newer_timm"
    payload["digest"] = payload_digest(payload)
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match=r"cannot build vit_from_a_newer_timm .*the timm that saved it"):
        load_quantized(tmp_path / "newer.pt")
    with pytest.raises(ConfigError, match="--device must be cpu or cuda"):
        load_quantized(tmp_path / "q.pt", device="gpu")
    state = torch.random.get_rng_state()
    load_quantized(tmp_path / "q.pt")
    assert torch.equal(torch.random.get_rng_state(), state)  # the rebuild's random init is thrown away


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p.pop("config"),
        lambda p: p.pop("granularity"),
        lambda p: p.update(metadata=[]),
        lambda p: p.update(state_dict=[]),
    ],
    ids=["no-config", "no-granularity", "metadata-list", "state-list"],
)
def test_an_edited_file_is_one_error(tmp_path, edit):
    """A file edited or crafted elsewhere (digest removed or recomputed) stopped the load with a raw
    KeyError / AttributeError from inside the rebuild."""
    q, cfg = _quantized_tiny()
    payload = torch.load(save_quantized(q, tmp_path / "q.pt", cfg), weights_only=True)
    del payload["digest"]  # as files before the digest have none
    edit(payload)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt is not a usable dopq quantized model: its"):
        load_quantized(tmp_path / "edited.pt")


def test_a_file_naming_timms_loading_arguments_reads_no_other_file(tmp_path, monkeypatch):
    """model_kwargs go to timm.create_model, whose checkpoint_path loaded the file it names (any path
    on the machine, read before the saved state replaced it)."""
    from dopq.serialize import payload_digest

    q, cfg = _quantized_tiny()
    payload = torch.load(save_quantized(q, tmp_path / "q.pt", cfg), weights_only=True)
    payload["model_kwargs"] = {"checkpoint_path": str(tmp_path / "elsewhere.pth")}
    payload["digest"] = payload_digest(payload)
    torch.save(payload, tmp_path / "edited.pt")
    torch.save(q.state_dict(), tmp_path / "elsewhere.pth")
    read = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: read.append(str(f)) or load(f, *a, **k))
    with pytest.raises(CheckpointError, match=r"model_kwargs name checkpoint_path: timm's loading arguments"):
        load_quantized(tmp_path / "edited.pt")
    assert str(tmp_path / "elsewhere.pth") not in read


def test_a_model_created_at_another_size_records_that_size():
    from dopq.models.loading import model_preprocess

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    assert model_preprocess(model)["input_size"] == [3, 32, 32]  # its pretrained_cfg still says 224


def test_reconstruction_lowers_block_error_and_is_deterministic(tmp_path):
    images = torch.randn(24, 3, 160, 160)
    cfg = dopq.get_preset("dopq", w_bits=3, a_bits=3, reconstruct=ReconstructConfig(iters=30, batch_size=8))
    outs, reports = [], []
    for _ in range(2):
        model = _tiny()  # timm's weight init draws from the global generator; the library must not
        caller_state = torch.get_rng_state()
        model, report = dopq.quantize_with_report(model, images[:8], cfg, recon_data=images, progress=False)
        # QDrop masks and batches come from the library's own generators: the caller's state is untouched
        assert torch.equal(torch.get_rng_state(), caller_state)
        with torch.no_grad():
            outs.append(model(images[:4]))
        reports.append(report)
    assert torch.equal(outs[0], outs[1])
    units = reports[0].reconstruction["units"]
    assert [u["unit"] for u in units][:2] == ["patch_embed", "blocks.0"] and units[-1]["unit"] == "head"
    improved = sum(u["loss_after"] < u["loss_before"] for u in units)
    assert improved >= len(units) - 1
    assert reports[0].timings["reconstruction"] > 0
    path = save_quantized(model, tmp_path / "r.pt", cfg)
    loaded, _, _ = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(images[:4]), outs[1])


@pytest.mark.slow
def test_accuracy_floor_on_shared_deit():
    """DeiT-Tiny W4/A4 dopq on 100 strided CIFAR-10 test images keeps most of FP's accuracy."""
    from dopq.experiment import RunSettings, load_workload, run_recipe

    settings = RunSettings(
        model="deit_tiny_patch16_224",
        checkpoint=str(require(DEIT)),
        data=str(require(CIFAR)),
        eval_subset=100,
        calib_size=16,
    )
    work = load_workload(settings)
    result, _ = run_recipe(work, dopq.get_preset("dopq", w_bits=4, a_bits=4), "dopq", progress=False)
    assert result["fp_top1"] >= 0.70
    assert result["quant_top1"] >= result["fp_top1"] - 0.06


def test_stage_timings_are_the_stages_the_recipe_ran():
    """repq has no bias correction: no time for it (the Markdown printed 'bias_correction 0.00 s')."""
    images = torch.randn(2, 3, 224, 224)
    for preset, corrected in (("repq", False), ("dopq", True)):
        model = timm.create_model("test_vit", num_classes=10).eval()
        _, report = dopq.quantize_with_report(model, images, preset)
        assert ("bias_correction" in report.timings) is corrected, report.timings


@pytest.mark.parametrize("preset", ["dopq", "repq"])
def test_torch_jit_trace_passes_its_check_and_saves(preset, tmp_path) -> None:
    """torch.jit.trace with autograd on (as users call it) traced the fake quantizers' autograd
    forms, then its check traced them again without autograd: 'Graphs differed across
    invocations', a TracingCheckError. The traced model gives the model's logits and saves."""
    import warnings

    model = dopq.quantize(_tiny(), torch.randn(4, 3, 160, 160), preset, progress=False)
    x, other = torch.randn(2, 3, 160, 160), torch.randn(3, 3, 160, 160)
    with warnings.catch_warnings():
        # the tracer's notes on the Python values it records, and jit's deprecation
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, tmp_path / "traced.pt")
        loaded = torch.jit.load(tmp_path / "traced.pt")
    with torch.no_grad():
        expected = model(other)
        assert torch.equal(traced(other), expected)
        assert torch.equal(loaded(other), expected)


def test_float16_inputs_get_float32_codes_and_half_models_are_refused() -> None:
    """Under torch.autocast (float16) TanQ's grid cell of an attention value near 1 overflowed
    float16 (x * 2^16 = inf): an IndexError. Low-precision inputs now get the codes of float32
    arithmetic; a model cast with .half() / .bfloat16() (rounded scales: other grids) is refused."""
    from dopq.errors import ConfigError

    model = dopq.quantize(_tiny(), torch.randn(4, 3, 160, 160), "dopq", progress=False)
    tanq = model.blocks[0].attn.matmul_av.quantizer_a
    attention = torch.tensor([0.0, 1e-3, 0.01, 0.1, 0.5, 0.9995, 1.0], dtype=torch.float16)
    with torch.no_grad():
        got = tanq(attention)
        assert got.dtype == torch.float16
        assert torch.equal(got, tanq(attention.float()).half())
        for block in model.blocks:
            block.attn.scale = 100.0  # peaked attention: Softmax values at 1, as trained models have
        x = torch.randn(2, 3, 160, 160)
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.isfinite(model(x)).all()
        for dtype in (torch.float16, torch.bfloat16):
            with pytest.raises(ConfigError, match=rf"runs in float32 .* not {dtype}.* call model\.float\(\)"):
                copy.deepcopy(model).to(dtype)(x.to(dtype))


def test_torch_export_is_one_clear_error() -> None:
    """torch.export cannot trace the quantizers' data-dependent Python (host-side zero points, TanQ's
    level tables): it ended in a page of graph and 'Could not guard on data-dependent expression'."""
    from dopq.errors import ConfigError

    model = dopq.quantize(_tiny(), torch.randn(4, 3, 160, 160), "dopq", progress=False)
    with pytest.raises(ConfigError, match=r"torch\.export cannot trace .* dopq\.export\.export_onnx"):
        torch.export.export(model, (torch.randn(2, 3, 160, 160),))


def test_a_state_dict_loads_into_the_same_recipe_and_is_refused_at_other_widths(tmp_path) -> None:
    """A quantizer's buffers have the same keys and shapes at every width: a W4/A4 state dict loaded
    into a W3/A3 model without a word, whose 3-bit grids then read the 4-bit scales. The widths
    travel in the state dict's metadata (through torch.save and a weights-only load)."""
    images, x = torch.randn(8, 3, 160, 160), torch.randn(2, 3, 160, 160)

    def quantized(w_bits: int, a_bits: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = timm.create_model("test_vit", num_classes=10).eval()
        return dopq.quantize(
            model, images * (1 + seed), dopq.get_preset("dopq", w_bits=w_bits, a_bits=a_bits)
        )

    source = quantized(4, 4, 0)
    torch.save(source.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    same_recipe = quantized(4, 4, 1)
    same_recipe.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(same_recipe(x), source(x))
    with pytest.raises(
        RuntimeError,
        match=r"blocks\.0\.attn\.qkv\.input_quantizer: saved from a 4-bit quantizer, this one has 3 bits",
    ):
        quantized(3, 3, 1).load_state_dict(state)


def test_quantizing_under_inference_mode_gives_the_same_model() -> None:
    """Under torch.inference_mode (which torch.enable_grad does not lift) the forward that finds the
    LayerNorm -> Linear pairs recorded no graph: no LayerNorm was re-parameterized, without a word,
    and the folded weights were inference tensors that no backward could use. A model built inside
    the block (its weights inference tensors) is quantized too."""
    images, x = torch.randn(4, 3, 160, 160), torch.randn(2, 3, 160, 160)
    expected = dopq.quantize(_tiny(), images, "dopq", progress=False)
    outside = _tiny()
    with torch.inference_mode():
        quantized = dopq.quantize(outside, images, "dopq", progress=False)
        built_inside = dopq.quantize(_tiny(), images.clone(), "dopq", progress=False)
    with torch.no_grad():
        for model in (quantized, built_inside):
            assert torch.equal(model(x), expected(x))
    for model in (quantized, built_inside):
        assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
        model(x).sum().backward()  # fine-tuning after quantization stays possible


def test_a_bar_names_the_stage_that_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """With progress on, the stages before reconstruction are shown as they run (calibration, GPTQ,
    its check: minutes on a large model, where nothing was shown between the two evaluations);
    with progress off, nothing."""
    images = torch.randn(6, 3, 160, 160)
    config = dopq.get_preset("recommended", w_bits=4, a_bits=4)
    for progress in (True, False):
        model = timm.create_model("test_vit", num_classes=10).eval()
        _, report = dopq.quantize_with_report(model, images, config, progress=progress)
        err = capsys.readouterr().err
        shown = [stage for stage in report.timings if f"quantize, now {stage.replace('_', ' ')}" in err]
        if progress:  # every stage but the preparation (a fraction of a second), GPTQ and its check too
            assert shown == [s for s in report.timings if s != "prepare"], err
            assert {"calibration", "gptq", "gptq_check", "bias_correction"} <= set(shown)
        else:
            assert err == ""
