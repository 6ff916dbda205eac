"""Privacy accounting for DP-SGD and the semantic query, on prv-accountant.

The guarantee is the PRV accountant's **upper bound** on ε (Gopi, Lee & Wutschitz, "Numerical Composition
of Differential Privacy", arXiv 2106.02848): the numerical estimate sits beside it, within ``eps_error``.
Mechanisms of different kinds compose in one accountant (heterogeneous composition), which is how the
PrivImage query (one Gaussian release of a label histogram) and the DP-SGD steps (Poisson-subsampled
Gaussian) share one (ε, δ) budget.

Where the PRV discretisation cannot represent a composition (very large ε, e.g. σ=0.6, q=0.1, 100 steps,
where its discrete mean check fails), or where the RDP bound already exceeds 100 (the PRV grid then grows
very large), we report the RDP bound of the same mechanisms (Mironov, arXiv 1702.07476; Mironov et al.
arXiv 1908.10530 for subsampling), which is a valid but looser upper bound, and say so in the report's
``accountant`` field.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

from prv_accountant import PRVAccountant
from prv_accountant.other_accountants import RDP
from prv_accountant.privacy_random_variables import (
    GaussianMechanism,
    PoissonSubsampledGaussianMechanism,
    PrivacyRandomVariable,
)

#: Largest noise multiplier calibration will return: above it, the requested ε is not worth training for.
MAX_NOISE_MULTIPLIER = 1e4
#: Absolute error allowed in ε; the reported upper bound already includes it.
EPS_ERROR = 0.01
#: A coarser grid for calibration's search (much cheaper); the answer is then verified at EPS_ERROR.
_SEARCH_EPS_ERROR = 0.1
#: The ``accountant`` of a composition holding a mechanism without noise (σ = 0): ε = ∞, not private.
NON_PRIVATE = "none (sigma = 0: NOT private)"
#: Above this RDP ε the PRV accountant is not run (see compose_epsilon).
_PRV_MAX_EPSILON = 100.0


@dataclass(frozen=True)
class Mechanism:
    """A Gaussian mechanism, Poisson-subsampled at ``sample_rate`` (1.0: not subsampled), run ``count`` times.

    Attributes:
        noise_multiplier: noise std divided by the L2 sensitivity of each release. 0 is allowed for a
            NON-PRIVATE reference run (no noise: :func:`compose_epsilon` reports ε = ∞ for any composition
            holding it, and no accountant is asked); calibration never returns it.
        sample_rate: probability q that each example joins a release (Poisson sampling).
        count: number of releases (DP-SGD steps; 1 for the semantic query).
    """

    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1

    def __post_init__(self) -> None:
        if self.noise_multiplier != 0:  # 0: the non-private reference (class docstring)
            _check_positive(noise_multiplier=self.noise_multiplier)
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"Expected sample_rate={self.sample_rate} in (0, 1].")
        if not (isinstance(self.count, int) and self.count >= 0):
            raise ValueError(f"Expected count={self.count} to be an integer >= 0.")

    def prv(self) -> PrivacyRandomVariable:
        if self.sample_rate == 1.0:
            return GaussianMechanism(noise_multiplier=self.noise_multiplier)
        return _subsampled_gaussian(self.noise_multiplier, self.sample_rate)


class _SubsampledGaussian(PoissonSubsampledGaussianMechanism):
    """prv-accountant's Poisson-subsampled Gaussian with its RDP curve memoised per order.

    One ε evaluation asks for the same RDP orders several times (our RDP check, then the PRV accountant's
    domain size for the composition and for each mechanism alone), and each order is a slow series in Python;
    the values depend only on (σ, q, order), so they are computed once per object.
    """

    def __init__(self, sampling_probability: float, noise_multiplier: float) -> None:
        super().__init__(sampling_probability=sampling_probability, noise_multiplier=noise_multiplier)
        self._rdp: dict[float, float] = {}

    def rdp(self, alpha: float) -> float:
        value = self._rdp.get(alpha)
        if value is None:
            value = self._rdp[alpha] = super().rdp(alpha)
        return value


@functools.lru_cache(maxsize=256)
def _subsampled_gaussian(noise_multiplier: float, sample_rate: float) -> _SubsampledGaussian:
    return _SubsampledGaussian(sampling_probability=sample_rate, noise_multiplier=noise_multiplier)


@dataclass(frozen=True)
class EpsilonReport:
    """ε of a composition at a given δ. ``upper`` is the guarantee; use it, not ``estimate``.

    ``float(report)`` is the upper bound.
    """

    upper: float
    estimate: float
    lower: float
    delta: float
    accountant: str = "prv"

    def __float__(self) -> float:
        return self.upper


def compose_epsilon(mechanisms: Sequence[Mechanism], *, delta: float, eps_error: float = EPS_ERROR) -> EpsilonReport:
    """ε(δ) of running every mechanism in ``mechanisms`` on the same data (heterogeneous composition).

    Args:
        mechanisms: the releases to compose; mechanisms with ``count == 0`` are ignored.
        delta: the target δ, in (0, 1).
        eps_error: the accountant's absolute error in ε (its discretisation; smaller is slower).

    Returns:
        The PRV accountant's bounds, or the RDP upper bound where the PRV discretisation fails; ε = ∞
        (accountant ``NON_PRIVATE``) when a mechanism that ran has no noise (``noise_multiplier == 0``).
    """
    _check_delta(delta)
    active = [m for m in mechanisms if m.count > 0]
    if not active:
        return EpsilonReport(0.0, 0.0, 0.0, delta)
    if any(m.noise_multiplier == 0 for m in active):  # an exact release: no ε holds, for any δ < 1
        return EpsilonReport(math.inf, math.inf, math.inf, delta, NON_PRIVATE)
    prvs = [m.prv() for m in active]
    counts = [m.count for m in active]
    rdp_upper = _rdp_epsilon(prvs, counts, delta)
    if rdp_upper > _PRV_MAX_EPSILON:
        # The PRV grid for such compositions grows very large (or fails its own checks), for an ε that
        # protects nothing; the RDP bound is a valid upper bound and cheap.
        return EpsilonReport(rdp_upper, rdp_upper, 0.0, delta, f"rdp (epsilon > {_PRV_MAX_EPSILON:g}: prv skipped)")
    try:
        accountant = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=eps_error,
                                   delta_error=delta / 1000)
        lower, estimate, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=counts)
        return EpsilonReport(float(upper), float(estimate), float(lower), delta, "prv")
    except (RuntimeError, ValueError, OverflowError, FloatingPointError) as err:
        return EpsilonReport(rdp_upper, rdp_upper, 0.0, delta, f"rdp (prv failed: {err})")


class PlannedComposition:
    """ε(δ) of any prefix of one planned composition, for a training log that reports ε at every step.

    ``mechanisms`` carry their PLANNED counts. The PRV accountant (and the RDP check of
    :func:`compose_epsilon`) is built once, for those counts; :meth:`epsilon` then answers any counts up to them
    by one composition of the already discretised variables, instead of rebuilding the accountant per call.

    Trap: the discretisation is sized for the planned counts, so a prefix's ε is the same kind of valid upper
    bound as :func:`compose_epsilon`'s but may differ from it by up to ``eps_error``. Counts above the plan,
    or a plan whose RDP ε exceeds the PRV range, are answered by :func:`compose_epsilon` itself.

    Example:
        >>> plan = PlannedComposition([Mechanism(1.0, 0.01, 100)], delta=1e-5)
        >>> abs(plan.epsilon([100]).upper - compose_epsilon([Mechanism(1.0, 0.01, 100)], delta=1e-5).upper) < 1e-9
        True
    """

    def __init__(self, mechanisms: Sequence[Mechanism], *, delta: float, eps_error: float = EPS_ERROR):
        _check_delta(delta)
        self.mechanisms, self.delta, self.eps_error = tuple(mechanisms), delta, eps_error
        self._accountant = None
        active = [m for m in self.mechanisms if m.count > 0]
        noisy = all(m.noise_multiplier > 0 for m in active)  # else compose_epsilon's ε = ∞ (NON_PRIVATE)
        if active and noisy and _rdp_epsilon([m.prv() for m in active], [m.count for m in active],
                                             delta) <= _PRV_MAX_EPSILON:
            try:
                self._accountant = PRVAccountant(prvs=[m.prv() for m in active],
                                                 max_self_compositions=[m.count for m in active],
                                                 eps_error=eps_error, delta_error=delta / 1000)
            except (RuntimeError, ValueError, OverflowError, FloatingPointError):
                self._accountant = None
        self._active = [i for i, m in enumerate(self.mechanisms) if m.count > 0]

    def epsilon(self, counts: Sequence[int]) -> EpsilonReport:
        """ε(δ) after ``counts[i]`` releases of mechanism i (each at most its planned count for the fast path)."""
        if len(counts) != len(self.mechanisms):
            raise ValueError(f"Expected {len(self.mechanisms)} counts, got {len(counts)}.")
        within = all(0 <= c <= m.count for c, m in zip(counts, self.mechanisms))
        if self._accountant is None or not within:
            return compose_epsilon([Mechanism(m.noise_multiplier, m.sample_rate, int(c))
                                    for m, c in zip(self.mechanisms, counts)], delta=self.delta,
                                   eps_error=self.eps_error)
        if not any(counts):
            return EpsilonReport(0.0, 0.0, 0.0, self.delta)
        try:
            lower, estimate, upper = self._accountant.compute_epsilon(
                delta=self.delta, num_self_compositions=[int(counts[i]) for i in self._active])
        except (RuntimeError, ValueError, OverflowError, FloatingPointError):
            return compose_epsilon([Mechanism(m.noise_multiplier, m.sample_rate, int(c))
                                    for m, c in zip(self.mechanisms, counts)], delta=self.delta,
                                   eps_error=self.eps_error)
        return EpsilonReport(float(upper), float(estimate), float(lower), self.delta, "prv")


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> EpsilonReport:
    """ε(δ) of ``steps`` DP-SGD steps with Poisson sampling rate ``sample_rate`` and noise ``noise_multiplier``.

    Example:
        >>> report = compute_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)
        >>> round(report.estimate, 2)
        0.72
        >>> report.upper >= report.estimate
        True
    """
    _check_positive(noise_multiplier=noise_multiplier)  # sigma = 0 only in an explicit Mechanism (class docstring)
    return compose_epsilon([Mechanism(noise_multiplier, sample_rate, steps)], delta=delta)


def calibrate_noise_multiplier(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                               other_mechanisms: Sequence[Mechanism] = (), rtol: float = 1e-3) -> float:
    """The smallest noise multiplier (to within ``rtol``) whose ε upper bound is at most ``target_epsilon``.

    Args:
        target_epsilon: the ε the whole composition may spend.
        sample_rate, steps: Poisson sampling rate and number of DP-SGD steps.
        delta: the target δ.
        other_mechanisms: releases composed with the steps (e.g. the semantic query), fixed.
        rtol: relative width of the final bracket on σ.

    Returns:
        σ such that ``compose_epsilon([Mechanism(σ, sample_rate, steps), *other_mechanisms]).upper <=
        target_epsilon``. Never an under-noised σ: the returned value is the bracket end whose upper bound
        was computed and found within the target.

    Raises:
        ValueError: for out-of-range settings, when the other mechanisms alone already spend the target, or
            when σ would exceed ``MAX_NOISE_MULTIPLIER``.
    """
    _check_positive(target_epsilon=target_epsilon)
    _check_delta(delta)
    Mechanism(1.0, sample_rate, steps)  # validates sample_rate and steps

    def composition(sigma: float, eps_error: float) -> EpsilonReport:
        return compose_epsilon([Mechanism(sigma, sample_rate, steps), *other_mechanisms], delta=delta,
                               eps_error=eps_error)

    def eps(sigma: float) -> float:
        # The search runs on a coarse grid's estimate, shifted by the fine grid's error so it aims at the
        # fine upper bound; the result is verified on the fine grid below.
        return composition(sigma, _SEARCH_EPS_ERROR).estimate + EPS_ERROR

    if other_mechanisms:
        fixed = compose_epsilon(other_mechanisms, delta=delta).upper
        if fixed >= target_epsilon:
            raise ValueError(f"The other mechanisms alone spend epsilon={fixed:.4g} >= target_epsilon="
                             f"{target_epsilon:.4g}: nothing is left for the {steps} DP-SGD steps.")
    if eps(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon:.4g} at delta={delta:.3g} with sample_rate={sample_rate:.4g} and "
            f"steps={steps} needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}: raise epsilon or "
            f"lower the sample rate or the number of steps.")
    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), growing geometrically from σ=1.
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, min(hi * 4, MAX_NOISE_MULTIPLIER)
    if lo == 0.0:
        lo = hi / 4
        while eps(lo) <= target_epsilon:
            lo, hi = lo / 4, lo
    # Root-find in log σ, where log ε is nearly linear: interpolate, then probe just either side of the
    # estimate so a good guess closes the bracket in two evaluations; fall back to bisection otherwise.
    f_lo, f_hi = math.log(eps(lo) / target_epsilon), math.log(max(eps(hi), 1e-12) / target_epsilon)
    half_width = math.log1p(rtol) / 2
    while hi / lo > 1 + rtol:
        a, b = math.log(lo), math.log(hi)
        guess = b - f_hi * (b - a) / (f_hi - f_lo) if f_hi != f_lo else (a + b) / 2
        width = b - a
        for probe in (min(guess + half_width, b - width / 8), max(guess - half_width, a + width / 8)):
            sigma = math.exp(probe)
            if not lo < sigma < hi:
                continue
            f = math.log(max(eps(sigma), 1e-12) / target_epsilon)
            if f > 0:
                lo, f_lo = sigma, f
            else:
                hi, f_hi = sigma, f
    # Verify on the fine grid, and step up until the reported guarantee is within the target.
    while composition(hi, EPS_ERROR).upper > target_epsilon:
        hi *= 1 + rtol
    return hi


def _rdp_epsilon(prvs: Sequence[PrivacyRandomVariable], counts: Sequence[int], delta: float) -> float:
    _, _, upper = RDP(prvs=prvs).compute_epsilon(delta=delta, num_self_compositions=counts)
    return float(upper)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"Expected {name}={value} > 0.")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"Expected delta={delta} in (0, 1).")
