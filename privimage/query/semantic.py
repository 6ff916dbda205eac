"""The DP semantic query: which public classes do the sensitive images look like?

PrivImage (arXiv 2311.12850, §4.1): the query classifier labels every sensitive image with its top-k public
classes; the votes form a histogram over the public classes; Gaussian noise makes the histogram
differentially private; the top-N classes of the noisy histogram are released and used to pick the
pre-training subset.

Sensitivity. Adding or removing one sensitive image changes k histogram entries by exactly 1 each, so the
histogram moves by √k in L2 norm. The histogram therefore travels as a
``ClippedSum(l2_sensitivity=sqrt(k))`` and gets noise of std ``sigma * sqrt(k)`` from
:func:`privimage.engine.add_gaussian_noise`, the one place noise is drawn. One release of the Gaussian
mechanism with noise multiplier ``sigma`` (sample rate 1, one step) is what the
:class:`~privimage.engine.PrivacyBudget` plans under the name ``"query"``; :meth:`SemanticQuery.run`
records it in the ledger before anything is released. Choosing the top-N of the noisy histogram is
post-processing and costs nothing more.

Following jax_privacy's split of public and sensitive information, :class:`SemanticQuery` holds only public
settings (k, N, sigma); the sensitive images are an argument of :meth:`SemanticQuery.run`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from privimage.engine import ClippedSum, PrivacyBudget, add_gaussian_noise
from privimage.engine.budget import QUERY


@dataclass(frozen=True)
class QueryResult:
    """What the query releases (all of it differentially private).

    Attributes:
        noisy_histogram: float64 (M,) vote counts plus Gaussian noise, one per public class.
        selected: the top-N public labels, highest noisy count first.
        query: the settings used.
    """

    noisy_histogram: torch.Tensor
    selected: list[int]
    query: "SemanticQuery"

    def save(self, directory: str | os.PathLike, *, class_names: list[str] | None = None) -> None:
        """Write ``histogram.npy`` (the noisy histogram) and ``selected_labels.json`` atomically."""
        from privimage.io import atomic_write, save_json

        directory = Path(directory)
        with atomic_write(directory / "histogram.npy") as f:
            np.save(f, self.noisy_histogram.numpy())
        save_json({"selected_labels": self.selected,
                   "selected_names": [class_names[i] for i in self.selected] if class_names else None,
                   **asdict(self.query), "l2_sensitivity": self.query.l2_sensitivity,
                   "noise_std": self.query.noise_std}, directory / "selected_labels.json")


@dataclass(frozen=True)
class SemanticQuery:
    """Public settings of the DP semantic query.

    Attributes:
        top_k: votes per sensitive image (its k most likely public classes). Sensitivity is √k.
        top_n: number of public classes selected.
        sigma: noise multiplier: the noise std is ``sigma * sqrt(top_k)``. Its ε at a given δ is that of
            one Gaussian release, ``compute_epsilon(noise_multiplier=sigma, sample_rate=1, steps=1, delta)``.

    Example:
        >>> query = SemanticQuery(top_k=2, top_n=3, sigma=1.5)
        >>> round(query.noise_std, 4)
        2.1213
    """

    top_k: int
    top_n: int
    sigma: float

    def __post_init__(self) -> None:
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"Expected top_k={self.top_k} to be an integer >= 1.")
        if not (isinstance(self.top_n, int) and self.top_n >= 1):
            raise ValueError(f"Expected top_n={self.top_n} to be an integer >= 1.")
        if not self.sigma > 0:
            raise ValueError(f"Expected sigma={self.sigma} > 0 (sigma = 0 would release the exact histogram).")

    @classmethod
    def from_budget(cls, budget: PrivacyBudget, *, top_k: int, top_n: int) -> "SemanticQuery":
        """The query with the noise multiplier that ``budget`` planned for it."""
        return cls(top_k=top_k, top_n=top_n, sigma=budget.noise_multiplier(QUERY))

    @property
    def l2_sensitivity(self) -> float:
        return math.sqrt(self.top_k)

    @property
    def noise_std(self) -> float:
        return self.sigma * self.l2_sensitivity

    def votes(self, logits: torch.Tensor) -> torch.Tensor:
        """The exact (NOT private) vote histogram: each row's top-k classes get one vote each (float64 (M,))."""
        if logits.ndim != 2 or logits.shape[1] < max(self.top_k, self.top_n):
            raise ValueError(f"Expected logits (N, M) with M >= top_k={self.top_k} and top_n={self.top_n}, "
                             f"got {tuple(logits.shape)}.")
        top = logits.topk(self.top_k, dim=1).indices.reshape(-1).cpu()
        return torch.bincount(top, minlength=logits.shape[1]).to(torch.float64)

    def release(self, histogram: torch.Tensor, *, budget: PrivacyBudget | None = None,
                generator: torch.Generator | None = None) -> QueryResult:
        """Add the Gaussian noise to an exact vote histogram and select the top N.

        Args:
            histogram: from :meth:`votes`; each image must have contributed exactly ``top_k`` distinct votes.
            budget: if given, one "query" release is recorded in its ledger first (raising
                :class:`~privimage.engine.BudgetExceededError` before any release if it would overspend);
                its planned noise multiplier must equal ``sigma``.
            generator: noise source (default torch's global one; use ``secure_generator()`` in production).

        Guarantees:
            The returned histogram and labels are (ε, δ)-DP with ε = ε(sigma) of one Gaussian release of
            sensitivity √k (add/remove one sensitive image).
        """
        if budget is not None:
            planned = budget.noise_multiplier(QUERY)
            if not math.isclose(planned, self.sigma, rel_tol=1e-9):
                raise ValueError(f"The budget planned the query with noise multiplier {planned:.6g}, but this "
                                 f"query uses sigma={self.sigma:.6g}; build it with SemanticQuery.from_budget.")
            budget.spend(QUERY)
        (noisy,) = add_gaussian_noise(ClippedSum((histogram.to(torch.float64),), l2_sensitivity=self.l2_sensitivity),
                                      noise_multiplier=self.sigma, generator=generator)
        selected = noisy.topk(min(self.top_n, len(noisy))).indices.tolist()
        return QueryResult(noisy, selected, self)

    def run(self, classifier: torch.nn.Module, sensitive_images: torch.Tensor, *,
            budget: PrivacyBudget | None = None, generator: torch.Generator | None = None,
            batch_size: int = 512) -> QueryResult:
        """Classify the sensitive images (uint8 (N, C, H, W)) and release the noisy top-N.

        ``classifier`` is a :class:`~privimage.query.QueryClassifier` (anything with
        ``predict_logits(images, batch_size=)``). The exact histogram never leaves this function.
        """
        logits = classifier.predict_logits(sensitive_images, batch_size=batch_size)
        return self.release(self.votes(logits), budget=budget, generator=generator)


def query_budget(*, epsilon: float, delta: float) -> PrivacyBudget:
    """A budget that plans only the query, spending ``epsilon`` at ``delta`` (for ``privimage query`` alone).

    The noise multiplier is calibrated with the engine's accountant for one Gaussian release.
    """
    from privimage.engine import Mechanism, calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, sample_rate=1.0, steps=1, delta=delta)
    return PrivacyBudget(epsilon, delta, plan={QUERY: Mechanism(sigma, 1.0, 1)})
