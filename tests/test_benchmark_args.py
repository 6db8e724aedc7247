"""benchmarks/run.py's arguments: a recipe name that matches nothing is refused before any work."""

from __future__ import annotations

import pytest

from conftest import benchmark_module
from dopq.errors import ConfigError


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


def test_calib_gains_rows_named_for_tanq_run_tanq_at_every_width() -> None:
    """At 8-bit activations dopq's post-Softmax grid is uniform: a row changing TanQ's centres or
    midpoints there ran dopq's model again under a TanQ label (its config differed only in fields
    nothing read, so it was not taken for dopq's row either)."""
    gains = benchmark_module("calib_gains")
    widths = [(w_bits, a_bits) for w_bits in range(2, 9) for a_bits in range(2, 9)]
    recipes = {width: gains.calib_gain_recipes(*width) for width in widths}
    for width, rows in recipes.items():
        for label, config in rows.items():
            if "tanq" in label or "midpoints" in label:
                assert config.softmax_quantizer == "tanq", (label, width)
    tanq_rows = {"dopq+tanq-wide", "dopq+gptq+tanq-wide", "dopq+exact-midpoints"}
    # below 8-bit activations they run, and --recipes knows them (its names are those of W4/A4)
    assert all(tanq_rows <= set(rows) for (_, a_bits), rows in recipes.items() if a_bits < 8)
    deploy = benchmark_module("deploy")
    assert deploy.deploy_config("dopq+tanq-wide", 4, 4).tanq_centers == (0.35, 0.5, 0.65, 0.8, 0.9)
    with pytest.raises(ConfigError, match="dopq\\+tanq-wide at W4/A8: dopq's post-Softmax grid is uniform"):
        deploy.deploy_config("dopq+tanq-wide", 4, 8)  # deploy --deploy-methods takes these names too


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calib-gains", "--widths", "4x4"], "argument --widths: expected W/A with each in 2..8"),
        (["deploy", "--widths", "4/"], "argument --widths: expected W/A"),
        (["calib-gains", "--widths", "9/9"], "argument --widths: expected W/A with each in 2..8"),
        (["ablation", "--bits", "9"], "argument --bits: invalid choice: 9"),
        (["ablation", "--models", "deit"], "argument --models: invalid choice: 'deit'"),
        (["ablation", "--models", "stress"], "--models stress: only calib-gains and error-budget"),
        (["timing", "--threads", "-1"], "argument --threads: invalid non-negative integer value: '-1'"),
        (["foundation", "--eval-subset", "0"], "argument --eval-subset: invalid positive integer value: '0'"),
        (["calib-gains", "--repeats", "0"], "argument --repeats: invalid positive integer value: '0'"),
    ],
)
def test_a_bad_argument_is_one_error_line_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Malformed widths, bits out of range, an unknown model or a negative count stopped a suite with a
    traceback (ValueError, KeyError, ConfigError), some after loading the model and data."""
    run = _run_module(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        run.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_input_found_by_a_suite_is_one_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """dopq's own input errors (a missing data archive) end the run as the dopq command ends it."""
    from dopq.errors import DataError

    run = _run_module(monkeypatch)

    def missing(*args: object, **kwargs: object) -> None:
        raise DataError("data path /nowhere/cifar10.tar does not exist")

    monkeypatch.setattr(run, "workload", missing)
    with pytest.raises(SystemExit) as stop:
        run.main(["ablation", "--data-file", "cifar10.tar"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(": error: data path /nowhere/cifar10.tar does not exist")


def test_hf_deit_without_its_float_pass_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf-deit --hf-skip-fp`` (a command its docstring gives) saved its file, then stopped with a
    KeyError printing the float comparison it had skipped."""
    run = _run_module(monkeypatch)
    import hf_deit  # the module run.py dispatches to, by name

    monkeypatch.setattr(hf_deit, "run", lambda args: {"suite": "hf_deit_tiny", "rows": []})
    saved: dict[str, object] = {}
    monkeypatch.setattr(run, "save", lambda name, payload: saved.update({name: payload}))
    run.main(["hf-deit", "--bits", "3", "--suffix", "_w3", "--hf-skip-fp"])
    assert list(saved) == ["hf_deit_tiny_w3"]
