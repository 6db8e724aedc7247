"""Block reconstruction of one unit: what is learned, what stays fixed, and that it ends frozen."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from tqdm.auto import tqdm

import dopq
from dopq import reconstruct
from dopq.checkpoint import ReconstructionCheckpoint, RunIdentity
from dopq.config import ReconstructConfig
from dopq.modules import QuantLinear
from dopq.quantizers import DropNoise, UniformQuantizer
from dopq.reconstruct import (
    _sharded_gradient,
    _whole_batch_gradient,
    reconstruct_unit,
)
from dopq.unit_io import cache_unit_io, chained_units


@pytest.fixture(scope="module")
def block_and_data():
    torch.manual_seed(0)
    fp = timm.create_model("test_vit", num_classes=10).eval()
    images = torch.randn(16, 3, 160, 160)
    model = dopq.quantize(copy.deepcopy(fp), images[:8], dopq.get_preset("dopq", w_bits=3, a_bits=3))
    inputs = cache_unit_io(model, model.blocks[0], images, 8, output=False)
    targets = cache_unit_io(fp, fp.blocks[0], images, 8, output=True)
    return model.blocks[0], inputs, targets


def _run(block, inputs, targets, **settings):
    unit = copy.deepcopy(block)
    rcfg = ReconstructConfig(calib_size=16, iters=25, batch_size=8, **settings)
    stats = reconstruct_unit(
        unit, inputs, targets, rcfg, 25, torch.Generator().manual_seed(0), progress=False
    )
    return unit, stats


def _linears(unit):
    return [m for m in unit.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize("rounding", ["ste", "adaround"])
def test_unit_reconstruction_learns_rounding_steps_and_biases(block_and_data, rounding):
    block, inputs, targets = block_and_data
    unit, stats = _run(block, inputs, targets, rounding=rounding)
    assert stats["loss_after"] < stats["loss_before"]
    before, after = _linears(block), _linears(unit)
    assert any(not torch.equal(a.bias, b.bias) for a, b in zip(after, before, strict=True))
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(after, before, strict=True))
    for layer in after:  # baked weights are grid points of the (unchanged) weight quantizer
        assert isinstance(layer.weight_quantizer, UniformQuantizer)
        assert torch.allclose(layer.weight_quantizer(layer.weight), layer.weight, atol=1e-6)
    # LayerNorms are not learned; trainable flags are given back as they were
    assert torch.equal(unit.norm1.weight, block.norm1.weight)
    flags = {name: p.requires_grad for name, p in block.named_parameters()}
    assert {name: p.requires_grad for name, p in unit.named_parameters() if name in flags} == flags
    steps = [q.scale for q in unit.modules() if isinstance(q, UniformQuantizer) and q.scale.requires_grad]
    assert not steps
    assert all(q.drop_prob == 0.0 for q in unit.modules() if hasattr(q, "drop_prob"))


def test_bias_learning_can_be_switched_off(block_and_data):
    block, inputs, targets = block_and_data
    unit, _ = _run(block, inputs, targets, learn_bias=False)
    for a, b in zip(_linears(unit), _linears(block), strict=True):
        assert torch.equal(a.bias, b.bias)


def test_learned_weight_scales_end_in_the_weight_quantizers(block_and_data):
    block, inputs, targets = block_and_data
    unit, _ = _run(block, inputs, targets, learn_weight_scale=True, lr_weight_scale=1e-2)
    moved = [
        not torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale)
        for a, b in zip(_linears(unit), _linears(block), strict=True)
    ]
    assert all(moved)
    for layer in _linears(unit):
        assert torch.allclose(layer.weight_quantizer(layer.weight), layer.weight, atol=1e-6)


def test_chained_units_are_found_from_the_forward():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    plan_units = [("patch_embed", model.patch_embed)]
    plan_units += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    plan_units.append(("head", model.head))
    links = chained_units(model, plan_units, torch.randn(1, 3, 160, 160))
    # position embedding sits between patch embedding and block 0, norm and pooling before the head
    assert links == [False, False] + [True] * (len(model.blocks) - 1) + [False]


def test_chained_caching_gives_the_same_model_as_forwards_from_the_image(monkeypatch):
    torch.manual_seed(0)
    fp = timm.create_model("test_vit", num_classes=10).eval()
    images = torch.randn(12, 3, 160, 160)
    cfg = dopq.get_preset("dopq", w_bits=3, a_bits=3, reconstruct=ReconstructConfig(iters=5, batch_size=4))
    chained, _ = dopq.quantize_with_report(
        copy.deepcopy(fp), images[:6], cfg, recon_data=images, progress=False
    )
    monkeypatch.setattr(reconstruct, "chained_units", lambda model, units, sample: [False] * len(units))
    direct, _ = dopq.quantize_with_report(
        copy.deepcopy(fp), images[:6], cfg, recon_data=images, progress=False
    )
    with torch.no_grad():
        assert torch.equal(chained(images), direct(images))


def test_qdrop_follows_the_width_rule_unless_set(block_and_data):
    block, _, _ = block_and_data
    assert reconstruct.unit_bits(block) == 3
    assert (ReconstructConfig().drop_prob_for(3), ReconstructConfig().drop_prob_for(4)) == (0.5, 0.0)
    assert ReconstructConfig(drop_prob=0.2).drop_prob_for(4) == 0.2
    unit = copy.deepcopy(block)
    for rcfg, expected in ((ReconstructConfig(), 0.5), (ReconstructConfig(drop_prob=0.0), 0.0)):
        with reconstruct._trainable(unit, rcfg, torch.Generator()):
            learned = [q for q in unit.modules() if isinstance(q, UniformQuantizer) and q.scale.requires_grad]
            drops = {q.drop_prob for q in learned}
        assert drops == {expected}
    assert all(q.drop_prob == 0.0 for q in unit.modules() if hasattr(q, "drop_prob"))


def _act_steps(unit):
    return [q.scale for q in unit.modules() if isinstance(q, UniformQuantizer) and q.channel_axis is None]


def test_learned_activation_steps_stay_positive(block_and_data):
    """Adam moves a step by about its learning rate, which is absolute: with a rate far above the
    steps' size they crossed 0 (an invalid grid that OpenVINO's export computed differently)."""
    block, inputs, targets = block_and_data
    unit, _ = _run(block, inputs, targets, lr_act=1.0, learn_bias=False)
    steps = _act_steps(unit)
    assert steps and all(bool((s > 0).all()) for s in steps)
    floors = [reconstruct.STEP_FLOOR * s.abs() for s in _act_steps(block)]
    assert all(bool((s >= f).all()) for s, f in zip(steps, floors, strict=True))


def test_a_unit_that_training_made_worse_keeps_its_calibrated_state(block_and_data):
    block, inputs, targets = block_and_data
    unit, stats = _run(block, inputs, targets, lr_bias=1e3)  # biases thrown far off
    assert stats["kept_calibrated"] and stats["loss_after"] == stats["loss_before"]
    calibrated = block.state_dict()
    assert all(torch.equal(v, calibrated[k]) for k, v in unit.state_dict().items())


def _open_bars() -> list[tqdm]:
    return [bar for bar in list(tqdm._instances) if not bar.disable]


def test_a_stop_between_units_closes_the_run_bar(tmp_path):
    """Ctrl-C between two units (here: while the checkpoint of the first is written) closes the
    run's bar on the way out; left to the garbage collector, it was drawn again after the CLI's line
    saying the run stopped. (A unit's own bar closes with its loop.)"""

    class StoppedAfterUnit(ReconstructionCheckpoint):
        def write(self, model, stages, progress, units):
            super().write(model, stages, progress, units)
            if progress is not None:
                raise KeyboardInterrupt

    torch.manual_seed(0)
    fp = timm.create_model("test_vit", num_classes=10).eval()
    images = torch.randn(4, 3, 160, 160)
    config = dopq.get_preset("dopq", w_bits=4, a_bits=4, reconstruct=ReconstructConfig(iters=1, batch_size=4))
    checkpoint = StoppedAfterUnit(tmp_path, RunIdentity({"recipe": "test"}, "ab" * 32), progress_lines=False)
    with pytest.raises(KeyboardInterrupt) as stopped:
        dopq.quantize_with_report(fp, images, config, progress=True, checkpoint=checkpoint)
    assert stopped.tb is not None and _open_bars() == []


def test_qdrop_masks_of_a_slice_are_the_rows_of_the_whole_batch():
    """A batch computed slice by slice (gradient shards, in one process or several) sees the masks
    of one whole-batch forward: each quantizer call draws the whole batch's noise once per batch and
    takes its slice's rows (one per image, or Swin's windows: several per image), whichever slice
    comes first; a second call of one quantizer in a forward gets the next draw."""

    def quantizer() -> UniformQuantizer:
        q = UniformQuantizer(4)
        q.initialize(torch.randn(64), None)
        q.initialized.fill_(True)
        q.drop_prob = 0.5
        return q

    q, other = quantizer(), quantizer()
    x = torch.randn(6 * 3, 5)  # six images, three rows each
    q.drop_noise = other.drop_noise = whole_noise = DropNoise(torch.Generator().manual_seed(7))
    whole_noise.new_batch(6)
    whole = [q(x), other(x), q(x)]
    sliced = DropNoise(torch.Generator().manual_seed(7))
    q.drop_noise = other.drop_noise = sliced
    sliced.new_batch(6)
    for start, end in ((2, 4), (0, 2), (4, 6)):  # a process whose first shard is not the first
        sliced.take(start, end)
        rows = slice(3 * start, 3 * end)
        assert [torch.equal(q(x[rows]), whole[0][rows]), torch.equal(other(x[rows]), whole[1][rows]),
                torch.equal(q(x[rows]), whole[2][rows])] == [True] * 3  # fmt: skip
    sliced.new_batch(6)  # a new batch draws anew
    sliced.take(0, 2)
    assert not torch.equal(q(x[:6]), whole[0][:6])
    with pytest.raises(RuntimeError, match="not whole images"):
        q(x[6:13])


def test_gradient_shards_sum_to_the_whole_batch_gradient():
    """The sharded gradient is the whole batch's up to float summation order, and its loss the
    batch's mean loss."""
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
    inputs, targets = torch.randn(10, 3, 6), torch.randn(10, 3, 4)
    batch = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    params = list(unit.parameters())
    rec = _whole_batch_gradient(unit, inputs, targets, batch, None)
    whole = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    sharded = _sharded_gradient(unit, inputs, targets, batch, 3, params, DropNoise(None))
    assert torch.allclose(sharded, rec, rtol=1e-6)
    assert all(torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7) for p, g in zip(params, whole, strict=True))
