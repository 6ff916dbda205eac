"""One (ε, δ) budget for a whole private pipeline: a plan, a ledger of what was spent, and a hard stop.

PrivImage (arXiv 2311.12850) spends privacy twice on the sensitive data: once in the semantic query (one
Gaussian release of a top-k label histogram) and once per DP-SGD step of the fine-tune. Both compose in one
accountant (:func:`privimage.engine.accounting.compose_epsilon`), so the budget is planned jointly: the
query gets its noise (directly, or from a share of ε), then the fine-tune's noise multiplier is calibrated
so the composition of both meets the total.

The ledger counts releases per mechanism. Spending within the plan is always allowed (the plan was checked);
spending beyond it is allowed only while the composition of what was actually spent stays within the total,
otherwise :class:`BudgetExceededError` is raised before anything is recorded. ``state_dict()`` goes into
every checkpoint, and a resumed run continues the same ledger, so no release is counted twice or forgotten.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

from privimage.engine.accounting import (
    EpsilonReport,
    Mechanism,
    calibrate_noise_multiplier,
    compose_epsilon,
)

QUERY = "query"
FINETUNE = "finetune"


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
    def for_privimage(cls, *, epsilon: float, delta: float, sample_rate: float, steps: int,
                      query_noise_multiplier: float | None = None, query_epsilon_fraction: float = 0.1,
                      num_examples: int | None = None) -> "PrivacyBudget":
        """Plan the semantic query plus ``steps`` DP-SGD steps within (ε, δ).

        Args:
            epsilon, delta: the total budget.
            sample_rate, steps: Poisson rate and number of fine-tuning steps.
            query_noise_multiplier: the query's noise std over its L2 sensitivity (√k for top-k votes). If
                ``None``, it is calibrated so the query alone spends ``query_epsilon_fraction · ε``.
            query_epsilon_fraction: share of ε the query may use on its own, in (0, 1); used when
                ``query_noise_multiplier`` is ``None``. The fine-tune's σ is then calibrated on the
                composition, which spends less than the sum of the parts.
            num_examples: size of the sensitive data set, to warn when δ ≥ 1/n (a δ that large allows
                releasing one example in the clear).

        Raises:
            ValueError: out-of-range settings, a query that alone spends the budget, or a fine-tune that
                would need σ above ``MAX_NOISE_MULTIPLIER``.
        """
        if num_examples is not None and delta >= 1 / num_examples:
            warnings.warn(f"delta={delta:g} >= 1/n = {1 / num_examples:g}: a delta this large permits "
                          f"releasing an individual example; use delta < 1/n (commonly 1/n^1.1 or 1e-5).")
        if query_noise_multiplier is None:
            if not 0 < query_epsilon_fraction < 1:
                raise ValueError(f"Expected query_epsilon_fraction={query_epsilon_fraction} in (0, 1).")
            try:
                query_noise_multiplier = calibrate_noise_multiplier(
                    target_epsilon=query_epsilon_fraction * epsilon, sample_rate=1.0, steps=1, delta=delta)
            except ValueError as err:
                raise ValueError(f"The semantic query's share of the budget ({query_epsilon_fraction:g} x "
                                 f"epsilon={epsilon:g}) is too small: {err}") from None
        query = Mechanism(query_noise_multiplier, 1.0, 1)
        sigma = calibrate_noise_multiplier(target_epsilon=epsilon, sample_rate=sample_rate, steps=steps,
                                           delta=delta, other_mechanisms=[query])
        return cls(epsilon, delta, plan={QUERY: query, FINETUNE: Mechanism(sigma, sample_rate, steps)})

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
        """ε of everything recorded in the ledger so far (upper bound; at the budget's δ)."""
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
