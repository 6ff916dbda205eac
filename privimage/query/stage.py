"""The query stage of a run directory, in the pieces an ε sweep (one set of votes, many runs) reuses.

:func:`privimage.pipeline.stage_query` (what ``privimage run`` and ``privimage query`` run) is::

    classifier = query_classifier(cfg, public, resolution=...)      # public data only; cached
    votes = query_votes(classifier, sensitive.images, sensitive.labels, num_classes=C, top_k=k)  # SECRET
    release_query(run_dir, cfg, votes, public=public, sensitive_class_names=...)  # this run's release

A sweep computes ``votes`` once and calls :func:`release_query` once per run directory: each run makes its
own Gaussian release with the σ its own ``budget.json`` planned, its spend written there before the noise is
drawn (the contract of :mod:`privimage.query.semantic`). The votes are never written.

Writes, in ``run_dir/query/``: ``classifier.pt`` (the caller, public), ``histogram.npy`` (noisy),
``selected_labels.json`` and ``subset.npz`` (the public images of the selected classes, relabelled to the
sensitive classes that chose them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from privimage.engine import PrivacyBudget
from privimage.errors import ConfigError, RunDirError
from privimage.privacy import QUERY
from privimage.query.semantic import SemanticQuery, Votes, release_histogram
from privimage.query.subset import subset_for
from privimage.rundir import RunDir

if TYPE_CHECKING:
    from privimage.config import RunConfig
    from privimage.data import ImageDataset
    from privimage.query.classifier import QueryClassifier

__all__ = ["query_classifier", "release_query", "shared_votes", "unspent_query_budget"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def unspent_query_budget(run_dir: RunDir | Path) -> PrivacyBudget:
    """The run's budget, refusing one whose planned query is missing or already spent."""
    run = RunDir.of(run_dir)
    budget = run.load_budget()
    if QUERY not in budget.plan:
        raise RunDirError(f"{run.budget_path}: the budget plans no 'query' mechanism.")
    if budget.spent.get(QUERY, 0) >= budget.plan[QUERY].count:
        raise RunDirError(f"{run.budget_path}: the query was already spent; a second one would cost more privacy. "
                          f"Start a new run directory.")
    return budget


def query_classifier(cfg: RunConfig, public: ImageDataset, *, resolution: int, log=_log) -> QueryClassifier:
    """The run's query classifier: trained on ``public`` only (spends nothing), cached by what it learnt from."""
    from privimage.query.classifier import ClassifierConfig, train_query_classifier
    from privimage.train import resolve_device

    qc = cfg.query
    if qc.top_k > public.num_classes:
        raise ConfigError(f"query.top_k={qc.top_k} exceeds the {public.num_classes} public classes.")
    return train_query_classifier(
        public, resolution=resolution, device=resolve_device(cfg.device), log=log,
        config=ClassifierConfig(width=qc.classifier_width, epochs=qc.classifier_epochs,
                                style_noise=qc.classifier_style_noise, style_gain=qc.classifier_style_gain,
                                seed=cfg.seed))


def shared_votes(classifier: QueryClassifier, images: torch.Tensor, labels: torch.Tensor | None, *, num_classes: int,
                 top_k: int, batch_size: int = 512) -> Votes:
    """:func:`~privimage.query.query_votes`, the work shared by the ranks under torchrun (one process: itself).

    Rank r classifies batches r, r + W, ... of the one-process batches (:func:`privimage.distributed.my_batches`),
    so every image gets the logits one process computes, bit for bit; the ranks' counts are summed by one
    all-reduce, exact (integers in float64). Every rank gets the whole SECRET histogram, in memory only.
    """
    from privimage import distributed
    from privimage.query.semantic import query_votes

    launch = distributed.current()
    if launch is None:
        return query_votes(classifier, images, labels, num_classes=num_classes, top_k=top_k, batch_size=batch_size)
    import torch.distributed as dist
    from privimage.engine.distributed import collective_device

    parts = distributed.my_batches(len(images), batch_size)
    mine = torch.cat([torch.arange(p.start, p.stop) for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    votes = query_votes(classifier, images[mine], labels[mine] if labels is not None else None,
                        num_classes=num_classes, top_k=top_k, batch_size=batch_size)
    counts = votes.counts.to(collective_device(launch.group))
    dist.all_reduce(counts, group=launch.group)
    return Votes(counts.cpu(), top_k)


def release_query(run_dir: RunDir | Path, cfg: RunConfig, votes: Votes, *, public: ImageDataset,
                  sensitive_class_names: list[str], log=_log) -> dict[int, int]:
    """This run's own release of ``votes`` (computed once, possibly for several runs: an ε sweep), into
    ``query/``: histogram.npy (noisy), selected_labels.json and subset.npz. Returns the label map.

    The noise multiplier is the one the run's ``budget.json`` planned; the spend is written to that file
    before the noise is drawn (:func:`privimage.query.release_histogram`); the noise is secret
    (``secure_generator``) unless the config is in the non-secure test mode (``finetune.secure_noise =
    false``: seeded by the public seed, said loudly).
    """
    from privimage.engine import secure_generator  # looked up at call time (tests watch it)

    run = RunDir.of(run_dir)
    budget = unspent_query_budget(run)
    qc = cfg.query
    query = SemanticQuery.from_budget(budget, top_k=qc.top_k, top_n=qc.top_n)
    if cfg.non_private:
        log("query: non_private=true: the histogram is released WITHOUT noise (sigma = 0). NOT private; the "
            "reference point of a sweep only.")
    if cfg.finetune.secure_noise:
        generator = secure_generator()
    else:
        log("query: finetune.secure_noise=false: the query's noise is derived from the PUBLIC seed. NOT private; "
            "for tests only.")
        generator = torch.Generator().manual_seed(cfg.seed + 11)
    release = release_histogram(votes, query, generator=generator, budget=budget,
                                persist=run.save_budget)
    release.save(run.query_dir, class_names=public.class_names, sensitive_class_names=sensitive_class_names)
    subset = subset_for(release, public, max_per_label=qc.max_per_label, seed=cfg.seed,
                        class_names=sensitive_class_names)
    run.save_subset(subset.images.numpy(), subset.labels.numpy())
    log(f"query: sigma={query.sigma:.4g}; selected "
        f"{', '.join(f'{public.class_names[j]}->{sensitive_class_names[c]}' for j, c in release.label_map.items())}"
        f"; subset {len(subset)} public images")
    return release.label_map
