"""One (ε, δ) budget for a whole private pipeline: a plan, a ledger of what was spent, and a hard stop.

A pipeline may spend privacy on the same sensitive data through several mechanisms (a one-off Gaussian
release and a DP-SGD run, say). All of them compose in one accountant
(:func:`privimage.engine.accounting.compose_epsilon`), so the budget is planned jointly:
:meth:`PrivacyBudget.plan` fixes the others' noise and calibrates one mechanism's noise multiplier so that
the composition of all meets the total.

The ledger counts releases per mechanism. Spending within the plan is always allowed (the plan was checked);
spending beyond it is allowed only while the composition of what was actually spent stays within the total,
otherwise :class:`BudgetExceededError` is raised before anything is recorded. ``state_dict()`` goes into
every checkpoint, and a resumed run continues the same ledger, so no release is counted twice or forgotten.

Deprecated for one release (a DeprecationWarning; PrivImage's plan is ``privimage.privacy``):
``PrivacyBudget.for_privimage`` (use ``privimage.privacy.plan_privimage_budget``), and this module's
``QUERY`` and ``FINETUNE`` (use ``privimage.privacy.QUERY`` / ``FINETUNE``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from privimage.engine.accounting import (
    EpsilonReport,
    Mechanism,
    PlannedComposition,
    calibrate_noise_multiplier,
    compose_epsilon,
)

_DEPRECATED_NAMES = {"QUERY": "query", "FINETUNE": "finetune"}


def __getattr__(name: str):
    if name in _DEPRECATED_NAMES:
        warnings.warn(f"privimage.engine.budget.{name} is deprecated and will be removed in the next release; "
                      f"use privimage.privacy.{name}.", DeprecationWarning, stacklevel=2)
        return _DEPRECATED_NAMES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warn_if_delta_too_large(delta: float, num_examples: int | None) -> None:
    """Warn when δ ≥ 1/n: a δ that large allows releasing one example of the n in the clear."""
    if num_examples is not None and delta >= 1 / num_examples:
        warnings.warn(f"delta={delta:g} >= 1/n = {1 / num_examples:g}: a delta this large permits "
                      f"releasing an individual example; use delta < 1/n (commonly 1/n^1.1 or 1e-5).")


class BudgetExceededError(ValueError):
    """Raised when a release would make the composed ε exceed the total budget."""


@dataclass
class PrivacyBudget:
    """A total (ε, δ), the planned mechanisms that share it, and the ledger of releases made.

    Attributes:
        epsilon, delta: the total guarantee for everything released about the sensitive data.
        plan: mechanism name -> the mechanism with its planned number of releases.
        spent: mechanism name -> number of releases made so far.
    """

    epsilon: float
    delta: float
    plan: dict[str, Mechanism] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"Expected epsilon={self.epsilon} > 0.")
        if not 0 < self.delta < 1:
            raise ValueError(f"Expected delta={self.delta} in (0, 1).")

    @classmethod
    def plan(cls, *, epsilon: float, delta: float, calibrate: str, sample_rate: float, steps: int,
             others: Mapping[str, Mechanism] | None = None, num_examples: int | None = None) -> "PrivacyBudget":
        """Plan mechanism ``calibrate`` beside the fixed ``others`` so that all of them together meet (ε, δ).

        ``calibrate`` is ``steps`` Poisson-subsampled Gaussian releases at rate ``sample_rate`` (DP-SGD); its
        noise multiplier is the smallest for which the composition with ``others`` is at most ε
        (:func:`privimage.engine.calibrate_noise_multiplier` with ``other_mechanisms``). Composing in one
        accountant spends less than adding the mechanisms' separate ε.

        Args:
            epsilon, delta: the total budget.
            calibrate: the name of the mechanism to calibrate, e.g. "train".
            sample_rate, steps: its Poisson rate and number of releases.
            others: name -> mechanism with its noise multiplier and count already fixed.
            num_examples: size of the sensitive data set, to warn when δ ≥ 1/n.

        Raises:
            ValueError: out-of-range settings, ``others`` that alone spend the budget, or a σ above
                ``MAX_NOISE_MULTIPLIER``.

        Example:
            >>> from privimage.engine import Mechanism, PrivacyBudget
            >>> budget = PrivacyBudget.plan(epsilon=3.0, delta=1e-5, calibrate="train", sample_rate=0.01,
            ...                             steps=100, others={"release": Mechanism(20.0, 1.0, 1)})
            >>> sorted(budget.plan), budget.epsilon_planned().upper <= 3.0
            (['release', 'train'], True)
        """
        warn_if_delta_too_large(delta, num_examples)
        others = dict(others or {})
        if calibrate in others:
            raise ValueError(f"Mechanism '{calibrate}' is both fixed (in others) and to be calibrated.")
        sigma = calibrate_noise_multiplier(target_epsilon=epsilon, sample_rate=sample_rate, steps=steps,
                                           delta=delta, other_mechanisms=list(others.values()))
        return cls(epsilon, delta, plan={**others, calibrate: Mechanism(sigma, sample_rate, steps)})

    @classmethod
    def for_privimage(cls, *, epsilon: float, delta: float, sample_rate: float, steps: int,
                      query_noise_multiplier: float | None = None, query_epsilon_fraction: float = 0.1,
                      num_examples: int | None = None) -> "PrivacyBudget":
        """Deprecated (removed in the next release): ``privimage.privacy.plan_privimage_budget``, which this
        reproduces (the query, calibrated alone to ``query_epsilon_fraction · ε`` unless its σ is given, then
        the fine-tune calibrated on the composition)."""
        warnings.warn("PrivacyBudget.for_privimage is deprecated and will be removed in the next release; use "
                      "privimage.privacy.plan_privimage_budget.", DeprecationWarning, stacklevel=2)
        if query_noise_multiplier is None:
            query_noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=query_epsilon_fraction * epsilon, sample_rate=1.0, steps=1, delta=delta)
        return cls.plan(epsilon=epsilon, delta=delta, calibrate="finetune", sample_rate=sample_rate, steps=steps,
                        others={"query": Mechanism(query_noise_multiplier, 1.0, 1)}, num_examples=num_examples)

    def noise_multiplier(self, name: str) -> float:
        """The planned noise multiplier of mechanism ``name``."""
        return self._planned(name).noise_multiplier

    def spend(self, name: str, count: int = 1) -> None:
        """Record ``count`` releases of mechanism ``name``; raise before recording if it would overspend."""
        planned = self._planned(name)
        if not (isinstance(count, int) and count >= 0):
            raise ValueError(f"Expected count={count} to be an integer >= 0.")
        after = self.spent.get(name, 0) + count
        if after > planned.count:
            report = self._compose({**self.spent, name: after})
            if report.upper > self.epsilon:
                raise BudgetExceededError(
                    f"Spending {count} more release(s) of '{name}' ({after} in all, {planned.count} planned) "
                    f"would make epsilon={report.upper:.4g} exceed the budget epsilon={self.epsilon:.4g} "
                    f"at delta={self.delta:.3g}.")
        self.spent[name] = after

    def epsilon_spent(self) -> EpsilonReport:
        """ε of everything recorded in the ledger so far (upper bound; at the budget's δ).

        Within the plan it is answered by the plan's :class:`PlannedComposition` (built once per plan, shared by
        every budget with the same plan and δ), so a loop may ask at every step."""
        names = list(self.plan)
        if set(self.spent) <= set(names):
            return _planned_composition(tuple(self.plan[n] for n in names), self.delta).epsilon(
                [self.spent.get(n, 0) for n in names])
        return self._compose(self.spent)

    def epsilon_planned(self) -> EpsilonReport:
        """ε of the whole plan, which is at most ``epsilon``."""
        return self._compose({name: m.count for name, m in self.plan.items()})

    def epsilon_of(self, name: str) -> EpsilonReport:
        """ε of mechanism ``name``'s plan on its own (the 'split' of the budget)."""
        return compose_epsilon([self._planned(name)], delta=self.delta)

    def state_dict(self) -> dict:
        """A JSON-serialisable dict: totals, plan and ledger (store it in every checkpoint)."""
        return {"epsilon": self.epsilon, "delta": self.delta,
                "plan": {name: asdict(m) for name, m in self.plan.items()}, "spent": dict(self.spent)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyBudget":
        return cls(state["epsilon"], state["delta"],
                   plan={name: Mechanism(**m) for name, m in state["plan"].items()},
                   spent={name: int(n) for name, n in state["spent"].items()})

    def _planned(self, name: str) -> Mechanism:
        if name not in self.plan:
            raise KeyError(f"No mechanism '{name}' in the budget's plan (have: {sorted(self.plan)}).")
        return self.plan[name]

    def _compose(self, counts: dict[str, int]) -> EpsilonReport:
        mechanisms = [Mechanism(self.plan[n].noise_multiplier, self.plan[n].sample_rate, c)
                      for n, c in counts.items()]
        return compose_epsilon(mechanisms, delta=self.delta)


@functools.lru_cache(maxsize=8)
def _planned_composition(mechanisms: tuple[Mechanism, ...], delta: float) -> PlannedComposition:
    return PlannedComposition(mechanisms, delta=delta)
