"""The deploy benchmark's timing loop: interleaved repeats, every repeat kept."""

from __future__ import annotations

from conftest import benchmark_module


def test_deploy_timing_interleaves_the_models_and_keeps_every_repeat() -> None:
    """Each repeat runs every model once, in turn (load from anything else falls on all alike), after
    one warm-up call each; every repeat's time is returned, and its mean over ``inner`` calls."""
    bench = benchmark_module("deploy")
    calls: list[str] = []
    models = {name: (lambda batch, name=name: calls.append(name)) for name in ("fp32", "w8a8", "w4a8")}
    times = bench.interleaved_times(models, None, repeats=3, inner=2)
    assert calls == ["fp32", "w8a8", "w4a8"] + ["fp32", "fp32", "w8a8", "w8a8", "w4a8", "w4a8"] * 3
    assert {k: len(v) for k, v in times.items()} == {"fp32": 3, "w8a8": 3, "w4a8": 3}
    assert set(bench.timed_runs(models, None, repeats=3)) == set(models)
