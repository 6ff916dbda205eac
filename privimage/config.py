"""Run configurations: frozen dataclasses, named presets, JSON files.

A :class:`RunConfig` says everything one ``privimage run`` does: which data (sensitive, its held-out test
split, public), the semantic query, the generator (``kind``: the UNet of PRIVIMAGE+D, or the GAN of
PRIVIMAGE+G), pre-training, DP fine-tuning, sampling and the total (ε, δ). Each kind has its own pre-training
and fine-tuning sections (:class:`PretrainConfig`/:class:`FinetuneConfig`, :class:`GANPretrainConfig`/
:class:`GANFinetuneConfig`); a key that only the other kind reads (``finetune.num_noise`` in a GAN config,
``finetune.d_lr`` in a diffusion one, the diffusion sampler's keys in a GAN's ``sample``) is a ConfigError.
Every field is public information (settings, never data); the whole config is written to the run
directory's ``config.json`` and into every checkpoint.

Presets (``privimage run --config NAME``):

* ``demo``: the embedded procedural data at 16×16, a small UNet; sized for a CPU (``bench/results/demo.md``).
* ``test``: the smallest end-to-end run, for the test suite.
* ``fmnist``: the data issue's Fashion-MNIST split (three sensitive classes, the other seven public),
  padded to 32×32 grayscale.
* ``demo-gan``, ``test-gan``: the same with the GAN generator (``kind = "gan"``, PRIVIMAGE+G).
* ``cifar10-gan-eps{1,10}``: PRIVIMAGE+G on CIFAR-10, sized like DPImageBench's DP-GAN (:func:`_cifar10_gan`:
  generator 3.84 M, discriminator 1.65 M parameters).
* ``cifar10-eps{1,5,10}``, ``celeba32-eps{1,5,10}``, ``celeba64-eps{1,5,10}``: the official PrivImage settings
  (logical batch 16384 × K = 8 noise draws, C = 1e-3, Adam 3e-4, 50 epochs, EMA 0.999; δ = 1e-5 for CIFAR-10,
  8e-7 for CelebA). They need the real files: ``--sensitive-root`` and ``--public-root`` on the command line
  (see :meth:`RunConfig.with_roots`).

A JSON file with the same nested keys (any subset: missing keys take the ``base`` preset's values, default
``demo``) is accepted wherever a name is.

Every value is checked when a config is built (:mod:`privimage.checks`): its type against the field's
annotation (a string where a number belongs, ``2.5`` steps, ``NaN``, ``"data": "oops"`` are refused), its
range, its name (unknown keys, methods, presets and data sets get a "did you mean"), and what the fields
must agree on (the UNet's shape, ``compile`` with the method). Every error is a
:class:`~privimage.errors.ConfigError` whose message names the key path. What needs the data or the machine
(class counts, files, the device, δ against the data set's size) is checked by :mod:`privimage.preflight`,
still before anything is written or spent.

(Over 400 lines on purpose: each section's fields sit beside the checks of their values, and the presets
beside the sections they fill; the generic type checking lives in :mod:`privimage.checks`.)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from privimage.checks import check_fields, coerce, describe, need, suggest
from privimage.diffusion.sampling import SamplerConfig
from privimage.errors import ConfigError, DataError
from privimage.models.gan import GAN_PRESETS, GANConfig
from privimage.models.unet import PRESETS as UNET_PRESETS, UNetConfig

__all__ = ["CONFIGS", "DataConfig", "FinetuneConfig", "GANFinetuneConfig", "GANPretrainConfig", "KINDS",
           "PretrainConfig", "QueryConfig", "RunConfig", "SampleConfig", "load_config"]

#: UNet fields a config may override (resolution, channels and classes come from the data).
UNET_OVERRIDES = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")
#: GAN fields a config may override (resolution, channels and classes come from the data).
GAN_OVERRIDES = ("z_dim", "shared_dim", "g_width", "g_ch_mult", "g_attention", "g_spectral_norm", "d_width",
                 "d_ch_mult", "d_downsample")
#: The generator a run trains: PrivImage's two variants (PRIVIMAGE+D and PRIVIMAGE+G).
KINDS = ("diffusion", "gan")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")


def _fraction(key: str, value: float, *, closed_right: bool = False) -> None:
    need(0 <= value <= 1 if closed_right else 0 <= value < 1, key, value, "a number in [0, 1]" if closed_right
         else "a number in [0, 1)")


def _every(key: str, value: int, low: int) -> None:
    need(low <= value <= 10 ** 9, key, value, f"an integer >= {low}" + (" (0: never)" if low == 0 else ""))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from: data specs ``name[:split][,key=value]`` of :func:`privimage.data.load_spec`."""

    sensitive: str = "embedded:sensitive"          # the private training set
    sensitive_test: str = "embedded:sensitive_test"  # held-out real images (evaluation only)
    public: str = "embedded:public"                # public images the query picks classes from
    resolution: int = 32                           # every image is resized (or padded) to this side length
    pad_to: int | None = None                      # pad (e.g. 28 -> 32) instead of resizing
    seed: int = 0                                  # data generation / subset seed (public)

    def __post_init__(self) -> None:
        check_fields(self, "data")
        from privimage.data import resolve_spec

        for which in ("sensitive", "sensitive_test", "public"):
            try:
                resolve_spec(getattr(self, which), which)
            except DataError as err:
                raise ConfigError(f"data.{which}: {err}") from None
        need(8 <= self.resolution <= 1024, "data.resolution", self.resolution, "an integer in [8, 1024]")
        need(self.pad_to is None or self.pad_to == self.resolution, "data.pad_to", self.pad_to,
             f"null or data.resolution={self.resolution} (images are padded to the model's resolution)")
        need(0 <= self.seed < 2 ** 63, "data.seed", self.seed, "an integer in [0, 2**63)")


@dataclass(frozen=True)
class QueryConfig:
    """The DP semantic query (PrivImage §4.1), run per sensitive class."""

    top_k: int = 1                    # votes per sensitive image (L2 sensitivity √k)
    top_n: int = 5                    # public classes selected in all (split over the sensitive classes)
    epsilon_fraction: float = 0.1     # share of ε the query alone may use; the fine-tune's σ uses the rest
    classifier_width: int = 32
    classifier_epochs: int = 10
    classifier_style_noise: float = 0.0   # style augmentation of the classifier (privimage.query.ClassifierConfig)
    classifier_style_gain: float = 0.0
    max_per_label: int | None = None  # cap of public images per selected class

    def __post_init__(self) -> None:
        check_fields(self, "query")
        need(1 <= self.top_k <= 10_000, "query.top_k", self.top_k, "an integer >= 1")
        need(1 <= self.top_n <= 100_000, "query.top_n", self.top_n, "an integer >= 1")
        need(0 < self.epsilon_fraction < 1, "query.epsilon_fraction", self.epsilon_fraction, "a number in (0, 1)")
        need(1 <= self.classifier_width <= 1024, "query.classifier_width", self.classifier_width,
             "an integer in [1, 1024]")
        need(1 <= self.classifier_epochs <= 100_000, "query.classifier_epochs", self.classifier_epochs,
             "an integer >= 1")
        need(self.classifier_style_noise >= 0, "query.classifier_style_noise", self.classifier_style_noise, ">= 0")
        need(self.classifier_style_gain >= 0, "query.classifier_style_gain", self.classifier_style_gain, ">= 0")
        need(self.max_per_label is None or self.max_per_label >= 1, "query.max_per_label", self.max_per_label,
             "null (no cap) or an integer >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    """Non-private pre-training on the selected public subset (PrivImage: Adam 1e-4)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    checkpoint_every: int = 500
    sample_every: int = 0             # PNG grid of EMA samples every N steps (0: only at the end)
    log_every: int = 50
    compile: bool | None = None       # torch.compile the step; None: on for CUDA, off on CPU (compile time)
    loader: str = "auto"              # stream the subset: "device" (uint8 on the device), "ffcv" (file), "auto"

    def __post_init__(self) -> None:
        check_fields(self, "pretrain")
        need(0 <= self.steps <= 10 ** 9, "pretrain.steps", self.steps, "an integer >= 0")
        need(self.loader in ("auto", "device", "ffcv"), "pretrain.loader", self.loader,
             "one of 'auto', 'device', 'ffcv'" + suggest(self.loader, ("auto", "device", "ffcv")))
        need(1 <= self.batch_size <= 2 ** 20, "pretrain.batch_size", self.batch_size, "an integer >= 1")
        need(0 < self.lr <= 10, "pretrain.lr", self.lr, "a number in (0, 10]")
        _fraction("pretrain.ema_decay", self.ema_decay)
        _fraction("pretrain.label_dropout", self.label_dropout, closed_right=True)
        _every("pretrain.checkpoint_every", self.checkpoint_every, 1)
        _every("pretrain.log_every", self.log_every, 1)
        _every("pretrain.sample_every", self.sample_every, 0)


#: The most DP-SGD steps a config may plan (the accountant composes them; more is a typo, not a plan).
MAX_FINETUNE_STEPS = 1_000_000


class _PoissonPlan:
    """What the budget plan reads of a fine-tune section (``epochs``, ``batch_size``): the Poisson rate and the
    number of DP steps (diffusion: DP-SGD steps of the UNet; GAN: discriminator steps)."""

    def sample_rate(self, num_examples: int) -> float:
        if self.batch_size > num_examples:
            raise ConfigError(f"finetune.batch_size={self.batch_size} exceeds the {num_examples} sensitive "
                              f"images; the Poisson rate batch_size/N must be <= 1.")
        return self.batch_size / num_examples

    def steps(self, num_examples: int) -> int:
        steps = max(1, round(self.epochs / self.sample_rate(num_examples)))
        need(steps <= MAX_FINETUNE_STEPS, "finetune.epochs", self.epochs,
             f"at most {MAX_FINETUNE_STEPS} DP-SGD steps (epochs x N / batch_size gives {steps})")
        return steps


def _check_dp_section(f) -> None:
    """The checks the two fine-tune sections share (their common fields)."""
    from privimage.engine.dp_sgd import METHODS

    need(0 < f.epochs <= 100_000, "finetune.epochs", f.epochs, "a number in (0, 100000]")
    need(1 <= f.batch_size <= 2 ** 31, "finetune.batch_size", f.batch_size, "an integer >= 1")
    need(1 <= f.physical_batch_size <= 2 ** 20, "finetune.physical_batch_size", f.physical_batch_size,
         "an integer >= 1")
    need(0 < f.max_grad_norm <= 1e6, "finetune.max_grad_norm", f.max_grad_norm, "a number > 0")
    _fraction("finetune.ema_decay", f.ema_decay)
    need(f.method in METHODS, "finetune.method", f.method, f"one of {', '.join(METHODS)}" + suggest(f.method, METHODS))
    need(not f.compile or f.method == "bk-mixed", "finetune.compile", f.compile,
         f"false with finetune.method={f.method!r} (the compiled step is bk-mixed only)")
    _every("finetune.checkpoint_every", f.checkpoint_every, 1)
    _every("finetune.log_every", f.log_every, 1)
    _every("finetune.sample_every", f.sample_every, 0)


@dataclass(frozen=True)
class FinetuneConfig(_PoissonPlan):
    """DP-SGD fine-tuning on the sensitive data (official: 16384 × K=8, C=1e-3, Adam 3e-4, 50 epochs)."""

    epochs: float = 50.0               # steps = round(epochs / sample_rate)
    batch_size: int = 16384            # EXPECTED logical batch size: Poisson rate q = batch_size / N
    physical_batch_size: int = 64      # images per micro-batch (memory); ×K rows go through the UNet
    num_noise: int = 8                 # K noise draws per image (DPDM noise multiplicity)
    max_grad_norm: float = 1e-3        # C
    lr: float = 3e-4
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    method: str = "bk-mixed"           # the DP engine's per-sample gradient method
    checkpoint_every: int = 10
    sample_every: int = 0              # a grid at the first checkpoint at/after each multiple (written after the
                                       # ledger and the checkpoint: a grid is a release of the steps before it)
    log_every: int = 1
    compile: bool = False              # torch.compile the DP step (bk-mixed); opt-in: see privimage.engine.dp_sgd
    # Draw the Poisson sampling seed and the DP noise (query and fine-tune) from the OS's cryptographic source.
    # False derives them from `seed`, which is public (config.json): reproducible, for tests only, NOT private.
    secure_noise: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "finetune")
        _check_dp_section(self)
        need(1 <= self.num_noise <= 1024, "finetune.num_noise", self.num_noise, "an integer in [1, 1024]")
        need(0 <= self.lr <= 10, "finetune.lr", self.lr,
             "a number in [0, 10] (0: the weights stay put, as the privacy audit needs)")
        _fraction("finetune.label_dropout", self.label_dropout, closed_right=True)



def _check_gan_steps(section: str, c) -> None:
    """The settings the two GAN sections share: both optimizers and the generator's schedule."""
    need(0 < c.d_lr <= 10, f"{section}.d_lr", c.d_lr, "a number in (0, 10]")
    need(0 < c.g_lr <= 10, f"{section}.g_lr", c.g_lr, "a number in (0, 10]")
    need(len(c.betas) == 2 and all(0 <= b < 1 for b in c.betas), f"{section}.betas", c.betas,
         "two numbers in [0, 1) (Adam's beta1, beta2; DP-GAN: [0, 0.999])")
    need(1 <= c.d_steps_per_g_step <= 10_000, f"{section}.d_steps_per_g_step", c.d_steps_per_g_step,
         "an integer >= 1 (n_D: one generator step after every n_D discriminator steps)")
    _fraction(f"{section}.ema_decay", c.ema_decay)


@dataclass(frozen=True)
class GANPretrainConfig:
    """Non-private GAN pre-training on the selected public subset (``kind = "gan"``; DPImageBench's DP-GAN:
    batch 64, Adam β = (0, 0.999), D 5e-4, G 2e-4, n_D = 5, EMA 0.999). :func:`privimage.train.pretrain_gan`."""

    steps: int = 1000                  # discriminator steps
    batch_size: int = 64               # real images per discriminator step (= fakes = generator batch)
    d_lr: float = 5e-4
    g_lr: float = 2e-4
    betas: tuple[float, ...] = (0.0, 0.999)
    d_steps_per_g_step: int = 5        # n_D
    ema_decay: float = 0.999           # EMA of the generator, after each generator step
    checkpoint_every: int = 500
    sample_every: int = 0
    log_every: int = 50
    compile: bool | None = None        # torch.compile both networks; None: on for CUDA, off on CPU
    loader: str = "auto"               # "device", "ffcv" or "auto" (privimage.query.loaders)

    def __post_init__(self) -> None:
        check_fields(self, "pretrain")
        need(0 <= self.steps <= 10 ** 9, "pretrain.steps", self.steps, "an integer >= 0")
        need(1 <= self.batch_size <= 2 ** 20, "pretrain.batch_size", self.batch_size, "an integer >= 1")
        need(self.loader in ("auto", "device", "ffcv"), "pretrain.loader", self.loader,
             "one of 'auto', 'device', 'ffcv'" + suggest(self.loader, ("auto", "device", "ffcv")))
        _check_gan_steps("pretrain", self)
        _every("pretrain.checkpoint_every", self.checkpoint_every, 1)
        _every("pretrain.log_every", self.log_every, 1)
        _every("pretrain.sample_every", self.sample_every, 0)


@dataclass(frozen=True)
class GANFinetuneConfig(_PoissonPlan):
    """DP fine-tune of the GAN (``kind = "gan"``): the discriminator by DP-SGD (one DP step per discriminator
    step; the budget plan counts these), the generator from the DP discriminator only (post-processing).
    DPImageBench's DP-GAN for CIFAR-10: batch 4096, 150 epochs, C = 1 (ε = 10) or 1e-3 (ε = 1), n_D = 5.
    :func:`privimage.train.finetune_gan`."""

    epochs: float = 150.0              # discriminator steps = round(epochs / sample_rate)
    batch_size: int = 4096             # EXPECTED logical batch of sensitive images per discriminator step
    physical_batch_size: int = 64      # records per micro-batch (each a real image and its fake: 2 rows)
    max_grad_norm: float = 1.0         # C, per record (the pair's gradient)
    d_lr: float = 5e-4
    g_lr: float = 2e-4
    betas: tuple[float, ...] = (0.0, 0.999)
    d_steps_per_g_step: int = 5        # n_D
    g_batch_size: int | None = None    # fakes per generator step; null: the expected batch q·N (public)
    ema_decay: float = 0.999
    method: str = "bk-mixed"           # the DP engine's per-sample gradient method (discriminator)
    checkpoint_every: int = 10
    sample_every: int = 0              # a grid at the first checkpoint at/after each multiple
    log_every: int = 1
    compile: bool = False              # DPEngine(compile=...) for the discriminator step
    # As FinetuneConfig.secure_noise: False derives the sampler seed, DP noise and per-record fakes from the
    # PUBLIC seed (tests only, NOT private).
    secure_noise: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "finetune")
        _check_dp_section(self)
        _check_gan_steps("finetune", self)
        need(self.g_batch_size is None or 1 <= self.g_batch_size <= 2 ** 24, "finetune.g_batch_size",
             self.g_batch_size, "null (the expected batch) or an integer >= 1")


@dataclass(frozen=True)
class SampleConfig(SamplerConfig):
    """Sampling the final (EMA) model: the sampler's own settings (:class:`~privimage.diffusion.SamplerConfig`,
    DPDM's deterministic DDIM, 50 steps, σ ∈ [0.002, 80], ρ = 7, guidance, stochastic) plus how many images,
    in which batches, and the grid."""

    num_samples: int = 1000
    batch_size: int = 250
    grid_per_class: int = 10

    def __post_init__(self) -> None:
        check_fields(self, "sample")  # the sampler's own checks too, as ConfigErrors naming the key
        need(1 <= self.num_samples <= 10 ** 8, "sample.num_samples", self.num_samples, "an integer >= 1")
        need(1 <= self.batch_size <= 2 ** 20, "sample.batch_size", self.batch_size, "an integer >= 1")
        need(2 <= self.num_steps <= 100_000, "sample.num_steps", self.num_steps, "an integer >= 2")
        need(0 < self.sigma_min < self.sigma_max, "sample.sigma_min", self.sigma_min,
             f"a number in (0, sample.sigma_max={self.sigma_max})")
        need(self.rho > 0, "sample.rho", self.rho, "a number > 0")
        need(0 <= self.guidance <= 1000, "sample.guidance", self.guidance, "a number >= 0 (0: no guidance)")
        need(1 <= self.grid_per_class <= 1000, "sample.grid_per_class", self.grid_per_class, "an integer >= 1")


@dataclass(frozen=True)
class RunConfig:
    """One whole PrivImage run."""

    name: str = "demo"
    epsilon: float = 10.0
    delta: float = 1e-5
    seed: int = 0
    device: str = "auto"                  # "auto": cuda if available, else cpu
    kind: str = "diffusion"               # the generator: "diffusion" (PRIVIMAGE+D) or "gan" (PRIVIMAGE+G)
    model: str = "s"                      # a UNet preset (privimage.models.PRESETS), or with kind "gan" a GAN
                                          # preset (privimage.models.GAN_PRESETS) ...
    model_overrides: dict = field(default_factory=dict)  # ... with fields replaced (nf, ch_mult, ... / g_width, ...)
    data: DataConfig = DataConfig()
    query: QueryConfig = QueryConfig()
    # The sections of the kind: PretrainConfig/FinetuneConfig (diffusion), GANPretrainConfig/GANFinetuneConfig.
    pretrain: PretrainConfig | GANPretrainConfig = PretrainConfig()
    finetune: FinetuneConfig | GANFinetuneConfig = FinetuneConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: bool = True                 # run `privimage evaluate` at the end (small CA preset)
    # Experiments only: accept delta >= 1/n (which permits publishing a record outright). Every report, the
    # release's privacy.json and PRIVACY.md then say so (privimage.preflight.large_delta_note).
    allow_large_delta: bool = False
    # The NON-PRIVATE reference of an epsilon sweep (`privimage sweep --epsilons ...,inf`): the query and the
    # fine-tune run with sigma = 0 (no noise; clipping as configured), epsilon is ignored and reported as inf,
    # and every plan, log and statement says NOT PRIVATE (privimage.privacy.plan_non_private_budget).
    non_private: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        need(bool(_NAME.fullmatch(self.name)), "name", self.name,
             "1-64 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-' (it names the run directory)")
        need(0 < self.epsilon <= 100, "epsilon", self.epsilon, "a finite number in (0, 100]")
        need(0 < self.delta < 1, "delta", self.delta, "a number in (0, 1), below 1/n for n sensitive images")
        need(0 <= self.seed < 2 ** 63, "seed", self.seed, "an integer in [0, 2**63)")
        need(bool(_DEVICE.fullmatch(self.device)), "device", self.device, "auto, cpu, cuda or cuda:N")
        need(self.kind in KINDS, "kind", self.kind, f"one of {', '.join(KINDS)}" + suggest(self.kind, KINDS))
        gan = self.kind == "gan"
        for name, want in (("pretrain", GANPretrainConfig if gan else PretrainConfig),
                           ("finetune", GANFinetuneConfig if gan else FinetuneConfig)):
            if not isinstance(getattr(self, name), want):
                raise ConfigError(f"{name}: a {type(getattr(self, name)).__name__} section with kind={self.kind!r}; "
                                  f"expected a {want.__name__} (each kind has its own {name} settings).")
        if gan:  # the diffusion sampler's settings mean nothing to a GAN: kept at their defaults, never written
            object.__setattr__(self, "sample", SampleConfig(**{k: v for k, v in vars(self.sample).items()
                                                               if k not in SAMPLER_KEYS}))
        presets, what = (GAN_PRESETS, "GAN") if gan else (UNET_PRESETS, "UNet")
        need(self.model in presets, "model", self.model, f"a {what} preset with kind={self.kind!r}, one of "
             f"{', '.join(sorted(presets))}" + suggest(self.model, presets))
        self._check_model_overrides()

    def _check_model_overrides(self) -> None:
        """Overrides are fields of the kind's model (UNet or GAN) of the right types, and the model they give is
        valid for the data."""
        import typing

        gan = self.kind == "gan"
        allowed, other = (GAN_OVERRIDES, UNET_OVERRIDES) if gan else (UNET_OVERRIDES, GAN_OVERRIDES)
        hints = typing.get_type_hints(GANConfig if gan else UNetConfig)
        over = {}
        for key, value in self.model_overrides.items():
            if key in other and key not in allowed:
                raise ConfigError(f"model_overrides.{key} is a {'UNet' if gan else 'GAN'} setting, but this config "
                                  f"has kind={self.kind!r}; remove it (its model's keys: {', '.join(allowed)}).")
            need(key in allowed, "model_overrides", key, f"keys among {', '.join(allowed)}"
                 + suggest(key, allowed) + " (resolution, channels and classes come from the data)")
            over[key] = coerce(value, hints[key], f"model_overrides.{key}")
        object.__setattr__(self, "model_overrides", over)  # JSON lists become the model's tuples
        if not gan:
            need(over.get("dropout", UNET_PRESETS[self.model].dropout) == 0, "model_overrides.dropout",
                 over.get("dropout"), "0: the DP fine-tune refuses dropout (its masks would not be secret randomness)")
        try:
            self.gan_config(channels=3, num_classes=1) if gan else self.unet_config(channels=3, num_classes=1)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model={self.model!r} with model_overrides {self.model_overrides} at data.resolution="
                              f"{self.data.resolution}: {err}") from None

    def gan_config(self, *, channels: int, num_classes: int) -> GANConfig:
        """The GAN for this data (kind "gan"): the preset, its overrides, then resolution/channels/classes."""
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in self.model_overrides.items()}
        return replace(GAN_PRESETS[self.model], **{**over, "resolution": self.data.resolution,
                                                    "in_channels": channels, "num_classes": num_classes})

    def unet_config(self, *, channels: int, num_classes: int) -> UNetConfig:
        """The UNet for this data: the preset, its overrides, then resolution/channels/classes from the data."""
        over = {k: tuple(v) if isinstance(v, list) else v for k, v in self.model_overrides.items()}
        return replace(UNET_PRESETS[self.model], **{**over, "resolution": self.data.resolution,
                                                     "in_channels": channels, "num_classes": num_classes})

    def with_roots(self, *, sensitive: str | Path | None = None, public: str | Path | None = None) -> "RunConfig":
        """This config with ``root=`` (made absolute) in the data specs: ``sensitive`` for the sensitive and
        sensitive_test splits, ``public`` for the public one.

        The command line's ``--sensitive-root``/``--public-root`` go into the config this way, so every stage
        and ``privimage evaluate`` (which reads config.json) find the same files. A root already in a spec
        is replaced.

        Example:
            >>> CONFIGS["cifar10-eps10"].with_roots(sensitive="/data/cifar").data.sensitive_test
            'cifar10:test,root=/data/cifar'
        """
        def rooted(spec: str, root: str | Path | None) -> str:
            if root is None:
                return spec
            root = str(Path(root).expanduser().absolute())
            if "," in root:
                raise ConfigError(f"Data root {root!r} contains a comma, which the data specs use as separator.")
            return ",".join([p for p in spec.split(",") if not p.startswith("root=")] + [f"root={root}"])

        d = self.data
        return replace(self, data=replace(d, sensitive=rooted(d.sensitive, sensitive),
                                          sensitive_test=rooted(d.sensitive_test, sensitive),
                                          public=rooted(d.public, public)))

    def to_dict(self) -> dict:
        """The settings as nested dicts; a GAN config leaves out the diffusion sampler's keys (:data:`SAMPLER_KEYS`)."""
        d = dataclasses.asdict(self)
        if self.kind == "gan":
            d["sample"] = {k: v for k, v in d["sample"].items() if k not in SAMPLER_KEYS}
        return d

    @classmethod
    def from_dict(cls, d: dict, base: "RunConfig | None" = None) -> "RunConfig":
        """Build from a (possibly partial) nested dict over ``base``; unknown keys are errors naming them.
        ``launch`` (how a run directory's config.json was launched: world size, backend) is a record, not a
        setting, and is ignored."""
        base = base or CONFIGS["demo"]
        if not isinstance(d, dict):
            raise ConfigError(f"A config must be a JSON object, got {describe(d)}.")
        _no_unknown_keys(d, [f.name for f in dataclasses.fields(cls)] + ["base", "launch"], "")
        kind = d.get("kind", base.kind)
        if not isinstance(kind, str) or kind not in KINDS:
            raise ConfigError(f"kind={kind!r}: expected one of {', '.join(KINDS)}"
                              + (suggest(kind, KINDS) if isinstance(kind, str) else "") + ".")
        _no_keys_of_the_other_kind(d, kind)
        kwargs = {}
        if kind != base.kind:  # the base's sections of the other kind give way to this kind's defaults
            kwargs.update(pretrain=_SECTIONS[kind]["pretrain"](), finetune=_SECTIONS[kind]["finetune"](),
                          model_overrides={})
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, current = d[f.name], kwargs.get(f.name, getattr(base, f.name))
            if dataclasses.is_dataclass(current):
                sub_known = [g.name for g in dataclasses.fields(current)]
                if not isinstance(value, dict):
                    raise ConfigError(f"{f.name}: expected a section (a JSON object with keys among "
                                      f"{', '.join(sub_known)}), got {describe(value)}.")
                _no_unknown_keys(value, sub_known, f"{f.name}.")
                value = replace(current, **value)
            kwargs[f.name] = value
        return replace(base, **kwargs)


#: The sample section's keys that only the diffusion sampler reads (a GAN draws one forward per image).
SAMPLER_KEYS = tuple(f.name for f in dataclasses.fields(SamplerConfig))
_SECTIONS = {"diffusion": {"pretrain": PretrainConfig, "finetune": FinetuneConfig},
             "gan": {"pretrain": GANPretrainConfig, "finetune": GANFinetuneConfig}}


def _no_keys_of_the_other_kind(d: dict, kind: str) -> None:
    """A key that only the other kind reads is a mistake (a diffusion setting in a GAN config or the reverse),
    refused by name rather than silently ignored."""
    other = "gan" if kind == "diffusion" else "diffusion"
    foreign = {name: {g.name for g in dataclasses.fields(_SECTIONS[other][name])}
               - {g.name for g in dataclasses.fields(_SECTIONS[kind][name])} for name in ("pretrain", "finetune")}
    if kind == "gan":
        foreign["sample"] = set(SAMPLER_KEYS)
    for section, keys in foreign.items():
        value = d.get(section)
        for key in (value if isinstance(value, dict) else ()):
            if key in keys:
                raise ConfigError(f"{section}.{key} is a {other} setting, but this config has kind={kind!r}; remove "
                                  f"it, or set kind={other!r}" + (" (a GAN draws each sample in one forward: no "
                                  "sampler steps, sigmas or guidance)" if section == "sample" else "") + ".")


def _no_unknown_keys(d: dict, known: list[str], prefix: str) -> None:
    for key in d:
        if key not in known:
            where = f" in section {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"Unknown config key {prefix}{key}{suggest(key, known)} (known{where}: "
                              f"{', '.join(sorted(known))}).")


def _official(dataset: str, eps: float) -> RunConfig:
    """PrivImage's official settings (arXiv 2311.12850 §5, DPDM's configs)."""
    if dataset == "cifar10":
        data = DataConfig(sensitive="cifar10:train", sensitive_test="cifar10:test", public="imagenet32:train",
                          resolution=32)
        model, classes_n = "s", 10
    elif dataset == "celeba32":
        data = DataConfig(sensitive="celeba:train", sensitive_test="celeba:test", public="imagenet32:train",
                          resolution=32)
        model, classes_n = "celeba32", 2
    else:
        data = DataConfig(sensitive="celeba:train", sensitive_test="celeba:test", public="imagenet64:train",
                          resolution=64)
        model, classes_n = "celeba64", 2
    # δ below 1/n: 1e-5 for CIFAR-10's 50k images; 8e-7 for CelebA's 162,770 (the official code's CelebA
    # configs; 1e-5 would exceed 1/n, which permits releasing one person's image).
    delta = 1e-5 if dataset == "cifar10" else 8e-7
    return RunConfig(
        name=f"{dataset}-eps{eps:g}", epsilon=eps, delta=delta, model=model, data=data,
        query=QueryConfig(top_k=1, top_n=classes_n * 5 if dataset == "cifar10" else 50, classifier_epochs=20),
        pretrain=PretrainConfig(steps=100_000, batch_size=256, checkpoint_every=5000, sample_every=10_000,
                                log_every=100),
        finetune=FinetuneConfig(epochs=50, batch_size=16384, physical_batch_size=256, num_noise=8,
                                max_grad_norm=1e-3, lr=3e-4, checkpoint_every=10, log_every=1),
        sample=SampleConfig(num_samples=5000, batch_size=500))


CONFIGS: dict[str, RunConfig] = {
    "demo": RunConfig(
        name="demo", epsilon=10.0, delta=1e-5, model="s",
        model_overrides={"ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,)},
        data=DataConfig(sensitive="embedded:sensitive,size=4000", sensitive_test="embedded:sensitive_test,size=500",
                        public="embedded:public,size=20000", resolution=16),
        query=QueryConfig(top_k=1, top_n=5, classifier_width=16, classifier_epochs=10,
                          classifier_style_noise=0.15, classifier_style_gain=0.3),
        pretrain=PretrainConfig(steps=2000, batch_size=32, lr=2e-3, checkpoint_every=500, log_every=50,
                                ema_decay=0.99),
        finetune=FinetuneConfig(epochs=1, batch_size=200, physical_batch_size=50, num_noise=2, max_grad_norm=1e-2,
                                lr=1e-3, ema_decay=0.9, checkpoint_every=5, log_every=5),
        sample=SampleConfig(num_samples=200, batch_size=100, num_steps=30, guidance=1.0, grid_per_class=8)),
    "test": RunConfig(
        name="test", epsilon=10.0, delta=1e-4, model="tiny",
        model_overrides={"nf": 8, "ch_mult": (1,), "attn_resolutions": (8,)},
        data=DataConfig(sensitive="embedded:sensitive,size=64", sensitive_test="embedded:sensitive_test,size=32",
                        public="embedded:public,size=600", resolution=8),
        query=QueryConfig(top_k=1, top_n=5, classifier_width=8, classifier_epochs=1),
        pretrain=PretrainConfig(steps=4, batch_size=8, checkpoint_every=2, log_every=1),
        finetune=FinetuneConfig(epochs=2, batch_size=16, physical_batch_size=8, num_noise=2, max_grad_norm=1e-2,
                                lr=1e-3, checkpoint_every=2, secure_noise=False),
        sample=SampleConfig(num_samples=10, batch_size=10, num_steps=3, grid_per_class=2),
        evaluate=False),
    "fmnist": RunConfig(
        name="fmnist", epsilon=10.0, delta=1e-5, model="s",
        model_overrides={"num_res_blocks": 1},
        data=DataConfig(sensitive="fmnist:sensitive", sensitive_test="fmnist:sensitive_test",
                        public="fmnist:public", resolution=32, pad_to=32),
        query=QueryConfig(top_k=1, top_n=3, classifier_epochs=5),
        pretrain=PretrainConfig(steps=3000, batch_size=64, lr=1e-3, checkpoint_every=500),
        finetune=FinetuneConfig(epochs=10, batch_size=2048, physical_batch_size=64, num_noise=4, max_grad_norm=1e-2,
                                lr=1e-3, checkpoint_every=5),
        sample=SampleConfig(num_samples=600, batch_size=200)),
}
for _ds in ("cifar10", "celeba32", "celeba64"):
    for _eps in (1.0, 5.0, 10.0):
        _c = _official(_ds, _eps)
        CONFIGS[_c.name] = _c


def _cifar10_gan(eps: float) -> RunConfig:
    """PRIVIMAGE+G on CIFAR-10 sized like DPImageBench's DP-GAN (configs/DPGAN/cifar10_32_eps{1.0,10.0}.yaml):
    GAN preset "32" (generator 3,838,884 parameters, discriminator 1,649,127 at 10 classes), pre-training
    batch 64 with n_D = 5, Adam β = (0, 0.999), D 5e-4, G 2e-4; DP fine-tune batch 4096 for 150 epochs, C = 1
    at ε = 10 and 1e-3 at ε = 1, EMA 0.999. The query is the diffusion presets' (top-50 ImageNet32 classes)."""
    base = _official("cifar10", eps)
    return replace(
        base, name=f"cifar10-gan-eps{eps:g}", kind="gan", model="32", model_overrides={},
        pretrain=GANPretrainConfig(steps=20_000, batch_size=64, checkpoint_every=2000, sample_every=5000,
                                   log_every=100),
        finetune=GANFinetuneConfig(epochs=150, batch_size=4096, physical_batch_size=256,
                                   max_grad_norm=1.0 if eps >= 10 else 1e-3, checkpoint_every=10),
        sample=SampleConfig(num_samples=5000, batch_size=1000))


CONFIGS.update({
    # PRIVIMAGE+G on the embedded data: the demo's data and query, GAN preset "demo" (32 channels), sized so the
    # whole run fits in minutes on a 2-core CPU (bench/results/demo_gan.md).
    "demo-gan": replace(
        CONFIGS["demo"], name="demo-gan", kind="gan", model="demo", model_overrides={},
        pretrain=GANPretrainConfig(steps=600, batch_size=32, d_lr=1e-3, g_lr=1e-3, betas=(0.5, 0.999),
                                   d_steps_per_g_step=1, ema_decay=0.99, checkpoint_every=200, log_every=50),
        finetune=GANFinetuneConfig(epochs=2.5, batch_size=100, physical_batch_size=100, max_grad_norm=1e-3,
                                   d_lr=2e-4, g_lr=2e-4, betas=(0.5, 0.999), d_steps_per_g_step=2, ema_decay=0.9,
                                   checkpoint_every=10, log_every=5),
        sample=SampleConfig(num_samples=200, batch_size=100, grid_per_class=8)),
    # the smallest end-to-end GAN run, for the test suite (like "test")
    "test-gan": replace(
        CONFIGS["test"], name="test-gan", kind="gan", model="tiny", model_overrides={},
        pretrain=GANPretrainConfig(steps=4, batch_size=8, d_steps_per_g_step=2, checkpoint_every=2, log_every=1),
        finetune=GANFinetuneConfig(epochs=2, batch_size=16, physical_batch_size=8, max_grad_norm=1e-2,
                                   d_steps_per_g_step=2, g_batch_size=8, checkpoint_every=2, secure_noise=False),
        sample=SampleConfig(num_samples=10, batch_size=10, grid_per_class=2)),
    **{c.name: c for c in (_cifar10_gan(1.0), _cifar10_gan(10.0))},
})


def load_config(name_or_file: str) -> RunConfig:
    """A preset by name, or a JSON file (partial: keys override ``base``, a preset name, default ``demo``).

    Raises :class:`ConfigError` naming the file and the key path of the first bad value.
    """
    if name_or_file in CONFIGS:
        return CONFIGS[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise ConfigError(f"--config {name_or_file!r} is neither a preset ({', '.join(sorted(CONFIGS))}) nor a "
                          f"JSON file{suggest(name_or_file, CONFIGS)}")
    return config_from_json(path.read_bytes() if _readable(path) else b"", source=str(path))


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError as err:
        raise ConfigError(f"Config file {path} cannot be read: {err.strerror or err}.") from None


def config_from_json(text: bytes | str, *, source: str) -> RunConfig:
    """A :class:`RunConfig` from JSON text (a partial config over its ``base`` preset); errors name ``source``."""
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"Config file {source} is not valid JSON (UTF-8): {err}") from None
    except RecursionError:
        raise ConfigError(f"Config file {source} is nested too deeply to be a config.") from None
    if not isinstance(d, dict):
        raise ConfigError(f"Config file {source} must hold a JSON object, got {describe(d)}.")
    base = d.get("base", "demo")
    if not isinstance(base, str) or base not in CONFIGS:
        raise ConfigError(f"Config file {source}: base={base!r} is not a preset ({', '.join(sorted(CONFIGS))})"
                          + (suggest(base, CONFIGS) if isinstance(base, str) else "") + ".")
    try:
        return RunConfig.from_dict(d, CONFIGS[base])
    except ConfigError as err:
        raise ConfigError(f"Config file {source}: {err}") from None
