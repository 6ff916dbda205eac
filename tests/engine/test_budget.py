"""PrivacyBudget: the joint plan, the ledger, the hard stop, the checkpoint round trip, and the deprecated
PrivImage names (one release)."""

import json

import pytest

from privimage.engine import BudgetExceededError, Mechanism, PrivacyBudget, compose_epsilon

EPS, DELTA, Q, STEPS = 4.0, 1e-5, 0.02, 200
RELEASE = Mechanism(12.0, 1.0, 1)  # a fixed one-off Gaussian release beside the calibrated DP-SGD run


@pytest.fixture(scope="module")
def planned():
    return PrivacyBudget.plan(epsilon=EPS, delta=DELTA, calibrate="train", sample_rate=Q, steps=STEPS,
                              others={"release": RELEASE})


def test_plan_calibrates_one_mechanism_on_the_composition(planned):
    assert list(planned.plan) == ["release", "train"]
    assert planned.plan["release"] == RELEASE
    assert 0.97 * EPS < planned.epsilon_planned().upper <= EPS
    # composing in one accountant: the calibrated run alone is below the total, the release took its part
    assert planned.epsilon_of("train").upper < planned.epsilon_planned().upper
    train = planned.plan["train"]
    assert (train.sample_rate, train.count) == (Q, STEPS)
    alone = PrivacyBudget.plan(epsilon=EPS, delta=DELTA, calibrate="train", sample_rate=Q, steps=STEPS)
    assert alone.noise_multiplier("train") < planned.noise_multiplier("train")


def test_spending_is_recorded_and_overspending_raises_with_numbers(planned):
    budget = PrivacyBudget.from_state_dict(planned.state_dict())
    assert budget.epsilon_spent().upper == 0.0
    budget.spend("release")
    budget.spend("train", STEPS)
    assert budget.epsilon_spent().upper == pytest.approx(budget.epsilon_planned().upper)
    with pytest.raises(BudgetExceededError, match=r"exceed the budget epsilon=4"):
        budget.spend("train", 50)
    assert budget.spent == {"release": 1, "train": STEPS}, "a refused release must not be recorded"


def test_spending_past_the_plan_is_allowed_while_within_the_total():
    budget = PrivacyBudget(10.0, DELTA, plan={"steps": Mechanism(5.0, 0.01, 10)})
    budget.spend("steps", 20)  # twice the plan, still far below epsilon=10
    assert budget.spent == {"steps": 20}
    expected = compose_epsilon([Mechanism(5.0, 0.01, 20)], delta=DELTA).upper
    assert budget.epsilon_spent().upper == pytest.approx(expected)


def test_state_dict_round_trips_through_json(planned):
    budget = PrivacyBudget.from_state_dict(planned.state_dict())
    budget.spend("release")
    budget.spend("train", 17)
    restored = PrivacyBudget.from_state_dict(json.loads(json.dumps(budget.state_dict())))
    assert restored == budget
    assert restored.epsilon_spent() == budget.epsilon_spent()


def test_unknown_mechanism_and_bad_counts_are_named(planned):
    budget = PrivacyBudget.from_state_dict(planned.state_dict())
    with pytest.raises(KeyError, match="pretrain"):
        budget.spend("pretrain")
    with pytest.raises(ValueError, match="count=-1"):
        budget.spend("train", -1)


def test_impossible_budgets_are_refused():
    with pytest.raises(ValueError, match="delta=1"):
        PrivacyBudget(1.0, 1.0)
    with pytest.raises(ValueError, match="epsilon=0"):
        PrivacyBudget(0, DELTA)
    with pytest.raises(ValueError, match="nothing is left"):
        PrivacyBudget.plan(epsilon=0.5, delta=DELTA, calibrate="train", sample_rate=Q, steps=STEPS,
                           others={"release": Mechanism(0.5, 1.0, 1)})
    with pytest.raises(ValueError, match="both fixed"):
        PrivacyBudget.plan(epsilon=EPS, delta=DELTA, calibrate="release", sample_rate=Q, steps=STEPS,
                           others={"release": RELEASE})


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/n"):
        PrivacyBudget.plan(epsilon=EPS, delta=1e-3, calibrate="train", sample_rate=1.0, steps=1, num_examples=5000)


def test_privimage_names_are_deprecated_aliases_for_one_release():
    """engine.budget's PrivImage names warn and still give what privimage.privacy gives."""
    from privimage.engine import budget as engine_budget
    from privimage.privacy import FINETUNE, QUERY, plan_privimage_budget

    with pytest.warns(DeprecationWarning, match="privimage.privacy.QUERY"):
        assert engine_budget.QUERY == QUERY
    with pytest.warns(DeprecationWarning, match="privimage.privacy.FINETUNE"):
        assert engine_budget.FINETUNE == FINETUNE
    kw = dict(epsilon=EPS, delta=DELTA, sample_rate=1.0, steps=1, query_noise_multiplier=3.0)
    with pytest.warns(DeprecationWarning, match="plan_privimage_budget"):
        old = PrivacyBudget.for_privimage(**kw)
    assert old == plan_privimage_budget(**kw)
    with pytest.raises(AttributeError, match="OTHER"):
        engine_budget.OTHER
