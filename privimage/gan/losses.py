"""Hinge losses of the GAN, per sample, and the pairing that bounds a record's gradient in a DP step.

Hinge (Lim & Ye arXiv 1705.02894; BigGAN, StudioGAN, DPImageBench's DP-GAN):

    L_D(i) = max(0, 1 − D(x_i, y_i)) + max(0, 1 + D(G(z_i, y'_i), y'_i))
    L_G(j) = −D(G(z_j, y_j), y_j)

The discriminator's loss is a sum over PAIRS: sensitive record i (image x_i, label y_i) with one fake image
G(z_i, y'_i) whose latent and label were drawn for record i (:mod:`privimage.randomness`). The engine
sees one forward of 2n rows (the n real images, then their n fakes) and the grouping row r ↔ sample r mod n,
so it clips the gradient of the whole pair to C. Adding record i adds exactly one pair (the generator maps
each latent on its own, so no other fake changes) and changes the clipped sum by at most C: the Gaussian
mechanism's sensitivity. The fake half carries nothing of any other record, and nothing of record i beyond
the pair's clipped total.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["d_hinge", "g_hinge", "pair_groups", "paired_rows"]


def d_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-pair discriminator hinge loss ``relu(1 − real) + relu(1 + fake)``, shape (n,)."""
    return F.relu(1.0 - real_logits) + F.relu(1.0 + fake_logits)


def g_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample generator hinge loss ``−D(fake)``, shape (n,)."""
    return -fake_logits


def paired_rows(discriminator: nn.Module, real: torch.Tensor, labels: torch.Tensor | None, fake: torch.Tensor,
                fake_labels: torch.Tensor | None) -> torch.Tensor:
    """One discriminator forward over [real; fake]; returns the (2n,) per-row hinge terms.

    Row r < n is ``relu(1 − D(real_r))``, row n + r is ``relu(1 + D(fake_r))``; their sum is
    :func:`d_hinge` of pair r. Hand the rows to the engine with ``groups=pair_groups(n)``.
    """
    if real.shape != fake.shape:
        raise ValueError(f"Each real image needs one fake image: got real {tuple(real.shape)}, fake "
                         f"{tuple(fake.shape)}.")
    n = real.shape[0]
    y = None if labels is None else torch.cat([labels, fake_labels])
    logits = discriminator(torch.cat([real, fake.to(real.dtype)]), y)
    return torch.cat([F.relu(1.0 - logits[:n]), F.relu(1.0 + logits[n:])])


def pair_groups(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2n,) sample ids [0..n-1, 0..n-1]: row r and row n + r form one sample (real r and its fake)."""
    ids = torch.arange(n, device=device)
    return torch.cat([ids, ids])
