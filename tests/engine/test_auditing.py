"""The one-run audit's statistics against independent references, and the engine audited with Dirac canaries.

References: the bound recomputed from its definition with exact binomial coefficients; Monte-Carlo runs of
randomised response (the worst case of ε-DP, where the bound is tight) and of an (ε, δ)-DP mechanism that
reveals a bit with probability δ; the values printed in Steinke, Nasr & Jagielski (arXiv 2305.08846v1).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from privimage.engine import DPEngine, calibrate_noise_multiplier
from privimage.engine.auditing import (
    AuditingEngine,
    PlantedBug,
    count_correct,
    dirac_canary_audit,
    draw_inclusions,
    epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    replay_noise,
)


def reference_p_value(m, r, v, eps, delta):
    """The theorem's right-hand side from its definition: f(v) + 2mδ max_{i≤v} (f(v−i) − f(v))/i."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x):  # P[Binomial(r, q) >= x], exact coefficients
        return math.fsum(math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(max(x, 0), r + 1))

    bonus = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(f(v) + 2 * m * delta * bonus, 1.0)


@pytest.mark.parametrize("m,r,v", [(10, 10, 10), (50, 20, 15), (200, 60, 51), (1000, 100, 75), (30, 30, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_matches_the_theorem_computed_from_its_definition(m, r, v, eps, delta):
    ours = one_run_p_value(m, r, v, epsilon=eps, delta=delta)
    assert ours == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-300)


def test_lower_bound_reproduces_the_values_printed_in_the_paper():
    # arXiv 2305.08846v1: Appendix D's example call (m=1000, r=100, v=75, δ=1e-4, 95%) prints 0.673; §7's
    # Figure 11 example (m=100000, r=1510, v=1439, δ=1e-5) prints 2.675 (truncated). Quoted from the paper via a
    # third-party reproduction (the paper itself was not available offline).
    assert one_run_epsilon_lower_bound(1000, 100, 75, delta=1e-4, significance=0.05) == pytest.approx(0.673, abs=1e-3)
    assert 2.675 <= one_run_epsilon_lower_bound(100000, 1510, 1439, delta=1e-5, significance=0.05) < 2.677


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_right_under_pure_dp_has_a_closed_form(r):
    # With δ = 0 and v = r: P[Bin(r, q) >= r] = q^r = α  =>  ε = ln(q / (1 − q)), q = α^(1/r).
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert one_run_epsilon_lower_bound(r, r, r, delta=0.0, significance=0.05) == pytest.approx(expected, abs=1e-5)


def test_no_evidence_gives_zero_and_more_evidence_gives_more():
    assert one_run_epsilon_lower_bound(100, 100, 50, delta=1e-5) == 0.0
    assert one_run_epsilon_lower_bound(100, 0, 0, delta=1e-5) == 0.0
    bounds = [one_run_epsilon_lower_bound(1000, 200, v, delta=1e-5) for v in (150, 170, 190, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0


def test_monte_carlo_randomised_response_meets_the_bound_with_equality_and_the_audit_stays_valid():
    # ε-randomised response reports each bit correctly with probability e^ε/(1+e^ε): guessing its outputs
    # makes W ~ Binomial(m, q), so the bound (δ = 0) is exact, and ε_lb may exceed ε in at most 5% of audits.
    rng = np.random.default_rng(0)
    m, eps, trials = 200, 1.0, 4000
    q = math.exp(eps) / (1 + math.exp(eps))
    correct = (rng.random((trials, m)) < q).sum(1)
    v = 160
    expected = one_run_p_value(m, m, v, epsilon=eps, delta=0.0)
    observed = float((correct >= v).mean())
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / trials) + 1e-3
    bound = {c: one_run_epsilon_lower_bound(m, m, int(c), delta=0.0) for c in set(correct.tolist())}
    lbs = np.array([bound[c] for c in correct.tolist()])
    rate = float((lbs > eps).mean())
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert rate > 0.02  # randomised response is the worst case: the bound is nearly attained
    assert np.median(lbs) < eps


def test_monte_carlo_approximate_dp_mechanism_stays_valid():
    # (ε, δ)-DP: with probability δ reveal the bit, otherwise ε-randomised response. A large δ makes the
    # 2mδ term matter; the audit at that δ must still exceed ε in at most 5% of runs.
    rng = np.random.default_rng(1)
    m, eps, delta, trials = 100, 0.5, 2e-3, 3000
    q = math.exp(eps) / (1 + math.exp(eps))
    revealed = rng.random((trials, m)) < delta
    correct = (revealed | (rng.random((trials, m)) < q)).sum(1)
    bound = {c: one_run_epsilon_lower_bound(m, m, int(c), delta=delta) for c in set(correct.tolist())}
    lbs = np.array([bound[c] for c in correct.tolist()])
    assert float((lbs > eps).mean()) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_count_correct_guesses_the_extremes_and_abstains_in_between():
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert count_correct(scores, included, 2, 2) == (4, 3)  # in: 5 (yes), 4 (no); out: -3 (yes), -2 (yes)
    assert count_correct(scores, included, 0, 1) == (1, 1)
    with pytest.raises(ValueError, match="k_pos=4, k_neg=4"):
        count_correct(scores, included, 4, 4)
    with pytest.raises(ValueError, match="finite"):
        count_correct([np.nan, 1.0], [True, False], 1, 0)


def test_a_family_of_tests_pays_for_its_size():
    rng = np.random.default_rng(2)
    included = rng.integers(0, 2, 1000).astype(bool)
    scores = rng.normal(size=1000) + 2.0 * included
    one = epsilon_lower_bound({"s": scores}, included, delta=1e-5, fractions=(0.2,))
    r, v = count_correct(scores, included, 100, 100)
    assert (one.r, one.v) == (r, v) and one.tests == 1
    assert one.epsilon_lb == one_run_epsilon_lower_bound(1000, r, v, delta=1e-5, significance=0.05)
    two = epsilon_lower_bound({"s": scores, "t": -scores}, included, delta=1e-5, fractions=(0.2,))
    assert two.tests == 2 and two.scoring == "s" and two.epsilon_lb < one.epsilon_lb  # same test, level α/2
    family = epsilon_lower_bound({"s": scores, "t": -scores}, included, delta=1e-5, fractions=(0.2, 0.3))
    explicit = max(one_run_epsilon_lower_bound(1000, *count_correct(s, included, k, k), delta=1e-5,
                                               significance=0.05 / 4)
                   for s in (scores, -scores) for k in (100, 150))
    assert family.tests == 4 and family.epsilon_lb == explicit
    with pytest.raises(ValueError, match="fractions"):
        epsilon_lower_bound({"s": scores}, included, delta=1e-5, fractions=(0.0,))


def test_inclusions_are_fair_secret_by_default_and_reproducible_on_request():
    assert not np.array_equal(draw_inclusions(256), draw_inclusions(256))
    assert np.array_equal(draw_inclusions(256, seed=3), draw_inclusions(256, seed=3))
    assert abs(draw_inclusions(20000, seed=4).mean() - 0.5) < 0.02


def test_the_tap_sees_the_exact_clipped_sum_and_the_bugs_change_what_it_should():
    model = nn.Linear(3, 2)
    x = torch.randn(3, 3).repeat_interleave(2, 0)  # a sample's two rows are equal
    groups = torch.arange(3).repeat_interleave(2)
    seen = []

    def run(bug, sigma=0.0, **kw):
        seen.clear()
        engine = AuditingEngine(model, max_grad_norm=0.1, noise_multiplier=sigma, expected_batch_size=7.0,
                                on_release=seen.append, bug=bug, **kw)
        engine.step(lambda m: 100 * m(x).sum(1), groups=groups)
        engine.close()
        return torch.cat([seen[0]["weight"].flatten(), seen[0]["bias"]])

    plain = DPEngine(model, max_grad_norm=0.1, noise_multiplier=0.0, expected_batch_size=7.0)
    plain.step(lambda m: 100 * m(x).sum(1), groups=groups)
    plain.close()
    reference = torch.cat([model.weight.grad.flatten(), model.bias.grad]) * 7.0
    assert torch.allclose(run(PlantedBug.NONE), reference, atol=1e-6)
    per_row = run(PlantedBug.PER_ROW_CLIPPING)
    assert torch.allclose(per_row, 2 * reference, atol=1e-6)  # each of a sample's 2 rows clipped to C alone
    noisy = run(PlantedBug.NONE, sigma=1.0, noise_generator=torch.Generator().manual_seed(5))
    quarter = run(PlantedBug.NOISE_QUARTER, sigma=1.0, noise_generator=torch.Generator().manual_seed(5))
    assert torch.allclose(quarter - reference, (noisy - reference) / 4, atol=1e-6)
    unclipped = run(PlantedBug.NO_CLIPPING)  # the raw per-sample gradients summed: far above the clipped sum
    raw = torch.autograd.grad(100 * model(x).sum(), [model.weight, model.bias])  # Σ_i g_i, nothing clipped
    assert torch.allclose(unclipped, torch.cat([raw[0].flatten(), raw[1]]), rtol=1e-5)
    assert unclipped.norm() > 100 * reference.norm()
    no_clip_noisy = run(PlantedBug.NO_CLIPPING, sigma=1.0, noise_generator=torch.Generator().manual_seed(5))
    assert torch.allclose(no_clip_noisy - unclipped, noisy - reference, atol=1e-3)  # the same noise σC (float32 at 600)


def test_replay_regenerates_public_seed_noise_exactly():
    model = nn.Linear(4, 3)
    seen = []
    engine = AuditingEngine(model, max_grad_norm=0.5, noise_multiplier=2.0, expected_batch_size=3.0,
                            on_release=seen.append, bug=PlantedBug.PUBLIC_SEED_NOISE, public_seed=11)
    for _ in range(3):
        engine.finalize()
    engine.close()
    replayed = replay_noise(nn.Linear(4, 3), max_grad_norm=0.5, noise_multiplier=2.0, seed=11, steps=3)
    for a, b in zip(seen, replayed):
        for name in ("weight", "bias"):
            assert torch.allclose(a[name], b[name], atol=1e-6)
    other = replay_noise(nn.Linear(4, 3), max_grad_norm=0.5, noise_multiplier=2.0, seed=12, steps=1)
    assert not torch.allclose(seen[0]["weight"], other[0]["weight"])


@pytest.fixture(scope="module")
def sigma_eps2():
    return calibrate_noise_multiplier(target_epsilon=2.0, sample_rate=1.0, steps=2, delta=1e-5)


def test_dirac_audit_passes_the_engine(sigma_eps2):
    result = dirac_canary_audit(canaries=1000, steps=2, noise_multiplier=sigma_eps2, delta=1e-5, rows_per_sample=4,
                                seed=0)
    assert 1.9 < result.claimed_epsilon <= 2.0
    assert result.bound.epsilon_lb <= result.claimed_epsilon


@pytest.mark.parametrize("bug", [PlantedBug.NOISE_QUARTER, PlantedBug.PER_ROW_CLIPPING, PlantedBug.PUBLIC_SEED_NOISE,
                                 PlantedBug.NO_CLIPPING])
def test_dirac_audit_catches_each_planted_bug(sigma_eps2, bug):
    result = dirac_canary_audit(canaries=1000, steps=2, noise_multiplier=sigma_eps2, delta=1e-5, rows_per_sample=4,
                                bug=bug, seed=0)
    assert result.bound.epsilon_lb > result.claimed_epsilon + 0.5
