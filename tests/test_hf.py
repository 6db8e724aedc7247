"""Hugging Face ``transformers`` image classifiers: loading, adapters, quantization, export, saving.

Random-init tiny configs (hidden 16-32, 2 layers, 32x32 images) of the five families, with both
attention implementations (eager, sdpa).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dopq  # noqa: E402
from dopq.centring import centre_values, fold_value_offset  # noqa: E402
from dopq.cli import main  # noqa: E402
from dopq.errors import ModelError  # noqa: E402
from dopq.models import build_model, prepare_model, value_paths  # noqa: E402
from dopq.models.hf import (  # noqa: E402
    HFImageClassifier,
    QuantHFAttention,
    preprocess_from_processor,
    wrap_hf_model,
)
from dopq.modules import QuantConv2d, QuantLinear, QuantMatMul, quantizers_off  # noqa: E402
from dopq.serialize import load_quantized, save_quantized  # noqa: E402

FAMILIES = ("vit", "deit", "swin", "beit", "dinov2")
VIT_LIKE = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def tiny(family: str, attn: str = "sdpa", num_labels: int = 5, num_channels: int = 3) -> torch.nn.Module:
    """A random-init ``transformers`` classifier of ``family`` (DeiT with its distillation head)."""
    t = transformers
    if family == "vit":
        config, cls = t.ViTConfig(**VIT_LIKE, intermediate_size=64), t.ViTForImageClassification
    elif family == "deit":
        config, cls = t.DeiTConfig(**VIT_LIKE, intermediate_size=64), t.DeiTForImageClassificationWithTeacher
    elif family == "swin":
        config = t.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4
        )
        cls = t.SwinForImageClassification
    elif family == "beit":
        config = t.BeitConfig(
            **VIT_LIKE, intermediate_size=64, use_relative_position_bias=True, layer_scale_init_value=0.1
        )
        cls = t.BeitForImageClassification
    else:
        config, cls = t.Dinov2Config(**VIT_LIKE, mlp_ratio=2), t.Dinov2ForImageClassification
    config.num_labels, config.num_channels = num_labels, num_channels
    config._attn_implementation = attn
    config.architectures = [cls.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config).eval()
    if family == "beit":  # transformers initializes the bias table to zeros: give it something to do
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "relative_position_bias_table"):
                    m.relative_position_bias_table.normal_(0, 0.5)
    return model


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float_function_and_full_coverage(family: str, attn: str) -> None:
    model = tiny(family, attn)
    x = _images()
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    wrapped = wrap_hf_model(model)
    with torch.no_grad():
        assert torch.equal(wrapped(x), reference)
    plan = prepare_model(wrapped, dopq.get_preset("dopq", w_bits=4, a_bits=4))
    with torch.no_grad(), quantizers_off(wrapped):
        assert (wrapped(x) - reference).abs().max() < 1e-5
    cov = plan.coverage
    assert cov.complete
    assert (
        cov.quantized["Linear"]
        == cov.total["Linear"]
        == sum(isinstance(m, QuantLinear) for m in model.modules())
    )
    heads = 4 if family == "swin" else 2
    assert cov.quantized["attention"] == cov.total["attention"] == heads
    assert sum(isinstance(m, QuantHFAttention) for m in model.modules()) == heads
    assert cov.quantized["LayerNorm re-parameterized"] >= 4  # before attention and before the MLP, per layer
    assert plan.adapter.family == f"hf-{family}"


@pytest.mark.parametrize("family", FAMILIES)
def test_value_centring_keeps_the_float_function(family: str) -> None:
    """v_proj -> o_proj is each attention's value path: a random offset moved through the biases
    leaves the logits as they were, and centring finds every attention."""
    model = tiny(family)
    x = _images()
    wrapped = wrap_hf_model(model)
    with torch.no_grad():
        reference = wrapped(x)
    prepare_model(wrapped, dopq.get_preset("recommended", w_bits=8, a_bits=8))
    paths = value_paths(wrapped)
    assert len(paths) == (4 if family == "swin" else 2)
    for path in paths.values():
        fold_value_offset(path, torch.randn(path.producer.out_features))
    with torch.no_grad(), quantizers_off(wrapped):
        assert (wrapped(x) - reference).abs().max() < 1e-4
    assert len(centre_values(wrapped, x).offsets) == len(paths)


def test_deit_distillation_logits_are_the_mean_of_both_heads() -> None:
    model = tiny("deit")
    x = _images(2)
    with torch.no_grad():
        out = model(pixel_values=x)
        assert torch.allclose(wrap_hf_model(model)(x), (out.cls_logits + out.distillation_logits) / 2)


def test_attention_the_adapter_does_not_know_is_refused() -> None:
    model = tiny("vit")
    attn = model.vit.layers[1].attention

    class OtherAttention(type(attn)):
        pass

    attn.__class__ = OtherAttention
    with pytest.raises(ModelError, match=r"cannot quantize every layer.*OtherAttention"):
        prepare_model(wrap_hf_model(model), dopq.get_preset("dopq"))


def test_unsupported_transformers_model_is_refused() -> None:
    backbone = transformers.ViTModel(transformers.ViTConfig(**VIT_LIKE, intermediate_size=64))
    with pytest.raises(ModelError, match="unsupported transformers model ViTModel"):
        wrap_hf_model(backbone)


@pytest.mark.parametrize("family", FAMILIES)
def test_w4a4_export_and_save_round_trip(family: str, tmp_path: Path) -> None:
    model = tiny(family)
    x = _images(8, seed=1)
    with torch.no_grad():
        reference = model(pixel_values=x).logits
    config = dopq.get_preset("dopq", w_bits=4, a_bits=4)
    qmodel = dopq.quantize(model, _images(8), config, progress=False)  # a transformers object in
    assert isinstance(qmodel, HFImageClassifier) and qmodel.model is model
    assert all(
        isinstance(m.matmul_qk, QuantMatMul) for m in model.modules() if isinstance(m, QuantHFAttention)
    )
    with torch.no_grad():
        out = qmodel(x)
    assert not torch.equal(out, reference)  # quantized...
    assert torch.nn.functional.cosine_similarity(out, reference).mean() > 0.8  # ...and close
    meta = {"preprocess": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                           "interpolation": "bilinear", "crop_pct": 1.0}}  # fmt: skip
    path = save_quantized(qmodel, tmp_path / "q.pt", config, meta)
    loaded, loaded_config, _ = load_quantized(path)
    assert (
        loaded_config == config
        and loaded.pretrained_cfg["architecture"] == qmodel.pretrained_cfg["architecture"]
    )
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    from dopq.export import OnnxModel, export_onnx

    export_onnx(qmodel, tmp_path / "q.onnx")
    with torch.no_grad():
        onnx_out = OnnxModel(tmp_path / "q.onnx", threads=1)(x)
    assert (onnx_out - out).abs().max() < 1e-3
    assert torch.equal(onnx_out.argmax(1), out.argmax(1))


@pytest.mark.parametrize("family", ["swin", "beit"])
def test_float64_export_reproduces_the_float64_simulation(family: str, tmp_path: Path) -> None:
    """Swin: the average pooling swapped for a module with float64 kernels, and ``transformers``'
    own GELU module's ``erf`` run in float32 by the export (onnxruntime has no float64 ``Erf``).
    BEiT: the relative position bias read from its table without ``transformers``' identity resize
    (onnxruntime has no float64 ``Resize``; the export was refused)."""
    from dopq.export import OnnxModel, export_onnx
    from dopq.modules import float64_copy

    qmodel = dopq.quantize(
        tiny(family), _images(8), dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False
    )
    export_onnx(qmodel, tmp_path / "q64.onnx", float_dtype="float64")
    x = _images(4, seed=2)
    with torch.no_grad():
        assert torch.equal(
            OnnxModel(tmp_path / "q64.onnx", threads=1)(x).double(), float64_copy(qmodel)(x.double())
        )


def _beit_bias_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "relative_position_bias_table")]


@pytest.mark.parametrize("window", [(4, 4), (6, 6), (3, 5)], ids=["trained", "larger", "non-square"])
@pytest.mark.parametrize("interpolate", [False, True])
def test_beit_position_bias_module_computes_transformers_values(
    window: tuple[int, int], interpolate: bool
) -> None:
    from dopq.models.hf import IndexedRelativePositionBias

    original = _beit_bias_modules(tiny("beit"))[0]
    swapped = IndexedRelativePositionBias(original)
    assert (
        swapped.relative_position_bias_table is original.relative_position_bias_table
    )  # same key, same values
    dim = window[0] * window[1] + 3
    with torch.no_grad():
        expected = original(window, interpolate, dim_size=dim)
        assert torch.equal(swapped(window, interpolate, dim_size=dim), expected)


@pytest.mark.parametrize("shared", [False, True], ids=["own-bias", "shared-bias"])
def test_beit_quantizes_after_an_inference_mode_forward(shared: bool) -> None:
    """``transformers`` caches BEiT's position index process-wide; one built during an evaluation under
    ``torch.inference_mode`` (the CLI's FP baseline) made the structure walk's forward with gradients
    fail ("Inference tensors cannot be saved for backward"). A 40-pixel model: a 5 x 5 window no other
    test builds, so the cache holds that index only as this test's evaluation made it."""
    t = transformers
    config = t.BeitConfig(
        **{**VIT_LIKE, "image_size": 40}, intermediate_size=64, num_labels=5,
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
    )  # fmt: skip
    config.architectures = ["BeitForImageClassification"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = t.BeitForImageClassification(config).eval()
    for m in _beit_bias_modules(model):
        with torch.no_grad():
            m.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(pixel_values=x).logits.clone()
    calib = torch.randn(8, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    qmodel, report = dopq.quantize_with_report(
        model, calib, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False
    )
    assert report.coverage.complete and report.reparam.max_logit_change <= 1e-4
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(qmodel(x), reference).mean() > 0.8


def test_saved_and_exported_models_keep_the_preprocessing_they_were_wrapped_with(tmp_path: Path) -> None:
    """Through the Python API, with no metadata given: a DINOv2 configured at 32 pixels, run at 48
    (its position embeddings interpolate) with its own mean and std. The reloaded model took the
    config's 32 pixels and the default normalization, and its export then failed at run time."""
    from dopq.export import OnnxModel, export_onnx
    from dopq.export.runtime import read_metadata

    pre = {"input_size": (3, 48, 48), "mean": (0.2, 0.3, 0.4), "std": (0.6, 0.5, 0.4)}
    wrapped = wrap_hf_model(tiny("dinov2"), pre)
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    config = dopq.get_preset("dopq", w_bits=8, a_bits=8)
    qmodel = dopq.quantize(wrapped, torch.randn(8, 3, 48, 48), config, progress=False)
    loaded, _, meta = load_quantized(save_quantized(qmodel, tmp_path / "q.pt", config))
    for key, value in pre.items():
        assert tuple(loaded.pretrained_cfg[key]) == value and tuple(meta["preprocess"][key]) == value
    with torch.no_grad():
        out = qmodel(x)
        assert torch.equal(loaded(x), out)
    export_onnx(loaded, tmp_path / "q.onnx")
    assert {
        k: tuple(v) for k, v in read_metadata(tmp_path / "q.onnx")["preprocess"].items() if k in pre
    } == pre
    with torch.no_grad():
        assert (OnnxModel(tmp_path / "q.onnx", threads=1)(x) - out).abs().max() < 1e-3


@pytest.mark.parametrize("family", ["swin", "beit"])
def test_reconstruction_and_gptq_run_on_layers_that_take_more_arguments(family: str) -> None:
    from dopq.config import ReconstructConfig

    config = dopq.get_preset(
        "dopq",
        w_bits=4,
        a_bits=4,
        weight_rounding="gptq",
        reconstruct=ReconstructConfig(calib_size=8, iters=3, batch_size=4),
    )
    qmodel, report = dopq.quantize_with_report(tiny(family), _images(8), config, progress=False)
    units = report.reconstruction["units"]
    assert len(units) >= 4 and all(u["loss_after"] >= 0 for u in units)
    assert any(u["chained"] for u in units)  # layer outputs (first tuple element) feed the next layer
    assert report.gptq["layers"] == sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in qmodel.modules())


def test_preprocessing_from_image_processor_configs(tmp_path: Path) -> None:
    config = transformers.ViTConfig(image_size=224)
    deit = {"size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
            "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}  # fmt: skip
    (tmp_path / "deit.json").write_text(json.dumps(deit))
    pre = preprocess_from_processor(tmp_path / "deit.json", config)
    assert pre == {"input_size": (3, 224, 224), "crop_pct": 224 / 256, "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}  # fmt: skip
    dinov2 = {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 224, "do_normalize": False}
    (tmp_path / "dinov2.json").write_text(json.dumps(dinov2))
    pre = preprocess_from_processor(tmp_path / "dinov2.json", config)
    assert (
        pre["input_size"] == (3, 224, 224)
        and pre["mean"] == (0.0, 0.0, 0.0)
        and pre["std"] == (1.0, 1.0, 1.0)
    )
    assert pre["interpolation"] == "bilinear"


def _save_folder(root: Path, family: str = "vit") -> Path:
    folder = root / f"hf-{family}"
    tiny(family, num_labels=2).save_pretrained(folder)
    processor = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def test_hf_folder_loads_with_its_preprocessing(tmp_path: Path) -> None:
    model = build_model(f"hf:{_save_folder(tmp_path)}")
    assert isinstance(model, HFImageClassifier) and model.num_classes == 2
    cfg = model.pretrained_cfg
    assert (
        cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic" and cfg["std"] == (0.25,) * 3
    )
    from dopq.data import preprocess_from_model

    assert preprocess_from_model(model).std == (0.25, 0.25, 0.25)


def test_cli_quantize_save_export_and_evaluate(tmp_path: Path, image_folder, capsys) -> None:
    folder = _save_folder(tmp_path)
    data = image_folder("hf-data", size=32)
    common = ["--data", str(data), "--batch-size", "4", "--workers", "0", "--quiet"]
    rc = main(["quantize", "--model", f"hf:{folder}", "--calib-size", "4", "--w-bits", "4", "--a-bits", "4",
               "--save", str(tmp_path / "q.pt"), "--export", str(tmp_path / "q.onnx"),
               "--output", str(tmp_path / "r.json"), "--std", "0.5", "0.5", "0.5", *common])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == f"hf:{folder}" and result["coverage"]["left_float"]["attention"] == []
    assert result["config"]["preprocess"]["std"] == [0.5, 0.5, 0.5]  # the override beats the processor
    assert result["config"]["preprocess"]["interpolation"] == "bicubic"  # from the processor
    assert result["config"]["preprocess_source"] == (
        f"image processor config {folder / 'preprocessor_config.json'}, with std given"
    )  # it said "the model's pretrained_cfg"
    from dopq.environment import file_sha256

    assert result["checkpoint_sha256"] == file_sha256(folder / "model.safetensors")  # the folder's weights
    rc = main(
        ["evaluate", "--quantized", str(tmp_path / "q.pt"), "--output", str(tmp_path / "e.json"), *common]
    )
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["quant_top1"] == result["quant_top1"] and saved["model"] == "hf:ViTForImageClassification"
    rc = main(["evaluate", "--onnx", str(tmp_path / "q.onnx"), "--quantized", str(tmp_path / "q.pt"),
               "--output", str(tmp_path / "o.json"), *common])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o.json").read_text())["comparison"]["identical_top1"] == 1.0


def _cli_error(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop what came before (transformers' save progress bar)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dopq: error: ") and "\n" not in err
    return err


def test_cli_errors(tmp_path: Path, image_folder, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(image_folder("hf-err", size=32, per_class=1))
    quantize = ["quantize", "--data", data, "--quiet", "--model"]
    assert "does not exist" in _cli_error([*quantize, f"hf:{tmp_path / 'nowhere'}"], capsys)
    folder = _save_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["ViTForMaskedImageModeling"]
    (folder / "config.json").write_text(json.dumps(config))
    err = _cli_error([*quantize, f"hf:{folder}"], capsys)
    assert (
        "unsupported architecture 'ViTForMaskedImageModeling'" in err and "ViTForImageClassification" in err
    )
    # without the extra: transformers (and dopq's module over it) cannot be imported
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "dopq.models.hf", raising=False)
    monkeypatch.delattr("dopq.models.hf", raising=False)
    err = _cli_error([*quantize, f"hf:{folder}"], capsys)
    assert "pip install 'dopq[hf]'" in err


@pytest.mark.slow
def test_torchrun_two_processes_give_the_one_process_result(tmp_path: Path, image_folder) -> None:
    import os
    import socket
    import subprocess

    folder = _save_folder(tmp_path)
    data = image_folder("hf-dist", size=32, classes=("a", "b"), per_class=3)
    argv = ["quantize", "--model", f"hf:{folder}", "--data", str(data), "--calib-size", "4", "--w-bits", "4",
            "--a-bits", "4", "--threads", "1", "--workers", "0", "--batch-size", "2", "--output", "r.json",
            "--save", "q.pt", "--quiet"]  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    # the subprocesses import the dopq under test, wherever they run
    env["PYTHONPATH"] = os.pathsep.join([str(Path(dopq.__file__).parents[1]), env.get("PYTHONPATH", "")])
    results = {}
    for nproc in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "dopq"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(port), "-m", "dopq"]  # fmt: skip
        run_dir = tmp_path / f"n{nproc}"
        run_dir.mkdir()
        done = subprocess.run([*launcher, *argv], capture_output=True, text=True, timeout=600, cwd=run_dir,
                              env={**env, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = (json.loads((run_dir / "r.json").read_text()), (run_dir / "q.pt").read_bytes())
    (one, one_bytes), (two, two_bytes) = results[1], results[2]
    assert two["distributed"]["world_size"] == 2
    for key in ("fp_top1_correct", "quant_top1_correct", "eval_images"):
        assert one[key] == two[key], key
    assert one_bytes == two_bytes


@pytest.mark.parametrize("tensors", ["pt", "np", None])
def test_image_processor_output_is_calibration_data(tensors: str | None) -> None:
    """What an image processor returns, a ``BatchFeature`` (a ``UserDict``, not a ``dict``), with
    tensors, arrays or (no ``return_tensors``) a list of arrays: its ``pixel_values`` are the images.
    It was iterated as a collection of its keys and refused as a str."""
    import numpy as np
    from PIL import Image

    from dopq.api import as_image_tensor

    pixels = [Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)) for i in range(3)]
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    features = processor(pixels, return_tensors=tensors)
    expected = processor(pixels, return_tensors="pt")["pixel_values"]
    model = wrap_hf_model(tiny("vit"))
    assert torch.equal(as_image_tensor(features, "cpu", model), expected)
    assert torch.equal(as_image_tensor([features, features], "cpu", model), torch.cat([expected, expected]))


def test_class_folders_in_another_order_than_id2label_are_refused(
    tmp_path: Path, image_folder, capsys
) -> None:
    """A label is its class folder's sorted position; a model whose ``id2label`` names those folders
    in another order was scored against the wrong classes, silently. Refused, by ``quantize`` and by
    ``evaluate --quantized`` (the saved config keeps ``id2label``); the model's own order runs."""
    data = str(image_folder("hf-id2label", size=32, classes=("a", "b"), per_class=1))
    common = ["--data", data, "--calib-size", "2", "--workers", "0", "--quiet"]
    folder = _save_folder(tmp_path)
    quantize = ["quantize", "--model", f"hf:{folder}", "--w-bits", "8", "--a-bits", "8", *common]
    config = json.loads((folder / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}
    (folder / "config.json").write_text(json.dumps(config))
    assert main([*quantize, "--save", str(tmp_path / "q.pt")]) == 0, capsys.readouterr().err
    config["id2label"], config["label2id"] = {"0": "b", "1": "a"}, {"b": 0, "a": 1}
    (folder / "config.json").write_text(json.dumps(config))
    err = _cli_error(quantize, capsys)
    assert "class folder 'a' gets label 0 (its sorted position), but the model's class 0 is 'b'" in err
    model = tiny("vit", num_labels=2)  # a saved model with that order (as the Python API saves it)
    model.config.id2label, model.config.label2id = {0: "b", 1: "a"}, {"b": 0, "a": 1}
    recipe = dopq.get_preset("dopq", w_bits=8, a_bits=8)
    qmodel = dopq.quantize(model, _images(4), recipe, progress=False)
    save_quantized(qmodel, tmp_path / "q.pt", recipe)
    err = _cli_error(
        ["evaluate", "--quantized", str(tmp_path / "q.pt"), *common[:2], "--workers", "0"], capsys
    )
    assert "class folder 'a' gets label 0" in err
    from dopq.export import export_onnx

    export_onnx(qmodel, tmp_path / "q.onnx")  # the graph records id2label: evaluate --onnx checks it too
    onnx_eval = ["evaluate", "--onnx", str(tmp_path / "q.onnx"), "--workers", "0", "--data"]
    assert "class folder 'a' gets label 0" in _cli_error([*onnx_eval, data], capsys)
    three = str(image_folder("hf-three", size=32, classes=("a", "b", "c"), per_class=1))
    assert "3 classes" in _cli_error([*onnx_eval, three], capsys)  # and its number of classes


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_returns_its_attention_maps(family: str) -> None:
    """``output_attentions=True`` on the quantized ``transformers`` model gives one map per layer
    (Swin: per stage) of the float eager model's shapes, each a softmax, close to the float ones. The
    quantized attention was not the class ``transformers`` records from, so the tuple came back
    empty, silently."""
    model, x = tiny(family, "eager"), _images(2, seed=3)
    with torch.no_grad():
        reference = model(pixel_values=x, output_attentions=True).attentions
    qmodel = dopq.quantize(model, _images(8), dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    with torch.no_grad():
        maps = qmodel.model(pixel_values=x, output_attentions=True).attentions
        assert qmodel.model(pixel_values=x).attentions is None  # only when asked for
    assert [m.shape for m in maps] == [m.shape for m in reference] and len(maps) == 2
    for got, ref in zip(maps, reference, strict=True):
        assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)
        assert (got - ref).abs().max() < 0.2


@pytest.mark.parametrize("family", ["vit", "deit", "beit", "dinov2"])
def test_attention_maps_without_a_float_forward_first(family: str) -> None:
    """A model quantized straight after loading (no float forward with ``output_attentions``, which
    is when ``transformers`` hooks its own attention modules) returns its maps too: the quantized
    attention's own hook was overwritten by the replaced module's (empty) hooks, so the tuple came
    back empty. A hook a caller had on the replaced module keeps running beside it."""
    model, x = tiny(family, "eager"), _images(2, seed=3)
    seen = []
    first = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    first.register_forward_hook(lambda *_: seen.append(1))
    qmodel = dopq.quantize(model, _images(8), dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    seen.clear()
    with torch.no_grad():
        maps = qmodel.model(pixel_values=x, output_attentions=True).attentions
    assert len(maps) == 2 and all(m.shape[:2] == (2, 2) and m.shape[2] == m.shape[3] for m in maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5) for m in maps)
    assert seen == [1]


def test_model_of_one_channel_quantizes_saves_and_exports(tmp_path: Path) -> None:
    """A config's ``num_channels`` is the input size's: the structure walk ran a 3-channel example
    image and the quantization stopped with ``transformers``' ValueError from inside."""
    from dopq.export import OnnxModel, export_onnx

    model, x = tiny("vit", num_channels=1), _images(4, seed=2)[:, :1]
    config = dopq.get_preset("dopq", w_bits=8, a_bits=8)
    qmodel = dopq.quantize(model, _images(8)[:, :1], config, progress=False)
    assert qmodel.pretrained_cfg["input_size"] == (1, 32, 32)
    loaded, _, meta = load_quantized(save_quantized(qmodel, tmp_path / "q.pt", config))
    with torch.no_grad():
        out = qmodel(x)
        assert torch.equal(loaded(x), out) and meta["preprocess"]["input_size"] == [1, 32, 32]
    export_onnx(loaded, tmp_path / "q.onnx")
    with torch.no_grad():
        assert (OnnxModel(tmp_path / "q.onnx", threads=1)(x) - out).abs().max() < 1e-2  # a rounding flip
    (tmp_path / "p.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    assert preprocess_from_processor(tmp_path / "p.json", model.config)["input_size"] == (1, 32, 32)


def test_cli_refuses_a_model_of_other_channels_than_rgb(tmp_path: Path, image_folder, capsys) -> None:
    """dopq's loader decodes RGB images; a 1-channel model stopped inside its first layer with
    ``transformers``' ValueError and a traceback (quantize, plot)."""
    folder = tmp_path / "hf-gray"
    tiny("vit", num_labels=2, num_channels=1).save_pretrained(folder)
    data = str(image_folder("hf-gray", size=32, per_class=1))
    expected = "the model reads 1-channel images and dopq's loader decodes images as RGB (3 channels)"
    common = ["--model", f"hf:{folder}", "--data", data, "--calib-size", "2"]
    assert expected in _cli_error(["quantize", *common, "--workers", "0", "--quiet"], capsys)
    assert expected in _cli_error(["plot", *common, "--out-dir", str(tmp_path)], capsys)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_the_transformers_object_quantized_in_place_saves_and_exports(family: str, tmp_path: Path) -> None:
    """``dopq.quantize`` changes the ``transformers`` model it is given; that object saves and
    exports as the wrapper it returned. The save was refused as a model without a timm name, the
    export traced it at 224 pixels (ViT: an error; Swin: a graph of the wrong input size), and the
    wrapper made for them, in training mode, turned Swin's drop path on."""
    from dopq.export import OnnxModel, export_onnx

    model, x = tiny(family), _images(4, seed=2)
    config = dopq.get_preset("dopq", w_bits=8, a_bits=8)
    qmodel = dopq.quantize(model, _images(8), config, progress=False)
    with torch.no_grad():
        out = qmodel(x)
    loaded, _, _ = load_quantized(save_quantized(model, tmp_path / "q.pt", config))
    export_onnx(model, tmp_path / "q.onnx")
    with torch.no_grad():
        assert torch.equal(qmodel(x), out) and torch.equal(loaded(x), out)
        assert (OnnxModel(tmp_path / "q.onnx", threads=1)(x) - out).abs().max() < 1e-2
    assert (tmp_path / "q.pt").read_bytes() == save_quantized(qmodel, tmp_path / "w.pt", config).read_bytes()
    assert not wrap_hf_model(tiny(family)).training


def test_cli_refuses_a_processor_size_the_model_cannot_take(tmp_path: Path, image_folder, capsys) -> None:
    """A processor config resizing to 48 pixels for a ViT of 32 (no position interpolation): one
    error line, where ``quantize`` stopped in its float baseline and ``plot`` in its structure walk,
    both with ``transformers``' traceback."""
    folder = _save_folder(tmp_path)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 48, "width": 48}}))
    data = str(image_folder("hf-size", size=32, per_class=1))
    common = ["--model", f"hf:{folder}", "--data", data, "--calib-size", "2"]
    expected = "cannot run on calibration images of shape (3, 48, 48): Input image size (48*48)"
    assert expected in _cli_error(["quantize", *common, "--workers", "0", "--quiet"], capsys)
    assert expected in _cli_error(["plot", *common, "--out-dir", str(tmp_path)], capsys)


def test_saved_model_is_accepted_for_the_folder_it_was_made_from(tmp_path: Path) -> None:
    """``evaluate --quantized q.pt --model hf:FOLDER`` (``load_quantized(arch=...)``) with the folder
    ``quantize --model`` took: the file records the folder's class, and the folder was refused as
    another architecture. A folder of another class still is."""
    from dopq.errors import CheckpointError

    folder, other = _save_folder(tmp_path), _save_folder(tmp_path, "swin")
    config = dopq.get_preset("dopq", w_bits=8, a_bits=8)
    qmodel = dopq.quantize(build_model(f"hf:{folder}"), _images(4), config, progress=False)
    path = save_quantized(qmodel, tmp_path / "q.pt", config)
    for arch in (f"hf:{folder}", "hf:ViTForImageClassification"):
        assert (
            load_quantized(path, arch=arch)[0].pretrained_cfg["architecture"]
            == "hf:ViTForImageClassification"
        )
    with pytest.raises(CheckpointError, match=f"made for hf:ViTForImageClassification, not hf:{other}"):
        load_quantized(path, arch=f"hf:{other}")


def test_processor_with_one_mean_and_std_for_every_channel(tmp_path: Path) -> None:
    """``ViTImageProcessor(image_mean=0.3, image_std=0.2).save_pretrained`` writes the numbers as
    given, which ``transformers`` applies to every channel; loading the folder stopped with a raw
    TypeError ('float' object is not iterable)."""
    folder = tmp_path / "hf-vit"
    tiny("vit", num_labels=2).save_pretrained(folder)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=0.3, image_std=0.2
    )
    processor.save_pretrained(folder)
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == 0.3
    cfg = build_model(f"hf:{folder}").pretrained_cfg
    assert cfg["mean"] == (0.3, 0.3, 0.3) and cfg["std"] == (0.2, 0.2, 0.2)


def test_folder_without_processor_config_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``model.save_pretrained`` writes no ``preprocessor_config.json``; the folder then takes the
    ViT processor's mean and std (0.5), which DeiT, Swin and DINOv2 were not trained with. It did
    so silently (a timm checkpoint without a model card warns)."""
    folder = tmp_path / "hf-deit"
    tiny("deit", num_labels=2).save_pretrained(folder)
    with caplog.at_level("WARNING", logger="dopq"):
        model = build_model(f"hf:{folder}")
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert "has no preprocessor_config.json" in caplog.text and "--mean, --std" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dopq"):
        build_model(f"hf:{_save_folder(tmp_path)}")
    assert "preprocessor_config" not in caplog.text


def test_folder_under_the_home_directory(tmp_path: Path, image_folder, capsys, monkeypatch) -> None:
    """``--model hf:~/FOLDER``: the shell leaves a ``~`` after ``hf:`` as it is, and the folder was
    one that does not exist. Loading, the weights' digest, the preprocessing source and the saved
    file's architecture check all read the expanded folder."""
    from dopq.environment import file_sha256

    monkeypatch.setenv("HOME", str(tmp_path))
    folder = _save_folder(tmp_path)
    data = str(image_folder("hf-home", size=32, per_class=1))
    argv = ["quantize", "--model", "hf:~/hf-vit", "--data", data, "--calib-size", "2", "--workers", "0",
            "--quiet", "--w-bits", "8", "--a-bits", "8", "--output", str(tmp_path / "r.json"),
            "--save", str(tmp_path / "q.pt")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["checkpoint_sha256"] == file_sha256(folder / "model.safetensors")
    assert (
        result["config"]["preprocess_source"]
        == f"image processor config {folder / 'preprocessor_config.json'}"
    )
    assert load_quantized(tmp_path / "q.pt", arch="hf:~/hf-vit")[0].num_classes == 2


def test_a_folder_with_its_own_python_code_is_refused_and_never_run(tmp_path: Path, monkeypatch) -> None:
    """A downloaded folder's config.json can name Python beside it (auto_map): transformers asked on
    stdin whether to run it, and ran it on a "y" (a pipe, a script)."""
    import io

    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    config = {"model_type": "customvit", "architectures": ["ViTForImageClassification"],
              "auto_map": {"AutoConfig": "custom_code.CustomConfig"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'customvit'\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(ModelError, match=r"config\.json could not be read"):
        build_model(f"hf:{folder}")
    assert not marker.exists()


class _Payload:
    """Unpickling it would write a marker file: code run from a data file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "ran"))


def test_a_pytorch_model_bin_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    """transformers reads pytorch_model.bin weights-only: the refusal was torch's first line, cut off,
    advising to load the file with weights_only=False (which runs its code)."""
    folder, marker = _save_folder(tmp_path), tmp_path / "ran"
    model = transformers.ViTForImageClassification.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "extra": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(dopq.errors.CheckpointError, match=r"hold pickled Python objects \(\w") as info:
        build_model(f"hf:{folder}")
    assert "weights_only" not in str(info.value) and not marker.exists()
