"""The privacy audit of the GAN's DP discriminator step (PRIVIMAGE+G, ``kind = "gan"``): canary records through
the real :func:`privimage.train.finetune_gan`, and a lower bound on its ε.

The same one-run audit as the diffusion fine-tune's (:mod:`privimage.audit`: Steinke, Nasr & Jagielski 2023,
arXiv 2305.08846; statistics in :mod:`privimage.engine.auditing`), the same white-box threat model (the auditor
sees every step's released noisy sum of the discriminator's clipped pair gradients and the public
configuration and initial networks; not the canary bits, the secure noise, the sampling or the secret per-record
fakes), sample rate 1 (the claim is the accountant's ε for ``steps`` Gaussian releases). It runs the loop
``privimage run`` calls for a GAN, with its DPEngine, Poisson sampler, pairing of each record with the fake of
its own secret stream, and secure noise, on a data set into which m canary records are inserted, each with
probability 1/2. The same audit then runs against planted bugs, to show that it can fail: noise at σ/4
(``noise-quarter``), the discriminator's clipping skipped with the noise still σC (``no-clipping``), and the
noise drawn from the public seed (``public-seed-noise``).

**The crafted public discriminator** (:func:`crafted_discriminator`; the auditor may choose the public
initialisation). The projection discriminator is D(x, y) = w·h(x) + b + ⟨E[y], h(x)⟩, h(x) its pooled
features. With w = 0, E = 0 and b = −2 every logit is −2, so each pair's real hinge term relu(1 − D) is
active and its fake term relu(1 + D) is 0, and ∂L/∂h = −(w + E[y]) = 0: the pair's gradient is −h(x) on w,
−1 on b, −h(x) on row y of E and zero everywhere else. Canary j is the only record of class j, so row j of E
receives canary j's clipped gradient and nothing of any other record: c_j·(−h(x_j)), whose component along
u_j = −h(x_j)/‖h(x_j)‖ is C·‖h‖/√(2‖h‖² + 1) ≈ C/√2 (w takes the other half of the norm). u_j is a
function of public things only, computed exactly by :func:`canary_directions` (no draw involved: the fake
does not enter). The learning rates are 1e-12 (the config asks for > 0): the released gradients are the
mechanism, the networks their post-processing, and a discriminator that does not move keeps the geometry.
The embedding costs little, so one fine-tune holds ``classes − 1`` canaries (the last class holds ordinary
"background" records, always included); ``runs`` fine-tunes with fresh canary bits are pooled as in
:mod:`privimage.audit`.

**Scores and guesses**: canary j's score is Σ_t ⟨u_j, Δ_t[row j of E]⟩ / C and the same with the public
seed's noise (:func:`~privimage.engine.auditing.replay_noise`) subtracted; the family of
:func:`~privimage.engine.auditing.epsilon_lower_bound`, fixed before any run, gives ε_lb.

**Seams**: the releases are read through ``finetune_gan``'s documented ``on_release`` hook; a planted bug (and,
in reproducible tests, a seeded stand-in for the secure noise) enters through the loop module's ``DPEngine``
name (:func:`privimage.audit._planted`), as for the diffusion audit.

**What it cannot see.** The fakes: the crafted discriminator silences their hinge term, so neither their
secrecy nor the pairing is exercised. A fake drawn from a public seed breaks the rule that every draw touching
a record is secret, but it is no ε leak an audit of the releases can measure: a fake is data-independent and a
pair's clipped gradient is bounded by C whatever its fake, so the Gaussian mechanism's guarantee still holds
(the sensitivity test in tests/privimage/gan/test_dp_step.py checks the pairing and the per-record keying).
Per-row clipping (the real and the fake row clipped apart, up to 2C a pair) needs both terms active and is
caught by the diffusion audit's engine-level case instead. Nor does it see the generator step (post-processing),
the Poisson sampling (rate 1), leaks outside the released gradients, or CUDA, bf16 and compile=True.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from privimage.audit import BaseAuditSettings, CaseResult, _Case, _planted, _seed, audited_records, collect_releases
from privimage.engine import PrivacyBudget
from privimage.engine.auditing import PlantedBug, draw_inclusions, replay_noise
from privimage.gan.losses import d_hinge
from privimage.models.gan import Discriminator, GANConfig, Generator

__all__ = ["GAN_CASES", "GANAuditSettings", "canary_directions", "crafted_discriminator", "run_gan_audit"]

#: The cases of the GAN audit: the pipeline as it is, then each planted bug it is shown to catch.
GAN_CASES = (PlantedBug.NONE, PlantedBug.NOISE_QUARTER, PlantedBug.NO_CLIPPING, PlantedBug.PUBLIC_SEED_NOISE)

#: The loop audited (its module's ``DPEngine`` name is the seam).
_LOOP = "privimage.train.gan_finetune"

#: The crafted discriminator's constant logit: the real hinge term active (1 − (−2) > 0), the fake's not.
_LOGIT = -2.0

#: Learning rates of the audited fine-tune: the smallest the config takes; nothing moves measurably.
_LR = 1e-12

# one row of E per canary: the canaries' coordinates
_EMBED = "embed.weight"


@dataclass(frozen=True)
class GANAuditSettings(BaseAuditSettings):
    """Public settings of a GAN audit (what the auditor chooses; the canary bits and the noise stay secret):
    those of :class:`~privimage.audit.BaseAuditSettings` (steps: DP discriminator steps; runs: each fine-tune
    holds ``classes − 1`` canaries; seed: also the networks' and the canary images'), and

    Attributes:
        classes: the GAN's classes: one per canary, and one for the background records.
        width: the discriminator's ``d_width`` (its features h have 2 · width dimensions).
    """

    physical_batch_size: int = 256
    classes: int = 4096
    width: int = 8

    _COUNTS: ClassVar[tuple[str, ...]] = ("width",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.classes, int) and self.classes >= 2):
            raise ValueError(f"Expected classes={self.classes!r} to be an integer >= 2 (one canary class at least "
                             f"and the background's).")

    def gan(self) -> GANConfig:
        """The audited GAN: 8×8 RGB, one discriminator block (2 · width channels), ``classes`` classes."""
        return GANConfig(resolution=8, num_classes=self.classes, z_dim=8, shared_dim=8, g_width=4, g_ch_mult=(2, 2),
                         g_attention=(), d_width=self.width, d_ch_mult=(2,), d_downsample=(True,))

    def describe(self) -> str:
        """The audited sizes, for the report's note."""
        return (f"GAN: {self.runs} fine-tunes × {self.canaries_per_run} canary records (one class each), "
                f"C = {self.max_grad_norm:g}, one real image and its fake per record (2 rows).")


# ---- the crafted discriminator and the canaries (public) ------------------------------------------------------

def _seeded(make: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``make()`` under torch's global generator seeded by ``seed``, the caller's generator state restored."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return make()
    finally:
        torch.random.set_rng_state(state)


def crafted_discriminator(gan: GANConfig, seed: int) -> dict[str, torch.Tensor]:
    """A public initial state of ``Discriminator(gan)`` whose every logit is −2 and whose pair gradients live in
    w, b and the record's row of E only (module docstring): w = 0, b = −2, E = 0, the blocks as initialised."""
    D = _seeded(lambda: Discriminator(gan), seed)
    with torch.no_grad():
        D.linear.weight.zero_()
        D.linear.bias.fill_(_LOGIT)
        D.embed.weight.zero_()
    return D.state_dict()


def _images(n: int, seed: int, *parts: int) -> torch.Tensor:
    """n public uint8 8×8 RGB images of uniform noise, from (seed, *parts)."""
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(
        _seed(seed, *parts)))


def canary_records(settings: GANAuditSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The canaries of one run: public noise images, canary j labelled class j."""
    return _images(settings.canaries_per_run, settings.seed, 1), torch.arange(settings.canaries_per_run)


def background_records(settings: GANAuditSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary records, always included, in the last class."""
    return (_images(settings.background, settings.seed, 2),
            torch.full((settings.background,), settings.classes - 1, dtype=torch.long))


def canary_directions(discriminator_state: dict, settings: GANAuditSettings) -> torch.Tensor:
    """(canaries per run, 2 · width): u_j, the unit direction of canary j's pair gradient on row j of E.

    Exact, not estimated: under the crafted discriminator the gradient of pair j's hinge loss on row j of E is
    −h(x_j), whatever its fake (whose logit is the constant −2 and whose term is inactive)."""
    from privimage.diffusion import to_model_range

    D = Discriminator(settings.gan())
    D.load_state_dict(discriminator_state)
    images, labels = canary_records(settings)
    real = D(to_model_range(images), labels)
    (grad,) = torch.autograd.grad(d_hinge(real, torch.full_like(real, _LOGIT)).sum(), [D.embed.weight])
    rows = grad[labels].double()
    return rows / rows.norm(dim=1, keepdim=True)


# ---- one audited fine-tune ------------------------------------------------------------------------------------

def _fine_tune(run_dir: Path, images: torch.Tensor, labels: torch.Tensor, *, settings: GANAuditSettings,
               budget: PrivacyBudget, init_state: dict) -> list[dict[str, torch.Tensor]]:
    """The one call into the GAN fine-tune (ITS signature is known here and nowhere else in this audit).

    Returns every discriminator step's released noisy sum {parameter name: tensor}, read through the loop's
    documented ``on_release`` hook (``p.grad`` = noisy sum / (q·N), q·N = N here). Public settings chosen by
    the auditor: learning rates 1e-12, no generator step within the run, secure noise and secret per-record
    fakes (the defaults), no intermediate checkpoints or logs.
    """
    from privimage.config import GANFinetuneConfig
    from privimage.train import finetune_gan

    config = GANFinetuneConfig(physical_batch_size=settings.physical_batch_size, max_grad_norm=settings.max_grad_norm,
                               d_lr=_LR, g_lr=_LR, d_steps_per_g_step=10_000, g_batch_size=1, secure_noise=True,
                               checkpoint_every=settings.steps, log_every=settings.steps)
    return collect_releases(lambda on_release: finetune_gan(
        run_dir, config, images=images, labels=labels, gan=settings.gan(), budget=budget, init_state=init_state,
        seed=settings.seed, on_release=on_release, log=lambda *_: None),
        divisor=float(len(images)), steps=settings.steps, what="GAN fine-tune")


def run_gan_audit(settings: GANAuditSettings = GANAuditSettings(), cases: Sequence[PlantedBug | str] = GAN_CASES, *,
                  reproducible: int | None = None, log: Callable[[str], None] = print) -> list[CaseResult]:
    """Audit the GAN fine-tune's DP discriminator step as it is and under each planted bug in ``cases``.

    Args:
        settings: the audit's public settings.
        cases: :class:`PlantedBug` values (``NONE`` is the pipeline as it is).
        reproducible: a seed for the canary bits and a stand-in for the secure noise generator (tests).
            ``None``: bits from the OS's entropy and the fine-tune's own secure noise.
        log: progress lines.

    Returns: one :class:`~privimage.audit.CaseResult` per case, level ``"gan"``.
    """
    cases = [PlantedBug(c) for c in cases]
    gan = settings.gan()
    sigma, claimed = settings.calibrated_claim()
    discriminator = crafted_discriminator(gan, settings.seed)
    init_state = {"generator": _seeded(lambda: Generator(gan), settings.seed + 1).state_dict(),
                  "discriminator": discriminator, "gan": gan.to_dict()}
    directions = canary_directions(discriminator, settings)
    m = settings.canaries_per_run
    replayed = replay_noise(Discriminator(gan), max_grad_norm=settings.max_grad_norm, noise_multiplier=sigma,
                            seed=settings.seed, steps=settings.steps)
    replay = sum(noise[_EMBED].double() for noise in replayed)[:m]
    canaries, background = canary_records(settings), background_records(settings)
    log(f"audit (GAN): claimed epsilon {claimed:.3f} (delta {settings.delta:g}; sigma {sigma:.4g}, {settings.steps} "
        f"discriminator steps, sample rate 1); {settings.canaries} canaries in {settings.runs} fine-tunes per case")
    results = []
    for case_index, bug in enumerate(cases):
        start = time.perf_counter()
        case = _Case()
        for run in range(settings.runs):
            included = draw_inclusions(m, seed=_seed(reproducible, 5, case_index, run) if reproducible is not None
                                       else None)
            images, labels = audited_records(included, canaries, background)
            noise_seed = _seed(reproducible, 6, case_index, run) if reproducible is not None else None
            with tempfile.TemporaryDirectory(prefix="privimage-audit-gan-") as tmp, \
                    _planted(bug, settings.seed, noise_seed, _LOOP):
                releases = _fine_tune(Path(tmp), images, labels, settings=settings,
                                      budget=settings.budget(sigma), init_state=init_state)
            released = sum(r[_EMBED].double() for r in releases)[:m]
            case.add(released, replay, directions, included, settings.max_grad_norm)
            if run == 0:  # over the canaries' rows (the shared w and b hold every record's gradient)
                case.correlation = float(torch.corrcoef(torch.stack([released.flatten(), replay.flatten()]))[0, 1])
        bound = case.bound(settings)
        result = CaseResult("gan", bug, claimed, bound, settings.steps, settings.runs, time.perf_counter() - start,
                            case.correlation)
        log(f"audit (GAN): {bug.value}: epsilon_lb {bound.epsilon_lb:.3f} vs claimed {claimed:.3f}: {result.verdict} "
            f"({result.seconds:.0f} s)")
        results.append(result)
    return results
