"""benchmarks/run.py's arguments: a recipe name that matches nothing is refused before any work."""

from __future__ import annotations

import pytest

from conftest import benchmark_module


def _run_module(monkeypatch: pytest.MonkeyPatch):
    """benchmarks/run.py with its workload and writes replaced: a suite that gets past the argument
    check stops at once instead of loading models and writing results."""
    run = benchmark_module("run")

    def no_workload(*args: object, **kwargs: object) -> None:
        raise AssertionError("the suite started")

    monkeypatch.setattr(run, "workload", no_workload)
    monkeypatch.setattr(run, "save", lambda *args, **kwargs: None)
    return run


@pytest.mark.parametrize("suite", ["calib-gains", "calib-gains-timing", "ablation", "stress"])
def test_an_unknown_recipe_name_is_refused_instead_of_running_nothing(
    suite: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--recipes`` filters the suite's recipes by name; a misspelt one ran no recipe, wrote
    nothing and exited 0."""
    run = _run_module(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run.main([suite, "--recipes", "dopq", "recommended+gptq-dl"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"--recipes recommended+gptq-dl: not a {suite} recipe; choose from" in err


def test_calib_gains_timing_needs_dopq_among_its_recipes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every recipe's time is reported against dopq's: without it the suite ran and then failed."""
    run = _run_module(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run.main(["calib-gains-timing", "--recipes", "recommended"])
    assert stop.value.code == 2
    assert "add dopq to --recipes" in capsys.readouterr().err


def test_every_recipe_name_the_docs_run_is_known() -> None:
    """The names the docs' calib-gains and ablation commands use pass the check."""
    run = benchmark_module("run")
    gains = run.recipe_labels("calib-gains")
    assert {"dopq", "recommended", "repq", "recommended+gptq-d1-check", "dopq+gptq-float-half"} <= set(gains)
    assert {"repq+tanq", "repq+exact-zp", "dopq"} <= set(run.recipe_labels("ablation"))
    assert run.recipe_labels("deploy") is None
