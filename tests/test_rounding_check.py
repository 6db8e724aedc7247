"""The GPTQ check: a signed-rank test on the calibration images' logit KL keeps the better rounding."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import timm
import torch

import dopq
import dopq.stats as stats_module
from dopq.modules import QuantConv2d, QuantLinear
from dopq.rounding_check import can_keep_gptq, compare_roundings, kl_divergence, last_output, logit_kl
from dopq.stats import fixed_broken, paired_sign_test, sign_test_p, signed_rank_test


def test_fixed_broken_counts_the_images_each_model_alone_gets_right() -> None:
    assert fixed_broken("110100", "101100") == (1, 1)
    assert fixed_broken("1111", "0000") == (4, 0)
    assert fixed_broken("0101", "0101") == (0, 0)
    with pytest.raises(ValueError):  # records of different test sets are not paired
        fixed_broken("101", "10")


def test_paired_sign_test_records_counts_and_p_and_refuses_other_test_sets() -> None:
    assert paired_sign_test("111111", "000000") == {"gained": 6, "lost": 0, "p": pytest.approx(2 / 64)}
    assert paired_sign_test("0101", "0101") == {"gained": 0, "lost": 0, "p": 1.0}
    assert paired_sign_test("101", "10") is None  # different images: no paired record


def test_sign_test_p_matches_the_binomial_tails() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)  # the smallest sample that can reach 0.05
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)  # ... which 5 images never do
    assert sign_test_p(24, 8) == pytest.approx(0.00700, abs=1e-5)
    assert sign_test_p(8, 24) == sign_test_p(24, 8)


def _enumerated_signed_rank_p(d: list[float]) -> float:
    """The two-sided p by flipping every sign (mean ranks for ties, zeros dropped): the definition."""
    d = [x for x in d if x != 0]
    mags = sorted(abs(x) for x in d)
    rank = {m: (mags.index(m) + 1 + len(mags) - mags[::-1].index(m)) / 2 for m in mags}
    ranks = [rank[abs(x)] for x in d]
    observed = sum(r for r, x in zip(ranks, d, strict=True) if x > 0)
    sums = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product((0, 1), repeat=len(d))
    ]
    low = sum(t <= observed + 1e-9 for t in sums) / len(sums)
    high = sum(t >= observed - 1e-9 for t in sums) / len(sums)
    return min(1.0, 2 * min(low, high))


@pytest.mark.parametrize(
    "d",
    [
        [1.5, -0.5, 2.0, 3.0, -0.25, 4.0, 0.75, 5.0],
        [1.0, 1.0, -1.0, 2.0, 2.0, -2.0, 0.0, 3.0, -0.5, 0.5, 0.5, 4.0],  # ties and a zero
        [-3.0, -1.0, -2.0, -4.0, 0.5, -5.0, -6.0, -7.0, -8.0, 9.0],
    ],
)
def test_signed_rank_p_is_the_sign_flip_distribution(d: list[float]) -> None:
    share, p = signed_rank_test(torch.tensor(d))
    assert p == pytest.approx(_enumerated_signed_rank_p(d), rel=1e-12)
    positive = [x for x in d if x > 0]
    assert (share > 0.5) == (sum(positive) > -sum(x for x in d if x < 0))  # these examples agree


def test_signed_rank_p_against_scipy_and_its_normal_form(monkeypatch) -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    d = torch.randn(32, generator=g, dtype=torch.float64) + 0.4
    assert signed_rank_test(d)[1] == pytest.approx(stats.wilcoxon(d.numpy(), method="exact").pvalue, rel=1e-9)
    assert signed_rank_test(torch.zeros(5)) == (0.5, 1.0)
    assert signed_rank_test(torch.ones(5))[1] == pytest.approx(2 / 32)  # 5 images never reach 0.05
    assert signed_rank_test(torch.ones(6))[1] == pytest.approx(2 / 64)
    big = torch.randn(300, generator=g, dtype=torch.float64) + 0.15
    exact = signed_rank_test(big)[1]
    monkeypatch.setattr(stats_module, "EXACT_SIGNED_RANK_MAX", 100)
    approx = signed_rank_test(big)[1]
    assert approx == pytest.approx(
        stats.wilcoxon(big.numpy(), method="approx", correction=True).pvalue, rel=1e-9
    )
    assert approx == pytest.approx(exact, rel=0.05)


def test_the_check_weighs_how_much_each_image_moved() -> None:
    """A gain the sign test cannot see (20 images better, 12 worse) is kept when the gains are the
    large moves, and a majority of tiny gains against a few large losses is not."""
    nearest = torch.full((32,), 1.0)
    large_gains = torch.cat([torch.linspace(0.2, 0.5, 20), torch.linspace(1.01, 1.05, 12)])
    check = compare_roundings(nearest, large_gains)
    assert sign_test_p(check.gptq_better, check.gptq_worse) > 0.2
    assert check.keep_gptq and check.p < 0.01 and check.rank_share > 0.5
    small_gains = torch.cat([torch.linspace(0.95, 0.99, 22), torch.linspace(1.5, 2.0, 10)])
    check = compare_roundings(nearest, small_gains)
    assert (check.gptq_better, check.gptq_worse) == (22, 10) and check.rank_share < 0.5
    assert not check.keep_gptq


def test_gptq_is_kept_only_when_it_wins_significantly() -> None:
    nearest = torch.full((32,), 1.0)
    clear = torch.cat([torch.full((24,), 0.5), torch.full((8,), 1.5)])
    assert compare_roundings(nearest, clear).keep_gptq
    coin = torch.cat([torch.full((18,), 0.5), torch.full((14,), 1.5)])
    check = compare_roundings(nearest, coin)
    assert not check.keep_gptq and (check.gptq_better, check.gptq_worse) == (18, 14)
    # a significant loss is not a reason to keep it either
    assert not compare_roundings(clear, nearest).keep_gptq
    assert not compare_roundings(nearest, nearest).keep_gptq  # all ties


def test_logit_kl_is_zero_against_itself_and_positive_otherwise() -> None:
    model = torch.nn.Linear(5, 4)
    x = torch.randn(3, 5)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(logit_kl(model, x, ref), torch.zeros(3), atol=1e-6, rtol=0)
    assert (logit_kl(model, x, ref + torch.randn(3, 4)) > 0).all()
    # against a hand-computed divergence of two 2-class distributions
    p, q = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kl_divergence(q.log(), p.log())) == pytest.approx(want, rel=1e-6)


def test_last_output_holds_the_latest_forward() -> None:
    model = torch.nn.Linear(3, 2)
    a, b = torch.randn(1, 3), torch.randn(4, 3)
    with last_output(model) as seen:
        model(a)
        out = model(b)
    assert torch.equal(seen.value, out.detach())
    model(a)  # the hook is gone after the block
    assert seen.value.shape == (4, 2)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("keep", [True, False])
def test_checked_model_is_exactly_one_of_the_two_roundings(monkeypatch, keep: bool) -> None:
    """Whichever rounding the check keeps, the model is bit for bit that recipe's model without the check."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(8, 3, 160, 160)
    gptq = dopq.get_preset("dopq", w_bits=4, a_bits=4, weight_rounding="gptq", gptq_damp=1.0)
    expected_config = gptq if keep else gptq.replace(weight_rounding="nearest")
    expected, _ = dopq.quantize_with_report(copy.deepcopy(model), x, expected_config, progress=False)
    # force the decision: the statistics are tested above, the model surgery here
    real = compare_roundings

    def forced(kl_nearest, kl_gptq, alpha=0.05):
        return real(kl_nearest, kl_gptq - 1.0 if keep else kl_gptq + 1.0, alpha)

    monkeypatch.setattr("dopq.rounding_check.compare_roundings", forced)
    with torch.no_grad():
        float_out = model(x)
    checked, report = dopq.quantize_with_report(model, x, gptq.replace(gptq_check=True), progress=False)
    want, got = _weights(expected), _weights(checked)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    with torch.no_grad():
        assert torch.equal(expected(x), checked(x))
    check = report.to_dict()["gptq"]["check"]
    assert check["kept"] is keep and check["images_better"] + check["images_worse"] <= 8
    assert report.timings["gptq_check"] > 0
    # the divergence the check computed (partly from the bias-correction pass) is the kept model's
    # (the forced decision moved GPTQ's by 1)
    computed = check["kl_gptq"] + 1.0 if keep else check["kl_nearest"]
    fresh = float(logit_kl(checked, x, float_out).mean())
    assert computed == pytest.approx(fresh, rel=1e-3)
    layers = [m for m in checked.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    on_grid = all(torch.equal(m.weight_quantizer(m.weight), m.weight) for m in layers)
    assert on_grid is keep  # GPTQ stores grid points; round-to-nearest keeps the float weights


def test_with_too_few_images_for_the_check_gptq_is_not_run_and_the_model_is_nearests(monkeypatch) -> None:
    """Under 6 images no signed-rank outcome reaches p < 0.05, so the check would put round-to-nearest
    back whatever GPTQ did: GPTQ is not run (minutes on a large model), the model is the same."""
    assert [can_keep_gptq(n) for n in (1, 5, 6, 32)] == [False, False, True, True]
    for n in (5, 6):  # the bound is the test's: every image on GPTQ's side
        assert (signed_rank_test(torch.arange(1.0, n + 1))[1] < 0.05) is can_keep_gptq(n)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(5, 3, 160, 160)
    gptq = dopq.get_preset("dopq", w_bits=4, a_bits=4, weight_rounding="gptq", gptq_check=True)
    expected, _ = dopq.quantize_with_report(
        copy.deepcopy(model), x, gptq.replace(weight_rounding="nearest", gptq_check=False), progress=False
    )

    def no_gptq(*args, **kwargs):
        raise AssertionError("GPTQ ran although its check cannot keep it")

    monkeypatch.setattr("dopq.api.gptq_model", no_gptq)
    checked, report = dopq.quantize_with_report(model, x, gptq, progress=False)
    want, got = _weights(expected), _weights(checked)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert report.to_dict()["gptq"]["skipped"] == "too few images"


def test_cli_switch_reaches_the_config() -> None:
    from dopq.cli import _config_from, build_parser

    args = build_parser().parse_args(
        ["quantize", "--model", "m", "--data", "d", "--weight-rounding", "gptq", "--gptq-check", "on"]
    )
    assert _config_from(args).gptq_check
