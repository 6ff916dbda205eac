"""Does PrivImage's pre-training help? The held-out denoising loss of three DP fine-tunes at the same ε.

Starting points: (a) pre-trained on public images of the classes the semantic query selects, relabelled to
the sensitive classes; (b) pre-trained on the same number of RANDOM public images (random labels); (c) no
pre-training. All three then get the identical DP fine-tune (same σ, q, steps, seeds), and each is scored by
the EDM loss on held-out sensitive images at fixed noise levels and fixed noise (lower is better): the claim
of PrivImage (arXiv 2311.12850 Table 3) at toy scale, checked by the test suite
(``tests/privimage/train/test_evidence.py``) and measured over seeds and noise levels by
``bench/evidence.py`` (``bench/results/evidence.md``).

The noise levels are the quartiles of the log-normal σ distribution EDM trains on (Karras et al. 2022,
arXiv 2206.00364: ln σ ~ N(-1.2, 1.2²), so σ ≈ 0.13, 0.30, 0.68): the central half of the training
objective, where the shapes and textures of the class are denoised. Trap: at large σ (≥ 2) the ranking of
the starting points is not stable across seeds, samplers and training lengths (the sensitive set's shifted
style makes a confident public-class prior no better a guess than the average), so a score over large σ
measures noise.
"""

from __future__ import annotations

import math
import tempfile
from statistics import NormalDist
from typing import Sequence

import torch

from privimage.config import FinetuneConfig, PretrainConfig
from privimage.diffusion import EDMDenoiser, EDMLoss, to_model_range
from privimage.engine import PrivacyBudget
from privimage.models import UNet, UNetConfig
from privimage.train.common import load_checkpoint
from privimage.train.finetune import finetune
from privimage.train.pretrain import pretrain

# The quartiles of the σ distribution EDMLoss trains on by default.
EVAL_SIGMAS = tuple(round(math.exp(EDMLoss.p_mean + EDMLoss.p_std * NormalDist().inv_cdf(p)), 4)
                    for p in (0.25, 0.5, 0.75))


@torch.no_grad()
def heldout_losses(unet: UNetConfig, state: dict, images: torch.Tensor, labels: torch.Tensor, *,
                   sigmas: Sequence[float] = EVAL_SIGMAS, seed: int = 0) -> list[float]:
    """Mean EDM loss over held-out images at each of ``sigmas``, fixed noise (one draw per σ in order from
    ``seed``), labels kept (no dropout)."""
    den = EDMDenoiser(UNet(unet))
    den.load_state_dict(state)
    den.eval()
    loss = EDMLoss(num_noise=1, label_dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    x = to_model_range(images)
    out = []
    for s in sigmas:
        noise = torch.randn(x.shape, generator=g)
        out.append(float(loss.compute(den, x, labels, torch.full((len(x),), s), noise).mean()))
    return out


def heldout_loss(unet: UNetConfig, state: dict, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> float:
    """Mean EDM loss over held-out images at :data:`EVAL_SIGMAS`, fixed noise, labels kept (no dropout)."""
    losses = heldout_losses(unet, state, images, labels, seed=seed)
    return sum(losses) / len(losses)


def embedded_setup(*, resolution: int = 16, steps: int = 10) -> dict:
    """The toy comparison on the embedded data that the test and the benchmark run: 12,000 public images,
    400 sensitive and 200 held-out sensitive test images at ``resolution``, the selected classes a correct
    query returns, a small UNet, and one fine-tune plan (σ = 1, q = 0.1, ``steps`` steps) for all three."""
    from dataclasses import replace

    from privimage.data import load_dataset
    from privimage.data.embedded import sensitive_classes
    from privimage.engine import Mechanism
    from privimage.models.unet import PRESETS

    return {"public": load_dataset("embedded", split="public", size=12000, resolution=resolution),
            "sensitive": load_dataset("embedded", split="sensitive", size=400, resolution=resolution),
            "heldout": load_dataset("embedded", split="sensitive_test", size=200, resolution=resolution),
            "selected": sensitive_classes(0),
            "unet": replace(PRESETS["tiny"], nf=16, ch_mult=(1, 2), attn_resolutions=(), resolution=resolution,
                            num_classes=5),
            "budget_state": PrivacyBudget(100.0, 1e-4, plan={"finetune": Mechanism(1.0, 0.1, steps)}).state_dict()}


def fine_tune_starting_points(*, public, sensitive, selected: list[int], unet: UNetConfig,
                              pretrain_steps: int = 200, pretrain_batch: int = 32, pretrain_lr: float = 2e-3,
                              budget_state: dict, physical_batch_size: int = 64, num_noise: int = 2,
                              max_grad_norm: float = 1e-2, finetune_lr: float = 1e-3, seed: int = 0,
                              log=None) -> dict[str, dict]:
    """The fine-tuned EMA denoiser states of the "subset", "random" and "none" starting points.

    ``selected`` are the public labels of the sensitive classes, in sensitive-label order (what the query
    selects); the subset keeps public images of those labels, relabelled 0..C-1. ``budget_state`` is a
    planned :class:`PrivacyBudget` state (its fine-tune plan sets σ, q and steps), the same for all three.
    The fine-tunes use the non-secure test mode (reproducible from ``seed``).
    """
    quiet = log or (lambda *_: None)
    remap = torch.full((public.num_classes,), -1, dtype=torch.long)
    remap[torch.as_tensor(selected)] = torch.arange(len(selected))
    keep = torch.nonzero(remap[public.labels] >= 0).flatten()
    g = torch.Generator().manual_seed(seed + 1)
    rand = torch.randperm(len(public), generator=g)[:len(keep)]
    starts = {"subset": (public.images[keep], remap[public.labels[keep]]),
              "random": (public.images[rand], torch.randint(len(selected), (len(rand),), generator=g)),
              "none": None}
    states = {}
    for name, data in starts.items():
        with tempfile.TemporaryDirectory() as d:
            init = None
            if data is not None:
                config = PretrainConfig(steps=pretrain_steps, batch_size=pretrain_batch, lr=pretrain_lr,
                                        ema_decay=0.0, checkpoint_every=10**9, log_every=10**9)
                path = pretrain(d, config, images=data[0], labels=data[1], unet=unet, seed=seed, log=quiet)
                init = load_checkpoint(path)["model"]
            budget = PrivacyBudget.from_state_dict(budget_state)
            config = FinetuneConfig(physical_batch_size=physical_batch_size, num_noise=num_noise,
                                    max_grad_norm=max_grad_norm, lr=finetune_lr, ema_decay=0.0, secure_noise=False,
                                    checkpoint_every=10**9, log_every=10**9)
            path = finetune(d, config, images=sensitive.images, labels=sensitive.labels, unet=unet, budget=budget,
                            init_state=init, seed=seed, log=quiet)
            states[name] = load_checkpoint(path)["ema"]["module"]
    return states


def compare_starting_points(*, heldout, unet: UNetConfig, seed: int = 0, **kwargs) -> dict[str, float]:
    """Held-out loss (:func:`heldout_loss`) after the DP fine-tune for the "subset", "random" and "none"
    starting points; ``kwargs`` as :func:`fine_tune_starting_points`."""
    states = fine_tune_starting_points(unet=unet, seed=seed, **kwargs)
    return {name: heldout_loss(unet, state, heldout.images, heldout.labels, seed=seed)
            for name, state in states.items()}
