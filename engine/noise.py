"""The Gaussian mechanism on a clipped sum: the one place where DP noise is drawn.

The noise standard deviation is ``noise_multiplier * l2_sensitivity``, and the sensitivity travels with
the clipped sum (:class:`ClippedSum`) instead of being re-derived from ``max_grad_norm`` by each caller
(the design of jax_privacy's ``clipped_grad(...).sensitivity()``).

Secure mode draws from a generator seeded from the operating system's cryptographic source, so the noise
cannot be reproduced from a guessable seed. (It does not defend against the floating-point attacks of
Mironov 2012 / arXiv 2107.10138 on the sampler itself; no torch-based library does fully.)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
import torch


@dataclass(frozen=True)
class ClippedSum:
    """A sum of per-sample contributions, each clipped to L2 norm ``l2_sensitivity`` or less.

    Attributes:
        tensors: the summed tensors (for DP-SGD: one per trainable parameter).
        l2_sensitivity: the largest change to ``tensors`` (in joint L2 norm) that adding or removing one
            sample can cause. For clipping at norm C this is C.
    """

    tensors: tuple[torch.Tensor, ...]
    l2_sensitivity: float

    def __post_init__(self) -> None:
        if not self.l2_sensitivity > 0:
            raise ValueError(f"Expected l2_sensitivity={self.l2_sensitivity} > 0.")


def secure_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS's cryptographic randomness (``secrets``)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def noise_std(clipped: ClippedSum, *, noise_multiplier: float) -> float:
    """Standard deviation of the Gaussian noise for ``clipped``: ``noise_multiplier * l2_sensitivity``."""
    if not noise_multiplier >= 0:
        raise ValueError(f"Expected noise_multiplier={noise_multiplier} >= 0.")
    return float(noise_multiplier) * clipped.l2_sensitivity


def add_gaussian_noise(clipped: ClippedSum, *, noise_multiplier: float,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Return ``clipped.tensors`` plus i.i.d. N(0, (noise_multiplier * l2_sensitivity)^2) noise.

    Args:
        clipped: the clipped sum and its sensitivity.
        noise_multiplier: sigma, the ratio of noise std to sensitivity that the accountant was given.
        generator: source of the noise; ``None`` uses torch's global generator. Pass
            :func:`secure_generator` for noise that cannot be replayed from a seed.

    Returns:
        New tensors (the inputs are not modified), in float32 or wider: noise is never drawn in half
        precision, whose coarse grid would distort the Gaussian tails the accountant relies on.

    Guarantees:
        With ``l2_sensitivity`` a true bound, the result is the Gaussian mechanism with noise
        multiplier ``noise_multiplier``; a caller releasing it once per step spends exactly what
        ``privimage.engine.compute_epsilon`` reports for that sigma.
    """
    std = noise_std(clipped, noise_multiplier=noise_multiplier)
    noisy = []
    for tensor in clipped.tensors:
        out_dtype = torch.promote_types(tensor.dtype, torch.float32)
        noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=out_dtype)
        noisy.append(tensor.to(out_dtype) + std * noise)
    return tuple(noisy)

