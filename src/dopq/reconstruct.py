"""Block reconstruction (BRECQ / QDrop / I&S-ViT family) over a calibrated quantized model.

Units (patch embedding, every transformer block, Swin patch merging, the head) are optimised one
after another so that the quantized unit, fed the quantized model's own input to it, reproduces
the float unit's output on the float input (MSE). Learned: weight rounding (AdaRound's variables,
straight-through or soft), activation step sizes (LSQ-style), the layers' biases, optionally weight
step sizes and TanQ's parameters; QDrop randomly keeps activations in float during optimisation.
Unit inputs and targets are cached on the accelerator when they fit in a quarter of its free memory
(no host round trip per step), else on the CPU, so that only one batch at a time sits on it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dopq import distributed
from dopq.config import QuantConfig, ReconstructConfig
from dopq.errors import ConfigError
from dopq.models import QuantPlan
from dopq.modules import QuantConv2d, QuantLinear, quantized_weight
from dopq.quantizers import DropNoise, Quantizer, TanQQuantizer, UniformQuantizer
from dopq.quantizers.adaround import AdaRoundQuantizer
from dopq.unit_io import apply_unit, bound_units, cache_unit_io, chained_units

__all__ = [
    "ReconstructionProgress",
    "block_loss",
    "check_processes",
    "reconstruct",
    "reconstruct_unit",
]

log = logging.getLogger(__name__)

ROUNDING_REG_WEIGHT = 0.01
WARMUP_FRACTION = 0.2
BETA_START, BETA_END = 20.0, 2.0
TANQ_LR = 1e-3
# a learned activation step may shrink a thousandfold, not reach or cross 0: Adam moves it by about
# its learning rate per step, which is absolute, and steps of 0.01-0.03 went negative on tiny models
STEP_FLOOR = 1e-3


@dataclasses.dataclass
class ReconstructionProgress:
    """Where a reconstruction stands between two units: everything the remaining units need
    besides the model itself (what a checkpoint holds to resume, ``dopq.checkpoint``).

    The optimiser and its schedule are made afresh for every unit, and each unit's cache is
    rebuilt from the images (bit-identical to the chained cache, ``tests/test_reconstruct.py``), so
    the two random streams are the only state carried from one unit to the next.

    Args:
        done: units finished, in forward order.
        names: every unit's name, in forward order.
        units: the finished units' statistics (``reconstruct``'s ``units`` entries).
        batch_rng: state of the generator that draws the batches (``torch.Generator.get_state``).
        drop_rng: state of the generator of the QDrop masks (on the model's device).
        seconds: time spent on the finished units, in this run and the runs it resumes.
    """

    done: int
    names: list[str]
    units: list[dict[str, Any]]
    batch_rng: torch.Tensor
    drop_rng: torch.Tensor
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.names)


def unit_bits(unit: nn.Module) -> int:
    """The narrowest width among a unit's quantizers (its recipe's min(w_bits, a_bits)): the QDrop
    rule's width when a unit is reconstructed on its own, without ``reconstruct``'s recipe."""
    return min((q.bits for q in unit.modules() if isinstance(q, Quantizer) and q.enabled), default=8)


@contextmanager
def _trainable(
    unit: nn.Module, rcfg: ReconstructConfig, noise: DropNoise
) -> Iterator[tuple[list, list, list, list]]:
    """Swap in AdaRound, make step sizes (biases, TanQ) learnable, turn QDrop on; undo on exit."""
    frozen = {p: p.requires_grad for p in unit.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    rounders, act_params, level_params, bias_params = [], [], [], []
    layers = [m for m in unit.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    if rcfg.learn_bias:
        bias_params = [layer.bias.requires_grad_(True) for layer in layers if layer.bias is not None]
    for layer in layers:
        if quantized_weight(layer) is not None:
            layer.weight_quantizer = AdaRoundQuantizer(
                layer.weight_quantizer,
                layer.weight,
                learn_scale=rcfg.learn_weight_scale,
                straight_through=rcfg.rounding == "ste",
            )
            rounders.append(layer.weight_quantizer)
    weight_bases = {id(r.base) for r in rounders}
    acts = [q for q in unit.modules() if isinstance(q, Quantizer) and id(q) not in weight_bases and q.enabled]
    drop_prob = rcfg.drop_prob_for(unit_bits(unit))
    for q in acts:
        q.drop_prob, q.drop_noise = drop_prob, noise
        if isinstance(q, UniformQuantizer):
            act_params.append(q.make_scale_learnable())
        elif isinstance(q, TanQQuantizer) and rcfg.learn_softmax:
            level_params += q.make_learnable()
    try:
        yield rounders, act_params, level_params, bias_params
    finally:
        for layer in layers:
            if isinstance(layer.weight_quantizer, AdaRoundQuantizer):
                ada = layer.weight_quantizer
                with torch.no_grad():  # in place on the parameter itself, so its version moves
                    layer.weight.copy_(ada.bake())
                layer.weight_quantizer = ada.base
        for q in acts:
            q.drop_prob, q.drop_noise = 0.0, None
        for p in act_params + level_params:
            p.requires_grad_(False)
        for p, flag in frozen.items():
            p.requires_grad_(flag)


def _image_losses(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # squared error summed over features, one per image
    return (out - target).pow(2).flatten(1).sum(1)


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The squared error summed over features, averaged over images (BRECQ's reconstruction loss)."""
    return _image_losses(out, target).mean()


def _rounding_penalty(rounders: list[AdaRoundQuantizer], progress: float) -> torch.Tensor:
    """AdaRound's regularizer at ``progress`` (0 to 1) through the annealing of its beta."""
    beta = BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(math.pi * progress))
    return ROUNDING_REG_WEIGHT * sum(r.regularizer(beta) for r in rounders)


def _whole_batch_gradient(
    unit: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch: torch.Tensor,
    regularizer: Callable[[], torch.Tensor] | None,
) -> torch.Tensor:
    """Gradients of the batch's loss (plus the regularizer's) from one forward and backward; the loss."""
    device = next(unit.parameters()).device
    out = unit(inputs[batch].to(device, non_blocking=True))
    rec = block_loss(out, targets[batch].to(device, non_blocking=True))
    (rec if regularizer is None else rec + regularizer()).backward()
    return rec.detach()


def _sharded_gradient(
    unit: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch: torch.Tensor,
    shards: int,
    trained: list[nn.Parameter],
    noise: DropNoise,
) -> torch.Tensor:
    """Gradients of the batch's loss as the sum, in shard order, of ``shards`` fixed contiguous
    shards' gradients; the loss.

    Each process computes its share of the shards (all of them in one process), the shards'
    gradients are gathered by copying, and every process adds them up in the same order: the same
    bits on any number of processes up to ``shards``.
    """
    device = next(unit.parameters()).device
    group = distributed.current()
    rows = []
    for k in range(*distributed.shard_bounds(shards, group.rank, group.world_size)):
        start, end = distributed.shard_bounds(len(batch), k, shards)
        noise.take(start, end)
        idx = batch[start:end]
        out = unit(inputs[idx].to(device, non_blocking=True))
        loss = _image_losses(out, targets[idx].to(device, non_blocking=True)).sum() / len(batch)
        grads = torch.autograd.grad(loss, trained, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for p, g in zip(trained, grads, strict=True)]
        rows.append(torch.cat([*(g.flatten() for g in flat), loss.detach().reshape(1)]))
    every = distributed.gather_shards(torch.stack(rows), shards)
    total = every[0].clone()
    for row in every[1:]:
        total += row
    offset = 0
    for p in trained:
        p.grad = total[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return total[-1]


@torch.no_grad()
def _probe_loss(
    unit: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    probe: torch.Tensor,
    without_drop: bool = False,
) -> float:
    device = next(unit.parameters()).device
    quantizers = [q for q in unit.modules() if isinstance(q, Quantizer)] if without_drop else []
    saved = [q.drop_prob for q in quantizers]
    for q in quantizers:
        q.drop_prob = 0.0
    try:
        return float(block_loss(unit(inputs[probe].to(device)), targets[probe].to(device)))
    finally:
        for q, p in zip(quantizers, saved, strict=True):
            q.drop_prob = p


def _parameter_groups(
    rcfg: ReconstructConfig,
    iters: int,
    rounders: list[Any],
    act_params: list[nn.Parameter],
    level_params: list[nn.Parameter],
    bias_params: list[nn.Parameter],
) -> list[dict[str, Any]]:
    """Adam's parameter groups, each kind at its own learning rate; empty kinds are left out (the
    order of the groups is part of the recipe: it fixes Adam's arithmetic)."""
    groups = []
    if rounders:
        groups.append({"params": [r.alpha for r in rounders], "lr": rcfg.lr_weight_for(iters)})
    if act_params:
        groups.append({"params": act_params, "lr": rcfg.lr_act_for(iters)})
    if level_params:
        groups.append({"params": level_params, "lr": TANQ_LR})
    if bias_params:
        groups.append({"params": bias_params, "lr": rcfg.lr_bias_for(iters)})
    if rounders and rcfg.learn_weight_scale:
        groups.append({"params": [r.log_gain for r in rounders], "lr": rcfg.lr_weight_scale})
    return groups


def reconstruct_unit(
    unit: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    rcfg: ReconstructConfig,
    iters: int,
    generator: torch.Generator,
    desc: str = "unit",
    progress: bool = True,
    drop_generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Optimise one unit; returns its loss before and after (on a fixed probe batch).

    ``generator`` draws the batches; ``drop_generator`` (on the unit's device; by default a new one
    seeded with ``rcfg.seed``) the QDrop masks. The caller's global random state is not touched.
    """
    device = next(unit.parameters()).device
    if drop_generator is None:
        drop_generator = torch.Generator(device=device).manual_seed(rcfg.seed)
    noise = DropNoise(drop_generator)
    probe = torch.arange(min(inputs.shape[0], rcfg.batch_size))
    before = _probe_loss(unit, inputs, targets, probe)
    soft = before
    if iters == 0:
        return {"loss_before": before, "loss_soft": before, "loss_after": before}
    calibrated = {k: v.detach().clone() for k, v in unit.state_dict().items()}
    with _trainable(unit, rcfg, noise) as (rounders, act_params, level_params, bias_params):
        groups = _parameter_groups(rcfg, iters, rounders, act_params, level_params, bias_params)
        if groups:
            opt = torch.optim.Adam(groups)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
            warmup = int(WARMUP_FRACTION * iters)
            bar = tqdm(range(iters), desc=desc, disable=not progress, leave=False, mininterval=1.0)
            trained = [p for g in groups for p in g["params"]]
            step_floors = [STEP_FLOOR * p.detach().abs() for p in act_params]
            for step in bar:
                batch = torch.randint(inputs.shape[0], (rcfg.batch_size,), generator=generator)
                noise.new_batch(len(batch))
                regularizer = None
                if rounders and rcfg.rounding == "adaround" and step >= warmup:
                    regularizer = functools.partial(
                        _rounding_penalty, rounders, (step - warmup) / max(1, iters - warmup)
                    )
                opt.zero_grad(set_to_none=True)
                if rcfg.grad_shards == 1:
                    rec = _whole_batch_gradient(unit, inputs, targets, batch, regularizer)
                else:
                    rec = _sharded_gradient(unit, inputs, targets, batch, rcfg.grad_shards, trained, noise)
                    if regularizer is not None:  # the same on every process: added after the shards
                        regularizer().backward()
                opt.step()
                _keep_steps_positive(act_params, step_floors)
                sched.step()
                if step % 20 == 0:
                    bar.set_postfix(rec=f"{rec.item():.4g}")
        soft = _probe_loss(unit, inputs, targets, probe, without_drop=True)
    after = _probe_loss(unit, inputs, targets, probe)
    if after > before:  # training made the unit worse on its own probe images: keep calibration's
        unit.load_state_dict(calibrated)
        log.warning(
            "%s: reconstruction raised the unit's loss (%.4g -> %.4g); kept the calibrated unit",
            desc,
            before,
            after,
        )
        return {"loss_before": before, "loss_soft": soft, "loss_after": before, "kept_calibrated": True}
    return {"loss_before": before, "loss_soft": soft, "loss_after": after}


def check_processes(grad_shards: int) -> None:
    """Reconstruction shares each batch's ``grad_shards`` gradient shards out among the processes,
    so that any number of them up to ``grad_shards`` gives the one-process model.

    Raises:
        DistributedError: more processes than shards (a process would have no shard).
    """
    world_size = distributed.current().world_size
    if world_size > grad_shards:
        raise distributed.DistributedError(
            f"reconstruction on {world_size} processes needs --recon-grad-shards (ReconstructConfig.grad_shards) "
            f"of at least {world_size}, got {grad_shards}: each batch's gradient is then summed over that many "
            "fixed shards, and one process or up to that many give the same model"
        )


@torch.no_grad()
def _keep_steps_positive(steps: list[nn.Parameter], floors: list[torch.Tensor]) -> None:
    for step, floor in zip(steps, floors, strict=True):
        step.copy_(torch.maximum(step, floor))


def reconstruct(
    model: nn.Module,
    fp_model: nn.Module,
    plan: QuantPlan,
    images: torch.Tensor,
    config: QuantConfig,
    progress: bool = True,
    resume_from: ReconstructionProgress | None = None,
    after_unit: Callable[[ReconstructionProgress], None] | None = None,
) -> dict[str, Any]:
    """Reconstruct every unit of ``model`` in forward order against ``fp_model``.

    Args:
        model: calibrated and re-parameterized quantized model (changed in place).
        fp_model: the float model before quantization (same architecture).
        plan: from ``prepare_model``; gives the units.
        images: reconstruction images ``(N, 3, H, W)``, kept on CPU.
        config: the recipe; ``config.reconstruct`` holds the settings.
        progress: show progress bars.
        resume_from: go on after the units it says are done (``model`` must hold them): the
            result is then the one an uninterrupted run gives.
        after_unit: called after each unit with the progress so far (e.g. to write a checkpoint).

    Returns:
        Per-unit losses and times plus totals, JSON-ready.
    """
    rcfg = config.reconstruct
    if rcfg is None:
        raise ConfigError("reconstruct() needs a recipe with reconstruction settings (config.reconstruct)")
    check_processes(rcfg.grad_shards)
    bits = min(config.w_bits, config.a_bits)
    iters = rcfg.iters_for(bits)
    rcfg = dataclasses.replace(rcfg, drop_prob=rcfg.drop_prob_for(bits))  # the recipe's rule, like iters
    device = next(model.parameters()).device
    fp_model = fp_model.to(device).eval()
    generator = torch.Generator().manual_seed(rcfg.seed)  # batch order
    drop_generator = torch.Generator(device=device).manual_seed(rcfg.seed)  # QDrop masks
    q_units = plan.adapter.units(model)
    fp_units = plan.adapter.units(fp_model)
    names = [name for name, _ in q_units]
    cache_bs = max(rcfg.batch_size, 64)
    links = chained_units(model, q_units, images[:1].to(device))
    q_calls = bound_units(model, q_units, images[:1].to(device))
    fp_calls = bound_units(fp_model, fp_units, images[:1].to(device))
    fp_units = dict(fp_units)
    done, seconds_before, stats = _resume(resume_from, names, generator, drop_generator)
    t_start = time.perf_counter()
    previous: tuple[nn.Module, torch.Tensor, torch.Tensor] | None = None  # unit, its inputs, its targets
    todo = itertools.islice(zip(q_units, links, strict=True), done, None)
    # closed however the run ends: a bar left open past a Ctrl-C was drawn again (by the garbage
    # collector) after the line saying the run stopped
    outer = tqdm(total=len(q_units), initial=done, desc="reconstruct", disable=not progress, unit="block")
    with outer:
        for (name, unit), chained in todo:
            t0 = time.perf_counter()
            if chained and previous is not None:
                # the previous (already reconstructed) unit's outputs are this unit's inputs, and the float
                # targets it was fitted to are this float unit's inputs: one unit's work, not a forward
                # (unpacked and dropped first, so each cached tensor is freed as soon as it is used)
                prev_unit, prev_inputs, fp_inputs = previous
                previous = None
                inputs = apply_unit(prev_unit, prev_inputs, cache_bs)
                del prev_inputs
                targets = apply_unit(fp_calls[name], fp_inputs, cache_bs)
                del fp_inputs
            else:
                previous = None
                inputs = cache_unit_io(model, unit, images, cache_bs, output=False)
                targets = cache_unit_io(fp_model, fp_units[name], images, cache_bs, output=True)
            t_cache = time.perf_counter() - t0
            res = reconstruct_unit(
                q_calls[name],
                inputs,
                targets,
                rcfg,
                iters,
                generator,
                desc=name,
                progress=progress,
                drop_generator=drop_generator,
            )
            res.update(unit=name, seconds=time.perf_counter() - t0, cache_seconds=t_cache, chained=chained)
            stats.append(res)
            log.info("reconstructed %s in %.1f s: block loss %.4g -> %.4g", name, res["seconds"],
                     res["loss_before"], res["loss_after"])  # fmt: skip
            outer.update()
            outer.set_postfix(unit=name, loss=f"{res['loss_after']:.4g}")
            previous = (q_calls[name], inputs, targets)
            del inputs, targets
            if after_unit is not None:
                after_unit(
                    ReconstructionProgress(
                        done=len(stats),
                        names=names,
                        units=stats,
                        batch_rng=generator.get_state(),
                        drop_rng=drop_generator.get_state(),
                        seconds=seconds_before + time.perf_counter() - t_start,
                    )
                )
    return _summary(rcfg, iters, int(images.shape[0]), seconds_before + time.perf_counter() - t_start, stats)


def _resume(
    resume_from: ReconstructionProgress | None,
    names: list[str],
    generator: torch.Generator,
    drop_generator: torch.Generator,
) -> tuple[int, float, list[dict[str, Any]]]:
    """Units done, seconds spent and per-unit stats so far; the random states set where the
    interrupted run left them (nothing done without a progress to resume)."""
    if resume_from is None:
        return 0, 0.0, []
    if resume_from.names != names:
        raise ValueError(f"the progress to resume is for units {resume_from.names}, not {names}")
    generator.set_state(resume_from.batch_rng)
    drop_generator.set_state(resume_from.drop_rng)
    return resume_from.done, resume_from.seconds, [dict(u) for u in resume_from.units]


def _summary(
    rcfg: ReconstructConfig, iters: int, images: int, seconds: float, units: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON-ready record of a reconstruction: its settings as used and the per-unit results."""
    return {
        "iters_per_unit": iters,
        "rounding": rcfg.rounding,
        "drop_prob": rcfg.drop_prob,
        "lr_weight": rcfg.lr_weight_for(iters),
        "lr_act": rcfg.lr_act_for(iters),
        "lr_bias": rcfg.lr_bias_for(iters) if rcfg.learn_bias else None,
        "images": images,
        "batch_size": rcfg.batch_size,
        "seconds": seconds,
        "units": units,
    }
