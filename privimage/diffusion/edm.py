"""EDM preconditioning and the denoising loss with noise multiplicity (Karras et al. arXiv 2206.00364; DPDM).

The network F sees a rescaled input and the log noise level; the denoiser is
``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), y)`` with
``c_skip = σ_d²/(σ²+σ_d²)``, ``c_out = σ·σ_d/√(σ²+σ_d²)``, ``c_in = 1/√(σ²+σ_d²)``, ``c_noise = ¼·ln σ``
(EDM Table 1). Images live in [-1, 1]; σ_d = √(1/3) is the std of a uniform distribution on [-1, 1], the
value DPDM uses.

Training draws ln σ ~ N(P_mean, P_std²) and weights the squared error by
``λ(σ) = (σ²+σ_d²)/(σ·σ_d)²`` so every noise level contributes at unit scale.

**Noise multiplicity** (DPDM, arXiv 2210.09929 §3.2): each image gets K independent (σ, n) draws; its loss is
the MEAN of the K denoising losses. Under DP-SGD this is free privacy-wise (the K rows belong to one sample,
clipped together) and cuts the variance of the per-sample gradient, which matters because the clipped
gradient gets the same noise either way. :class:`EDMLoss` returns the B·K rows' losses each divided by K plus
the ``groups`` vector that maps rows to images; the engine sums a group's rows before clipping, so a sample's
gradient is the gradient of its mean loss (the engine contract in COMMON.md). The loss is never reduced
over the batch here: the caller (or the engine) owns the reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from privimage.randomness import RecordRandomness

SIGMA_DATA = math.sqrt(1.0 / 3.0)

#: Streams of :meth:`EDMLoss.draw_per_record`'s per-record draws: what record i draws at step t.
LABEL_DROPOUT_STREAM, LOG_SIGMA_STREAM, NOISE_STREAM = 1, 2, 3


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class EDMDenoiser(nn.Module):
    """Wraps a network ``net(x, c_noise, labels)`` into the EDM denoiser ``D(x, σ, labels)``.

    ``sigma`` is (B,) or a scalar; the network's output is computed in whatever dtype autocast picks and
    the preconditioning in the input's dtype (float32 in training).
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    @property
    def num_classes(self) -> int:
        return getattr(getattr(self.net, "config", None), "num_classes", 0)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x if x.is_floating_point() else x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        s = sigma[:, None, None, None]
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1.0 / (s ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        out = self.net(c_in * x, c_noise, labels)
        return c_skip * x + c_out * out.to(x.dtype)


@dataclass(frozen=True)
class EDMLoss:
    """Per-row EDM denoising loss with K noise draws per image (public settings only).

    Attributes:
        p_mean, p_std: ln σ ~ N(p_mean, p_std²) (EDM: -1.2, 1.2).
        sigma_data: σ_d of the preconditioning's weighting.
        num_noise: K, noise draws per image (official PrivImage fine-tune: 8).
        label_dropout: probability that an image's label is replaced by "no label" (classifier-free
            guidance training, DPDM: 0.1); ignored for unconditional models.

    Example:
        >>> from privimage.models import build_unet
        >>> den = EDMDenoiser(build_unet("tiny", resolution=8, ch_mult=(1,), attn_resolutions=()))
        >>> loss = EDMLoss(num_noise=4)
        >>> rows = loss(den, torch.zeros(3, 3, 8, 8), torch.tensor([0, 1, 2]))
        >>> rows.shape, loss.groups(3).tolist()
        (torch.Size([12]), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = SIGMA_DATA
    num_noise: int = 1
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.num_noise, int) and self.num_noise >= 1):
            raise ValueError(f"Expected num_noise={self.num_noise} to be an integer >= 1.")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"Expected label_dropout={self.label_dropout} in [0, 1).")
        if not self.p_std > 0:
            raise ValueError(f"Expected p_std={self.p_std} > 0.")

    def groups(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B·K,) long: the image each row belongs to (rows of one image are adjacent)."""
        return torch.arange(batch_size, device=device).repeat_interleave(self.num_noise)

    def rows(self, is_padding: torch.Tensor) -> torch.Tensor:
        """Expand a per-image (B,) mask to the (B·K,) rows."""
        return is_padding.repeat_interleave(self.num_noise)

    def draw(self, x: torch.Tensor, labels: torch.Tensor | None, *, num_classes: int = 0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The randomness of one loss evaluation: (dropped-out labels (B,), σ (B·K,), unit noise like the rows).

        Kept apart from :meth:`compute` so a compiled step is a pure function of its tensors.
        """
        B, K = x.shape[0], self.num_noise
        dev = x.device
        if labels is not None and num_classes and self.label_dropout > 0:
            drop = torch.rand(B, generator=generator, device=dev) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
        sigma = (torch.randn(B * K, generator=generator, device=dev) * self.p_std + self.p_mean).exp()
        noise = torch.randn((B * K, *x.shape[1:]), generator=generator, device=dev)
        return labels, sigma, noise

    def draw_per_record(self, x: torch.Tensor, labels: torch.Tensor | None, *, num_classes: int = 0,
                        randomness: RecordRandomness, step: int, indices: torch.Tensor, is_padding: torch.Tensor
                        ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """:meth:`draw`, but image j's draws are record ``indices[j]``'s at ``step`` alone (DP training).

        Record i draws from ``randomness`` (:class:`privimage.randomness.RecordRandomness`) on three streams:
        one uniform on :data:`LABEL_DROPOUT_STREAM` (used by conditional models with ``label_dropout > 0``),
        K normals for ln σ on :data:`LOG_SIGMA_STREAM`, and K·C·H·W normals for its K noise images on
        :data:`NOISE_STREAM`. So image j's draws depend on (key, step, indices[j]) only: not on which other
        images share its batch, where it sits, or whether the dropout draw is used (the property DP-SGD's
        sensitivity bound needs). A padding row (``is_padding[j]``) draws nothing: no dropout,
        σ = exp(p_mean), zero noise (its clip factor is 0 anyway), whatever index it carries.

        Everything is drawn vectorised on ``x``'s device, in the default dtype (like :meth:`draw`). Besides the
        returned tensors, the call holds at most :class:`~privimage.randomness.RecordRandomness`'s per-chunk
        temporaries plus, when some rows are padding, the real rows' noise before it is scattered.
        """
        B, K = x.shape[0], self.num_noise
        dev, dtype = x.device, torch.get_default_dtype()
        indices, is_padding = torch.as_tensor(indices).to(dev), torch.as_tensor(is_padding).to(dev)
        if indices.shape != (B,) or is_padding.shape != (B,) or is_padding.dtype != torch.bool:
            raise ValueError(f"Expected one record index and one bool padding flag per image ({B}), got indices "
                             f"of shape {tuple(indices.shape)} and is_padding of shape {tuple(is_padding.shape)} "
                             f"({is_padding.dtype}).")
        real = (~is_padding).nonzero().squeeze(1)
        records, numel = indices[real], math.prod(x.shape[1:])
        draw = dict(step=step, indices=records)
        z = torch.zeros(B, K, dtype=dtype, device=dev)
        z[real] = randomness.normal(stream=LOG_SIGMA_STREAM, n=K, dtype=dtype, **draw)
        sigma = (z.reshape(B * K) * self.p_std + self.p_mean).exp()
        noise = randomness.normal(stream=NOISE_STREAM, n=K * numel, dtype=dtype, **draw)
        if len(real) < B:
            noise = torch.zeros(B, K * numel, dtype=dtype, device=dev).index_copy_(0, real, noise)
        if labels is not None and num_classes and self.label_dropout > 0:
            drop = torch.zeros(B, dtype=torch.bool, device=dev)
            drop[real] = randomness.uniform(stream=LABEL_DROPOUT_STREAM, n=1, **draw)[:, 0] < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
        return labels, sigma, noise.reshape(B * K, *x.shape[1:])

    def compute(self, denoiser: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, sigma: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """λ(σ)·mean_pixels(D(y + σn; σ) − y)² / K per row, y = image repeated K times. Shape (B·K,)."""
        K = self.num_noise
        y = x.repeat_interleave(K, dim=0)
        rep_labels = labels.repeat_interleave(K) if labels is not None else None
        D = denoiser(y + noise * sigma[:, None, None, None], sigma, rep_labels)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return weight * (D - y).square().flatten(1).mean(1) / K

    def __call__(self, denoiser: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Losses of shape (B·K,), row r = image r // K, each divided by K (so a group sums to the mean).

        Args:
            denoiser: an :class:`EDMDenoiser`.
            x: images in [-1, 1], (B, C, H, W) (use :func:`to_model_range` on uint8).
            labels: (B,) long class labels, or None (unconditional).
            generator: source of σ, the noise and the label dropout (seeded -> reproducible).
        """
        drawn = self.draw(x, labels, num_classes=getattr(denoiser, "num_classes", 0), generator=generator)
        return self.compute(denoiser, x, *drawn)
