"""The DP semantic query of PrivImage (arXiv 2311.12850) and the pre-training subset it selects.

- :func:`train_query_classifier` / :class:`QueryClassifier`: a small ResNet trained on public data only
  (``.features(x)``, ``forward(x)`` logits), cached by a hash of its config and data.
- The query, in three pieces (:mod:`privimage.query.semantic` states the privacy contract):
  :func:`query_votes` counts the sensitive images' votes (:class:`Votes`: SECRET, memory only);
  :func:`release_histogram` makes one Gaussian release of them (:class:`QueryRelease`), recording the
  spend first; :func:`subset_for` gives the public images of the selected classes, relabelled to the
  sensitive classes that chose them. :class:`SemanticQuery` ``(top_k, top_n, sigma)`` holds the public
  settings. :mod:`privimage.query.stage` runs them for a run directory (``privimage query``, ``privimage
  run``; ``release_query`` once per run for votes computed once).
- :func:`select_subset`: the public images of given labels.
- :func:`write_ffcv`, :class:`FFCVLoader`, :class:`DeviceLoader`, :func:`make_loader`: stream the subset.
"""

from privimage.query.classifier import ClassifierConfig, QueryClassifier, train_classifier, train_query_classifier
from privimage.query.loaders import DeviceLoader, FFCVLoader, augment, ffcv_available, make_loader, write_ffcv
from privimage.query.semantic import (QueryRelease, SemanticQuery, Votes, assign_per_class, count_votes, query_budget,
                                      query_votes, release_histogram)
from privimage.query.subset import select_subset, subset_for, subset_indices

__all__ = [
    "ClassifierConfig",
    "DeviceLoader",
    "FFCVLoader",
    "QueryClassifier",
    "QueryRelease",
    "SemanticQuery",
    "Votes",
    "assign_per_class",
    "augment",
    "count_votes",
    "ffcv_available",
    "make_loader",
    "query_budget",
    "query_votes",
    "release_histogram",
    "select_subset",
    "subset_for",
    "subset_indices",
    "train_query_classifier",
]
