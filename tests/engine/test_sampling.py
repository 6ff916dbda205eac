"""Poisson sampling: rate, variability, determinism, padding, splitting (STYLE.md §5, Opacus poisson_test)."""

import math

import numpy as np
import pytest
import torch

from privimage.engine import PoissonSampler


def drawn(batch):
    """The real (non-padding) indices of a logical batch."""
    return torch.cat([b.indices[~b.is_padding] for b in batch.physical])


def test_mean_batch_size_within_four_standard_deviations():
    n, q, steps = 1000, 0.05, 400
    sampler = PoissonSampler(sample_rate=q, steps=steps, physical_batch_size=32, seed=1)
    sizes = np.array([b.size for b in sampler.logical_batches(n)])
    std_of_mean = math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.mean() - n * q) < 4 * std_of_mean
    assert len(set(sizes.tolist())) > 5, "Poisson batch sizes must vary"
    assert sampler.expected_batch_size(n) == pytest.approx(50.0)


def test_each_example_included_with_frequency_q():
    n, q, steps = 40, 0.1, 3000
    sampler = PoissonSampler(sample_rate=q, steps=steps, physical_batch_size=8, seed=2)
    counts = torch.zeros(n)
    for batch in sampler.logical_batches(n):
        counts[drawn(batch)] += 1
    freq = counts / steps
    std = math.sqrt(q * (1 - q) / steps)
    assert (freq - q).abs().max() < 4.5 * std  # 40 examples, so allow a little above 4 std
    assert freq[7] == pytest.approx(q, abs=4 * std)


def test_same_seed_repeats_and_other_seed_differs():
    a = PoissonSampler(sample_rate=0.2, steps=5, physical_batch_size=4, seed=3)
    b = PoissonSampler(sample_rate=0.2, steps=5, physical_batch_size=4, seed=3)
    c = PoissonSampler(sample_rate=0.2, steps=5, physical_batch_size=4, seed=4)
    draws = [[drawn(x).tolist() for x in s.logical_batches(100)] for s in (a, b, c)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_padding_is_flagged_and_nothing_truncated():
    sampler = PoissonSampler(sample_rate=0.3, steps=20, physical_batch_size=7, seed=5)
    for batch in sampler.logical_batches(60):
        real = drawn(batch)
        assert len(real) == batch.size
        assert len(set(real.tolist())) == batch.size, "an example appears twice in one step"
        assert all(len(b.indices) == 7 and len(b.is_padding) == 7 for b in batch.physical)
        assert len(batch.physical) == max(1, math.ceil(batch.size / 7))
        n_padding = sum(int(b.is_padding.sum()) for b in batch.physical)
        assert n_padding == len(batch.physical) * 7 - batch.size


def test_logical_batch_larger_than_memory_is_split_not_truncated():
    sampler = PoissonSampler(sample_rate=1.0, steps=1, physical_batch_size=4, seed=0)
    batch = sampler.logical_batch(10, 0)
    assert len(batch.physical) == 3
    assert sorted(drawn(batch).tolist()) == list(range(10))
    assert batch.physical[-1].is_padding.tolist() == [False, False, True, True]


def test_empty_sample_still_yields_one_all_padding_micro_batch():
    sampler = PoissonSampler(sample_rate=1e-9, steps=1, physical_batch_size=3, seed=0)
    batch = sampler.logical_batch(5, 0)
    assert batch.size == 0
    assert len(batch.physical) == 1 and batch.physical[0].is_padding.all()


def test_sample_does_not_depend_on_physical_batch_size():
    small = PoissonSampler(sample_rate=0.2, steps=3, physical_batch_size=2, seed=9)
    large = PoissonSampler(sample_rate=0.2, steps=3, physical_batch_size=64, seed=9)
    for a, b in zip(small.logical_batches(50), large.logical_batches(50)):
        assert drawn(a).tolist() == drawn(b).tolist()


def test_resume_from_state_dict_redraws_the_same_batches():
    sampler = PoissonSampler(sample_rate=0.2, steps=6, physical_batch_size=4)  # seed drawn from the OS
    restored = PoissonSampler.from_state_dict(sampler.state_dict())
    full = [drawn(b).tolist() for b in sampler.logical_batches(30)]
    tail = [drawn(b).tolist() for b in restored.logical_batches(30, start_step=4)]
    assert tail == full[4:]


def test_secure_mode_seeds_from_the_os():
    a = PoissonSampler(sample_rate=0.5, steps=1, physical_batch_size=8, secure=True)
    b = PoissonSampler(sample_rate=0.5, steps=1, physical_batch_size=8, secure=True)
    assert a.state_dict()["seed"] != b.state_dict()["seed"]
    assert drawn(a.logical_batch(200, 0)).tolist() != drawn(b.logical_batch(200, 0)).tolist()
    with pytest.raises(ValueError, match="secure=True"):
        PoissonSampler(sample_rate=0.5, steps=1, physical_batch_size=8, secure=True, seed=1)
    assert PoissonSampler.from_state_dict(a.state_dict()).secure


@pytest.mark.parametrize("kwargs, message", [
    (dict(sample_rate=1.3, steps=1, physical_batch_size=1), r"Expected sample_rate=1.3 in \(0, 1\]"),
    (dict(sample_rate=0.0, steps=1, physical_batch_size=1), r"sample_rate=0.0"),
    (dict(sample_rate=0.1, steps=0, physical_batch_size=1), r"steps=0"),
    (dict(sample_rate=0.1, steps=1, physical_batch_size=0), r"physical_batch_size=0"),
])
def test_invalid_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoissonSampler(**kwargs)


def test_invalid_arguments_are_named():
    sampler = PoissonSampler(sample_rate=0.1, steps=2, physical_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="num_examples=0"):
        sampler.logical_batch(0, 0)
    with pytest.raises(ValueError, match="step=2"):
        sampler.logical_batch(10, 2)
