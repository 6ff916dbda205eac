"""Run configurations: frozen dataclasses, named presets, JSON files.

A :class:`RunConfig` says everything one ``privimage run`` does: which data (sensitive, its held-out test
split, public), the semantic query, the UNet, pre-training, DP fine-tuning, sampling and the total (ε, δ).
Every field is public information (settings, never data); the whole config is written to the run
directory's ``config.json`` and into every checkpoint.

Presets (``privimage run --config NAME``):

* ``demo``: the embedded procedural data at 16×16, a small UNet; sized for a CPU (``bench/results/demo.md``).
* ``test``: the smallest end-to-end run, for the test suite.
* ``fmnist``: the data issue's Fashion-MNIST split (three sensitive classes, the other seven public),
  padded to 32×32 grayscale.
* ``cifar10-eps{1,5,10}``, ``celeba32-eps{1,5,10}``, ``celeba64-eps{1,5,10}``: the official PrivImage settings
  (logical batch 16384 × K = 8 noise draws, C = 1e-3, Adam 3e-4, 50 epochs, EMA 0.999; δ = 1e-5 for CIFAR-10,
  8e-7 for CelebA). They need the real files: ``--sensitive-root`` and ``--public-root`` on the command line
  (see :meth:`RunConfig.with_roots`).

A JSON file with the same nested keys (any subset: missing keys take the ``base`` preset's values, default
``demo``) is accepted wherever a name is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from privimage.diffusion.sampling import SamplerConfig
from privimage.models.unet import PRESETS as UNET_PRESETS, UNetConfig

__all__ = ["CONFIGS", "DataConfig", "FinetuneConfig", "PretrainConfig", "QueryConfig", "RunConfig",
           "SampleConfig", "load_config"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


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
        _check(self.resolution >= 8, f"Expected data.resolution={self.resolution} >= 8.")


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
        _check(self.top_k >= 1 and self.top_n >= 1, f"Expected query.top_k={self.top_k} and query.top_n="
                                                     f"{self.top_n} >= 1.")
        _check(0 < self.epsilon_fraction < 1, f"Expected query.epsilon_fraction={self.epsilon_fraction} in (0, 1).")


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
        _check(self.steps >= 0, f"Expected pretrain.steps={self.steps} >= 0.")
        _check(self.loader in ("auto", "device", "ffcv"),
               f"Expected pretrain.loader in ('auto', 'device', 'ffcv'), got {self.loader!r}.")
        _check(self.batch_size >= 1, f"Expected pretrain.batch_size={self.batch_size} >= 1.")
        _check(self.lr > 0, f"Expected pretrain.lr={self.lr} > 0.")
        _check(0 <= self.ema_decay < 1, f"Expected pretrain.ema_decay={self.ema_decay} in [0, 1).")


@dataclass(frozen=True)
class FinetuneConfig:
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
        _check(self.epochs > 0, f"Expected finetune.epochs={self.epochs} > 0.")
        _check(self.batch_size >= 1 and self.physical_batch_size >= 1,
               f"Expected finetune.batch_size={self.batch_size} and physical_batch_size="
               f"{self.physical_batch_size} >= 1.")
        _check(self.num_noise >= 1, f"Expected finetune.num_noise={self.num_noise} >= 1.")
        _check(self.max_grad_norm > 0, f"Expected finetune.max_grad_norm={self.max_grad_norm} > 0.")
        _check(self.lr > 0, f"Expected finetune.lr={self.lr} > 0.")

    def sample_rate(self, num_examples: int) -> float:
        if self.batch_size > num_examples:
            raise ValueError(f"finetune.batch_size={self.batch_size} exceeds the {num_examples} sensitive "
                             f"images; the Poisson rate batch_size/N must be <= 1.")
        return self.batch_size / num_examples

    def steps(self, num_examples: int) -> int:
        return max(1, round(self.epochs / self.sample_rate(num_examples)))


@dataclass(frozen=True)
class SampleConfig(SamplerConfig):
    """Sampling the final (EMA) model: the sampler's own settings (:class:`~privimage.diffusion.SamplerConfig`,
    DPDM's deterministic DDIM, 50 steps, σ ∈ [0.002, 80], ρ = 7, guidance, stochastic) plus how many images,
    in which batches, and the grid."""

    num_samples: int = 1000
    batch_size: int = 250
    grid_per_class: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_samples >= 1 and self.batch_size >= 1, f"Expected sample.num_samples="
                                                               f"{self.num_samples} and batch_size >= 1.")


@dataclass(frozen=True)
class RunConfig:
    """One whole PrivImage run."""

    name: str = "demo"
    epsilon: float = 10.0
    delta: float = 1e-5
    seed: int = 0
    device: str = "auto"                  # "auto": cuda if available, else cpu
    model: str = "s"                      # a UNet preset (privimage.models.PRESETS) ...
    model_overrides: dict = field(default_factory=dict)  # ... with fields replaced (nf, ch_mult, ...)
    data: DataConfig = DataConfig()
    query: QueryConfig = QueryConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: bool = True                 # run `privimage evaluate` at the end (small CA preset)

    def __post_init__(self) -> None:
        _check(self.epsilon > 0 and math.isfinite(self.epsilon), f"Expected epsilon={self.epsilon} > 0.")
        _check(0 < self.delta < 1, f"Expected delta={self.delta} in (0, 1).")
        _check(self.model in UNET_PRESETS, f"Unknown model preset {self.model!r}; choose one of "
                                           f"{sorted(UNET_PRESETS)}.")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"Expected device={self.device!r} to be auto, cpu or cuda[:N].")

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
            _check("," not in root, f"Data root {root!r} contains a comma, which the data specs use as separator.")
            return ",".join([p for p in spec.split(",") if not p.startswith("root=")] + [f"root={root}"])

        d = self.data
        return replace(self, data=replace(d, sensitive=rooted(d.sensitive, sensitive),
                                          sensitive_test=rooted(d.sensitive_test, sensitive),
                                          public=rooted(d.public, public)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, base: "RunConfig | None" = None) -> "RunConfig":
        """Build from a (possibly partial) nested dict over ``base``; unknown keys are errors naming them."""
        base = base or CONFIGS["demo"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"base"}
        if unknown:
            raise ValueError(f"Unknown config keys {sorted(unknown)}; known: {sorted(known)}.")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, current = d[f.name], getattr(base, f.name)
            if dataclasses.is_dataclass(current):
                sub_known = {g.name for g in dataclasses.fields(current)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(f"Unknown keys {sorted(bad)} in config section {f.name!r}; known: "
                                     f"{sorted(sub_known)}.")
                value = replace(current, **value)
            kwargs[f.name] = value
        return replace(base, **kwargs)


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


def load_config(name_or_file: str) -> RunConfig:
    """A preset by name, or a JSON file (partial: keys override ``base``, a preset name, default ``demo``)."""
    if name_or_file in CONFIGS:
        return CONFIGS[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"--config {name_or_file!r} is neither a preset ({', '.join(sorted(CONFIGS))}) nor a "
                         f"JSON file.")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Config file {path} is not valid JSON: {err}") from None
    if not isinstance(d, dict):
        raise ValueError(f"Config file {path} must hold a JSON object.")
    base = d.get("base", "demo")
    if base not in CONFIGS:
        raise ValueError(f"Config file {path}: base={base!r} is not a preset ({', '.join(sorted(CONFIGS))}).")
    return RunConfig.from_dict(d, CONFIGS[base])
