"""The DP semantic query's pieces: votes (exact, secret), the Gaussian release (noise scale by KS, the ledger
written before the noise exists), the per-class selection, saving, and the subset."""

import io
import json
import math
import pickle

import numpy as np
import pytest
import torch
from scipy import stats

from privimage.data import ImageDataset
from privimage.engine import BudgetExceededError, PrivacyBudget, compute_epsilon
from privimage.privacy import QUERY
from privimage.query import (SemanticQuery, Votes, assign_per_class, count_votes, query_budget, query_votes,
                             release_histogram, subset_for)
from privimage.query import semantic


def _votes_loop(logits, k):
    """Reference: one image at a time, its k largest logits each get one vote."""
    hist = [0.0] * logits.shape[1]
    for row in logits.tolist():
        for c in sorted(range(len(row)), key=lambda j: -row[j])[:k]:
            hist[c] += 1
    return torch.tensor(hist, dtype=torch.float64)


def _release(counts, query, seed=0, **kwargs):
    return release_histogram(Votes(counts, query.top_k), query, generator=torch.Generator().manual_seed(seed),
                             **kwargs)


@pytest.mark.parametrize("k", [1, 3])
def test_pooled_votes_match_loop_and_each_image_adds_k(k):
    logits = torch.randn(50, 12)
    votes = count_votes(logits, top_k=k)
    assert votes.counts.shape == (1, 12) and votes.counts.dtype == torch.float64
    assert torch.equal(votes.counts[0], _votes_loop(logits, k))
    assert votes.counts.sum() == 50 * k
    # Removing one image moves the histogram by exactly sqrt(k) in L2: the sensitivity the noise uses.
    assert math.isclose(float((votes.counts - count_votes(logits[1:], top_k=k).counts).norm()), math.sqrt(k))
    assert votes.l2_sensitivity == math.sqrt(k) == SemanticQuery(top_k=k, top_n=1, sigma=1.0).l2_sensitivity


@pytest.mark.parametrize("k", [1, 3])
def test_votes_per_class_are_each_class_s_own_votes_with_sensitivity_sqrt_k(k):
    logits, labels = torch.randn(60, 12), torch.randint(0, 4, (60,))
    labels[labels == 2] = 1  # class 2 has no images: its row stays zero
    counts = count_votes(logits, labels, num_classes=4, top_k=k).counts
    assert counts.shape == (4, 12)
    for c in range(4):
        assert torch.equal(counts[c], _votes_loop(logits[labels == c], k))
    # Removing one image changes k entries of ONE row by 1: the same sqrt(k) as the pooled histogram.
    fewer = count_votes(logits[1:], labels[1:], num_classes=4, top_k=k).counts
    assert math.isclose(float((counts - fewer).norm()), math.sqrt(k))
    with pytest.raises(ValueError, match=r"labels in \[0, 4\)"):
        count_votes(logits, labels + 3, num_classes=4, top_k=k)


def test_query_votes_classifies_then_counts():
    class Fixed(torch.nn.Module):
        def predict_logits(self, images, *, batch_size):
            return images.float().flatten(1)[:, :6]

    images = torch.randint(0, 255, (9, 1, 3, 3), dtype=torch.uint8)
    labels = torch.arange(9) % 2
    votes = query_votes(Fixed(), images, labels, num_classes=2, top_k=2)
    assert torch.equal(votes.counts, count_votes(images.float().flatten(1)[:, :6], labels, num_classes=2,
                                                 top_k=2).counts)


def test_votes_are_secret_they_do_not_print_pickle_or_save():
    votes = count_votes(torch.tensor([[3.0, 1.0, 2.0]] * 7), top_k=1)
    assert "7" not in repr(votes) and "SECRET" in repr(votes)
    for write in (pickle.dumps, lambda v: torch.save(v, io.BytesIO())):
        with pytest.raises(TypeError, match="never written"):
            write(votes)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="top_k=0"):
        SemanticQuery(top_k=0, top_n=1, sigma=1.0)
    with pytest.raises(ValueError, match="sigma=-1"):
        SemanticQuery(top_k=1, top_n=1, sigma=-1.0)
    with pytest.raises(ValueError, match="sigma=nan"):
        SemanticQuery(top_k=1, top_n=1, sigma=float("nan"))
    assert SemanticQuery(top_k=1, top_n=1, sigma=0.0).noise_std == 0  # the non-private reference only
    with pytest.raises(ValueError, match="top_k=20"):
        count_votes(torch.randn(3, 10), top_k=20)
    with pytest.raises(ValueError, match="exceed the 10 public classes"):  # top_n=20 of 10 classes
        _release(torch.zeros(1, 10), SemanticQuery(top_k=1, top_n=20, sigma=1.0))
    with pytest.raises(ValueError, match="top_k=2"):
        release_histogram(Votes(torch.zeros(1, 10), 2), SemanticQuery(top_k=1, top_n=1, sigma=1.0),
                          generator=torch.Generator())


@pytest.mark.parametrize("k, sigma", [(1, 2.0), (4, 0.7)])
def test_noise_std_is_sigma_sqrt_k(k, sigma):
    """KS over a 20 x 100 matrix: the noise is N(0, (sigma*sqrt(k))^2), not 2/3 or 1.5 times that scale."""
    q = SemanticQuery(top_k=k, top_n=20, sigma=sigma)
    hist = torch.arange(2000, dtype=torch.float64).reshape(20, 100)
    noise = (_release(hist, q, seed=2).noisy_histogram - hist).flatten().numpy() / (sigma * math.sqrt(k))
    assert stats.kstest(noise, "norm").pvalue > 0.025
    assert stats.kstest(noise * 1.5, "norm").pvalue < 0.025
    assert stats.kstest(noise / 1.5, "norm").pvalue < 0.025


def test_pooled_selection_is_the_top_n_noisy_counts_and_saves(tmp_path):
    q = SemanticQuery(top_k=1, top_n=3, sigma=0.5)
    hist = torch.tensor([[0, 50, 3, 40, 0, 45, 1]], dtype=torch.float64)
    release = _release(hist, q)
    assert release.selected == [1, 5, 3] and release.label_map == {1: 0, 5: 0, 3: 0}
    assert not torch.equal(release.noisy_histogram, hist)
    release.save(tmp_path, class_names=[f"c{i}" for i in range(7)], sensitive_class_names=["all"])
    assert np.array_equal(np.load(tmp_path / "histogram.npy"), release.noisy_histogram.numpy())
    meta = json.loads((tmp_path / "selected_labels.json").read_text())
    assert meta["selected_labels"] == [1, 5, 3] and meta["selected_names"] == ["c1", "c5", "c3"]
    assert meta["sigma"] == 0.5 and meta["top_k"] == 1 and meta["sensitive_class_names"] == ["all"]


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
    votes = Votes(hist, 2)
    return sum(release_histogram(votes, q, generator=gen).label_map == truth for _ in range(draws)) / draws


def test_per_class_selection_is_right_at_generous_epsilon_and_noise_at_tiny_epsilon():
    generous = compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=1, delta=1e-5).upper
    tiny = compute_epsilon(noise_multiplier=500.0, sample_rate=1.0, steps=1, delta=1e-5).upper
    assert generous < 3 and tiny < 0.05
    assert _per_class_recovery(2.0) == 1.0
    assert _per_class_recovery(500.0) < 0.1


def test_the_spend_is_recorded_and_persisted_before_the_noise_exists(monkeypatch):
    budget = query_budget(epsilon=1.0, delta=1e-5)
    q = SemanticQuery.from_budget(budget, top_k=2, top_n=3)
    assert q.sigma == budget.noise_multiplier(QUERY) and budget.spent.get(QUERY, 0) == 0
    events = []
    real_noise = semantic.add_gaussian_noise
    monkeypatch.setattr(semantic, "add_gaussian_noise", lambda *a, **k: events.append("noise") or real_noise(*a, **k))
    _release(torch.zeros(1, 10), q, budget=budget, persist=lambda b: events.append(("persist", dict(b.spent))))
    assert events == [("persist", {QUERY: 1}), "noise"]
    assert budget.epsilon_spent().upper <= 1.0
    # A second release would exceed the budget: refused before any spend, persist or noise.
    events.clear()
    with pytest.raises(BudgetExceededError):
        _release(torch.zeros(1, 10), q, budget=budget, persist=lambda b: events.append("persist"))
    assert budget.spent[QUERY] == 1 and events == []
    # A query whose sigma differs from the plan is refused; so are impossible settings, before any spend.
    with pytest.raises(ValueError, match="planned the query"):
        _release(torch.zeros(1, 10), SemanticQuery(top_k=2, top_n=3, sigma=q.sigma * 2), budget=budget)
    fresh = PrivacyBudget(1.0, 1e-5, plan=dict(budget.plan))
    with pytest.raises(ValueError, match="exceed the 3 public classes"):
        _release(torch.zeros(2, 3), SemanticQuery.from_budget(fresh, top_k=1, top_n=4), budget=fresh)
    assert fresh.spent.get(QUERY, 0) == 0


def test_one_set_of_votes_released_twice_spends_twice_with_fresh_noise():
    """What an epsilon sweep does: each point releases the same votes with its own noise and its own ledger."""
    votes = Votes(torch.eye(2, 6, dtype=torch.float64) * 50, 1)
    releases = []
    for epsilon in (1.0, 8.0):
        budget = query_budget(epsilon=epsilon, delta=1e-5)
        query = SemanticQuery.from_budget(budget, top_k=1, top_n=2)
        releases.append(release_histogram(votes, query, generator=torch.Generator().manual_seed(0), budget=budget))
        assert budget.spent == {QUERY: 1}
    assert releases[0].query.sigma > releases[1].query.sigma
    # the same seed, other sigma: the noise scales with sigma (one N(0, 1) draw per entry)
    unit = [(r.noisy_histogram - votes.counts) / r.query.noise_std for r in releases]
    assert torch.allclose(unit[0], unit[1])


def test_subset_is_the_selected_public_images_relabelled_to_the_class_that_chose_them():
    public = ImageDataset(torch.arange(12, dtype=torch.uint8).reshape(12, 1, 1, 1).expand(12, 1, 2, 2).contiguous(),
                          torch.arange(12) % 6, [f"p{j}" for j in range(6)])
    release = _release(torch.tensor([[0, 0, 0, 90, 0, 0], [80, 0, 0, 0, 0, 70]], dtype=torch.float64),
                       SemanticQuery(top_k=1, top_n=3, sigma=0.5))
    assert release.label_map == {3: 0, 0: 1}  # quota max(1, 3 // 2) = 1 public class per sensitive class
    subset = subset_for(release, public, class_names=["a", "b"])
    assert subset.class_names == ["a", "b"]
    assert subset.images[:, 0, 0, 0].tolist() == [0, 3, 6, 9] and subset.labels.tolist() == [1, 0, 1, 0]
    assert len(subset_for(release, public, max_per_label=1)) == 2
    with pytest.raises(ValueError, match="no images of the selected classes"):
        subset_for(release, ImageDataset(public.images[:1], torch.tensor([4]), public.class_names))


def test_query_budget_calibrates_one_release():
    budget = query_budget(epsilon=1.0, delta=1e-5)
    sigma = budget.noise_multiplier(QUERY)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=1e-5).upper
    assert eps <= 1.0 and eps > 0.99
