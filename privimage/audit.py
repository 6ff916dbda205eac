"""The pipeline's privacy audit: canary images through the real DP fine-tune, and a lower bound on its ε.

The fine-tune's ε comes from the accountant; whether the code deserves it is what this module measures, with
the one-run audit of Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846; statistics in
:mod:`privimage.engine.auditing`). It runs :func:`privimage.train.finetune`, the function ``privimage run`` calls,
with its DPEngine, Poisson sampler, EDM loss with K noise draws per image and its secure noise, on a data set
into which m canary images are inserted, each with probability 1/2, and turns the auditor's guesses into ε_lb
at 95% confidence. The same audit then runs against three planted bugs (:class:`PlantedBug`), to show that it
can fail: noise at σ/4, clipping per row instead of per image (K = 4 rows), and noise from a generator seeded
by the public configuration seed.

**Threat model (white box).** The auditor sees every step's released noisy sum (DP-SGD's guarantee covers
every iterate), the public configuration and initial model, and nothing else: not which canaries were
included, not the Poisson draws, not the secure noise, not the diffusion draws. The sample rate is 1 (every
record in every step), so the accountant's ε has no subsampling amplification that seeing the batches could
undo; the claim is the accountant's ε for ``steps`` Gaussian releases of the clipped sum.

**Why the canaries are built this way.** Canary images scored through a generic UNet are weak witnesses: their
per-sample gradients are strongly correlated with each other (they share conv weights) and depend on the loss's
random noise levels, so a projection score recovers only a fraction of each canary's signal: too little to
resolve the per-row clipping bug at a small ε. Auditors may choose the public initial model and public
hyper-parameters (worst-case initialisations are standard in tight auditing), so this audit crafts both:

* :func:`crafted_init` routes the class label through the time-embedding MLP so that class c switches on
  one coordinate of the embedding every ResBlock reads (``h + W_b · silu(temb)``), at a large value a, while
  each ``W_b`` is scaled by 1/a: the forward pass keeps its usual scale, and the per-sample gradient of a
  record of class c is dominated (> 99% of its norm) by column c of every ``W_b``. Records of different
  classes then have orthogonal gradients: each canary gets its own class, and nothing else touches its
  coordinates.
* Canaries are constant-colour images (saturated colours): their gradient direction barely depends
  on the loss's noise draws, so the auditor's estimate (the mean unit gradient over its own draws,
  :func:`canary_directions`) is close to what the engine actually adds.
* The learning rate is 0: the released gradients are the mechanism (the model is their post-processing), so
  the guarantee is the same for any learning rate, and a model that does not move keeps the crafted geometry
  and keeps the auditor's directions free of anything but public information.

One model has 4·width classes, so one fine-tune holds 4·width − 1 canaries (one class holds ordinary
"background" images, always included). ``runs`` independent fine-tunes, each with fresh canary bits, are
pooled: every canary changes only its own run, so the pooled release is (ε, δ)-DP in each canary and the
one-run theorem applies to all ``runs · (4·width − 1)`` canaries at once.

(One file, over 400 lines, on purpose: the crafted model, the canaries, the runs and the verdict depend on
each other's geometry and read best top to bottom; the statistics live in :mod:`privimage.engine.auditing`.)

**Scores and guesses.** Canary j's score is Σ_t ⟨u_j, Δ_t[columns of its class]⟩ / C, with Δ_t the released
noisy sum of step t and u_j its estimated direction; a second score subtracts the noise that a generator seeded
with the public seed would have drawn (:func:`~privimage.engine.auditing.replay_noise`). Both scores times the
guess fractions form the family of :func:`~privimage.engine.auditing.epsilon_lower_bound`, fixed before any
run and Bonferroni-corrected; the reported ε_lb is the best of the family.

**Seams in other modules** (the only places this audit reaches in). The releases are read through the
fine-tune's documented ``on_release`` hook (``p.grad`` after ``finalize``, before the optimizer), in
:func:`_fine_tune`, the one function that knows the fine-tune's signature. The pipeline as it is runs with
nothing replaced. For a planted bug (and, in reproducible tests, for a seeded stand-in of the secure noise
generator) the fine-tune's engine is swapped for one call: it is built through the module attribute
``privimage.train.finetune.DPEngine``, which :func:`_engine_seam` points at an
:class:`~privimage.engine.auditing.AuditingEngine` (public DPEngine API only: the constructor's keywords and
``accumulate(groups=...)``).

**What it cannot see.** Leaks outside the released gradients (checkpoints, logs, sample grids); anything that
depends on the Poisson sampling (the rate is 1); the divisor q·N, which changes with the number of included
canaries and is treated as public; public or positional diffusion randomness (issue 13, item 1: adding a record
shifts the draws of the records after it, a real sensitivity increase, but in those records' own coordinates,
which a per-canary score never reads); code paths the audit does not run (CUDA, bf16 autocast,
``compile=True``, ``method`` other than the default); leaks smaller than a one-run audit resolves: with every
guess right it certifies at most about ln(r / ln(1/α)) (r guesses, α the per-test level), so it catches leaks
of several times the claim, not an ε that is off by tens of percent.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from privimage.diffusion import EDMDenoiser, EDMLoss, to_model_range
from privimage.engine import PrivacyBudget, calibrate_noise_multiplier, compute_epsilon
from privimage.engine.accounting import Mechanism
from privimage.engine.auditing import (
    GUESS_FRACTIONS,
    AuditBound,
    AuditingEngine,
    PlantedBug,
    dirac_canary_audit,
    draw_inclusions,
    epsilon_lower_bound,
    replay_noise,
)
from privimage.models.unet import ResBlock, UNet, UNetConfig
from privimage.privacy import FINETUNE

__all__ = ["AuditSettings", "BaseAuditSettings", "CaseResult", "PlantedBug", "audit_engine", "crafted_init",
           "format_report", "run_audit"]

#: The cases of the diffusion audit: the pipeline as it is, then each planted bug it is shown to catch.
CASES = (PlantedBug.NONE, PlantedBug.NOISE_QUARTER, PlantedBug.PER_ROW_CLIPPING, PlantedBug.PUBLIC_SEED_NOISE)

# The crafted initialisation (see crafted_init): embedding rows of norm _LABEL_SCALE, a threshold _THRESHOLD that
# only a class's own row passes, and the gain _GAIN of the second time-embedding layer.
_LABEL_SCALE = 1000.0
_THRESHOLD = 0.9
_GAIN = 10.0


@dataclass(frozen=True)
class BaseAuditSettings:
    """What the public settings of every audit share (:class:`AuditSettings`, and the GAN's
    :class:`privimage.audit_gan.GANAuditSettings`): the claim, the runs and the statistics.

    Attributes:
        epsilon, delta: the claim audited: σ is calibrated so the fine-tune's ``steps`` Gaussian releases
            (sample rate 1) spend ``epsilon`` at ``delta`` (:meth:`calibrated_claim`).
        steps: DP steps per fine-tune.
        runs: independent fine-tunes pooled.
        max_grad_norm: C.
        physical_batch_size: records per micro-batch (small enough that every step accumulates several).
        background: ordinary records always in the data set, in their own (the last) class.
        confidence: of the whole family of tests.
        fractions: guess fractions of the family (k₊ = k₋ = fraction · m / 2).
        seed: the public configuration seed (the fine-tune's ``seed``; the public-seed bug uses it).

    Invalid values raise ValueError naming the value: steps, runs, physical_batch_size, background and a
    subclass's ``_COUNTS`` integers >= 1; ε finite and > 0; δ and the confidence in (0, 1); C > 0.
    """

    epsilon: float = 2.0
    delta: float = 1e-5
    steps: int = 1
    runs: int = 2
    max_grad_norm: float = 1e-3
    physical_batch_size: int = 16
    background: int = 4
    confidence: float = 0.95
    fractions: tuple[float, ...] = GUESS_FRACTIONS
    seed: int = 0

    _COUNTS: ClassVar[tuple[str, ...]] = ()  # a subclass's further settings that are integers >= 1

    def __post_init__(self) -> None:
        for name in ("steps", "runs", "physical_batch_size", "background", *self._COUNTS):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Expected {name}={value!r} to be an integer >= 1.")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"Expected epsilon={self.epsilon} finite and > 0.")
        if not 0 < self.delta < 1:
            raise ValueError(f"Expected delta={self.delta} in (0, 1).")
        if not 0 < self.confidence < 1:
            raise ValueError(f"Expected confidence={self.confidence} in (0, 1).")
        if not self.max_grad_norm > 0:
            raise ValueError(f"Expected max_grad_norm={self.max_grad_norm} > 0.")

    @property
    def canaries_per_run(self) -> int:
        """Canaries per fine-tune: one per class (a subclass's ``classes``) but the background's."""
        return self.classes - 1

    @property
    def canaries(self) -> int:
        return self.runs * self.canaries_per_run

    def calibrated_claim(self) -> tuple[float, float]:
        """(σ, claimed ε): σ calibrated so ``steps`` Gaussian releases at sample rate 1 spend ``epsilon`` at
        ``delta``, and the accountant's ε for that σ (the claim audited)."""
        sigma = calibrate_noise_multiplier(target_epsilon=self.epsilon, sample_rate=1.0, steps=self.steps,
                                           delta=self.delta)
        return sigma, compute_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=self.steps,
                                      delta=self.delta).upper

    def budget(self, sigma: float) -> PrivacyBudget:
        """One audited fine-tune's budget: ``steps`` Gaussian releases of σ at sample rate 1."""
        return PrivacyBudget(self.epsilon, self.delta, plan={FINETUNE: Mechanism(sigma, 1.0, self.steps)})


@dataclass(frozen=True)
class AuditSettings(BaseAuditSettings):
    """Public settings of an audit (what the auditor chooses; the canary bits and the noise stay secret): those
    of :class:`BaseAuditSettings` (runs: each fine-tune holds ``4 · width − 1`` canaries), and

    Attributes:
        width: the UNet's ``nf`` (classes = 4 · width).
        resolution: image side length.
        num_noise: K, noise draws (rows) per image.
        direction_draws: rounds of the auditor's own loss draws averaged into each canary's direction.
    """

    steps: int = 2
    runs: int = 16
    width: int = 32
    resolution: int = 4
    num_noise: int = 4
    direction_draws: int = 16

    _COUNTS: ClassVar[tuple[str, ...]] = ("resolution", "num_noise", "direction_draws")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.width, int) and self.width >= 4 and self.width % 4 == 0):
            raise ValueError(f"Expected width={self.width!r} to be a multiple of 4, at least 4 (the UNet's nf).")

    @property
    def classes(self) -> int:
        return 4 * self.width

    def describe(self) -> str:
        """The audited sizes, for the report's note."""
        return (f"Pipeline: {self.runs} fine-tunes × {self.canaries_per_run} canary images, C = {self.max_grad_norm:g}, "
                f"K = {self.num_noise} rows per image. Engine: as many Dirac canaries of K rows each.")

    def unet(self) -> UNetConfig:
        """The audited UNet: one level, one ResBlock per stage, no attention, 4·width classes."""
        return UNetConfig(resolution=self.resolution, in_channels=3, nf=self.width, ch_mult=(1,),
                          num_res_blocks=1, attn_resolutions=(), num_classes=self.classes)


@dataclass(frozen=True)
class CaseResult:
    """One audited case: the claim, the bound, and how the noise relates to the public-seed replay.

    ``level`` is "pipeline" (canary images through the fine-tune) or "engine" (Dirac canaries through DPEngine
    alone, :func:`~privimage.engine.auditing.dirac_canary_audit`).
    """

    level: str
    bug: PlantedBug
    claimed_epsilon: float
    bound: AuditBound
    steps: int
    runs: int
    seconds: float
    replay_correlation: float  # correlation of the released sums with the public-seed noise (≈ 1: replayable)

    @property
    def epsilon_lb(self) -> float:
        return self.bound.epsilon_lb

    @property
    def verdict(self) -> str:
        above = self.bound.epsilon_lb > self.claimed_epsilon
        if self.bug is PlantedBug.NONE:
            return "VIOLATION: the claim is refuted" if above else "consistent (ε_lb ≤ ε)"
        return "caught" if above else "missed"


# ---- the crafted model and the canaries (public) --------------------------------------------------------------

def _class_directions(nf: int) -> torch.Tensor:
    """4·nf unit vectors in R^nf with pairwise cosines ≤ 1/√2: ±e_i and ±(e_i + e_{i+1 mod nf})/√2."""
    eye = torch.eye(nf)
    pairs = (eye + eye.roll(1, dims=1)) / math.sqrt(2)
    return torch.cat([eye, -eye, pairs, -pairs])


def crafted_init(config: UNetConfig, seed: int) -> dict[str, torch.Tensor]:
    """A public initial state of ``UNet(config)`` that gives each class its own gradient coordinates.

    The time embedding is ``temb = temb1(silu(temb0(sinusoid(c_noise) + E[y])))`` and every ResBlock adds
    ``W_b · silu(temb)`` to its features. With 4·nf unit vectors v_c (pairwise cosines ≤ 1/√2):

    * ``E[c] = a·v_c`` and ``temb0(z) = V z − a·τ`` (rows v_c, τ = 0.9): row c of class c's input is a(1 − τ)
      (the noise level's sinusoid moves it by at most its norm, √(nf/2)), every other row is below
      a(1/√2 − τ) ≈ −0.19·a, where SiLU is 0 to within e^(−0.19·a);
    * ``temb1 = g·I``: so ``silu(temb) ≈ g·a·(1 − τ)·e_c``, a one-hot of large value;
    * ``W_b ~ N(0, 1/(g·a·(1 − τ))²)``: each block receives a class-dependent bias of the usual scale.

    The gradient of ``W_b`` for a record of class c is (its features' gradient) ⊗ silu(temb): column c only,
    scaled by g·a·(1 − τ), which dominates every other parameter's gradient. The layers PrivImage's init sets to
    zero (each block's last conv, ``conv_out``) get small random weights so that every block's features reach
    the loss. ``E[null]`` (the "no label" row) stays 0; the audit sets label dropout to 0.
    """
    if config.num_classes != 4 * config.nf:
        raise ValueError(f"The crafted init needs num_classes = 4·nf = {4 * config.nf}, got {config.num_classes}.")
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = UNet(config)
    finally:
        torch.random.set_rng_state(torch_state)
    nf, classes = config.nf, config.num_classes
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.05, generator=gen)
        v = _class_directions(nf)
        net.label_embed.weight.zero_()
        net.label_embed.weight[:classes] = _LABEL_SCALE * v
        net.temb0.weight.copy_(v)
        net.temb0.bias.fill_(-_LABEL_SCALE * _THRESHOLD)
        net.temb1.weight.copy_(_GAIN * torch.eye(4 * nf))
        net.temb1.bias.zero_()
        on = _GAIN * _LABEL_SCALE * (1 - _THRESHOLD)
        for block in net.modules():
            if isinstance(block, ResBlock):
                block.temb.weight.normal_(0.0, 1.0 / on, generator=gen)
                block.temb.bias.zero_()
    return net.state_dict()


def class_columns(config: UNetConfig) -> list[str]:
    """Names (in the fine-tune's :class:`EDMDenoiser`) of the weights whose column c is class c's coordinates."""
    return [f"net.{name}.temb.weight" for name, module in UNet(config).named_modules() if isinstance(module, ResBlock)]


def _coordinates(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """(classes, D): row c = class c's coordinates (column c of each named weight), in float64."""
    return torch.cat([tensors[name].detach().double().T for name in names], dim=1)


#: Canary colours: the saturated corners of the RGB cube (black and white gave the least stable gradients).
_CANARY_COLOURS = ((255, 0, 0), (0, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 0, 255))


def canary_images(settings: AuditSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The canaries of one run: constant-colour images (the colours in turn), canary i labelled class i."""
    colours = torch.tensor(_CANARY_COLOURS, dtype=torch.uint8)
    m, res = settings.canaries_per_run, settings.resolution
    images = colours[torch.arange(m) % len(colours)][:, :, None, None].expand(m, 3, res, res).contiguous()
    return images, torch.arange(m)


def background_images(settings: AuditSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary images (the embedded data set's sensitive split), always included, in the last class."""
    from privimage.data import load_dataset

    data = load_dataset("embedded", split="sensitive", size=settings.background, resolution=8, seed=settings.seed)
    images = data.images
    if settings.resolution != 8:
        images = F.interpolate(images.float(), size=settings.resolution, mode="area").round().to(torch.uint8)
    return images, torch.full((settings.background,), settings.classes - 1, dtype=torch.long)


def canary_directions(init_state: dict, settings: AuditSettings, *, generator: torch.Generator) -> torch.Tensor:
    """(canaries per run, D): each canary's expected clipped-gradient direction in its class's coordinates.

    The mean, over ``direction_draws`` rounds of the auditor's OWN loss draws (never the fine-tune's), of the
    unit per-image gradient (K rows, as the fine-tune forms it), renormalised. All canaries share one backward
    per round: their gradients live in disjoint coordinates (:func:`crafted_init`).
    """
    config = settings.unet()
    net = UNet(config)
    net.load_state_dict(init_state)
    denoiser = EDMDenoiser(net)
    names = class_columns(config)
    weights = [dict(denoiser.named_parameters())[name] for name in names]
    loss = EDMLoss(num_noise=settings.num_noise, label_dropout=0.0)
    images, labels = canary_images(settings)
    x = to_model_range(images)
    total = torch.zeros(len(labels), sum(w.shape[0] for w in weights), dtype=torch.float64)
    for _ in range(settings.direction_draws):
        drawn = loss.draw(x, labels, num_classes=config.num_classes, generator=generator)
        grads = torch.autograd.grad(loss.compute(denoiser, x, *drawn).sum(), weights)
        g = _coordinates(dict(zip(names, grads)), names)[labels]
        total += g / g.norm(dim=1, keepdim=True)
    return total / total.norm(dim=1, keepdim=True)


# ---- one audited fine-tune ------------------------------------------------------------------------------------

def _fine_tune(run_dir: Path, images: torch.Tensor, labels: torch.Tensor, *, settings: AuditSettings,
               budget: PrivacyBudget, init_state: dict) -> list[dict[str, torch.Tensor]]:
    """The one call into the pipeline's fine-tune (ITS signature is known here and nowhere else in the audit).

    Returns every step's released noisy sum {parameter name: tensor}, read through the fine-tune's documented
    ``on_release`` hook: right after ``finalize``, ``p.grad`` = noisy sum / (q·N), and q·N = N here (rate 1).
    Public settings chosen by the auditor: learning rate 0, label dropout 0, secure noise and secret diffusion
    randomness (the defaults), no intermediate checkpoints or logs. Its progress bar is silenced.
    """
    from privimage.config import FinetuneConfig
    from privimage.train import finetune

    config = FinetuneConfig(physical_batch_size=settings.physical_batch_size, num_noise=settings.num_noise,
                            max_grad_norm=settings.max_grad_norm, lr=0.0, label_dropout=0.0, secure_noise=True,
                            checkpoint_every=settings.steps, log_every=settings.steps)
    return collect_releases(lambda on_release: finetune(
        run_dir, config, images=images, labels=labels, unet=settings.unet(), budget=budget, init_state=init_state,
        seed=settings.seed, on_release=on_release, log=lambda *_: None),
        divisor=float(len(images)), steps=settings.steps, what="fine-tune")


@contextlib.contextmanager
def _engine_seam(make_engine: Callable, loop: str = "privimage.train.finetune"):
    """Let the fine-tune build its engine with ``make_engine`` (same keywords as DPEngine) for one ``with``.

    The seam: the fine-tune ``loop`` (:func:`privimage.train.finetune`; the GAN's
    :func:`privimage.train.finetune_gan`) constructs its engine through its module's ``DPEngine`` name.
    Restored on exit, whatever happens.
    """
    module = importlib.import_module(loop)
    original = module.DPEngine
    module.DPEngine = make_engine
    try:
        yield
    finally:
        module.DPEngine = original


def _planted(bug: PlantedBug, public_seed: int, noise_seed: int | None, loop: str = "privimage.train.finetune"):
    """The engine seam for one fine-tune of ``loop``: an :class:`AuditingEngine` with ``bug`` (and, for
    reproducible tests, a seeded stand-in for the secure noise generator); no seam at all for the pipeline as
    it is."""
    if bug is PlantedBug.NONE and noise_seed is None:
        return contextlib.nullcontext()
    noise = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
    return _engine_seam(functools.partial(AuditingEngine, bug=bug, public_seed=public_seed, noise_generator=noise),
                        loop)


@dataclass
class _Case:
    """What one case accumulates over its runs."""

    plain: list = field(default_factory=list)
    replayed: list = field(default_factory=list)
    included: list = field(default_factory=list)
    correlation: float = float("nan")

    def add(self, released: torch.Tensor, replay: torch.Tensor, directions: torch.Tensor, included: np.ndarray,
            max_grad_norm: float) -> None:
        """One run: the canaries' released sums and the public-seed noise replayed (m, D), projected on their
        directions (m, D) in units of C, with and without the replay; which canaries were included."""
        self.plain.append((released * directions).sum(1) / max_grad_norm)
        self.replayed.append(((released - replay) * directions).sum(1) / max_grad_norm)
        self.included.append(included)

    def bound(self, settings) -> AuditBound:
        """The family's ε lower bound over every run's scores (both scorings, ``settings``' guess fractions)."""
        scorings = {"projection": torch.cat(self.plain).numpy(),
                    "projection minus public-seed noise": torch.cat(self.replayed).numpy()}
        return epsilon_lower_bound(scorings, np.concatenate(self.included), delta=settings.delta,
                                   confidence=settings.confidence, fractions=settings.fractions)


def _seed(reproducible: int | None, *parts: int) -> int:
    """A 63-bit seed: derived from (reproducible, *parts) for tests, else from the OS's entropy."""
    if reproducible is None:
        return secrets.randbits(63)
    state = np.random.SeedSequence([reproducible, *parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def audited_records(included: np.ndarray, canaries: tuple[torch.Tensor, torch.Tensor],
                    background: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One run's data set: the ``included`` canaries (images, labels), then the background records."""
    pick = torch.from_numpy(included)
    return torch.cat([canaries[0][pick], background[0]]), torch.cat([canaries[1][pick], background[1]])


def collect_releases(fine_tune: Callable[[Callable[[int, torch.nn.Module], None]], None], *, divisor: float,
                     steps: int, what: str) -> list[dict[str, torch.Tensor]]:
    """Every step's released noisy sum {parameter name: tensor} of ``fine_tune(on_release)`` (its progress bar
    silenced), read through the loop's documented ``on_release`` hook: right after ``finalize``, ``p.grad`` =
    noisy sum / (q·N), and q·N = ``divisor`` (N at rate 1). A loop whose hook missed a step is an error."""
    releases: list[dict[str, torch.Tensor]] = []

    def on_release(step: int, module: torch.nn.Module) -> None:
        releases.append({name: p.grad.detach() * divisor for name, p in module.named_parameters() if p.requires_grad})

    with contextlib.redirect_stderr(io.StringIO()):
        fine_tune(on_release)
    if len(releases) != steps:
        raise RuntimeError(f"The {what} reported {len(releases)} releases for {steps} steps: its on_release hook "
                           f"no longer sees every step.")
    return releases


def _correlation(releases: list[dict], replayed: list[dict]) -> float:
    """Correlation of all released coordinates with the replayed public-seed noise (≈ 1: the noise is public)."""
    def flat(seq):
        return torch.cat([t.flatten().double() for step in seq for t in step.values()])

    return float(torch.corrcoef(torch.stack([flat(releases), flat(replayed)]))[0, 1])


def run_audit(settings: AuditSettings = AuditSettings(), cases: Sequence[PlantedBug | str] = CASES, *,
              reproducible: int | None = None, log: Callable[[str], None] = print) -> list[CaseResult]:
    """Audit the fine-tune as it is and under each planted bug in ``cases``; one :class:`CaseResult` each.

    Args:
        settings: the audit's public settings.
        cases: :class:`PlantedBug` values (``NONE`` is the pipeline as it is).
        reproducible: a seed for the canary bits, a stand-in for the secure noise generator and the auditor's
            draws (tests). ``None``: bits and auditor draws from the OS's entropy, and the fine-tune's own
            secure noise.
        log: progress lines.
    """
    cases = [PlantedBug(c) for c in cases]
    config = settings.unet()
    sigma, claimed = settings.calibrated_claim()
    init_state = crafted_init(config, settings.seed)
    names = class_columns(config)
    directions = canary_directions(init_state, settings,
                                   generator=torch.Generator().manual_seed(_seed(reproducible, 1)))
    replayed = replay_noise(EDMDenoiser(UNet(config)), max_grad_norm=settings.max_grad_norm, noise_multiplier=sigma,
                            seed=settings.seed, steps=settings.steps)
    replay = sum(_coordinates(noise, names) for noise in replayed)
    canaries, background = canary_images(settings), background_images(settings)
    log(f"audit: claimed epsilon {claimed:.3f} (delta {settings.delta:g}; sigma {sigma:.4g}, {settings.steps} "
        f"steps, sample rate 1); {settings.canaries} canaries in {settings.runs} fine-tunes per case")
    results = []
    for case_index, bug in enumerate(cases):
        start = time.perf_counter()
        case = _Case()
        for run in range(settings.runs):
            included = draw_inclusions(settings.canaries_per_run, seed=_seed(reproducible, 2, case_index, run))
            images, labels = audited_records(included, canaries, background)
            with tempfile.TemporaryDirectory(prefix="privimage-audit-") as tmp, \
                    _planted(bug, settings.seed, _seed(reproducible, 3, case_index, run) if reproducible is not None
                             else None):
                releases = _fine_tune(Path(tmp), images, labels, settings=settings,
                                      budget=settings.budget(sigma), init_state=init_state)
            released = sum(_coordinates(r, names) for r in releases)[: settings.canaries_per_run]
            case.add(released, replay[: settings.canaries_per_run], directions, included, settings.max_grad_norm)
            if run == 0:
                case.correlation = _correlation(releases, replayed)
        bound = case.bound(settings)
        result = CaseResult("pipeline", bug, claimed, bound, settings.steps, settings.runs,
                            time.perf_counter() - start, case.correlation)
        log(f"audit: pipeline, {bug.value}: epsilon_lb {bound.epsilon_lb:.3f} vs claimed {claimed:.3f}: "
            f"{result.verdict} ({result.seconds:.0f} s)")
        results.append(result)
    return results


def audit_engine(settings: AuditSettings = AuditSettings(), cases: Sequence[PlantedBug | str] = CASES, *,
                 reproducible: int | None = None) -> list[CaseResult]:
    """The same claim and cases for DPEngine alone, with as many Dirac canaries (K rows each) as the pipeline audit.

    A mechanism-level check in a second: if it fails, the engine is at fault; if only the pipeline audit fails,
    the fault is in how the fine-tune uses the engine.
    """
    sigma, _ = settings.calibrated_claim()
    results = []
    for case_index, bug in enumerate(PlantedBug(c) for c in cases):
        start = time.perf_counter()
        audit = dirac_canary_audit(canaries=settings.canaries, steps=settings.steps, noise_multiplier=sigma,
                                   delta=settings.delta, max_grad_norm=settings.max_grad_norm,
                                   rows_per_sample=settings.num_noise, bug=bug, public_seed=settings.seed,
                                   confidence=settings.confidence, fractions=settings.fractions,
                                   seed=None if reproducible is None else _seed(reproducible, 4, case_index))
        results.append(CaseResult("engine", bug, audit.claimed_epsilon, audit.bound, settings.steps, 1,
                                  time.perf_counter() - start, float("nan")))
    return results


def format_report(results: Sequence[CaseResult], settings) -> str:
    """A markdown table (claimed ε, ε_lb and the verdict per case) and a note on how the bound was taken
    (``settings``: an :class:`AuditSettings` or a :class:`privimage.audit_gan.GANAuditSettings`)."""
    lines = ["| level | case | claimed ε | ε_lb | canaries m | guesses r | correct v | best score "
             "| noise ~ public seed | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        corr = "–" if math.isnan(r.replay_correlation) else f"{r.replay_correlation:.2f}"
        lines.append(f"| {r.level} | {r.bug.value} | {r.claimed_epsilon:.3f} | {r.epsilon_lb:.3f} | {r.bound.m} "
                     f"| {r.bound.r} | {r.bound.v} | {r.bound.scoring} | {corr} | {r.verdict} |")
    lines += ["", f"ε_lb: the one-run audit of Steinke, Nasr & Jagielski 2023 at {settings.confidence:.0%} confidence "
              f"for a family of {2 * len(settings.fractions)} tests (2 scores × guess fractions "
              f"{', '.join(map(str, settings.fractions))}; Bonferroni), δ = {settings.delta:g}. Claimed ε: the "
              f"accountant's, for {settings.steps} Gaussian step(s) at sample rate 1. {settings.describe()}"]
    return "\n".join(lines)
