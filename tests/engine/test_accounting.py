"""ε from our PRV accounting against dp-accounting's PLD and RDP accountants, run live (STYLE.md §5).

The PLD accountant (Google's dp-accounting) is an independent implementation of (nearly) tight accounting:
ours must agree within 3% (or the PRV grid's absolute error where ε is tiny). RDP is a looser bound: it
must never be below our upper bound, else one of us is wrong.
"""

import itertools
import math
import time

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from privimage.engine import (Mechanism, PlannedComposition, PrivacyBudget, calibrate_noise_multiplier,
                             compose_epsilon, compute_epsilon)
from privimage.engine.accounting import EPS_ERROR

DELTA = 1e-5
GRID = list(itertools.product([0.6, 1.0, 2.0, 5.0], [0.001, 0.01, 0.1], [1, 100, 10000]))


def dp_accounting_epsilons(sigma, q, steps, delta=DELTA):
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    return pld.get_epsilon(delta), rdp.get_epsilon(delta)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_epsilon_matches_pld_and_stays_below_rdp_over_the_grid():
    rows, failures = [], []
    for sigma, q, steps in GRID:
        start = time.perf_counter()
        ours = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
        seconds = time.perf_counter() - start
        pld, rdp = dp_accounting_epsilons(sigma, q, steps)
        rows.append((sigma, q, steps, ours.upper, pld, rdp, ours.accountant[:3], seconds))
        if ours.accountant == "prv":
            # 3% relative, or the PRV grid's own absolute error bound (twice: upper = estimate + error).
            if abs(ours.upper - pld) > max(0.03 * pld, 2 * EPS_ERROR):
                failures.append(f"sigma={sigma} q={q} steps={steps}: ours {ours.upper:.4f} vs PLD {pld:.4f}")
        elif ours.upper < pld:  # the RDP fallback must still be an upper bound
            failures.append(f"sigma={sigma} q={q} steps={steps}: fallback {ours.upper:.4f} < PLD {pld:.4f}")
        if rdp < ours.upper - 1e-6 and ours.accountant == "prv":
            failures.append(f"sigma={sigma} q={q} steps={steps}: RDP {rdp:.4f} below ours {ours.upper:.4f}")
    print("\nsigma q steps | ours(upper) PLD RDP | accountant seconds")
    for row in rows:
        print("{:<4} {:<5} {:<5} | {:9.4f} {:9.4f} {:9.4f} | {} {:.2f}".format(*row))
    assert not failures, "\n".join(failures)
    assert sum(r[6] == "prv" for r in rows) >= 33, "PRV should handle all but the huge-epsilon corners"


def test_calibration_round_trip_is_tight_and_never_under_noised():
    sigma = calibrate_noise_multiplier(target_epsilon=1.0, sample_rate=0.01, steps=1000, delta=DELTA)
    at_sigma = compute_epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=DELTA)
    assert at_sigma.upper <= 1.0
    assert at_sigma.upper > 0.97, "calibration should not waste budget"
    slightly_less = compute_epsilon(noise_multiplier=sigma * 0.99, sample_rate=0.01, steps=1000, delta=DELTA)
    assert slightly_less.upper > 1.0


def test_calibrated_sigma_matches_an_independent_accountant():
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, sample_rate=0.01, steps=1000, delta=DELTA)
    pld, _ = dp_accounting_epsilons(sigma, 0.01, 1000)
    assert pld == pytest.approx(2.0, rel=0.03)


def test_composition_of_query_and_steps_exceeds_either_part():
    query = Mechanism(noise_multiplier=5.0)
    steps = Mechanism(noise_multiplier=1.0, sample_rate=0.01, count=500)
    both = compose_epsilon([query, steps], delta=DELTA).upper
    alone = [compose_epsilon([m], delta=DELTA).upper for m in (query, steps)]
    assert both > max(alone)
    assert both < sum(alone) + 2 * EPS_ERROR


def test_gaussian_query_matches_the_analytic_gaussian_mechanism():
    # Balle & Wang 2018 (arXiv 1805.06530): delta(eps) = Phi(1/(2s) - eps*s) - e^eps Phi(-1/(2s) - eps*s)
    sigma = 4.0
    eps = compose_epsilon([Mechanism(sigma)], delta=DELTA).estimate
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    delta_at_eps = phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)
    assert delta_at_eps == pytest.approx(DELTA, rel=0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=DELTA), "noise_multiplier=0.0"),
    (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1, delta=DELTA), "sample_rate=1.5"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1, delta=DELTA), "count=-1"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1.0), "delta=1.0"),
])
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_epsilon(**kwargs)


def test_epsilon_too_small_to_calibrate_is_refused():
    with pytest.raises(ValueError, match="above 10000"):
        calibrate_noise_multiplier(target_epsilon=1e-4, sample_rate=0.5, steps=100, delta=DELTA)


@pytest.mark.parametrize("plan", [
    (Mechanism(3.77, 1.0, 1), Mechanism(0.58, 0.1, 10)),     # PrivImage's shape: query + fine-tune steps
    (Mechanism(1.0, 0.01, 200),),
])
def test_planned_composition_answers_every_prefix_as_compose_epsilon_does(plan):
    planned = PlannedComposition(plan, delta=1e-5)
    for fraction in (0.0, 0.3, 1.0):
        counts = [round(m.count * fraction) if m.count > 1 else m.count for m in plan]
        ours = planned.epsilon(counts)
        ref = compose_epsilon([Mechanism(m.noise_multiplier, m.sample_rate, c) for m, c in zip(plan, counts)],
                              delta=1e-5)
        # both are PRV upper bounds of the same composition, each within eps_error of the truth
        assert abs(ours.upper - ref.upper) <= 2 * EPS_ERROR, (counts, ours, ref)
        assert ours.lower <= ref.upper + 1e-9 and ref.lower <= ours.upper + 1e-9
    over = [m.count + 1 for m in plan]          # beyond the plan: answered by compose_epsilon itself
    assert planned.epsilon(over) == compose_epsilon([Mechanism(m.noise_multiplier, m.sample_rate, c)
                                                     for m, c in zip(plan, over)], delta=1e-5)


def test_budget_epsilon_spent_is_monotone_and_ends_at_the_plan():
    budget = PrivacyBudget(10.0, 1e-5, plan={"query": Mechanism(3.77, 1.0, 1), "train": Mechanism(0.58, 0.1, 10)})
    budget.spend("query")
    seen = []
    for _ in range(10):
        budget.spend("train")
        seen.append(budget.epsilon_spent().upper)
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert abs(seen[-1] - budget.epsilon_planned().upper) <= 2 * EPS_ERROR


def test_planned_composition_of_a_noiseless_plan_is_infinite():
    planned = PlannedComposition([Mechanism(0.0, 1.0, 1), Mechanism(1.0, 0.1, 5)], delta=1e-5)
    assert planned.epsilon([0, 3]).upper < math.inf
    report = planned.epsilon([1, 3])
    assert report.upper == math.inf and "NOT private" in report.accountant
