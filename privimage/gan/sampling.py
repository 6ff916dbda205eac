"""Sampling a GAN generator: one forward per image, each image's latent from its own (seed, index) draw.

Image i's latent is the counter-based draw (seed, i) of :class:`~privimage.randomness.RecordRandomness`
(a public seed: samples are publishable), so image i is the same whether it is drawn alone or in a batch of
thousands, and any prefix of a larger draw is the same images (the diffusion sampler's per-image seeds).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from privimage.diffusion.edm import to_uint8
from privimage.gan.steps import generate
from privimage.io import save_png_grid
from privimage.randomness import RecordRandomness

__all__ = ["sample_gan", "sample_gan_in_batches", "save_gan_grid"]

_SAMPLE_STREAM = 3


def sample_gan(generator: nn.Module, *, indices: torch.Tensor, labels: torch.Tensor | None, seed: int = 0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Images (float, [-1, 1]) numbered ``indices`` of the draw ``seed``, with class ``labels`` (None if
    unconditional)."""
    z = RecordRandomness.from_public_seed(seed).normal(stream=_SAMPLE_STREAM, step=0, indices=indices,
                                                       n=generator.config.z_dim)
    return generate(generator, z.to(device), None if labels is None else labels.to(device))


def sample_gan_in_batches(generator: nn.Module, *, num: int, seed: int = 0, batch_size: int = 256,
                          device: torch.device | str = "cpu", progress=None,
                          batches: list[slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` uint8 images with balanced labels (``i % num_classes``; zeros if unconditional).

    ``batches``: only these slices of the ``num`` images, in this order (a rank's share under torchrun,
    :func:`privimage.distributed.my_batches`); image i depends only on (seed, i), so the shares put together
    are the one-process images bit for bit.
    """
    k = generator.config.num_classes
    labels = torch.arange(num) % max(k, 1) if k else torch.zeros(num, dtype=torch.long)
    parts = batches if batches is not None else [slice(s, min(num, s + batch_size)) for s in range(0, num, batch_size)]
    out, out_labels = [], []
    for part in parts:
        y = labels[part] if k else None
        out.append(to_uint8(sample_gan(generator, indices=torch.arange(part.start, part.stop), labels=y, seed=seed,
                                       device=device)).cpu())
        out_labels.append(labels[part])
        if progress is not None:
            progress.update(part.stop - part.start)
    if not out:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(out), torch.cat(out_labels)


def save_gan_grid(generator: nn.Module, path: str | os.PathLike, *, per_class: int = 8, seed: int = 0,
                  device: torch.device | str = "cpu") -> None:
    """A PNG grid: one row of ``per_class`` samples per class (8 rows if unconditional)."""
    k = generator.config.num_classes
    rows = k if k else 8
    labels = torch.arange(rows * per_class) // per_class
    x = sample_gan(generator, indices=torch.arange(rows * per_class), labels=labels if k else None, seed=seed,
                   device=device)
    save_png_grid(to_uint8(x).cpu(), path, nrow=per_class)
