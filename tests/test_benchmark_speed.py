"""The speed benchmark's images/s: the models' passes alternate within one run."""

from __future__ import annotations

import torch
from torch import nn

from conftest import benchmark_module


class _Named(nn.Module):
    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        return x


def test_images_per_second_interleaves_the_models_after_one_warm_up_pass_each() -> None:
    """FP was timed in a block of passes, then each quantized model in its own: a load change
    between the blocks moved the "x FP" ratio."""
    speed = benchmark_module("speed")
    calls: list[str] = []
    models = {name: _Named(name, calls) for name in ("fp", "dopq_w4a4", "dopq_w3a3")}
    images = torch.zeros(6, 3)
    speeds = speed.images_per_second(models, images, batch=3, repeats=2)  # two batches per pass
    per_pass = [calls[i] for i in range(0, len(calls), 2)]
    assert per_pass == ["fp", "dopq_w4a4", "dopq_w3a3"] * 3  # warm-up, then two interleaved rounds
    assert set(speeds) == set(models) and all(v > 0 for v in speeds.values())
