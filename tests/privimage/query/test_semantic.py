"""The DP semantic query's mechanics: votes, noise scale (KS), budget ledger, top-N selection, saving."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from privimage.engine import BudgetExceededError, PrivacyBudget, compute_epsilon
from privimage.engine.budget import FINETUNE, QUERY
from privimage.query import SemanticQuery, query_budget


def _votes_loop(logits, k):
    """Reference: one image at a time, its k largest logits each get one vote."""
    hist = [0.0] * logits.shape[1]
    for row in logits.tolist():
        for c in sorted(range(len(row)), key=lambda j: -row[j])[:k]:
            hist[c] += 1
    return torch.tensor(hist, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3])
def test_votes_match_loop_and_each_image_adds_k(k):
    logits = torch.randn(50, 12)
    q = SemanticQuery(top_k=k, top_n=2, sigma=1.0)
    hist = q.votes(logits)
    assert torch.equal(hist, _votes_loop(logits, k))
    assert hist.sum() == 50 * k
    # Removing one image moves the histogram by exactly sqrt(k) in L2: the sensitivity the noise uses.
    assert math.isclose(float((hist - q.votes(logits[1:])).norm()), math.sqrt(k))
    assert q.l2_sensitivity == math.sqrt(k)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="top_k=0"):
        SemanticQuery(top_k=0, top_n=1, sigma=1.0)
    with pytest.raises(ValueError, match="sigma=0"):
        SemanticQuery(top_k=1, top_n=1, sigma=0.0)
    with pytest.raises(ValueError, match="top_n=20"):
        SemanticQuery(top_k=1, top_n=20, sigma=1.0).votes(torch.randn(3, 10))


@pytest.mark.parametrize("k, sigma", [(1, 2.0), (4, 0.7)])
def test_noise_std_is_sigma_sqrt_k(k, sigma):
    """KS: the released noise is N(0, (sigma*sqrt(k))^2); the test rejects 2/3 and 1.5 times that scale."""
    q = SemanticQuery(top_k=k, top_n=1, sigma=sigma)
    hist = torch.arange(2000, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    noise = (q.release(hist, generator=gen).noisy_histogram - hist).numpy()
    std = sigma * math.sqrt(k)
    assert stats.kstest(noise / std, "norm").pvalue > 0.025
    assert stats.kstest(noise / (std * 2 / 3), "norm").pvalue < 0.025
    assert stats.kstest(noise / (std * 1.5), "norm").pvalue < 0.025


def test_top_n_is_the_largest_noisy_counts_and_exact_counts_never_leave(tmp_path):
    q = SemanticQuery(top_k=1, top_n=3, sigma=0.5)
    hist = torch.tensor([0, 50, 3, 40, 0, 45, 1], dtype=torch.float64)
    result = q.release(hist, generator=torch.Generator().manual_seed(0))
    assert result.selected == [1, 5, 3]
    assert not torch.equal(result.noisy_histogram, hist)
    result.save(tmp_path, class_names=[f"c{i}" for i in range(7)])
    saved = np.load(tmp_path / "histogram.npy")
    assert np.array_equal(saved, result.noisy_histogram.numpy())
    meta = json.loads((tmp_path / "selected_labels.json").read_text())
    assert meta["selected_labels"] == [1, 5, 3] and meta["selected_names"] == ["c1", "c5", "c3"]
    assert meta["sigma"] == 0.5 and meta["top_k"] == 1


def test_ledger_records_the_query_spend_once():
    budget = PrivacyBudget.for_privimage(epsilon=5.0, delta=1e-5, sample_rate=0.05, steps=100,
                                         query_epsilon_fraction=0.2)
    q = SemanticQuery.from_budget(budget, top_k=2, top_n=3)
    assert q.sigma == budget.noise_multiplier(QUERY)
    assert budget.spent.get(QUERY, 0) == 0
    q.release(torch.zeros(10, dtype=torch.float64), budget=budget)
    assert budget.spent[QUERY] == 1
    assert math.isclose(budget.epsilon_spent().upper, budget.epsilon_of(QUERY).upper, rel_tol=1e-6)
    assert budget.epsilon_spent().upper <= 0.2 * 5.0 + 1e-6
    # A second query is beyond the plan; with all of the fine-tune still unspent the composition allows it,
    # so spend the plan's fine-tune first: now a second query must be refused before any release.
    budget.spend(FINETUNE, budget.plan[FINETUNE].count)
    with pytest.raises(BudgetExceededError):
        q.release(torch.zeros(10, dtype=torch.float64), budget=budget)
    assert budget.spent[QUERY] == 1
    # A query whose sigma differs from the plan is refused.
    with pytest.raises(ValueError, match="planned the query"):
        SemanticQuery(top_k=2, top_n=3, sigma=q.sigma * 2).release(torch.zeros(10), budget=budget)


def test_query_budget_calibrates_one_release():
    budget = query_budget(epsilon=1.0, delta=1e-5)
    sigma = budget.noise_multiplier(QUERY)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=1e-5).upper
    assert eps <= 1.0 and eps > 0.99
