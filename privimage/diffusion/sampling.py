"""Samplers for the EDM denoiser: DPDM's deterministic DDIM/Euler sampler and its stochastic variant.

Noise levels follow EDM's schedule ``σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``
(arXiv 2206.00364 eq. 5; DPDM defaults: N = 50, σ_min 0.002, σ_max 80, ρ = 7). The deterministic sampler
takes Euler steps of the probability-flow ODE ``dx/dσ = (x − D(x; σ))/σ`` and returns the final denoised
estimate ``D(x; σ_min)``; the stochastic one follows the reverse SDE (DPDM's ``ddim_sampler(stochastic=True)``).

Classifier-free guidance (Ho & Salimans arXiv 2207.12598) with scale w:
``D̃ = (1 + w)·D(x; σ, y) − w·D(x; σ, ∅)``.

Per-image randomness: every image has its own seed and generator (EDM's ``StackedRandomGenerator``), so
image i is the same whether it is drawn alone or in a batch of 1000, and a grid can be regenerated exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn


class StackedRandomGenerator:
    """One torch.Generator per image; ``randn`` stacks each image's own draw."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape: Sequence[int], *, device: torch.device | str) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"Expected {len(self.generators)} rows, got shape {tuple(shape)}.")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device) for g in self.generators])


@dataclass(frozen=True)
class SamplerConfig:
    """Public sampler settings (DPDM defaults). The run config's sampling stage,
    :class:`privimage.config.SampleConfig`, is this plus how many images and in which batches."""

    num_steps: int = 50
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance: float = 0.0       # classifier-free guidance scale w (0: off)
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ValueError(f"Expected num_steps={self.num_steps} >= 2.")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"Expected 0 < sigma_min={self.sigma_min} < sigma_max={self.sigma_max}.")
        if self.guidance < 0 or self.rho <= 0:
            raise ValueError(f"Expected guidance={self.guidance} >= 0 and rho={self.rho} > 0.")


def sigma_steps(cfg: SamplerConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The N noise levels from σ_max down to σ_min (float64 for an exact schedule)."""
    i = torch.arange(cfg.num_steps, dtype=torch.float64, device=device)
    a, b = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    return (a + i / (cfg.num_steps - 1) * (b - a)) ** cfg.rho


def _guided(denoiser: nn.Module, x, sigma, labels, w: float):
    if w <= 0 or labels is None:
        return denoiser(x, sigma, labels)
    null = torch.full_like(labels, denoiser.num_classes)
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return (1 + w) * cond - w * uncond


@torch.no_grad()
def sample(denoiser: nn.Module, *, seeds: Sequence[int], shape: Sequence[int], labels: torch.Tensor | None = None,
           config: SamplerConfig = SamplerConfig(), device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw ``len(seeds)`` images (float, about [-1, 1]) of ``shape`` (C, H, W), image i from seed i.

    Args:
        denoiser: an :class:`~privimage.diffusion.EDMDenoiser` (eval mode).
        seeds: one integer per image; the image depends only on its seed and label.
        labels: (N,) long class labels, or None for unconditional models.
    """
    rng = StackedRandomGenerator(device, seeds)
    n = len(seeds)
    sig = sigma_steps(config, device)
    x = rng.randn((n, *shape), device=device) * float(sig[0])
    if labels is not None:
        labels = labels.to(device)
    ones = torch.ones(n, device=device)
    for t0, t1 in zip(sig[:-1], sig[1:]):
        t0f, dt = float(t0), float(t1 - t0)
        D = _guided(denoiser, x, ones * t0f, labels, config.guidance)
        if config.stochastic:
            x = x + 2 * dt * (x - D) / t0f + (2 * abs(dt) * t0f) ** 0.5 * rng.randn(x.shape, device=device)
        else:
            x = x + dt * (x - D) / t0f
    return _guided(denoiser, x, ones * float(sig[-1]), labels, config.guidance)


def sample_in_batches(denoiser: nn.Module, *, num: int, shape: Sequence[int], num_classes: int, seed: int = 0,
                      batch_size: int = 256, config: SamplerConfig = SamplerConfig(),
                      device: torch.device | str = "cpu", progress=None,
                      batches: Sequence[slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` uint8 images with balanced labels (``i % num_classes``; zeros if unconditional).

    Image i uses seed ``seed * 1_000_003 + i``, so any prefix of a larger draw is the same images.
    ``batches``: draw only these of the ``batch_size`` batches (slices of ``range(num)``, e.g. one rank's
    :func:`privimage.distributed.my_batches`), returned in that order with their labels.
    """
    from privimage.diffusion.edm import to_uint8

    labels = torch.arange(num) % max(num_classes, 1)
    if not num_classes:
        labels = torch.zeros(num, dtype=torch.long)
    if batches is None:
        batches = [slice(start, min(num, start + batch_size)) for start in range(0, num, batch_size)]
    out = [torch.zeros((0, *shape), dtype=torch.uint8)]
    for part in batches:
        start, stop = part.start, part.stop
        seeds = [seed * 1_000_003 + i for i in range(start, stop)]
        y = labels[start:stop] if num_classes else None
        out.append(to_uint8(sample(denoiser, seeds=seeds, shape=shape, labels=y, config=config,
                                   device=device)).cpu())
        if progress is not None:
            progress.update(stop - start)
    return torch.cat(out), torch.cat([labels[part] for part in batches] or [labels[:0]])
