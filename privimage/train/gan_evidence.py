"""Does PrivImage's pre-training help the GAN? Proxy FID and CA after three DP fine-tunes at the same ε.

Starting points, as for the diffusion model (:mod:`privimage.train.evidence`): (a) pre-trained on public
images of the classes the semantic query selects, relabelled to the sensitive classes; (b) pre-trained on
as many RANDOM public images with random labels; (c) no pre-training. All three then get the identical DP
fine-tune (same σ, q, steps, seeds, test-mode randomness), and the fine-tuned generator is scored on
held-out sensitive images:

* proxy FID: the Fréchet distance of a public-data classifier's features (the query classifier:
  :func:`privimage.evaluate.proxy_feature_net`) between balanced samples and the held-out images (lower is
  better; comparable between the starting points only);
* CA: accuracy on the held-out images of a small classifier trained on the samples
  (:data:`privimage.evaluate.SMALL`; higher is better).

This is PrivImage's claim (arXiv 2311.12850, Table 3: PRIVIMAGE+G against DP-GAN with and without
pre-training) at toy scale; the test suite keeps a cheap version, ``bench/gan_evidence.py`` the measured one.
"""

from __future__ import annotations

import tempfile

import torch

from privimage.config import GANFinetuneConfig, GANPretrainConfig
from privimage.engine import PrivacyBudget
from privimage.evaluate import CAConfig, FeatureNet, FeatureStats, classification_accuracy, extract_features
from privimage.evaluate.fid import frechet_distance
from privimage.gan.sampling import sample_gan_in_batches
from privimage.models.gan import GANConfig, Generator
from privimage.train.common import load_checkpoint
from privimage.train.gan_finetune import finetune_gan
from privimage.train.gan_pretrain import pretrain_gan, pretrained_init

__all__ = ["STARTS", "compare_gan_starting_points", "feature_stats", "generator_quality", "pretraining_sets"]

STARTS = ("subset", "random", "none")


def pretraining_sets(public, selected: list[int], *, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """{"subset": public images of ``selected`` relabelled 0..C-1, "random": as many random public images
    with random labels in 0..C-1, "none": None}. ``selected[c]`` is the public label standing for class c."""
    remap = torch.full((public.num_classes,), -1, dtype=torch.long)
    remap[torch.as_tensor(selected)] = torch.arange(len(selected))
    keep = torch.nonzero(remap[public.labels] >= 0).flatten()
    g = torch.Generator().manual_seed(seed + 1)
    rand = torch.randperm(len(public), generator=g)[:len(keep)]
    return {"subset": (public.images[keep], remap[public.labels[keep]]),
            "random": (public.images[rand], torch.randint(len(selected), (len(rand),), generator=g)),
            "none": None}


def feature_stats(features: FeatureNet, images: torch.Tensor) -> FeatureStats:
    return FeatureStats.from_features(extract_features(features, images, desc="features")[0])


def generator_quality(generator, heldout, features: FeatureNet, *, num_samples: int, seed: int,
                      ca: CAConfig | None, reference: FeatureStats | None = None) -> dict[str, float]:
    """{"proxy_fid": ..., "ca": ... (if ``ca``)} of ``num_samples`` balanced samples against ``heldout``
    (``reference``: its feature statistics, if already computed)."""
    images, labels = sample_gan_in_batches(generator, num=num_samples, seed=seed)
    a, b = feature_stats(features, images), reference or feature_stats(features, heldout.images)
    out = {"proxy_fid": float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))}
    if ca is not None:
        out["ca"] = classification_accuracy(images, labels, heldout.images, heldout.labels,
                                            num_classes=generator.config.num_classes, config=ca)["accuracy"]
    return out


def compare_gan_starting_points(*, public, sensitive, heldout, selected: list[int], gan: GANConfig,
                                budget_state: dict, features: FeatureNet, pretrain_steps: int = 300,
                                pretrain: dict | None = None, finetune: dict | None = None, num_samples: int = 500,
                                ca: CAConfig | None = None, seed: int = 0, log=None) -> dict[str, dict[str, float]]:
    """:func:`generator_quality` after the DP fine-tune for each of :data:`STARTS` (and, as
    ``pretrained_proxy_fid``, the proxy FID of the pre-trained generator the fine-tune started from).

    ``budget_state`` is a planned :class:`~privimage.engine.PrivacyBudget` state (its FINETUNE plan sets σ, q
    and the discriminator steps), the same for all three. ``pretrain`` and ``finetune`` are fields of
    :class:`~privimage.config.GANPretrainConfig` and :class:`~privimage.config.GANFinetuneConfig` (batch sizes,
    learning rates, betas, n_D, C, EMA decay). The fine-tune runs in test mode (``secure_noise=False``,
    randomness from ``seed``), so the three runs differ only in their starting point.
    """
    quiet = log or (lambda *_: None)
    reference = feature_stats(features, heldout.images)
    pre_config = GANPretrainConfig(steps=pretrain_steps, checkpoint_every=10**9, log_every=10**9, loader="device",
                                   **(pretrain or {}))
    ft_config = GANFinetuneConfig(secure_noise=False, checkpoint_every=10**9, log_every=10**9, **(finetune or {}))
    results = {}
    for name, data in pretraining_sets(public, selected, seed=seed).items():
        with tempfile.TemporaryDirectory() as d:
            init, before = None, {}
            if data is not None:
                pretrain_gan(d, pre_config, images=data[0], labels=data[1], gan=gan, seed=seed, log=quiet)
                init = pretrained_init(d)
                before = generator_quality(Generator.from_state(gan, init["generator"]), heldout, features,
                                           num_samples=num_samples, seed=seed, ca=None, reference=reference)
            path = finetune_gan(d, ft_config, images=sensitive.images, labels=sensitive.labels, gan=gan,
                                budget=PrivacyBudget.from_state_dict(budget_state), init_state=init, seed=seed,
                                log=quiet)
            tuned = Generator.from_state(gan, load_checkpoint(path)["ema"]["module"])
            results[name] = generator_quality(tuned, heldout, features, num_samples=num_samples, seed=seed, ca=ca,
                                              reference=reference)
            results[name].update({f"pretrained_{k}": v for k, v in before.items()})
            quiet(f"{name}: {results[name]}")
    return results
