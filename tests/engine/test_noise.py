"""The Gaussian mechanism: the noise has exactly the std the accountant was told (KS test, both directions)."""

import pytest
import torch
from scipy import stats

from privimage.engine import ClippedSum, add_gaussian_noise, secure_generator
from privimage.engine.noise import noise_std


def noise_sample(sensitivity, noise_multiplier, n=20000, seed=0):
    zeros = (torch.zeros(n // 2), torch.zeros(n // 2, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    noisy = add_gaussian_noise(ClippedSum(zeros, sensitivity), noise_multiplier=noise_multiplier, generator=gen)
    return torch.cat([t.double() for t in noisy]).numpy()


def test_ks_accepts_true_std_and_rejects_wrong_ones():
    sensitivity, sigma = 0.5, 3.0
    true_std = sensitivity * sigma
    sample = noise_sample(sensitivity, sigma)
    assert stats.kstest(sample, "norm", args=(0, true_std)).pvalue > 0.025
    assert stats.kstest(sample, "norm", args=(0, true_std * 2 / 3)).pvalue < 1e-6
    assert stats.kstest(sample, "norm", args=(0, true_std * 1.5)).pvalue < 1e-6


def test_std_comes_from_the_sensitivity_carried_by_the_sum():
    clipped = ClippedSum((torch.zeros(3),), l2_sensitivity=3.0)
    assert noise_std(clipped, noise_multiplier=2.0) == 6.0


def test_inputs_untouched_and_half_precision_promoted():
    grads = (torch.ones(4, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float64))
    noisy = add_gaussian_noise(ClippedSum(grads, 1.0), noise_multiplier=1.0)
    assert grads[0].eq(1).all() and grads[1].eq(1).all()
    assert noisy[0].dtype == torch.float32 and noisy[1].dtype == torch.float64
    assert [t.shape for t in noisy] == [g.shape for g in grads]
    assert not torch.equal(noisy[1], grads[1])


def test_zero_noise_multiplier_returns_the_sum():
    grads = (torch.arange(3.0),)
    assert torch.equal(add_gaussian_noise(ClippedSum(grads, 1.0), noise_multiplier=0.0)[0], grads[0])


def test_invalid_sensitivity_and_sigma_are_refused():
    with pytest.raises(ValueError, match="l2_sensitivity=0"):
        ClippedSum((torch.zeros(1),), 0)
    with pytest.raises(ValueError, match="noise_multiplier=-1"):
        add_gaussian_noise(ClippedSum((torch.zeros(1),), 1.0), noise_multiplier=-1)


def test_secure_generators_do_not_repeat():
    a, b = secure_generator(), secure_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
