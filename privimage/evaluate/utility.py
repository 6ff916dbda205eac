"""Utility in the report: classification accuracy (CA) of classifiers trained on the samples, by protocol.

Each protocol is one function returning ``(metric, coverage, release)``: the metric for the report, what it
was computed on, and the evaluation's own privacy release (``None`` when it spends nothing). The training
recipes and the selection mechanism themselves are in :mod:`privimage.evaluate.classify`.

- :func:`official_ca`: train on the samples, test on the held-out real test set; spends nothing.
- :func:`dpimagebench_ca`: each classifier's epoch is selected by Report Noisy Max on a validation split of
  the SENSITIVE training data; that selection is a pure ε-DP release the caller must record in the
  evaluation ledger before the report exists (:func:`privimage.evaluate.privacy.add_privacy`).
"""

from __future__ import annotations

import time

import torch

import privimage.evaluate.classify as classify
from privimage.evaluate.figures import match_images
from privimage.evaluate.options import EvaluateOptions
from privimage.evaluate.privacy import HELD_OUT, NOISY_SELECTION, Coverage, Reports
from privimage.evaluate.real_data import load_real

__all__ = ["add_classification_accuracy", "dpimagebench_ca", "drop_test_copies", "official_ca"]


def official_ca(samples, sample_labels, test_images, test_labels, *, num_classes: int,
                opts: EvaluateOptions) -> tuple[dict, Coverage, None]:
    """PrivImage's CA: one classifier trained on the samples, its accuracy on the held-out test set."""
    metric = classify.classification_accuracy(samples, sample_labels, test_images, test_labels,
                                              num_classes=num_classes, config=opts.ca, device=opts.device)
    return metric, HELD_OUT, None


def drop_test_copies(val_images: torch.Tensor, val_labels: torch.Tensor, test_images: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Remove validation images that are exact copies of a test image; returns them and how many went.

    Selecting epochs on images that are also in the test set would select on test accuracy (the leak
    DPImageBench warns about). Dropping by a fixed rule (equality with a test image) keeps the selection
    ε-DP: neighbouring validation sets stay neighbouring or become equal. The number dropped is itself a
    count on the sensitive data, so it goes to the operator's log, never into the report.
    """
    test_keys = {img.numpy().tobytes() for img in test_images}
    keep = torch.tensor([img.numpy().tobytes() not in test_keys for img in val_images], dtype=torch.bool)
    return val_images[keep], val_labels[keep], int((~keep).sum())


def dpimagebench_ca(samples, sample_labels, test_images, test_labels, *, num_classes: int, config: dict,
                    opts: EvaluateOptions, created: str, log) -> tuple[dict, Coverage, dict]:
    """DPImageBench's CA with its epochs selected on sensitive validation data; the release it makes.

    The validation images come from ``opts.val`` (a file the user gives as sensitive data) or the run's
    ``sensitive`` split, matched to the samples' shape, less exact copies of test images.
    """
    val_images, val_labels = load_real(config, split="sensitive", override=opts.val, size=opts.val_size)
    num_val = int(val_images.shape[0])
    val_images, val_labels, dropped = drop_test_copies(match_images(val_images, samples), val_labels, test_images)
    source = (f"file {opts.val} (given as sensitive data)" if opts.val else
              "split 'sensitive' of the run's data set, the generator's training data")
    if val_images.shape[0] == 0:
        raise ValueError(f"Every validation image ({source}) is also in the test set: selecting on it would "
                         f"select on the test set. Give a disjoint --val.")
    if dropped:  # to the operator only: the count is not DP (see drop_test_copies)
        log(f"{dropped} of {num_val} validation images are exact copies of test images; they are left out of the "
            f"selection (this count is not written to the report).")
    metric = classify.dpimagebench_accuracy(samples, sample_labels, val_images, val_labels, test_images,
                                            test_labels, num_classes=num_classes, archs=opts.ca_archs,
                                            config=opts.ca, selection_epsilon=opts.selection_epsilon,
                                            device=opts.device)
    metric["num_val"] = num_val  # before dropping test copies: the report does not release that count
    metric["validation_data"] = f"{source}, less exact copies of test images"
    release = {"created": created, "what": "DPImageBench CA epoch selection",
               "mechanism": "Report Noisy Max, Laplace(1/epsilon_per_classifier) on validation counts",
               "epsilon": metric["selection_epsilon_total"], "delta": 0.0,
               "epsilon_per_classifier": opts.selection_epsilon, "classifiers": list(opts.ca_archs),
               "data": f"{metric['num_val']} validation images from {source}"}
    return metric, NOISY_SELECTION, release


def add_classification_accuracy(reports: Reports, samples, sample_labels, test_images, test_labels, *,
                                config: dict, opts: EvaluateOptions, created: str, log) -> tuple[dict | None, float]:
    """CA by ``opts.ca_protocol`` into the report; returns (the evaluation's release or None, seconds)."""
    t0 = time.perf_counter()
    num_classes = int(max(int(sample_labels.max()), int(test_labels.max())) + 1)
    if opts.ca_protocol == "official":
        metric, coverage, release = official_ca(samples, sample_labels, test_images, test_labels,
                                                num_classes=num_classes, opts=opts)
    else:
        metric, coverage, release = dpimagebench_ca(samples, sample_labels, test_images, test_labels,
                                                    num_classes=num_classes, config=config, opts=opts,
                                                    created=created, log=log)
    metric["kind"] = "classification_accuracy"
    reports.add("classification_accuracy", metric, coverage)
    return release, time.perf_counter() - t0
