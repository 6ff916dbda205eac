"""PrivacyBudget: the joint plan, the ledger, the hard stop, and the checkpoint round trip."""

import json

import pytest

from privimage.engine import BudgetExceededError, Mechanism, PrivacyBudget, compose_epsilon
from privimage.engine.budget import FINETUNE, QUERY

EPS, DELTA, Q, STEPS = 4.0, 1e-5, 0.02, 200


@pytest.fixture(scope="module")
def planned():
    return PrivacyBudget.for_privimage(epsilon=EPS, delta=DELTA, sample_rate=Q, steps=STEPS,
                                       query_epsilon_fraction=0.1)


def test_plan_splits_the_budget_and_meets_it_tightly(planned):
    assert planned.epsilon_of(QUERY).upper <= 0.1 * EPS
    assert planned.epsilon_of(QUERY).upper > 0.09 * EPS
    assert 0.97 * EPS < planned.epsilon_planned().upper <= EPS
    # the fine-tune alone is below the total: the query took its share
    assert planned.epsilon_of(FINETUNE).upper < planned.epsilon_planned().upper
    finetune = planned.plan[FINETUNE]
    assert (finetune.sample_rate, finetune.count) == (Q, STEPS)


def test_an_explicit_query_sigma_is_used_as_given():
    budget = PrivacyBudget.for_privimage(epsilon=EPS, delta=DELTA, sample_rate=Q, steps=STEPS,
                                         query_noise_multiplier=20.0)
    assert budget.noise_multiplier(QUERY) == 20.0
    # a quieter query leaves more for the fine-tune: less noise there than with a 10% query share
    default = PrivacyBudget.for_privimage(epsilon=EPS, delta=DELTA, sample_rate=Q, steps=STEPS)
    assert budget.noise_multiplier(FINETUNE) < default.noise_multiplier(FINETUNE)


def test_spending_is_recorded_and_overspending_raises_with_numbers(planned):
    budget = PrivacyBudget.from_state_dict(planned.state_dict())
    assert budget.epsilon_spent().upper == 0.0
    budget.spend(QUERY)
    budget.spend(FINETUNE, STEPS)
    assert budget.epsilon_spent().upper == pytest.approx(budget.epsilon_planned().upper)
    with pytest.raises(BudgetExceededError, match=r"exceed the budget epsilon=4"):
        budget.spend(FINETUNE, 50)
    assert budget.spent == {QUERY: 1, FINETUNE: STEPS}, "a refused release must not be recorded"


def test_spending_past_the_plan_is_allowed_while_within_the_total():
    budget = PrivacyBudget(10.0, DELTA, plan={"steps": Mechanism(5.0, 0.01, 10)})
    budget.spend("steps", 20)  # twice the plan, still far below epsilon=10
    assert budget.spent == {"steps": 20}
    expected = compose_epsilon([Mechanism(5.0, 0.01, 20)], delta=DELTA).upper
    assert budget.epsilon_spent().upper == pytest.approx(expected)


def test_state_dict_round_trips_through_json(planned):
    budget = PrivacyBudget.from_state_dict(planned.state_dict())
    budget.spend(QUERY)
    budget.spend(FINETUNE, 17)
    restored = PrivacyBudget.from_state_dict(json.loads(json.dumps(budget.state_dict())))
    assert restored == budget
    assert restored.epsilon_spent() == budget.epsilon_spent()


def test_unknown_mechanism_and_bad_counts_are_named(planned):
    budget = PrivacyBudget.from_state_dict(planned.state_dict())
    with pytest.raises(KeyError, match="pretrain"):
        budget.spend("pretrain")
    with pytest.raises(ValueError, match="count=-1"):
        budget.spend(FINETUNE, -1)


def test_impossible_budgets_are_refused():
    with pytest.raises(ValueError, match="delta=1"):
        PrivacyBudget(1.0, 1.0)
    with pytest.raises(ValueError, match="epsilon=0"):
        PrivacyBudget(0, DELTA)
    with pytest.raises(ValueError, match="nothing is left"):
        PrivacyBudget.for_privimage(epsilon=0.5, delta=DELTA, sample_rate=Q, steps=STEPS,
                                    query_noise_multiplier=0.5)


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/n"):
        PrivacyBudget.for_privimage(epsilon=EPS, delta=1e-3, sample_rate=Q, steps=10, num_examples=5000)
