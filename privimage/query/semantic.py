"""The DP semantic query: which public classes do the sensitive images look like?

PrivImage (arXiv 2311.12850, §4.1): the query classifier labels every sensitive image with its top-k public
classes; the votes form a histogram over the public classes; Gaussian noise makes the histogram
differentially private; the top public classes of the noisy histogram are released and pick the
pre-training subset. The query comes in three pieces, so that a caller can compute the secret votes once
and release them several times, each release with its own noise and its own ledger entry (an ε sweep):

    votes = query_votes(classifier, images, labels, num_classes=C, top_k=k)       # SECRET, memory only
    release = release_histogram(votes, query, generator=g, budget=b, persist=p)    # the DP release
    subset = subset_for(release, public)                                            # post-processing

Per-class form (the official code's). Every sensitive image votes for its top-k public classes in ITS OWN
class's row of a (sensitive classes C × public classes M) histogram. Each selected public class is labelled
with the sensitive class whose noisy row chose it (:func:`assign_per_class`), so a conditional model
pre-trained on the subset already maps "sensitive class c" to public images like it. Without labels every
image votes in one row (C = 1): the pooled histogram of the paper's description.

Sensitivity. Adding or removing one sensitive image changes k entries of one row by exactly 1 each, so the
whole (C, M) histogram moves by √k in L2 norm. It travels as a ``ClippedSum(l2_sensitivity=sqrt(k))`` and
gets noise of std ``sigma * sqrt(k)`` on every entry from :func:`privimage.engine.add_gaussian_noise`, the
one place noise is drawn: one Gaussian mechanism with noise multiplier ``sigma`` (sample rate 1, one step),
which is what the :class:`~privimage.engine.PrivacyBudget` plans under the name ``"query"``. Choosing
classes from the noisy histogram is post-processing and costs nothing more.

Privacy contract:

- :class:`Votes` are the exact histogram of sensitive data. They are secret: held in memory only, never
  written, logged or printed (their ``repr`` shows the shape only, and they refuse to be pickled, so
  ``torch.save`` of them fails).
- :func:`release_histogram` records the spend in the budget and calls ``persist(budget)`` BEFORE it draws
  the noise, so once a release exists, the durable ledger counts it. Every call is a new release that
  spends again, with fresh noise.
- Only a :class:`QueryRelease` (the noisy histogram, the settings, and what is computed from them) may be
  written or published.

Following jax_privacy's split of public and sensitive information, :class:`SemanticQuery` holds only public
settings (k, N, σ); the sensitive images are arguments.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from privimage.engine import ClippedSum, Mechanism, PrivacyBudget, add_gaussian_noise, calibrate_noise_multiplier
from privimage.privacy import QUERY

__all__ = ["QueryRelease", "SemanticQuery", "Votes", "assign_per_class", "count_votes", "query_budget",
           "query_votes", "release_histogram"]


@dataclass(frozen=True)
class SemanticQuery:
    """Public settings of the DP semantic query.

    Attributes:
        top_k: votes per sensitive image (its k most likely public classes). Sensitivity is √k.
        top_n: public classes selected in all, split evenly over the sensitive classes (at least one each).
        sigma: noise multiplier: the noise std is ``sigma * sqrt(top_k)``. Its ε at a given δ is that of
            one Gaussian release, ``compute_epsilon(noise_multiplier=sigma, sample_rate=1, steps=1, delta)``.
            0 (the exact histogram, NOT private) only in the non-private reference
            (:func:`privimage.privacy.plan_non_private_budget`).

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
        if not (self.sigma > 0 or self.sigma == 0):
            raise ValueError(f"Expected sigma={self.sigma} > 0 (sigma = 0 releases the exact histogram: only the "
                             f"non-private reference, privimage.privacy.plan_non_private_budget, plans it).")

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

    def per_class_quota(self, num_classes: int) -> int:
        """Public classes per sensitive class: ``top_n`` split evenly, at least one each."""
        return max(1, self.top_n // num_classes)


# ------------------------------------------------------------------------------------------------------------
# (a) the votes: exact, secret, in memory only


@dataclass(frozen=True, eq=False, repr=False)
class Votes:
    """The EXACT per-class vote histogram of the sensitive images. SECRET: never write, log or print it.

    Attributes:
        counts: float64 (C, M): row c holds the top-k votes of sensitive class c's images.
        top_k: votes per image, so the histogram's L2 sensitivity is √top_k.

    Its ``repr`` shows the shape only, and pickling (``torch.save``, ``copy.deepcopy``) raises.
    """

    counts: torch.Tensor
    top_k: int

    @property
    def l2_sensitivity(self) -> float:
        return math.sqrt(self.top_k)

    def __repr__(self) -> str:
        return f"Votes({self.counts.shape[0]} sensitive x {self.counts.shape[1]} public classes, " \
               f"top_k={self.top_k}; SECRET)"

    def __reduce_ex__(self, protocol):
        raise TypeError("Votes are the exact histogram of sensitive data: they stay in memory and are never "
                        "written. Write a QueryRelease (release_histogram) instead.")


def count_votes(logits: torch.Tensor, labels: torch.Tensor | None = None, *, num_classes: int = 1,
                top_k: int) -> Votes:
    """Each image's top-k classes by ``logits`` (N, M) get one vote each, in row ``labels[i]`` (float64 (C, M)).

    ``labels=None`` puts every vote in one row (``num_classes`` must then be 1: the pooled histogram).
    """
    if logits.ndim != 2 or logits.shape[1] < top_k:
        raise ValueError(f"Expected logits (N, M) with M >= top_k={top_k}, got {tuple(logits.shape)}.")
    if labels is None:
        if num_classes != 1:
            raise ValueError(f"Without labels every vote goes to one row; got num_classes={num_classes}.")
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"Expected labels ({logits.shape[0]},), got {tuple(labels.shape)}.")
    labels = labels.long().cpu()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Expected sensitive labels in [0, {num_classes}).")
    num_public = logits.shape[1]
    top = logits.topk(top_k, dim=1).indices.cpu()
    cells = (labels[:, None] * num_public + top).reshape(-1)
    counts = torch.bincount(cells, minlength=num_classes * num_public).reshape(num_classes, num_public).double()
    return Votes(counts, top_k)


def query_votes(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                num_classes: int = 1, top_k: int, batch_size: int = 512) -> Votes:
    """Classify the sensitive uint8 ``images`` (N, C, H, W) and count their votes (:func:`count_votes`).

    ``classifier`` is a :class:`~privimage.query.QueryClassifier` (anything with ``predict_logits(images,
    batch_size=)``). The logits stay inside this function; the result is SECRET (:class:`Votes`).
    """
    logits = classifier.predict_logits(images, batch_size=batch_size)
    return count_votes(logits, labels, num_classes=num_classes, top_k=top_k)


# ------------------------------------------------------------------------------------------------------------
# (b) the release: Gaussian noise, recorded in the ledger first


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
class QueryRelease:
    """What the query releases: differentially private, publishable.

    Attributes:
        noisy_histogram: float64 (C, M): row c holds the votes of sensitive class c's images plus noise.
        query: the public settings it was made with.
    """

    noisy_histogram: torch.Tensor
    query: SemanticQuery

    @cached_property
    def label_map(self) -> dict[int, int]:
        """Selected public label -> the sensitive class it stands for, highest noisy count first."""
        return assign_per_class(self.noisy_histogram, self.query.per_class_quota(self.noisy_histogram.shape[0]))

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


def release_histogram(votes: Votes, query: SemanticQuery, *, generator: torch.Generator,
                      budget: PrivacyBudget | None = None,
                      persist: Callable[[PrivacyBudget], None] | None = None) -> QueryRelease:
    """One Gaussian release of ``votes``: noise of std ``query.sigma * sqrt(k)`` on every entry.

    Args:
        votes: from :func:`query_votes`; their ``top_k`` must be the query's.
        query: the public settings; with a ``budget`` its ``sigma`` must be the one the budget planned
            (build it with :meth:`SemanticQuery.from_budget`).
        generator: the noise's source: ``privimage.engine.secure_generator()`` for a private release; a
            generator seeded from a public seed only in tests (the release is then NOT private).
        budget: one "query" release is recorded in its ledger before the noise is drawn (raising
            :class:`~privimage.engine.BudgetExceededError`, with nothing spent, if that would overspend).
            ``None``: nothing is recorded (tests, or a caller that accounts by itself).
        persist: called as ``persist(budget)`` right after the spend and before the noise is drawn: write the
            ledger to disk here, so no release can exist that the durable ledger does not count.

    Guarantees:
        The returned histogram, and everything computed from it alone, is (ε, δ)-DP with ε = ε(sigma) of one
        Gaussian release of L2 sensitivity √k (add/remove one sensitive image). Settings that cannot be
        assigned (more classes asked for than exist) are refused before anything is spent.
    """
    if votes.top_k != query.top_k:
        raise ValueError(f"The votes were counted with top_k={votes.top_k} but the query has top_k={query.top_k}.")
    _check_assignable(tuple(votes.counts.shape), query.per_class_quota(votes.counts.shape[0]))
    if budget is not None:
        planned = budget.noise_multiplier(QUERY)
        if not math.isclose(planned, query.sigma, rel_tol=1e-9):
            raise ValueError(f"The budget planned the query with noise multiplier {planned:.6g}, but this "
                             f"query uses sigma={query.sigma:.6g}; build it with SemanticQuery.from_budget.")
        budget.spend(QUERY)
        if persist is not None:
            persist(budget)
    (noisy,) = add_gaussian_noise(ClippedSum((votes.counts.to(torch.float64),), l2_sensitivity=votes.l2_sensitivity),
                                  noise_multiplier=query.sigma, generator=generator)
    return QueryRelease(noisy, query)


def query_budget(*, epsilon: float, delta: float) -> PrivacyBudget:
    """A budget that plans only the query, spending ``epsilon`` at ``delta`` (``privimage query
    --epsilon-query``). The noise multiplier is calibrated with the engine's accountant for one Gaussian
    release."""
    sigma = calibrate_noise_multiplier(target_epsilon=epsilon, sample_rate=1.0, steps=1, delta=delta)
    return PrivacyBudget(epsilon, delta, plan={QUERY: Mechanism(sigma, 1.0, 1)})
