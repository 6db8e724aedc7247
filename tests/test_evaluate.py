"""Tests of dopq.evaluate: exact top-1/top-5 on a fake model with known logits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dopq.errors import DataError, ModelError
from dopq.evaluate import EvalResult, accuracy_counts, compare, evaluate

NUM_CLASSES = 7
# rank of the true label among each sample's logits (0 = highest): top-1 hits 2 of 6, top-5 hits 4 of 6
RANKS = [0, 1, 4, 5, 6, 0]


def _table(ranks: list[int], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with distinct values and labels placed at the given ranks."""
    g = torch.Generator().manual_seed(0)
    logits, labels = [], []
    for rank in ranks:
        order = torch.randperm(num_classes, generator=g)  # order[j] gets the j-th highest logit
        row = torch.empty(num_classes)
        row[order] = torch.arange(num_classes, 0, -1, dtype=torch.float32)
        logits.append(row)
        labels.append(int(order[rank]))
    return torch.stack(logits), torch.tensor(labels)


class _LookupModel(nn.Module):
    """Returns the stored logits of the sample whose index is the input's first value."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.inference_mode_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inference_mode_seen.append(torch.is_inference_mode_enabled() and not self.training)
        return self.table[x[:, 0].long()]


def _loader(ranks: list[int], num_classes: int, batch_size: int = 4) -> tuple[_LookupModel, DataLoader]:
    logits, labels = _table(ranks, num_classes)
    inputs = torch.arange(len(ranks), dtype=torch.float32).view(-1, 1)
    return _LookupModel(logits), DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)


def test_evaluate_exact_accuracies() -> None:
    model, loader = _loader(RANKS, NUM_CLASSES)
    model.train()
    result = evaluate(model, loader, progress=False)
    assert (result.top1, result.top5, result.images) == (2 / 6, 4 / 6, 6)
    assert result.top1_correct == "100001"  # per image, in loader order, across both batches
    assert result.seconds > 0 and result.images_per_second == pytest.approx(6 / result.seconds)
    assert model.inference_mode_seen == [True, True]  # two batches, eval mode, inference mode


def test_top5_is_capped_by_num_classes() -> None:
    model, loader = _loader([0, 1, 2, 2], num_classes=3)
    result = evaluate(model, loader, progress=True, desc="tiny")
    assert (result.top1, result.top5) == (0.25, 1.0)


def test_accuracy_counts() -> None:
    logits, labels = _table(RANKS, NUM_CLASSES)
    assert accuracy_counts(logits, labels, ks=(1, 2, 5, 6, 7, 10)) == (2, 3, 4, 5, 6, 6)
    with pytest.raises(ValueError, match="expected logits"):
        accuracy_counts(logits, labels[:3])


def test_eval_result_dict() -> None:
    result = EvalResult(top1=0.5, top5=0.75, images=100, seconds=4.0)
    expected = {"top1": 0.5, "top5": 0.75, "images": 100, "seconds": 4.0, "top1_correct": "",
                "images_per_second": 25.0}  # fmt: skip
    assert result.to_dict() == expected
    assert EvalResult(0.0, 0.0, 0, 0.0).images_per_second == 0.0


def test_empty_loader_raises() -> None:
    model, _ = _loader(RANKS, NUM_CLASSES)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="no images"):
        evaluate(model, empty, progress=False)


def test_a_label_beyond_the_outputs_is_refused() -> None:
    """Data whose classes are not the model's (1000 class folders, a 10-class head) would score 0
    with every image counted a miss."""
    model, _ = _loader(RANKS, NUM_CLASSES)
    labels = torch.tensor([0, 1, 2, 3, 4, NUM_CLASSES])
    loader = DataLoader(TensorDataset(torch.arange(6.0).view(-1, 1), labels), batch_size=4)
    with pytest.raises(
        DataError, match=f"the data holds label {NUM_CLASSES} but the model has {NUM_CLASSES} outputs"
    ):
        evaluate(model, loader, progress=False)


def test_nan_logits_are_refused_not_scored() -> None:
    """topk ranks NaN first: an all-NaN model scored top-1 1/7 and top-5 5/7 here, and compare()
    reported a max logit difference of 0 against it (max() keeps its old value over a NaN)."""
    model, loader = _loader(RANKS, NUM_CLASSES)
    model.table[4, 2] = float("nan")  # image 4, in the second batch
    with pytest.raises(ModelError, match=r"NaN logits for 1 of the 2 images of a batch \(first: image 4 "):
        evaluate(model, loader, progress=False)
    good, _ = _loader(RANKS, NUM_CLASSES)
    with pytest.raises(ModelError, match=r"a vs b \(second model\): the model gives NaN logits"):
        compare(good, model, loader, progress=False, desc="a vs b")


def _quantized_test_vit() -> tuple[nn.Module, torch.Tensor]:
    import copy

    import timm

    import dopq

    torch.manual_seed(0)
    fp = timm.create_model("test_vit", num_classes=10).eval()
    images = torch.randn(6, 3, 160, 160)
    return dopq.quantize(copy.deepcopy(fp), images[:4], dopq.get_preset("dopq", w_bits=4, a_bits=4)), images


def test_compiled_model_traces_the_quantized_model_and_gives_its_logits() -> None:
    """``--compile`` runs the quantizers through torch.compile: traced op for op (aot_eager replays
    the captured graph without fusing), the logits are the eager model's exactly."""
    from dopq.evaluate import CompiledModel

    model, images = _quantized_test_vit()
    compiled = CompiledModel(model, backend="aot_eager")
    with torch.inference_mode():
        assert torch.equal(compiled(images), model(images))
        assert torch.equal(compiled(images[:3]), model(images[:3]))  # another batch shape
    assert compiled.pretrained_cfg == model.pretrained_cfg
    assert [n for n, _ in compiled.named_parameters()] == [f"model.{n}" for n, _ in model.named_parameters()]


def test_compiling_the_post_softmax_tables_is_no_warned_graph_break(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """TanQ's level table checks its thresholds against the grid with data-dependent branches: traced,
    each was a graph break that torch warned about in 48 lines on stderr (``dopq evaluate --compile``
    of the default recipe, once per process under torchrun). The table is computed outside the graph."""
    from dopq.evaluate import CompiledModel

    torch._dynamo.reset()  # an earlier test's compilation would hide the warning
    model, images = _quantized_test_vit()
    with torch.inference_mode():
        assert torch.equal(CompiledModel(model, backend="aot_eager")(images), model(images))
    assert "Graph break" not in capfd.readouterr().err


# what inductor does on its first CPU kernel: load torch's C++ extension helper (compiling a kernel
# here would take half a minute)
_COMPILE_THEN_LOAD_CPP_EXTENSION = """
from torch import nn
from dopq.evaluate import CompiledModel

CompiledModel(nn.Identity())
import torch.utils.cpp_extension
print("loaded")
"""


def test_compiling_on_a_cpu_beside_a_cuda_toolkit_says_nothing_of_cuda(tmp_path: Path) -> None:
    """Inductor's CPU kernels load torch's C++ extension helper, which warned 'No CUDA runtime is
    found, using CUDA_HOME=...' on a machine with a CUDA toolkit and no GPU, in the middle of
    ``dopq evaluate --compile`` on the CPU."""
    toolkit = tmp_path / "cuda"
    toolkit.mkdir()
    env = {**os.environ, "CUDA_HOME": str(toolkit), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_THEN_LOAD_CPP_EXTENSION],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "loaded", proc.stderr
    assert "CUDA" not in proc.stderr, proc.stderr


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_compiled_model_with_inductor_agrees_with_eager() -> None:
    """The fused kernels (inductor, on the CPU here) may round a last float bit otherwise, which can
    move a rare code and with it that image's logits (by a few per cent on this AVX2 CPU): most
    images' logits agree closely and most predictions are the same; a wrong function moves all."""
    from dopq.evaluate import CompiledModel

    model, images = _quantized_test_vit()
    with torch.inference_mode():
        eager, fused = model(images), CompiledModel(model)(images)
    per_image = (eager - fused).abs().flatten(1).amax(1)
    assert int((per_image > 0.05 * float(eager.abs().max())).sum()) <= len(per_image) // 2, per_image
    assert (eager.argmax(1) == fused.argmax(1)).float().mean() >= 0.75


def test_compile_failure_is_one_clear_error() -> None:
    from dopq.errors import ConfigError
    from dopq.evaluate import CompiledModel

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    compiled = CompiledModel(nn.Linear(4, 2), backend=broken_backend)
    with pytest.raises(
        ConfigError, match=r"--compile: torch.compile could not compile the model.*C\+\+ compiler"
    ):
        compiled(torch.randn(3, 4))


def test_compare_counts_agreement_and_hits_from_the_same_top_class() -> None:
    """With tied top logits argmax takes the first tied class while topk (the accuracy's) may take
    another: compare() counted agreement by argmax and hits by topk, so two models could "agree" on
    an image one of them got right and the other wrong. Both now come from one top-1."""
    tied = torch.zeros(1, 10)  # ten equal logits: argmax says class 0, topk picks another
    label = int(tied.topk(1, dim=1).indices[0, 0])
    assert label != int(tied.argmax(1)[0])  # the premise: the two disagree on this row
    first = torch.zeros(1, 10)
    first[0, 0] = 1.0  # a clear class 0
    inputs, labels = torch.zeros(1, 1), torch.tensor([label])
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=1)
    result = compare(_LookupModel(tied), _LookupModel(first), loader, progress=False)
    right_a, right_b = result.top1_correct_a, result.top1_correct_b
    assert (right_a, right_b) == ("1", "0")
    assert result.identical_top1 == 0.0  # one right, one wrong: not the same prediction


def test_nan_logits_name_the_image_file(image_folder) -> None:
    """The position of the first NaN image counted within the loader (under torchrun, within one
    process's share, with skipped images left out), which found no file; the file is named now."""
    import numpy as np
    from PIL import Image

    from dopq.data import make_loader, open_split

    root = image_folder("nan_named", splits=("test",), per_class=3)
    Image.new("RGB", (40, 40), "white").save(root / "test" / "b" / "1.jpg")
    (root / "test" / "a" / "2.jpg").write_bytes(b"not an image")  # skipped: the positions shift

    def to_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32) / 255).permute(2, 0, 1)

    dataset = open_split(root, "test", transform=to_tensor, skip_bad_images=True)

    class NanOnWhite(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            white = x.mean((1, 2, 3)) > 0.95
            return torch.where(white[:, None], float("nan"), 0.0).expand(len(x), 2)

    loader = make_loader(dataset, [1, 2, 3, 4, 5], batch_size=2)  # a share starting at the second image
    with pytest.raises(ModelError, match=r"\(first: .*b/1\.jpg\)"):
        evaluate(NanOnWhite(), loader, progress=False)
    with pytest.raises(ModelError, match=r"second model\): .*\(first: .*b/1\.jpg\)"):
        compare(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), NanOnWhite(), loader, progress=False)
