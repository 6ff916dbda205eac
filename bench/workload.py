"""The benchmarks' UNet workload: the real PrivImage UNet in the EDM denoiser, and a batch with its EDM loss.

Shared by ``dp_step.py``, ``layer_strategies.py`` and ``finetune_projection.py`` so they measure the same
thing the fine-tune runs (:mod:`privimage.train.finetune`): ``EDMLoss(num_noise=K)`` on a batch of images,
K rows per image, the rows of one image forming one sample (``groups``).

Weights: score_sde's initialisation zeroes the last convolution of every residual branch, the attention
output projections and the output convolution, so at initialisation almost every gradient is exactly zero.
:func:`denoiser` redraws those weights (normal, std 0.02): a gradient check then compares non-zero numbers,
and timings do not depend on the values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from privimage.diffusion import EDMDenoiser, EDMLoss
from privimage.models import build_unet


def denoiser(preset="s", *, device="cpu", seed: int = 0, **overrides) -> EDMDenoiser:
    """``EDMDenoiser(build_unet(preset, **overrides))`` on ``device`` (preset: a name or a UNetConfig),
    zero-initialised weights redrawn."""
    torch.manual_seed(seed)
    net = build_unet(preset, **overrides)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return EDMDenoiser(net).to(device)


@dataclass
class Batch:
    """``images`` images in [-1, 1] with labels and one fixed draw of the EDM loss's randomness (σ, noise and
    label dropout for K rows per image), so every method and every repeat sees the same rows."""

    x: torch.Tensor
    drawn: tuple
    loss: EDMLoss
    groups: torch.Tensor
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return self.groups.shape[0]

    def autocast(self):
        """bf16 autocast around the forward (as the fine-tune runs on CUDA), nothing for float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.x.device.type, dtype=self.dtype)

    def per_row_loss(self, model) -> torch.Tensor:
        """(images·K,) EDM losses, each divided by K (a sample's rows sum to its mean loss)."""
        with self.autocast():
            return self.loss.compute(model, self.x, *self.drawn)


def batch(images: int, *, k: int = 1, resolution: int = 32, channels: int = 3, num_classes: int = 10,
          device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(images, channels, resolution, resolution, generator=g) * 2 - 1
    labels = torch.randint(0, max(num_classes, 1), (images,), generator=g) if num_classes else None
    loss = EDMLoss(num_noise=k)
    drawn = loss.draw(x, labels, num_classes=num_classes, generator=g)
    drawn = tuple(None if t is None else t.to(device) for t in drawn)
    return Batch(x.to(device), drawn, loss, loss.groups(images, device), dtype)


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise SystemExit(f"--dtype {name!r}: expected one of {sorted(dtypes)}.")
    return dtypes[name]
