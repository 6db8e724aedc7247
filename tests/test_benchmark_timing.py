"""The benchmarks' timing loops: interleaved repeats, every repeat kept."""

from __future__ import annotations

import torch

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


def test_timing_alternates_repq_and_dopq_within_each_repeat(monkeypatch, tmp_path) -> None:
    """``run.py timing`` ran every repq repeat, then every dopq one: a load that came or went
    between the two blocks moved the ratio. The medians are of each method's own times."""
    import types

    import dopq.api

    run = benchmark_module("run")
    calls: list[str] = []
    seconds = iter([5.0, 1.0, 3.0, 2.0, 4.0, 9.0])  # repq, dopq, repq, dopq, ...

    def fake_quantize(model, images, config, progress=False):
        calls.append("dopq" if config.softmax_quantizer == "tanq" else "repq")
        return model, types.SimpleNamespace(calib_seconds=next(seconds))

    work = types.SimpleNamespace(
        model=torch.nn.Linear(2, 2), calib_images=None, settings=types.SimpleNamespace()
    )
    saved = {}
    monkeypatch.setattr(dopq.api, "quantize_with_report", fake_quantize)
    monkeypatch.setattr(run, "workload", lambda args, arch: work)
    monkeypatch.setattr(run, "save", lambda name, payload: saved.update(payload))
    run.main(["timing", "--repeats", "3", "--results-dir", str(tmp_path)])
    assert calls == ["repq", "dopq"] * 3
    assert saved["repq"] == {"calib_seconds": [5.0, 3.0, 4.0], "median": 4.0}
    assert saved["dopq"] == {"calib_seconds": [1.0, 2.0, 9.0], "median": 2.0}
    assert saved["dopq_over_repq"] == 0.5


def test_deploy_throughput_counts_the_images_its_batch_holds(monkeypatch, tmp_path) -> None:
    """With ``--eval-subset`` under 32 the timed batch holds fewer images, but images/s divided 32 by
    the batch's time: an 8-image run reported four times its speed."""
    import time
    import types

    import dopq.export

    deploy = benchmark_module("deploy")

    def runtime(path, kind, threads):
        return lambda batch: time.sleep(1e-3 * batch.shape[0])  # 1 ms per image

    monkeypatch.setattr(dopq.export, "load_runtime", runtime)
    fp = tmp_path / "fp32.onnx"
    fp.write_bytes(b"0" * 10)
    models = {"fp32": {"path": fp, "w_bits": 32, "a_bits": 32, "runtimes": ("onnxruntime",)}}
    work = types.SimpleNamespace(eval_dataset=[(torch.zeros(3), 0)] * 8, eval_indices=list(range(8)))
    (row,) = deploy._deploy_timing(types.SimpleNamespace(repeats=2), work, "probe", models, 1)
    deploy._RUNNERS.clear()
    assert row["images_per_second"] < 1000  # 8 images at 1 ms each: about 900, never 32 / 8 ms = 4000
    assert row["batch"] == 8
    assert row["images_per_second"] == row["fp32_images_per_second"] and row["throughput_ratio"] == 1.0
