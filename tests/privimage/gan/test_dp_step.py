"""A DP discriminator step: per-pair norms and clipped sums against the loop reference, a record's
sensitivity ≤ C with everything else and the secret draws held, noise of std σC."""

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from scipy import stats

from privimage.engine import DPEngine, check_per_sample_norms
from privimage.gan import d_hinge, pair_groups, paired_rows, record_fakes
from privimage.models import GAN_PRESETS, Discriminator, Generator
from privimage.randomness import RecordRandomness
from reference import clipped_sum_loop, per_sample_norms_loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# odd widths on purpose: 6 and 9 channels, GroupNorm(3, 3) on the input
GAN = replace(GAN_PRESETS["tiny"], d_width=3, d_ch_mult=(2, 3), num_classes=3)
C = 1e-3


def networks(seed=0, gan=GAN):
    """The tiny pair in float64, the discriminator's outputs scaled into (-1, 1) so that both hinge terms
    (real and fake) are active and every fake really enters its pair's gradient."""
    torch.manual_seed(seed)
    G, D = Generator(gan).double(), Discriminator(gan).double()
    with torch.no_grad():
        D.linear.weight.mul_(1e-3)
        D.embed.weight.mul_(1e-3)
    return G, D


def records(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1,
            torch.randint(3, (n,), generator=g))


def test_paired_rows_sum_to_the_pair_hinge():
    G, D = networks()
    real, y = records(4)
    fake, y_fake = record_fakes(G, RecordRandomness.from_public_seed(0), step=0, indices=torch.arange(4))
    rows = paired_rows(D, real, y, fake, y_fake)
    assert rows.shape == (8,) and fake.dtype == torch.float64
    assert bool((rows > 0).all())  # the set-up keeps both hinge terms active
    expected = d_hinge(D(real, y), D(fake, y_fake))
    torch.testing.assert_close(rows[:4] + rows[4:], expected)
    assert torch.equal(pair_groups(3), torch.tensor([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="one fake image"):
        paired_rows(D, real, y, fake[:3], y_fake[:3])


@pytest.mark.parametrize("method", ["bk-mixed", "ghost", "vmap"])
def test_pair_norms_and_clipped_sums_match_the_loop_reference(method):
    G, D = networks()
    real, y = records(5)
    fake, y_fake = record_fakes(G, RecordRandomness.from_public_seed(1), step=3, indices=torch.arange(5))
    pad = torch.tensor([False, False, True, False, True]).repeat(2)
    groups = pair_groups(5)

    def loss_fn(model):
        return paired_rows(model, real, y, fake, y_fake)

    engine = DPEngine(D, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=1.0, method=method)
    stats_ = engine.accumulate(loss_fn, is_padding=pad, groups=groups)
    engine.finalize()
    engine.close()
    ref_norms = per_sample_norms_loop(D, loss_fn, groups=groups, is_padding=pad)
    torch.testing.assert_close(stats_.norms.double(), ref_norms, rtol=1e-8, atol=1e-10)
    assert float(ref_norms[[0, 1, 3]].min()) > 0.5  # most pairs really are clipped
    for p, ref in zip(D.parameters(), clipped_sum_loop(D, loss_fn, 0.5, groups=groups, is_padding=pad)):
        torch.testing.assert_close(p.grad, ref, rtol=1e-8, atol=1e-10)
    check = check_per_sample_norms(D, lambda m, batch: paired_rows(m, *batch), (real, y, fake, y_fake),
                                   method=method, groups=groups)
    assert check.ok, check


def clipped_step_sum(G, D, draws, images, labels, ids, *, step, physical=3):
    """The σ = 0 sum of clipped pair gradients of one discriminator step over every record, in physical
    micro-batches of ``physical`` rows (the last padded), each record's fake drawn by its id."""
    engine = DPEngine(D, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=1.0)
    for start in range(0, len(images), physical):
        idx = torch.arange(start, min(start + physical, len(images)))
        pad = torch.arange(physical) >= len(idx)
        idx = torch.cat([idx, torch.zeros(physical - len(idx), dtype=torch.long)])
        fake, y_fake = record_fakes(G, draws, step=step, indices=ids[idx])
        engine.accumulate(lambda m: paired_rows(m, images[idx], labels[idx], fake, y_fake),
                          is_padding=pad.repeat(2), groups=pair_groups(physical))
    engine.finalize()
    engine.close()
    return torch.cat([p.grad.flatten() for p in D.parameters()])


def neighbour_distances(G, D, *, ids_of=lambda ids: ids, step=4):
    """‖sum(X ∪ {x_new at k}) − sum(X)‖ for every insertion position k; each record keeps its draws."""
    draws = RecordRandomness.from_public_seed(11)
    images, labels = records(8, seed=2)
    base_x, base_y, new_x, new_y = images[:7], labels[:7], images[7:], labels[7:]
    base = clipped_step_sum(G, D, draws, base_x, base_y, ids_of(torch.arange(7)), step=step)
    out = []
    for k in range(8):
        x = torch.cat([base_x[:k], new_x, base_x[k:]])
        y = torch.cat([base_y[:k], new_y, base_y[k:]])
        ids = torch.cat([torch.arange(k), torch.tensor([7]), torch.arange(k, 7)])  # the new record is id 7
        out.append(float((clipped_step_sum(G, D, draws, x, y, ids_of(ids), step=step) - base).norm()))
    return out


def test_adding_one_record_anywhere_moves_the_clipped_sum_by_at_most_C():
    G, D = networks()
    distances = neighbour_distances(G, D)
    # the new pair is clipped (its gradient norm is far above C) and nothing else changes
    assert all(C * (1 - 1e-6) <= d <= C * (1 + 1e-6) for d in distances), distances


def test_the_sensitivity_check_catches_draws_keyed_by_batch_position_or_coupled_fakes():
    G, D = networks()
    by_position = neighbour_distances(G, D, ids_of=lambda ids: torch.arange(len(ids)))
    assert max(by_position) > 1.5 * C, by_position

    class BatchCoupled(nn.Module):  # a generator whose images depend on the batch (like BatchNorm)
        def __init__(self, g):
            super().__init__()
            self.g, self.config = g, g.config

        def forward(self, z, y):
            x = self.g(z, y)
            return x - x.mean(0, keepdim=True)

    coupled = neighbour_distances(BatchCoupled(G), D)
    assert max(coupled) > 1.2 * C, coupled


def test_noise_has_std_sigma_times_C():
    gan = replace(GAN, d_width=8)
    G, D = networks(gan=gan)
    real, y = records(6)
    fake, y_fake = record_fakes(G, RecordRandomness.from_public_seed(2), step=0, indices=torch.arange(6))
    sigma, expected = 2.0, 6.0

    def step(noise_multiplier, seed):
        engine = DPEngine(D, max_grad_norm=C, noise_multiplier=noise_multiplier, expected_batch_size=expected,
                          generator=torch.Generator().manual_seed(seed))
        engine.accumulate(lambda m: paired_rows(m, real, y, fake, y_fake), groups=pair_groups(6))
        engine.finalize()
        engine.close()
        return torch.cat([p.grad.flatten() for p in D.parameters()])

    noise = ((step(sigma, 0) - step(0.0, 0)) * expected).numpy()
    assert len(noise) > 5000
    std = sigma * C
    assert stats.kstest(noise, "norm", args=(0, std)).pvalue > 0.025
    assert stats.kstest(noise, "norm", args=(0, std * 2 / 3)).pvalue < 1e-6
    assert stats.kstest(noise, "norm", args=(0, std * 1.5)).pvalue < 1e-6
