"""PrivImage's privacy plan (privimage.privacy): the query's share, the fine-tune calibrated on the rest."""

import pytest

from privimage.privacy import FINETUNE, QUERY, plan_privimage_budget

EPS, DELTA, Q, STEPS = 4.0, 1e-5, 0.02, 200


@pytest.fixture(scope="module")
def planned():
    return plan_privimage_budget(epsilon=EPS, delta=DELTA, sample_rate=Q, steps=STEPS, query_epsilon_fraction=0.1)


def test_plan_splits_the_budget_and_meets_it_tightly(planned):
    assert list(planned.plan) == [QUERY, FINETUNE]
    assert 0.09 * EPS < planned.epsilon_of(QUERY).upper <= 0.1 * EPS
    assert 0.97 * EPS < planned.epsilon_planned().upper <= EPS
    # the fine-tune alone is below the total: the query took its share
    assert planned.epsilon_of(FINETUNE).upper < planned.epsilon_planned().upper
    finetune = planned.plan[FINETUNE]
    assert (finetune.sample_rate, finetune.count) == (Q, STEPS)


def test_an_explicit_query_sigma_is_used_as_given(planned):
    budget = plan_privimage_budget(epsilon=EPS, delta=DELTA, sample_rate=Q, steps=STEPS, query_noise_multiplier=20.0)
    assert budget.noise_multiplier(QUERY) == 20.0
    # a quieter query leaves more for the fine-tune: less noise there than with a 10% query share
    assert budget.noise_multiplier(FINETUNE) < planned.noise_multiplier(FINETUNE)


def test_impossible_plans_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="nothing is left"):
        plan_privimage_budget(epsilon=0.5, delta=DELTA, sample_rate=Q, steps=STEPS, query_noise_multiplier=0.5)
    with pytest.raises(ValueError, match="query_epsilon_fraction=1.5"):
        plan_privimage_budget(epsilon=EPS, delta=DELTA, sample_rate=Q, steps=STEPS, query_epsilon_fraction=1.5)


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/n"):
        plan_privimage_budget(epsilon=EPS, delta=1e-3, sample_rate=1.0, steps=1, query_noise_multiplier=3.0,
                              num_examples=5000)
