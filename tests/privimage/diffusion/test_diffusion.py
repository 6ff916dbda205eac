"""EDM loss (per-row shape, groups, preconditioning), samplers (per-image seeding), EMA."""

import math

import pytest
import torch
import torch.nn as nn

from privimage.diffusion import (EDMDenoiser, EDMLoss, EMA, SamplerConfig, sample, sample_in_batches, sigma_steps,
                                 to_model_range, to_uint8)
from privimage.models import build_unet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _denoiser(num_classes=3, res=8, randomize=True):
    torch.manual_seed(0)
    den = EDMDenoiser(build_unet("tiny", nf=8, resolution=res, ch_mult=(1,), attn_resolutions=(res,),
                                 num_classes=num_classes))
    if randomize:
        for p in den.parameters():
            nn.init.normal_(p, std=0.05)
    return den.eval()


def test_loss_rows_shape_and_groups():
    den = _denoiser()
    loss = EDMLoss(num_noise=4)
    rows = loss(den, torch.rand(5, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1]),
                generator=torch.Generator().manual_seed(0))
    assert rows.shape == (20,)
    assert torch.equal(loss.groups(5), torch.arange(5).repeat_interleave(4))
    assert torch.equal(loss.rows(torch.tensor([True, False])), torch.tensor([True] * 4 + [False] * 4))


def test_group_sum_is_the_mean_of_the_k_draws():
    den = _denoiser()
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 1])
    k4 = EDMLoss(num_noise=4, label_dropout=0.0)
    labels, sigma, noise = k4.draw(x, y, num_classes=3, generator=torch.Generator().manual_seed(1))
    rows = k4.compute(den, x, labels, sigma, noise)
    # the same 8 (image, σ, noise) rows evaluated one draw at a time with K = 1
    k1 = EDMLoss(num_noise=1, label_dropout=0.0)
    single = torch.stack([k1.compute(den, x[r // 4:r // 4 + 1], labels[r // 4:r // 4 + 1], sigma[r:r + 1],
                                     noise[r:r + 1])[0] for r in range(8)])
    torch.testing.assert_close(rows * 4, single, rtol=1e-4, atol=1e-6)
    per_image = torch.zeros(2).index_add_(0, k4.groups(2), rows)
    torch.testing.assert_close(per_image, single.view(2, 4).mean(1), rtol=1e-4, atol=1e-6)


def test_untrained_denoiser_has_unit_loss_at_every_sigma():
    # With F = 0 (zero-initialised output), D = c_skip·(y + σn) and, for data with E[y²] = σ_d²,
    # λ(σ)·E(D − y)² = (σ²σ_d² + σ_d⁴) / (σ_d²(σ² + σ_d²)) = 1: the EDM weighting balances every noise level.
    den = _denoiser(randomize=False)
    loss = EDMLoss(num_noise=1, label_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1      # uniform on [-1, 1]: E[y²] = 1/3 = σ_d²
    for s in (0.01, 0.3, 1.0, 10.0, 80.0):
        sigma = torch.full((64,), s)
        rows = loss.compute(den, x, None, sigma, torch.randn(x.shape, generator=g))
        assert abs(rows.mean().item() - 1.0) < 0.05, (s, rows.mean().item())


def test_loss_is_reproducible_from_its_generator():
    den = _denoiser()
    x, y = torch.rand(3, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 2])
    a = EDMLoss(num_noise=2)(den, x, y, generator=torch.Generator().manual_seed(3))
    b = EDMLoss(num_noise=2)(den, x, y, generator=torch.Generator().manual_seed(3))
    c = EDMLoss(num_noise=2)(den, x, y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sigma_schedule():
    s = sigma_steps(SamplerConfig())
    assert len(s) == 50 and math.isclose(s[0], 80.0) and math.isclose(s[-1], 0.002, rel_tol=1e-9)
    assert torch.all(s[1:] < s[:-1])


@pytest.mark.parametrize("stochastic", [False, True])
def test_image_i_is_the_same_at_any_batch_size(stochastic):
    den = _denoiser()
    cfg = SamplerConfig(num_steps=6, stochastic=stochastic, guidance=1.0)
    batch = sample(den, seeds=[10, 11, 12, 13], shape=(3, 8, 8), labels=torch.tensor([0, 1, 2, 0]), config=cfg)
    alone = sample(den, seeds=[12], shape=(3, 8, 8), labels=torch.tensor([2]), config=cfg)
    torch.testing.assert_close(batch[2], alone[0], rtol=1e-4, atol=1e-5)
    other = sample(den, seeds=[99], shape=(3, 8, 8), labels=torch.tensor([2]), config=cfg)
    assert (other[0] - alone[0]).abs().max() > 1e-3


def test_sample_in_batches_is_batch_size_invariant_and_balanced():
    den = _denoiser()
    cfg = SamplerConfig(num_steps=3)
    a, la = sample_in_batches(den, num=6, shape=(3, 8, 8), num_classes=3, batch_size=6, config=cfg)
    b, lb = sample_in_batches(den, num=6, shape=(3, 8, 8), num_classes=3, batch_size=4, config=cfg)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 8, 8)
    assert torch.equal(la, lb) and la.tolist() == [0, 1, 2, 0, 1, 2]
    assert (a.int() - b.int()).abs().max() <= 1   # rounding of float results that agree to ~1e-5


def test_uint8_round_trip():
    img = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(img)), img)


def test_ema_follows_the_weights_with_its_decay():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    for _ in range(10):
        ema.update(net)
    # θ_ema = θ + 0.9^10 (θ_0 − θ)
    expected = net.weight - 0.9 ** 10 * (net.weight - start)
    torch.testing.assert_close(ema.module.weight, expected)
    assert not ema.module.weight.requires_grad
    state = ema.state_dict()
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9 and torch.equal(other.module.weight, ema.module.weight)
