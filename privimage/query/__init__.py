"""The DP semantic query of PrivImage (arXiv 2311.12850) and the pre-training subset it selects.

- :func:`train_classifier` / :class:`QueryClassifier`: a small ResNet trained on public data only
  (``.features(x)``, ``forward(x)`` logits), cached by a hash of its config and data.
- :class:`SemanticQuery` ``(top_k, top_n, sigma)``: public settings; ``run(classifier, sensitive_images,
  budget=...)`` releases the noisy top-k vote histogram and the top-N labels, recording the spend;
  ``run_per_class(...)`` releases one noisy row per sensitive class and :func:`assign_per_class` gives each
  sensitive class its public classes (:class:`PerClassResult`).
- :func:`select_subset`: the public images of the selected labels.
- :func:`write_ffcv`, :class:`FFCVLoader`, :class:`DeviceLoader`, :func:`make_loader`: stream the subset.
"""

from privimage.query.classifier import ClassifierConfig, QueryClassifier, train_classifier
from privimage.query.loaders import DeviceLoader, FFCVLoader, augment, ffcv_available, make_loader, write_ffcv
from privimage.query.semantic import PerClassResult, QueryResult, SemanticQuery, assign_per_class, query_budget
from privimage.query.subset import select_subset, subset_indices

__all__ = [
    "ClassifierConfig",
    "DeviceLoader",
    "FFCVLoader",
    "PerClassResult",
    "QueryClassifier",
    "QueryResult",
    "SemanticQuery",
    "assign_per_class",
    "augment",
    "ffcv_available",
    "make_loader",
    "query_budget",
    "select_subset",
    "subset_indices",
    "train_classifier",
    "write_ffcv",
]
