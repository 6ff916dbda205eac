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

Per-class form (:meth:`SemanticQuery.run_per_class`, what ``privimage run`` uses). The official code asks
the classifier about each sensitive class separately: every sensitive image votes for its top-k public
classes in ITS OWN class's row of a (sensitive classes × public classes) histogram. Adding or removing one
image still changes k entries of one row by 1, so the whole matrix has L2 sensitivity √k and its release
is the same single Gaussian mechanism with noise multiplier ``sigma``. Each selected public class is then
labelled with the sensitive class whose noisy row chose it (:func:`assign_per_class`, post-processing), so a
conditional model pre-trained on the subset already maps "sensitive class c" to public images like it.

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
from privimage.privacy import QUERY


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
class PerClassResult:
    """What the per-class query releases (all of it differentially private).

    Attributes:
        noisy_histogram: float64 (C, M): row c holds the votes of sensitive class c's images plus noise.
        label_map: selected public label -> the sensitive class it stands for, highest noisy count first.
        query: the settings used.
    """

    noisy_histogram: torch.Tensor
    label_map: dict[int, int]
    query: "SemanticQuery"

    @property
    def selected(self) -> list[int]:
        return list(self.label_map)

    def save(self, directory: str | os.PathLike, *, class_names: list[str],
             sensitive_class_names: list[str]) -> None:
        """Write ``histogram.npy`` (the noisy (C, M) matrix) and ``selected_labels.json`` atomically."""
        from privimage.io import atomic_write, save_json

        directory = Path(directory)
        with atomic_write(directory / "histogram.npy") as f:
            np.save(f, self.noisy_histogram.numpy())
        save_json({"selected_labels": self.selected, "selected_names": [class_names[j] for j in self.selected],
                   "label_map": {str(j): c for j, c in self.label_map.items()},
                   "sensitive_class_names": list(sensitive_class_names), "per_class": True,
                   **asdict(self.query), "l2_sensitivity": self.query.l2_sensitivity,
                   "noise_std": self.query.noise_std}, directory / "selected_labels.json")


def _check_assignable(shape: tuple[int, ...], per_class: int) -> None:
    if len(shape) != 2 or per_class < 1:
        raise ValueError(f"Expected a (C, M) histogram and per_class >= 1, got {tuple(shape)} and {per_class}.")
    if per_class * shape[0] > shape[1]:
        raise ValueError(f"{shape[0]} sensitive classes x {per_class} public classes each exceed the "
                         f"{shape[1]} public classes.")


def assign_per_class(noisy_histogram: torch.Tensor, per_class: int) -> dict[int, int]:
    """Give each sensitive class (row) ``per_class`` public classes (columns), greedily by noisy count.

    The largest remaining entry of the whole matrix wins: its public class goes to its row unless that class
    is already taken or the row is full. Only the noisy histogram goes in, so this is post-processing.

    Example:
        >>> assign_per_class(torch.tensor([[5., 9., 1.], [0., 8., 7.]]), 1)
        {1: 0, 2: 1}
    """
    _check_assignable(noisy_histogram.shape, per_class)
    num_classes, num_public = noisy_histogram.shape
    label_map: dict[int, int] = {}
    taken = [0] * num_classes
    for flat in torch.argsort(noisy_histogram.flatten(), descending=True, stable=True).tolist():
        c, j = divmod(flat, num_public)
        if j in label_map or taken[c] >= per_class:
            continue
        label_map[j] = c
        taken[c] += 1
        if len(label_map) == per_class * num_classes:
            break
    return label_map


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

    def _spend(self, budget: PrivacyBudget | None) -> None:
        """Record one "query" release in ``budget``'s ledger (before any noise exists); refuse a foreign sigma."""
        if budget is None:
            return
        planned = budget.noise_multiplier(QUERY)
        if not math.isclose(planned, self.sigma, rel_tol=1e-9):
            raise ValueError(f"The budget planned the query with noise multiplier {planned:.6g}, but this "
                             f"query uses sigma={self.sigma:.6g}; build it with SemanticQuery.from_budget.")
        budget.spend(QUERY)

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
        self._spend(budget)
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

    def votes_per_class(self, logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The exact (NOT private) per-class histogram (float64 (C, M)): image i's top-k votes go to row labels[i]."""
        if logits.ndim != 2 or logits.shape[1] < self.top_k or labels.shape != logits.shape[:1]:
            raise ValueError(f"Expected logits (N, M) with M >= top_k={self.top_k} and labels (N,), got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}.")
        labels = labels.long().cpu()
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"Expected sensitive labels in [0, {num_classes}).")
        num_public = logits.shape[1]
        top = logits.topk(self.top_k, dim=1).indices.cpu()
        cells = (labels[:, None] * num_public + top).reshape(-1)
        return torch.bincount(cells, minlength=num_classes * num_public).reshape(num_classes, num_public).double()

    def per_class_quota(self, num_classes: int) -> int:
        """Public classes per sensitive class: ``top_n`` split evenly, at least one each."""
        return max(1, self.top_n // num_classes)

    def release_per_class(self, histogram: torch.Tensor, *, budget: PrivacyBudget | None = None,
                          generator: torch.Generator | None = None) -> PerClassResult:
        """Add the Gaussian noise to an exact (C, M) histogram and give each class its public classes.

        ``budget`` and ``generator`` as in :meth:`release`: one "query" release is recorded before the noise is
        drawn. The whole matrix is one release of sensitivity √k (one image touches k entries of one row).
        """
        quota = self.per_class_quota(histogram.shape[0]) if histogram.ndim == 2 else 1
        _check_assignable(tuple(histogram.shape), quota)  # before the spend: a bad setting costs no privacy
        self._spend(budget)
        (noisy,) = add_gaussian_noise(ClippedSum((histogram.to(torch.float64),), l2_sensitivity=self.l2_sensitivity),
                                      noise_multiplier=self.sigma, generator=generator)
        return PerClassResult(noisy, assign_per_class(noisy, quota), self)

    def run_per_class(self, classifier: torch.nn.Module, sensitive_images: torch.Tensor,
                      sensitive_labels: torch.Tensor, *, num_classes: int, budget: PrivacyBudget | None = None,
                      generator: torch.Generator | None = None, batch_size: int = 512) -> PerClassResult:
        """Classify the sensitive images, vote per class, release the noisy matrix and the class assignment.

        The exact histogram never leaves this function.
        """
        logits = classifier.predict_logits(sensitive_images, batch_size=batch_size)
        return self.release_per_class(self.votes_per_class(logits, sensitive_labels, num_classes), budget=budget,
                                      generator=generator)


def query_budget(*, epsilon: float, delta: float) -> PrivacyBudget:
    """A budget that plans only the query, spending ``epsilon`` at ``delta`` (for ``privimage query`` alone).

    The noise multiplier is calibrated with the engine's accountant for one Gaussian release.
    """
    from privimage.engine import Mechanism, calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, sample_rate=1.0, steps=1, delta=delta)
    return PrivacyBudget(epsilon, delta, plan={QUERY: Mechanism(sigma, 1.0, 1)})
