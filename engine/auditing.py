"""Empirical privacy auditing: a lower bound on ε from ONE run with canaries (Steinke, Nasr & Jagielski 2023).

Accounting can be right while the code is wrong; an audit measures what the code leaks. This module holds
the mechanism-level pieces, usable by any DP code built on :class:`~privimage.engine.DPEngine`:

* the statistics of the one-run audit (:func:`one_run_p_value`, :func:`one_run_epsilon_lower_bound`,
  :func:`epsilon_lower_bound` for a pre-declared family of guesses with a Bonferroni correction);
* the white-box view of a DP-SGD run (:class:`AuditingEngine`: every released noisy sum, read from ``.grad``
  after :meth:`~privimage.engine.DPEngine.finalize`), and the three planted bugs that show an audit can fail
  (:class:`PlantedBug`), switched on only where an audit asks for them;
* :func:`replay_noise`, the attack on noise drawn from a public seed;
* :func:`dirac_canary_audit`, a complete audit of the engine itself (clipping, noise, finalize) with canaries
  whose gradients are basis vectors.

**The game** (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", arXiv 2305.08846,
Algorithm 1). m canaries are each included in the training data independently with probability 1/2 (the
bits S ∈ {0,1}^m are the auditor's secret); the mechanism runs once; the auditor scores every canary from what
it sees, guesses "in" for the k₊ highest scores and "out" for the k₋ lowest, and abstains on the rest. If the
mechanism is (ε, δ)-DP, the number W of correct guesses among the r = k₊ + k₋ made satisfies

    P[W ≥ v] ≤ f(v) + 2mδ · max_{i = 1..v} (f(v − i) − f(v)) / i,     f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v]

(arXiv 2305.08846v1, Corollary 5.4 of the main theorem for (ε, δ)-DP; the form above, with the maximum over i,
is the one its Appendix D computes, ``p_value_DP_audit``). With δ = 0 it is the comparison of W with the r coin
flips of ε-randomised response. Observing v correct guesses therefore rejects "(ε, δ)-DP" at level α whenever
the right side is below α, and the largest such ε is the lower bound ε_lb: with probability ≥ 1 − α over the
canary bits and the mechanism's randomness, a mechanism that IS (ε, δ)-DP yields ε_lb ≤ ε. (Rejecting (ε_lb, δ)
rejects every smaller ε too, since (ε', δ)-DP implies (ε, δ)-DP for ε ≥ ε'; so no monotonicity of the bound is
assumed.)

**What the guesses may depend on**: anything the mechanism released, public information, and the auditor's own
randomness; never the bits S. The score is free (any function of those): a bad score costs power, not
validity. Choosing the number of guesses AFTER looking at the scores is a choice among several tests, so
:func:`epsilon_lower_bound` takes a family fixed in advance (score functions × guess counts) and runs each test
at α / (family size) (Bonferroni): the reported ε_lb is valid at the stated confidence for the whole family.

**Power**: a one-run audit with m canaries cannot certify a large ε (with all r guesses right, ε_lb is about
ln(r / ln(1/α))); it catches mechanisms that leak far more than they claim, which is what implementation bugs do.

**Traps**: the bits must be secret from the mechanism (:func:`draw_inclusions` uses the OS's entropy by
default); an auditor that sees which examples a Poisson sampler drew breaks the amplification the accountant
credits (audit with sample rate 1, or keep the sampling secret); the releases read here are the NOISY SUMS
(``.grad`` × the divisor): a divisor that depends on the data (e.g. q·N with a private N) is a separate
channel this module does not audit.
"""

from __future__ import annotations

import enum
import math
import secrets
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from privimage.engine.accounting import compute_epsilon
from privimage.engine.dp_sgd import DPEngine, StepStats

__all__ = [
    "AuditBound",
    "AuditingEngine",
    "DiracAudit",
    "PlantedBug",
    "count_correct",
    "dirac_canary_audit",
    "draw_inclusions",
    "epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "replay_noise",
]

#: Default family of guess counts, as fractions of m (k₊ = k₋ = fraction · m / 2), fixed in advance.
GUESS_FRACTIONS = (0.1, 0.2, 0.4)


# ---- the one-run bound ----------------------------------------------------------------------------------------

def _binomial_pmf(r: int, epsilon: float) -> np.ndarray:
    """P[Binomial(r, q) = k] for k = 0..r, q = e^ε/(1+e^ε), in log space (exact to float64 rounding)."""
    k = np.arange(r + 1)
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, r + 1, dtype=np.float64)))))
    log_q = -np.logaddexp(0.0, -epsilon)        # log(e^ε/(1+e^ε)), stable for large ε
    log_1mq = -np.logaddexp(0.0, epsilon)       # log(1/(1+e^ε))
    return np.exp(log_fact[r] - log_fact[k] - log_fact[r - k] + k * log_q + (r - k) * log_1mq)


def _check_counts(m: int, r: int, v: int) -> None:
    if not all(isinstance(x, (int, np.integer)) for x in (m, r, v)):
        raise ValueError(f"Expected integer counts, got m={m!r}, r={r!r}, v={v!r}.")
    if not 0 <= v <= r <= m:
        raise ValueError(f"Expected 0 <= v <= r <= m (correct guesses <= guesses <= canaries), got "
                         f"v={v}, r={r}, m={m}.")


def one_run_p_value(m: int, r: int, v: int, *, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v correct guesses out of r] for an (ε, δ)-DP mechanism with m canaries.

    Steinke, Nasr & Jagielski 2023 (arXiv 2305.08846v1), Corollary 5.4, in the form of their Appendix D:
    ``f(v) + 2mδ · max_i (f(v−i) − f(v))/i`` with ``f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v]``,
    capped at 1. ``m`` is the number of canaries (each included with probability 1/2), ``r`` the guesses made
    (abstentions excluded), ``v`` the correct ones.

    Example (ten guesses, all right, against ε = 0: the chance of ten fair coins all landing right):
        >>> round(one_run_p_value(10, 10, 10, epsilon=0.0, delta=0.0) * 2 ** 10, 9)
        1.0
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"Expected epsilon={epsilon} finite and >= 0.")
    if not 0 <= delta <= 1:
        raise ValueError(f"Expected delta={delta} in [0, 1].")
    if v == 0:
        return 1.0
    pmf = _binomial_pmf(r, epsilon)
    tail = float(pmf[v:].sum())                               # f(v)
    if delta == 0:
        return min(tail, 1.0)
    below = np.cumsum(pmf[v - 1::-1])                         # f(v − i) − f(v) = P[v − i ≤ B < v], i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, significance: float = 0.05,
                                tolerance: float = 1e-7) -> float:
    """The largest ε whose (ε, δ)-DP claim ``v`` correct guesses out of ``r`` reject at level ``significance``.

    The search of Steinke et al.'s Appendix D (``get_eps_audit``): grow an upper bracket, then bisect, and return
    the LOW end, at which the p-value was computed and found below ``significance`` (0 if even ε = 0 is not
    rejected). ``significance`` is 1 − confidence (0.05 for 95%).

    Example:
        >>> round(one_run_epsilon_lower_bound(1000, 100, 75, delta=1e-4), 3)   # Steinke et al., App. D's example
        0.673
    """
    _check_counts(m, r, v)
    if not 0 < significance < 1:
        raise ValueError(f"Expected significance={significance} in (0, 1) (it is 1 - confidence).")

    def rejected(eps: float) -> bool:
        return one_run_p_value(m, r, v, epsilon=eps, delta=delta) < significance

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # every guess right and δ = 0 with r huge: no finite bound is refused by the data
            return lo
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---- guesses from scores, and a family of tests ---------------------------------------------------------------

def count_correct(scores, included, k_pos: int, k_neg: int) -> tuple[int, int]:
    """(r, v): guess "in" for the ``k_pos`` highest scores and "out" for the ``k_neg`` lowest; count the right ones.

    Ties are broken by position (a stable sort), never by the bits.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != (m,):
        raise ValueError(f"Expected one inclusion bit per score ({m}), got shape {included.shape}.")
    if not np.isfinite(scores).all():
        raise ValueError("Scores must be finite (a NaN score would be ranked arbitrarily).")
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"Expected k_pos={k_pos}, k_neg={k_neg} >= 0 with k_pos + k_neg <= m={m}.")
    order = np.argsort(scores, kind="stable")
    low, high = order[:k_neg], order[m - k_pos:]
    return k_pos + k_neg, int(included[high].sum() + (~included[low]).sum())


@dataclass(frozen=True)
class AuditBound:
    """The best lower bound of a family of one-run tests, and the test that gave it.

    Attributes:
        epsilon_lb: ε that the audit refutes, at confidence ``confidence`` for the whole family.
        m, r, v: canaries, guesses made, correct guesses (of the test that gave ``epsilon_lb``).
        scoring, fraction: that test's score function and guess fraction (r ≈ fraction · m).
        tests: the family's size (each test ran at significance (1 − confidence) / tests).
    """

    epsilon_lb: float
    m: int
    r: int
    v: int
    scoring: str
    fraction: float
    delta: float
    confidence: float
    tests: int


def epsilon_lower_bound(scorings: Mapping[str, Sequence[float]], included, *, delta: float,
                        confidence: float = 0.95, fractions: Sequence[float] = GUESS_FRACTIONS) -> AuditBound:
    """ε_lb over a family fixed in advance: every score function × every guess fraction, Bonferroni-corrected.

    Args:
        scorings: name -> one score per canary (higher = "more likely included"); all of the same length m.
        included: the secret bits (bool, length m).
        delta: the δ of the claim being tested.
        confidence: for the whole family (each of the ``len(scorings) · len(fractions)`` tests runs at
            significance (1 − confidence) / that number).
        fractions: guess k₊ = k₋ = round(fraction · m / 2) for each fraction, in (0, 1].

    Returns:
        The test with the largest ε_lb (ties: the first). Choosing the maximum is covered by the correction.
    """
    if not scorings:
        raise ValueError("Expected at least one score function.")
    if not 0 < confidence < 1:
        raise ValueError(f"Expected confidence={confidence} in (0, 1).")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"Expected guess fractions in (0, 1], got {tuple(fractions)}.")
    included = np.asarray(included, dtype=bool)
    m = len(included)
    tests = len(scorings) * len(fractions)
    significance = (1 - confidence) / tests
    best = None
    for name, scores in scorings.items():
        for fraction in fractions:
            k = max(1, round(fraction * m / 2))
            r, v = count_correct(scores, included, k, min(k, m - k))
            eps = one_run_epsilon_lower_bound(m, r, v, delta=delta, significance=significance)
            if best is None or eps > best.epsilon_lb:
                best = AuditBound(eps, m, r, v, name, fraction, delta, confidence, tests)
    return best


def draw_inclusions(m: int, *, seed: int | None = None) -> np.ndarray:
    """m independent fair bits: which canaries go in. From the OS's entropy unless ``seed`` (tests) is given."""
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"Expected m={m} to be an integer >= 1.")
    seed = secrets.randbits(128) if seed is None else seed
    return np.random.default_rng(seed).integers(0, 2, m).astype(bool)


# ---- the white-box view of a DP-SGD run, and planted bugs ------------------------------------------------------

class PlantedBug(str, enum.Enum):
    """Bugs an audit plants to show that it can fail (never on outside an audit).

    * ``NOISE_QUARTER``: the noise std is σC/4 instead of σC.
    * ``PER_ROW_CLIPPING``: ``groups`` is ignored, so every row is clipped on its own and a sample of K rows adds
      up to K·C to the sum.
    * ``PUBLIC_SEED_NOISE``: the noise comes from a generator seeded by a public seed, which an auditor who
      knows the configuration replays (:func:`replay_noise`) and subtracts.
    * ``NO_CLIPPING``: the gradients are not clipped (every clip factor is 1) while the noise keeps its std σC,
      as if the clipping stage were skipped.
    """

    NONE = "none"
    NOISE_QUARTER = "noise-quarter"
    PER_ROW_CLIPPING = "per-row-clipping"
    PUBLIC_SEED_NOISE = "public-seed-noise"
    NO_CLIPPING = "no-clipping"


#: NO_CLIPPING's clip norm: C times this, with σ divided by it (the noise std σC is unchanged), so that no
#: gradient of an audit (norms far below C · 1e9) is ever scaled down.
_NO_CLIPPING_SCALE = 1e9


Release = dict[str, torch.Tensor]


class AuditingEngine(DPEngine):
    """A :class:`DPEngine` that hands every released noisy sum to an auditor, optionally with a planted bug.

    The release of a step is read from the documented result of :meth:`DPEngine.finalize`: every trainable
    ``p.grad`` = (clipped sum + noise) / ``expected_batch_size``, so ``p.grad · expected_batch_size`` is the
    noisy sum the accountant's Gaussian mechanism releases (DP-SGD's guarantee covers every such iterate).

    Args:
        model, **engine_kwargs: as for :class:`DPEngine` (``expected_batch_size`` is required).
        on_release: called after every ``finalize`` with {parameter name: noisy sum}; None records nothing.
        bug: the planted bug (default none).
        public_seed: the seed a ``PUBLIC_SEED_NOISE`` bug uses (the configuration's public seed).
        noise_generator: replaces the engine's noise generator (tests: a seeded stand-in for the secure one,
            whose seed the auditor is never told); ignored under ``PUBLIC_SEED_NOISE``.
    """

    def __init__(self, model: nn.Module, *, on_release: Callable[[Release], None] | None = None,
                 bug: PlantedBug | str = PlantedBug.NONE, public_seed: int = 0,
                 noise_generator: torch.Generator | None = None, **engine_kwargs):
        self.bug = PlantedBug(bug)
        kwargs = dict(engine_kwargs)
        if noise_generator is not None:
            kwargs["generator"] = noise_generator
        if self.bug is PlantedBug.NOISE_QUARTER:
            kwargs["noise_multiplier"] = kwargs["noise_multiplier"] / 4
        elif self.bug is PlantedBug.PUBLIC_SEED_NOISE:
            kwargs["generator"] = torch.Generator(_device_of(model)).manual_seed(public_seed)
        elif self.bug is PlantedBug.NO_CLIPPING:
            kwargs["max_grad_norm"] = kwargs["max_grad_norm"] * _NO_CLIPPING_SCALE
            kwargs["noise_multiplier"] = kwargs["noise_multiplier"] / _NO_CLIPPING_SCALE
        super().__init__(model, **kwargs)
        self._divisor = float(kwargs["expected_batch_size"])
        self._on_release = on_release

    def accumulate(self, loss_fn, *, is_padding=None, groups=None) -> StepStats:
        if self.bug is PlantedBug.PER_ROW_CLIPPING:
            groups = None  # every row its own sample: clipped alone
        return super().accumulate(loss_fn, is_padding=is_padding, groups=groups)

    def finalize(self) -> StepStats:
        stats = super().finalize()
        if self._on_release is not None:
            self._on_release({name: p.grad.detach() * self._divisor
                              for name, p in self.model.named_parameters() if p.requires_grad})
        return stats


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def replay_noise(model: nn.Module, *, max_grad_norm: float, noise_multiplier: float, seed: int,
                 steps: int) -> list[Release]:
    """The noise ``steps`` finalizes of a DPEngine would add with a generator seeded by ``seed``.

    The white-box attack on public-seed noise: a replica engine on ``model`` (any module of the audited
    architecture, not attached to another engine; its values do not matter) with the same public settings
    finalizes empty batches, whose ``.grad`` is the noise alone (documented in :meth:`DPEngine.finalize`).
    """
    engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                      expected_batch_size=1.0, generator=torch.Generator(_device_of(model)).manual_seed(seed))
    try:
        out = []
        for _ in range(steps):
            engine.finalize()
            out.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
        return out
    finally:
        engine.close()
        model.zero_grad(set_to_none=True)


# ---- a complete mechanism-level audit of the engine ------------------------------------------------------------

@dataclass(frozen=True)
class DiracAudit:
    """Result of :func:`dirac_canary_audit`: the accountant's ε and the audit's bound."""

    claimed_epsilon: float
    bound: AuditBound
    steps: int
    noise_multiplier: float


def dirac_canary_audit(*, canaries: int, steps: int, noise_multiplier: float, delta: float,
                       max_grad_norm: float = 1.0, rows_per_sample: int = 1, method: str = "bk-mixed",
                       bug: PlantedBug | str = PlantedBug.NONE, public_seed: int = 0,
                       confidence: float = 0.95, fractions: Sequence[float] = GUESS_FRACTIONS,
                       seed: int | None = None) -> DiracAudit:
    """Audit DPEngine's clipping, noise and finalize with canaries whose gradients are basis vectors.

    The model is ``nn.Linear(canaries, 1, bias=False)``; canary j is a sample of ``rows_per_sample`` rows, each
    the input e_j with loss 10·C·⟨w, e_j⟩ / rows: its gradient is 10·C·e_j, clipped to C·e_j, and no other
    canary touches coordinate j. Every step (sample rate 1: no subsampling, so the claim is the accountant's ε
    for ``steps`` Gaussian releases) the included canaries go through one ``accumulate`` and ``finalize``;
    the score of canary j is the j-th coordinate of the released sums, with and without the noise a public
    seed would give (:func:`replay_noise`), over the family of :func:`epsilon_lower_bound`.

    ``seed`` fixes the canary bits and the secure noise's stand-in (tests); None draws both from the OS.
    """
    bug = PlantedBug(bug)
    if not (isinstance(rows_per_sample, int) and rows_per_sample >= 1):
        raise ValueError(f"Expected rows_per_sample={rows_per_sample} to be an integer >= 1.")
    included = draw_inclusions(canaries, seed=seed)
    noise_seed = secrets.randbits(63) if seed is None else seed + 1
    releases: list[Release] = []
    model = nn.Linear(canaries, 1, bias=False)
    nn.init.zeros_(model.weight)
    engine = AuditingEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                            expected_batch_size=float(canaries), method=method, bug=bug,
                            public_seed=public_seed, on_release=releases.append,
                            noise_generator=torch.Generator().manual_seed(noise_seed))
    ids = torch.from_numpy(np.flatnonzero(included)).repeat_interleave(rows_per_sample)
    inputs = torch.eye(canaries)[ids]
    groups = torch.arange(len(ids) // rows_per_sample).repeat_interleave(rows_per_sample)
    scale = 10.0 * max_grad_norm / rows_per_sample
    try:
        for _ in range(steps):
            if len(ids):
                engine.accumulate(lambda m: scale * m(inputs)[:, 0], groups=groups)
            engine.finalize()
    finally:
        engine.close()
    released = sum(r["weight"][0].double() for r in releases)
    replay = sum(r["weight"][0].double() for r in replay_noise(
        nn.Linear(canaries, 1, bias=False), max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
        seed=public_seed, steps=steps))
    scorings = {"projection": (released / max_grad_norm).numpy(),
                "projection minus public-seed noise": ((released - replay) / max_grad_norm).numpy()}
    bound = epsilon_lower_bound(scorings, included, delta=delta, confidence=confidence, fractions=fractions)
    claimed = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=steps, delta=delta).upper
    return DiracAudit(claimed, bound, steps, noise_multiplier)
