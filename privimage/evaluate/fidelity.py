"""Fidelity in the report: FID (or proxy FID), Inception Score and precision/recall of the samples.

The feature network is the standard FID Inception-v3 when its weights file is given, else the run's own
query classifier (every number then named ``proxy_*``, never mixed with FID). The reference is what
:func:`fid_reference` picks, and its :class:`~privimage.evaluate.privacy.Coverage` decides which report the
numbers go to: with the default ``fid_split="sensitive"`` they compare the samples with sensitive TRAINING
images without noise, so they are private.

Reference statistics of real images (mu, sigma: statistics of possibly sensitive data) are cached in the
run's ``private/fid/`` (or ``cache_dir``); per-image features are never stored.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from privimage.evaluate.features import (
    INCEPTION,
    FeatureNet,
    extract_features,
    inception_feature_net,
    load_proxy_classifier,
    proxy_feature_net,
)
from privimage.evaluate.fid import FeatureStats, fid_from_stats, load_stats, read_npz, save_stats, stats_from_arrays
from privimage.evaluate.inception import WEIGHTS_ENV, WEIGHTS_FILE_NAME, find_inception_weights
from privimage.evaluate.metrics import inception_score, precision_recall
from privimage.evaluate.options import EvaluateOptions
from privimage.evaluate.privacy import HELD_OUT, PUBLIC_REFERENCE, SAMPLES, SENSITIVE_TRAINING, Coverage, Reports
from privimage.evaluate.real_data import load_real
from privimage.rundir import RunDir

__all__ = ["add_fidelity", "feature_network", "fid_reference", "fidelity", "reference_features"]


def reference_features(net: FeatureNet, images: torch.Tensor, opts: EvaluateOptions, cache_dir: Path
                       ) -> tuple[FeatureStats, np.ndarray | None, str]:
    """Reference statistics of real ``images``, and up to ``pr_max`` features for precision/recall.

    Only ``mu``, ``sigma`` and the count are cached, as ``<cache_dir>/<kind>-<key>.npz`` (an ordinary
    statistics file) where the key hashes the feature network's weights and the images' bytes, so a cached
    file is reused exactly when it would be recomputed identically. Per-image features of real images are
    never written; on a cache hit, precision/recall recomputes the features of the first ``pr_max`` images.
    """
    bf16 = opts.bf16 and torch.device(opts.device).type == "cuda"  # bf16 features are not fp32 features
    digest = hashlib.sha256(f"{net.kind}:{net.fingerprint}:{tuple(images.shape)}:bf16={bf16}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    path = cache_dir / f"{net.kind}-{digest.hexdigest()[:24]}.npz"
    if path.is_file():
        stats, _ = stats_from_arrays(read_npz(path, what="Cached reference statistics"), path)
        feats = None
        if min(len(images), opts.pr_max) > opts.pr_k:
            feats, _ = extract_features(net, images[:opts.pr_max], batch_size=opts.batch_size, device=opts.device,
                                        bf16=opts.bf16, desc="reference features (precision/recall)")
        return stats, feats, f"cache {path}"
    feats, _ = extract_features(net, images, batch_size=opts.batch_size, device=opts.device, bf16=opts.bf16,
                                desc="reference features")
    stats = FeatureStats.from_features(feats)
    save_stats(path, stats, kind=net.kind, network=net.name)
    return stats, feats[:opts.pr_max], f"computed, cached at {path}"


def fidelity(net: FeatureNet, samples: torch.Tensor, real: torch.Tensor | None, opts: EvaluateOptions, *,
             cache_dir: Path) -> dict:
    """FID (or proxy FID), Inception Score and precision/recall of ``samples``, named by ``net.kind``.

    ``real``'s statistics are cached in ``cache_dir`` (:func:`reference_features`).
    """
    t0 = time.perf_counter()
    feats, logits = extract_features(net, samples, batch_size=opts.batch_size, device=opts.device,
                                     bf16=opts.bf16, desc="sample features")
    stats = FeatureStats.from_features(feats)
    out: dict = {}
    common = {"kind": net.kind, "network": net.name, "num_samples": int(samples.shape[0])}
    if opts.reference_stats:
        ref, meta = load_stats(opts.reference_stats)
        if meta.get("kind", INCEPTION) != net.kind:
            raise ValueError(f"Reference statistics {opts.reference_stats} are of kind {meta.get('kind', INCEPTION)!r}, "
                             f"but the features are {net.kind!r}: they cannot be compared.")
        if ref.mu.shape != stats.mu.shape:
            raise ValueError(f"Reference statistics {opts.reference_stats} have dimension {ref.mu.shape[0]}, "
                             f"the {net.kind} features {stats.mu.shape[0]}.")
        ref_feats, source = None, f"file {opts.reference_stats}"
    elif real is not None:
        ref, ref_feats, source = reference_features(net, real, opts, cache_dir)
    else:
        raise ValueError("No real images and no --reference-stats: nothing to compare the samples with.")
    out[net.metric_name("fid")] = {**common, "value": fid_from_stats(stats, ref), "num_reference": ref.num,
                                   "reference": source, "feature_dim": int(stats.mu.shape[0])}
    if logits is not None and samples.shape[0] >= opts.is_splits:
        mean, std = inception_score(logits, splits=opts.is_splits)
        out[net.metric_name("inception_score")] = {**common, "mean": mean, "std": std, "splits": opts.is_splits,
                                                   "num_classes": int(logits.shape[1])}
    if ref_feats is not None and min(len(ref_feats), len(feats)) > opts.pr_k:
        p, r = precision_recall(ref_feats, feats[:opts.pr_max], k=opts.pr_k)
        out[net.metric_name("precision_recall")] = {**common, "precision": p, "recall": r, "k": opts.pr_k,
                                                    "num_real": int(len(ref_feats)),
                                                    "num_generated": int(min(len(feats), opts.pr_max))}
    out["_seconds"] = time.perf_counter() - t0
    return out


def feature_network(run_dir: Path, opts: EvaluateOptions, log) -> FeatureNet | None:
    """The Inception when its weights file is given; else the run's query classifier (proxy); else None."""
    weights = find_inception_weights(opts.inception_weights)
    if weights is not None:
        log(f"FID: standard Inception-v3 from {weights}")
        return inception_feature_net(weights)
    classifier = RunDir(run_dir).classifier_path
    log(f"No Inception weights file (--inception-weights or ${WEIGHTS_ENV}; the file is {WEIGHTS_FILE_NAME}).")
    if not classifier.is_file():
        log(f"No proxy either ({classifier} does not exist): fidelity metrics are skipped.")
        return None
    log(f"Computing the PROXY FID on features of {classifier}: useful to compare runs of this data set, "
        f"NOT comparable to published FIDs. Every such number is labelled proxy_*.")
    return proxy_feature_net(load_proxy_classifier(classifier), name=str(classifier.relative_to(run_dir)))


def fid_reference(config: dict, opts: EvaluateOptions, test_images: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, Coverage]:
    """The real images the samples' statistics are compared with, and what they are (their coverage)."""
    if opts.reference_stats:
        return None, PUBLIC_REFERENCE
    on_training = SENSITIVE_TRAINING if opts.fid_split == "sensitive" else HELD_OUT
    if opts.fid_real:
        images, _ = load_real(config, split=opts.fid_split, override=opts.fid_real, size=opts.num_reference)
        return images, on_training
    if opts.real:  # the --real override doubles as the FID reference unless --fid-real is given
        return (test_images[:opts.num_reference] if opts.num_reference else test_images), HELD_OUT
    images, _ = load_real(config, split=opts.fid_split, size=opts.num_reference)
    return images, on_training


def add_fidelity(reports: Reports, run_dir: Path, config: dict, opts: EvaluateOptions, samples: torch.Tensor,
                 test_images: torch.Tensor | None, log) -> float | None:
    """The fidelity metrics, each into the report its reference's coverage allows, with the notes they need;
    returns the seconds spent (``None`` when no feature network is available and fidelity is skipped)."""
    net = feature_network(run_dir, opts, log)
    if net is None:
        reports.note("No Inception weights and no query/classifier.pt: fidelity metrics skipped.")
        return None
    real, coverage = fid_reference(config, opts, test_images)
    if net.kind != INCEPTION:
        reports.note("proxy_* metrics use the project's query classifier features: not comparable to published "
                     "FID/IS/precision/recall.", coverage)
    if not coverage.publishable:
        reports.not_private.append(f"{net.metric_name('fid')} and {net.metric_name('precision_recall')} compare "
                                   f"the samples with the sensitive training split without noise: like every FID "
                                   f"on training data, these values are not covered by epsilon.")
    if opts.reference_stats:
        reports.note("Precision/recall need real features: skipped with --reference-stats.")
    if samples.shape[0] < 5000:
        reports.note(f"{net.metric_name('fid')} from {samples.shape[0]} samples: FID is biased upward at small N "
                     f"(the official protocol uses 5,000, the community 50,000); compare values only at equal N.",
                     coverage)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else RunDir(run_dir).fid_cache_dir
    metrics = fidelity(net, samples, real, opts, cache_dir=cache_dir)
    seconds = metrics.pop("_seconds")
    for name, metric in metrics.items():
        reports.add(name, metric, SAMPLES if name.endswith("inception_score") else coverage)
    reports.public["feature_network"] = {"kind": net.kind, "name": net.name, "fingerprint": net.fingerprint}
    return seconds
