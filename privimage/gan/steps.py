"""The pieces of a GAN iteration that the pre-training and the DP fine-tune share.

* :func:`record_fakes`: the fake image paired with each sensitive record of a DP discriminator step, from
  that record's secret draws (latent and label keyed by (key, step, record index)).
* :func:`generate`: fakes from the generator in eval mode without gradients. Eval mode freezes spectral
  norm's power iteration, which in train mode updates the generator's buffers once per forward: in a DP
  step the number of forwards follows the private Poisson batch size, and the generator is released.
* :class:`GANTrainState`: the two networks, the generator's EMA and both optimizers, saved and restored
  together by both loops.
* :func:`generator_update`: one Adam step of the generator against the current discriminator, with the
  discriminator's parameters frozen. In the fine-tune this is post-processing of the DP discriminator: its
  loss reads the discriminator's parameters (already noised and released to the loop) and latents drawn
  from a public stream, and no sensitive record enters it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from privimage.diffusion.ema import EMA
from privimage.errors import DataError
from privimage.gan.losses import g_hinge
from privimage.models.gan import Discriminator, GANConfig, Generator
from privimage.randomness import RecordRandomness

__all__ = ["FAKE_LABEL_STREAM", "FAKE_LATENT_STREAM", "GANTrainState", "check_training_data", "generate", "generator_update",
           "record_fakes"]

# Streams of the per-record secret draws (privimage.randomness): what is drawn for record i at step t.
FAKE_LATENT_STREAM, FAKE_LABEL_STREAM = 1, 2


class GANTrainState:
    """Generator ``G``, discriminator ``D`` (optionally from ``init``: {"generator", "discriminator"} state
    dicts), the EMA of G (a copy of the initial G) and Adam for each."""

    def __init__(self, gan: GANConfig, *, init: dict | None, d_lr: float, g_lr: float, betas: tuple[float, float],
                 ema_decay: float, device: torch.device | str):
        self.G, self.D = Generator(gan).to(device), Discriminator(gan).to(device)
        if init is not None:
            self.G.load_state_dict(init["generator"])
            self.D.load_state_dict(init["discriminator"])
        self.ema = EMA(self.G, ema_decay)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=g_lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=d_lr, betas=betas)

    def state_dict(self) -> dict:
        """{"generator", "discriminator", "ema", "optimizer_g", "optimizer_d"} (uncompiled modules' keys)."""
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict(), "ema": self.ema.state_dict(),
                "optimizer_g": self.opt_g.state_dict(), "optimizer_d": self.opt_d.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.ema.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["optimizer_g"])
        self.opt_d.load_state_dict(state["optimizer_d"])


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool):
    was = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was)


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``generator(z, labels)`` in eval mode, without gradients (fakes for a discriminator step)."""
    with _mode(generator, False):
        return generator(z, labels)


def record_fakes(generator: nn.Module, draws: RecordRandomness, *, step: int, indices: torch.Tensor,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fake image and label paired with each record of ``indices`` at discriminator step ``step``.

    Row r is a function of (key, step, indices[r]) and the generator only: padding rows (whatever index they
    carry) are masked by the engine, and no record's fake depends on which other records were drawn.
    """
    c = generator.config
    dtype = next(generator.parameters()).dtype
    z = draws.normal(stream=FAKE_LATENT_STREAM, step=step, indices=indices, n=c.z_dim, dtype=dtype).to(device)
    labels = (draws.integers(stream=FAKE_LABEL_STREAM, step=step, indices=indices, high=c.num_classes).to(device)
              if c.num_classes else None)
    return generate(generator, z, labels), labels


def generator_update(generator: nn.Module, discriminator: nn.Module, optimizer: torch.optim.Optimizer, *,
                     batch_size: int, chunk: int, rng: torch.Generator, amp: dict | None = None) -> float:
    """One optimizer step of the generator on the mean hinge loss of ``batch_size`` fresh fakes.

    Latents and labels come from ``rng`` (a public stream); the batch runs in chunks of ``chunk`` rows with
    the gradients summed. The discriminator's parameters are frozen for the step (their ``requires_grad``
    restored after), so nothing is written to their ``.grad``. Returns the mean loss.
    """
    c = generator.config
    device = next(generator.parameters()).device
    frozen = [p for p in discriminator.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    total = 0.0
    try:
        optimizer.zero_grad(set_to_none=True)
        with _mode(generator, True), _mode(discriminator, False):
            for start in range(0, batch_size, chunk):
                n = min(chunk, batch_size - start)
                z = torch.randn(n, c.z_dim, generator=rng, device=rng.device).to(device)
                y = (torch.randint(c.num_classes, (n,), generator=rng, device=rng.device).to(device)
                     if c.num_classes else None)
                with torch.autocast(**(amp or dict(device_type=device.type, enabled=False))):
                    loss = g_hinge(discriminator(generator(z, y), y)).float().sum() / batch_size
                loss.backward()
                total += float(loss.detach())
        optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return total


def check_training_data(images: torch.Tensor, labels: torch.Tensor, gan: GANConfig, what: str) -> None:
    """uint8 (N, C, H, W) images matching the GAN's channels and side, labels (N,) in [0, num_classes)."""
    shape = (gan.in_channels, gan.resolution, gan.resolution)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != shape:
        raise DataError(f"The {what} must be uint8 images of shape (N, {', '.join(map(str, shape))}) for this "
                         f"GAN (resolution {gan.resolution}, {gan.in_channels} channels); got {images.dtype} "
                         f"{tuple(images.shape)}.")
    if len(images) == 0:
        raise DataError(f"The {what} is empty.")
    if labels.shape != (len(images),):
        raise DataError(f"The {what} has {len(images)} images but labels of shape {tuple(labels.shape)}.")
    if gan.num_classes and not bool(((labels >= 0) & (labels < gan.num_classes)).all()):
        raise DataError(f"The {what}'s labels must lie in [0, {gan.num_classes}) (gan.num_classes); got "
                         f"min {int(labels.min())}, max {int(labels.max())}.")

