"""The DP semantic query's mechanics, pooled and per class: votes, noise scale (KS), budget ledger, top-N
selection, saving."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from privimage.engine import BudgetExceededError, PrivacyBudget, compute_epsilon
from privimage.privacy import FINETUNE, QUERY, plan_privimage_budget
from privimage.query import SemanticQuery, assign_per_class, query_budget


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
    budget = plan_privimage_budget(epsilon=5.0, delta=1e-5, sample_rate=0.05, steps=100,
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


# ---- per sensitive class -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
def test_votes_per_class_are_each_class_s_own_votes_with_sensitivity_sqrt_k(k):
    logits, labels = torch.randn(60, 12), torch.randint(0, 4, (60,))
    labels[labels == 2] = 1  # class 2 has no images: its row stays zero
    q = SemanticQuery(top_k=k, top_n=4, sigma=1.0)
    hist = q.votes_per_class(logits, labels, 4)
    assert hist.shape == (4, 12) and hist.dtype == torch.float64
    for c in range(4):
        assert torch.equal(hist[c], _votes_loop(logits[labels == c], k))
    # Removing one image changes k entries of ONE row by 1: the same sqrt(k) as the pooled histogram.
    assert math.isclose(float((hist - q.votes_per_class(logits[1:], labels[1:], 4)).norm()), math.sqrt(k))
    with pytest.raises(ValueError, match=r"labels in \[0, 4\)"):
        q.votes_per_class(logits, labels + 3, 4)


@pytest.mark.parametrize("k, sigma", [(1, 2.0), (4, 0.7)])
def test_per_class_noise_std_is_sigma_sqrt_k(k, sigma):
    """KS over a 20 x 100 matrix: the noise is N(0, (sigma*sqrt(k))^2), not 2/3 or 1.5 times that scale."""
    q = SemanticQuery(top_k=k, top_n=20, sigma=sigma)
    hist = torch.arange(2000, dtype=torch.float64).reshape(20, 100)
    noise = (q.release_per_class(hist, generator=torch.Generator().manual_seed(2)).noisy_histogram - hist)
    noise = noise.flatten().numpy() / (sigma * math.sqrt(k))
    assert stats.kstest(noise, "norm").pvalue > 0.025
    assert stats.kstest(noise * 1.5, "norm").pvalue < 0.025
    assert stats.kstest(noise / 1.5, "norm").pvalue < 0.025


def test_assign_per_class_is_greedy_without_reuse():
    noisy = torch.tensor([[9.0, 8.0, 1.0, 0.0, 7.0],
                          [9.5, 0.0, 6.0, 5.0, 0.0]])
    # 9.5 -> (1, 0); 9.0 is column 0 again, skipped; 8.0 -> (0, 1); 7.0 -> (0, 4); 6.0 -> (1, 2).
    assert assign_per_class(noisy, 2) == {0: 1, 1: 0, 4: 0, 2: 1}
    assert assign_per_class(noisy, 1) == {0: 1, 1: 0}
    with pytest.raises(ValueError, match="exceed the 5 public classes"):
        assign_per_class(noisy, 3)


def _per_class_recovery(sigma, draws=30):
    """Share of draws in which every sensitive class gets exactly its own public classes."""
    # 3 sensitive classes, 30 public ones; class c's 40 images all vote for public classes 10c and 10c+1.
    hist = torch.zeros(3, 30, dtype=torch.float64)
    for c in range(3):
        hist[c, 10 * c], hist[c, 10 * c + 1] = 40, 40
    truth = {10 * c + d: c for c in range(3) for d in range(2)}
    q = SemanticQuery(top_k=2, top_n=6, sigma=sigma)
    gen = torch.Generator().manual_seed(3)
    return sum(q.release_per_class(hist, generator=gen).label_map == truth for _ in range(draws)) / draws


def test_per_class_selection_is_right_at_generous_epsilon_and_noise_at_tiny_epsilon():
    generous = compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=1, delta=1e-5).upper
    tiny = compute_epsilon(noise_multiplier=500.0, sample_rate=1.0, steps=1, delta=1e-5).upper
    assert generous < 3 and tiny < 0.05
    assert _per_class_recovery(2.0) == 1.0
    assert _per_class_recovery(500.0) < 0.1


def test_per_class_release_spends_once_and_saves(tmp_path):
    budget = plan_privimage_budget(epsilon=5.0, delta=1e-5, sample_rate=0.05, steps=100)
    q = SemanticQuery.from_budget(budget, top_k=1, top_n=4)
    with pytest.raises(ValueError, match="exceed the 3 public classes"):  # refused before any spend
        q.release_per_class(torch.zeros(2, 3), budget=budget)
    assert budget.spent.get(QUERY, 0) == 0
    result = q.release_per_class(torch.eye(2, 6, dtype=torch.float64) * 1e4, budget=budget)
    assert budget.spent[QUERY] == 1 and len(result.label_map) == 4
    assert result.label_map[0] == 0 and result.label_map[1] == 1
    result.save(tmp_path, class_names=[f"p{j}" for j in range(6)], sensitive_class_names=["a", "b"])
    assert np.array_equal(np.load(tmp_path / "histogram.npy"), result.noisy_histogram.numpy())
    meta = json.loads((tmp_path / "selected_labels.json").read_text())
    assert meta["label_map"] == {str(j): c for j, c in result.label_map.items()} and meta["per_class"]
    assert meta["sensitive_class_names"] == ["a", "b"] and meta["sigma"] == q.sigma
    assert meta["selected_names"] == [f"p{j}" for j in result.selected]
