"""PrivImage's privacy plan: the semantic query and the DP-SGD fine-tune share one (ε, δ).

PrivImage (arXiv 2311.12850) spends privacy twice on the sensitive data: once in the semantic query (one
Gaussian release of a top-k label histogram, sensitivity √k) and once per DP-SGD step of the fine-tune.
:func:`plan_privimage_budget` gives the query its noise (directly, or from a share of ε), then calibrates the
fine-tune's noise multiplier on the composition of both (:meth:`privimage.engine.PrivacyBudget.plan`), so
the two together meet the total. ``QUERY`` and ``FINETUNE`` name the two mechanisms in the budget's plan
and ledger (``budget.json``, checkpoints).

The non-private reference (``RunConfig.non_private``, the ``inf`` point of ``privimage sweep``):
:func:`plan_non_private_budget` plans the same two mechanisms with σ = 0 (no noise on the histogram, none on
the clipped gradients), so the accountant reports ε = ∞ (:data:`privimage.engine.accounting.NON_PRIVATE`),
and every statement carries :data:`NON_PRIVATE_NOTE`. It is a point of comparison, never a release.
"""

from __future__ import annotations

import math

from privimage.engine import Mechanism, PrivacyBudget, calibrate_noise_multiplier

__all__ = ["FINETUNE", "NON_PRIVATE_NOTE", "QUERY", "is_non_private", "plan_non_private_budget",
           "plan_privimage_budget"]

QUERY = "query"
FINETUNE = "finetune"
NON_PRIVATE_NOTE = ("NOT PRIVATE: the non-private reference (non_private = true, epsilon = inf): the query's "
                    "histogram and the fine-tune's clipped gradients were used WITHOUT noise (sigma = 0). A point "
                    "of comparison only: never publish it, and never count it in a privacy statement.")


def plan_non_private_budget(*, delta: float, sample_rate: float, steps: int) -> PrivacyBudget:
    """The non-private reference's plan: the query and ``steps`` fine-tune steps, both with σ = 0 (ε = ∞).

    The ledger still counts releases (resume and export check it as for a private run); ``epsilon`` is ∞.
    """
    return PrivacyBudget(math.inf, delta, plan={QUERY: Mechanism(0.0, 1.0, 1),
                                                FINETUNE: Mechanism(0.0, sample_rate, steps)})


def is_non_private(budget: PrivacyBudget) -> bool:
    """True for :func:`plan_non_private_budget`'s budgets (ε = ∞)."""
    return math.isinf(budget.epsilon)


def plan_privimage_budget(*, epsilon: float, delta: float, sample_rate: float, steps: int,
                          query_noise_multiplier: float | None = None, query_epsilon_fraction: float = 0.1,
                          num_examples: int | None = None) -> PrivacyBudget:
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
    if query_noise_multiplier is None:
        if not 0 < query_epsilon_fraction < 1:
            raise ValueError(f"Expected query_epsilon_fraction={query_epsilon_fraction} in (0, 1).")
        try:
            query_noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=query_epsilon_fraction * epsilon, sample_rate=1.0, steps=1, delta=delta)
        except ValueError as err:
            raise ValueError(f"The semantic query's share of the budget ({query_epsilon_fraction:g} x "
                             f"epsilon={epsilon:g}) is too small: {err}") from None
    return PrivacyBudget.plan(epsilon=epsilon, delta=delta, calibrate=FINETUNE, sample_rate=sample_rate,
                              steps=steps, others={QUERY: Mechanism(query_noise_multiplier, 1.0, 1)},
                              num_examples=num_examples)
