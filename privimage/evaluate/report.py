"""Evaluate a run directory: fidelity (FID or proxy FID, IS, precision/recall), utility (CA), privacy spent.

Reads the run directory that ``privimage run`` writes (``config.json``, ``budget.json``,
``samples/samples.npz``, ``logs/*.csv``, ``query/classifier.pt``; never a checkpoint) and writes two reports,
split by what their numbers were computed on (:class:`~privimage.evaluate.privacy.Coverage`):

* publishable, in ``release/``: ``report.json`` and ``report.md`` (every metric under a name that is its kind,
  ``fid`` or ``proxy_fid``, never both from one network, with its coverage; only metrics on the samples, on
  held-out test images or on reference data the user declared public), the privacy section (the training
  ledger and ε/δ from ``budget.json``, every evaluation release, the total by composition), provenance, and
  ``figures/``: a grid of samples, ε over steps, the public pre-training's loss;
* private, in ``private/``: ``report-private.json`` and ``report-private.md`` with everything computed on the
  sensitive training data without noise (FID/precision-recall against the training split, the fine-tune's
  loss curve, training diagnostics) and ``figures/samples_vs_real.png`` (real sensitive test images beside
  the samples). Nothing in it is copied into ``release/``;
* ``evaluation_ledger.json``: append-only record of the evaluation's own privacy releases (the DPImageBench
  noisy selection), see :func:`~privimage.evaluate.privacy.privacy_summary`.

Reference statistics of real images (mu, sigma: statistics of possibly sensitive data) are cached in the run's
``private/fid/`` (or ``cache_dir``); per-image features are never stored.

Real images come from :func:`load_real` (the only call into :mod:`privimage.data`), or from ``.npz`` files
given on the command line (arrays ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privimage.evaluate import classify
from privimage.evaluate.features import (
    INCEPTION,
    FeatureNet,
    extract_features,
    inception_feature_net,
    load_proxy_classifier,
    proxy_feature_net,
)
from privimage.evaluate.fid import FeatureStats, fid_from_stats, load_stats, read_npz, save_stats, stats_from_arrays
from privimage.evaluate.figures import match_images, read_log, samples_grid, samples_vs_real_grid, training_plots
from privimage.evaluate.inception import WEIGHTS_ENV, WEIGHTS_FILE_NAME, find_inception_weights
from privimage.evaluate.markdown import render_markdown
from privimage.evaluate.metrics import inception_score, precision_recall
from privimage.evaluate.privacy import (
    HELD_OUT,
    NOISY_SELECTION,
    PUBLIC_REFERENCE,
    SAMPLES,
    SENSITIVE_TRAINING,
    Coverage,
    generator_privacy,
    load_evaluation_ledger,
    privacy_summary,
    read_json,
    record_evaluation_release,
)
from privimage.io import atomic_write, save_json
from privimage.rundir import RunDir

__all__ = ["EvaluateOptions", "PRIVATE_REPORT", "PUBLIC_REPORT", "data_options", "evaluate_run", "load_real",
           "samples_vs_real_grid"]

#: Where the two reports go, relative to the run directory (figures in ``figures/`` beside each).
PUBLIC_REPORT = Path(RunDir.PUBLIC_REPORT)
PRIVATE_REPORT = Path(RunDir.PRIVATE_REPORT)


@dataclass
class EvaluateOptions:
    """What to compute and from where (the ``privimage evaluate`` flags)."""

    inception_weights: str | None = None     # None: $PRIVIMAGE_INCEPTION_WEIGHTS, else the proxy FID
    reference_stats: str | None = None       # precomputed Inception mu/sigma .npz (skips the real features)
    real: str | None = None                  # .npz test set overriding load_real(split="sensitive_test");
                                             # also the FID reference unless fid_real is given
    fid_real: str | None = None              # .npz FID reference images
    val: str | None = None                   # .npz validation set for the DPImageBench protocol
    fid_split: str = "sensitive"             # real split the FID reference statistics come from
    num_samples: int | None = None           # generated images used (None: all; official 5k, community 50k)
    num_reference: int | None = None         # real images for the reference statistics (None: all)
    pr_k: int = 3                            # k of the k-NN precision/recall
    pr_max: int = 5000                       # at most this many images per side for precision/recall
    is_splits: int = 10
    ca_protocol: str = "official"            # "official", "dpimagebench" or "none"
    ca: classify.CAConfig = field(default_factory=lambda: classify.OFFICIAL)
    ca_archs: tuple[str, ...] = ("resnet9", "wrn", "cnn")
    selection_epsilon: float | None = None   # ε of DPImageBench's noisy selection per classifier, spent on the
                                             # sensitive validation data: required with that protocol
    val_size: int = 1000
    batch_size: int = 200
    device: str = "cpu"
    bf16: bool = False
    cache_dir: str | None = None             # where reference statistics of real images are cached (None: the
                                             # run's private/fid; they are statistics of sensitive data)
    grid_per_class: int = 8
    max_grid_classes: int = 10

    def __post_init__(self) -> None:
        if self.ca_protocol not in ("official", "dpimagebench", "none"):
            raise ValueError(f"Unknown CA protocol {self.ca_protocol!r}; use official, dpimagebench or none.")
        if self.ca_protocol == "dpimagebench":
            if self.selection_epsilon is None:
                raise ValueError("The dpimagebench CA protocol selects epochs on sensitive validation data and "
                                 "spends privacy on top of the training budget: give its epsilon per classifier "
                                 f"explicitly (--selection-epsilon; {len(self.ca_archs)} classifiers spend "
                                 f"{len(self.ca_archs)} x that).")
            if not self.selection_epsilon > 0:
                raise ValueError(f"Expected selection_epsilon={self.selection_epsilon} > 0.")

    @property
    def selection_epsilon_total(self) -> float:
        """ε the evaluation spends on sensitive data: 0 unless the DPImageBench protocol is chosen."""
        if self.ca_protocol != "dpimagebench":
            return 0.0
        return self.selection_epsilon * len(self.ca_archs)



# -------------------------------------------------------------------------------------------------------------
# Inputs


def load_npz_images(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``images`` (uint8 (N, C, H, W)) and ``labels`` (N,) from an ``.npz``; errors name the file."""
    data = read_npz(path, what="Image file")
    if "images" not in data or "labels" not in data:
        raise ValueError(f"{path} must hold arrays 'images' and 'labels' (has {sorted(data)}).")
    images, labels = data["images"], data["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{path}: 'images' must be uint8 (N, 1|3, H, W), got {images.dtype} {images.shape}.")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be integers of shape ({images.shape[0]},), got {labels.dtype} "
                         f"{labels.shape}.")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


_LOADER_KEYS = ("root", "resolution", "seed", "attribute", "num_sensitive_classes")


def data_options(config: dict, split: str) -> dict:
    """Arguments of :func:`privimage.data.load_dataset` (``name``, the reader's ``split``, options) for the
    pipeline's ``split``, from a run's config.json.

    Understands the pipeline's ``data`` section (``privimage.config.DataConfig``: one spec string
    ``name[:split][,key=value...]`` per split, plus ``resolution``, ``pad_to`` and ``seed``), and also a plain
    ``data`` spec string or ``{"name": ..., options}`` dict used for every split. The returned dict may hold
    ``pad_to`` (pad instead of resizing), which :func:`load_real` applies itself.
    """
    from privimage.data import parse_spec

    data = config.get("data") or config.get("dataset") or {}
    if isinstance(data, str):
        data = {"spec": data}
    per_split = isinstance(data.get(split), str)
    spec = data[split] if per_split else data.get("spec")
    args = {k: data[k] for k in _LOADER_KEYS if data.get(k) is not None}
    args["split"] = split
    if spec:
        parsed = parse_spec(spec)
        if not per_split:
            parsed.pop("split", None)  # the split asked for wins over a split written in a shared spec
        args.update(parsed)  # a per-split spec names the reader's own split ("cifar10:test" for sensitive_test)
    elif data.get("name"):
        args["name"] = data["name"]
    if not args.get("name"):
        raise ValueError(f"config.json names no data set for split {split!r} (expected data.{split} or "
                         f"data.name); pass --real/--fid-real NPZ files.")
    if data.get("pad_to"):
        args["pad_to"] = int(data["pad_to"])
        if not (spec and "resolution" in parse_spec(spec)):
            args.pop("resolution", None)  # native size, then padded
    return args


def load_real(config: dict, *, split: str, override: str | None = None,
              size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images and labels of ``split``: from ``override`` (.npz) if given, else ``privimage.data``.

    This is the only place the evaluation reads real data, so the pipeline's data conventions live here.
    """
    if override:
        images, labels = load_npz_images(override)
    else:
        from privimage.data import load_dataset

        args = data_options(config, split)
        pad_to = args.pop("pad_to", None)
        ds = load_dataset(args.pop("name"), **args)
        images, labels = torch.as_tensor(ds.images), torch.as_tensor(ds.labels).long()
        if pad_to and images.shape[-1] < pad_to:
            lo_h, lo_w = (pad_to - images.shape[-2]) // 2, (pad_to - images.shape[-1]) // 2
            images = F.pad(images, (lo_w, pad_to - images.shape[-1] - lo_w, lo_h, pad_to - images.shape[-2] - lo_h))
    return (images[:size], labels[:size]) if size else (images, labels)


# -------------------------------------------------------------------------------------------------------------
# Fidelity


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


# -------------------------------------------------------------------------------------------------------------
# Privacy, provenance


def _drop_test_copies(val_images: torch.Tensor, val_labels: torch.Tensor, test_images: torch.Tensor
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


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def versions() -> dict:
    from privimage import __version__

    return {"privimage": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -------------------------------------------------------------------------------------------------------------
# The whole evaluation


def _fid_reference(config: dict, opts: EvaluateOptions, test_images: torch.Tensor | None
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


def _training_diagnostics(run_dir: Path) -> dict:
    """Aggregates of the fine-tune's private log (computed on drawn sensitive batches without noise)."""
    path = RunDir(run_dir).log_path("finetune")
    cols = read_log(path) if path.is_file() else {}
    out = {}
    if "loss" in cols and np.isfinite(cols["loss"]).any():
        out["last logged fine-tune loss (mean over a drawn sensitive batch)"] = f"{cols['loss'][-1]:.5g}"
    if "dropped_nonfinite" in cols:
        out["samples dropped for a NaN/inf gradient (whole run)"] = int(np.nan_to_num(cols["dropped_nonfinite"])[-1])
    return out


def evaluate_run(run_dir: str | os.PathLike, opts: EvaluateOptions | None = None, *, log=None) -> dict:
    """Evaluate ``run_dir`` into the publishable and the private report (module docstring); returns the
    publishable report's dict. The private one is at ``run_dir / PRIVATE_REPORT``."""
    opts = opts or EvaluateOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist.")
    config_path = RunDir(run_dir).config_path
    config = read_json(config_path) if config_path.is_file() else {}
    if not config:
        log(f"Note: {config_path} is missing or empty; real data must come from --real/--fid-real.")
    finetune_config = config.get("finetune")
    secure = finetune_config.get("secure_noise") if isinstance(finetune_config, dict) else None
    samples, sample_labels = load_npz_images(RunDir(run_dir).samples_path)
    if opts.num_samples:
        if opts.num_samples > samples.shape[0]:
            raise ValueError(f"--num-samples {opts.num_samples} > {samples.shape[0]} images in samples.npz.")
        samples, sample_labels = samples[:opts.num_samples], sample_labels[:opts.num_samples]
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    public_dir, private_dir = run_dir / PUBLIC_REPORT.parent, run_dir / PRIVATE_REPORT.parent
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance = {"run_dir": run_dir.name, "created": created, "config_hash": config_hash(config),
                  "versions": versions()}  # the folder's name only: its path is the operator's business
    report: dict = {**provenance, "notes": [],
                    "samples": {"num": int(samples.shape[0]), "shape": list(samples.shape[1:]),
                                "per_class": {str(c): int(n) for c, n in
                                              zip(*np.unique(sample_labels.numpy(), return_counts=True))}}}
    private: dict = {**provenance, "notes": [], "diagnostics": _training_diagnostics(run_dir)}
    metrics: dict = {}
    private_metrics: dict = {}
    not_private: list[str] = []
    release: dict | None = None

    def add(name: str, metric: dict, coverage: Coverage) -> None:
        metric.update(coverage=coverage.text, computed_on=coverage.data)
        (metrics if coverage.publishable else private_metrics)[name] = metric

    test_images = test_labels = None
    if opts.real or config:  # the CA test set, also shown beside the samples in the private grid
        test_images, test_labels = load_real(config, split="sensitive_test", override=opts.real)
        if test_images.shape[1:] != samples.shape[1:]:
            report["notes"].append(f"Real images {tuple(test_images.shape[1:])} were resized to the samples' "
                                   f"{tuple(samples.shape[1:])} for CA and the grid.")
            test_images = match_images(test_images, samples)
    elif opts.ca_protocol != "none":
        raise ValueError("CA needs a real test set: config.json names no data set and --real is not given.")

    net = feature_network(run_dir, opts, log)
    if net is None:
        report["notes"].append("No Inception weights and no query/classifier.pt: fidelity metrics skipped.")
    else:
        fid_real, coverage = _fid_reference(config, opts, test_images)
        holder = report if coverage.publishable else private
        if net.kind != INCEPTION:
            holder["notes"].append("proxy_* metrics use the project's query classifier features: not comparable "
                                   "to published FID/IS/precision/recall.")
        if not coverage.publishable:
            not_private.append(f"{net.metric_name('fid')} and {net.metric_name('precision_recall')} compare "
                               f"the samples with the sensitive training split without noise: like every "
                               f"FID on training data, these values are not covered by epsilon.")
        if opts.reference_stats:
            report["notes"].append("Precision/recall need real features: skipped with --reference-stats.")
        if samples.shape[0] < 5000:
            holder["notes"].append(f"{net.metric_name('fid')} from {samples.shape[0]} samples: FID is biased upward "
                                   f"at small N (the official protocol uses 5,000, the community 50,000); compare "
                                   f"values only at equal N.")
        fid = fidelity(net, samples, fid_real, opts, cache_dir=Path(opts.cache_dir) if opts.cache_dir else
                       RunDir(run_dir).fid_cache_dir)
        timings["fidelity_s"] = fid.pop("_seconds")
        for name, metric in fid.items():
            add(name, metric, SAMPLES if name.endswith("inception_score") else coverage)
        report["feature_network"] = {"kind": net.kind, "name": net.name, "fingerprint": net.fingerprint}

    if opts.ca_protocol != "none":
        t0 = time.perf_counter()
        num_classes = int(max(int(sample_labels.max()), int(test_labels.max())) + 1)
        if opts.ca_protocol == "official":
            ca = classify.classification_accuracy(samples, sample_labels, test_images, test_labels,
                                                  num_classes=num_classes, config=opts.ca, device=opts.device)
        else:
            val_images, val_labels = load_real(config, split="sensitive", override=opts.val, size=opts.val_size)
            num_val = int(val_images.shape[0])
            val_images, val_labels, dropped = _drop_test_copies(match_images(val_images, samples), val_labels,
                                                                test_images)
            source = (f"file {opts.val} (given as sensitive data)" if opts.val else
                      "split 'sensitive' of the run's data set, the generator's training data")
            if val_images.shape[0] == 0:
                raise ValueError(f"Every validation image ({source}) is also in the test set: selecting on it "
                                 f"would select on the test set. Give a disjoint --val.")
            if dropped:  # to the operator only: the count is not DP (see _drop_test_copies)
                log(f"{dropped} of {num_val} validation images are exact copies of test images; they are left "
                    f"out of the selection (this count is not written to the report).")
            ca = classify.dpimagebench_accuracy(samples, sample_labels, val_images, val_labels, test_images,
                                                test_labels, num_classes=num_classes, archs=opts.ca_archs,
                                                config=opts.ca, selection_epsilon=opts.selection_epsilon,
                                                device=opts.device)
            ca["num_val"] = num_val  # before dropping test copies: the report does not release that count
            ca["validation_data"] = f"{source}, less exact copies of test images"
            release = {"created": created, "what": "DPImageBench CA epoch selection",
                       "mechanism": "Report Noisy Max, Laplace(1/epsilon_per_classifier) on validation counts",
                       "epsilon": ca["selection_epsilon_total"], "delta": 0.0,
                       "epsilon_per_classifier": opts.selection_epsilon, "classifiers": list(opts.ca_archs),
                       "data": f"{ca['num_val']} validation images from {source}"}
        ca["kind"] = "classification_accuracy"
        add("classification_accuracy", ca, HELD_OUT if release is None else NOISY_SELECTION)
        timings["classification_accuracy_s"] = time.perf_counter() - t0

    samples_grid(samples, sample_labels, public_dir / "figures" / "samples.png", per_class=opts.grid_per_class,
                 max_classes=opts.max_grid_classes)
    figures, private_figures = [public_dir / "figures" / "samples.png"], []
    if test_images is not None:
        private_figures.append(private_dir / "figures" / "samples_vs_real.png")
        samples_vs_real_grid(samples, sample_labels, test_images, test_labels, private_figures[0],
                             per_class=opts.grid_per_class, max_classes=opts.max_grid_classes)
    public_curves, private_curves = training_plots(run_dir, public_dir / "figures", private_dir / "figures")

    # The release is recorded before anything it produced is written or returned.
    releases = record_evaluation_release(run_dir, release) if release else load_evaluation_ledger(run_dir)
    generator = generator_privacy(run_dir)
    privacy = report["privacy"] = privacy_summary(generator, releases, secure=secure)
    private["privacy"] = privacy_summary(generator, releases, not_private, secure=secure)
    if secure is False:
        report["notes"].append("NOT PRIVATE: the run used the non-secure test mode (finetune.secure_noise = false).")
    if privacy["generator"] is None:
        report["notes"].append("No budget.json: the privacy spent by training, and so the total, is unknown.")
    elif not privacy["total"]["within_budget"]:
        report["notes"].append(f"The total epsilon {privacy['total']['epsilon']:.4g} (training plus evaluation) "
                               f"exceeds the run's budget epsilon {privacy['generator']['epsilon_budget']:g}.")
    if private_metrics or private_figures or private_curves:
        report["notes"].append("Metrics and figures computed on sensitive data without noise are in the private "
                               "report (not publishable).")
    report["metrics"], private["metrics"] = metrics, private_metrics
    report["figures"] = [str(p.relative_to(public_dir)) for p in figures + public_curves]
    private["figures"] = [str(p.relative_to(private_dir)) for p in private_figures + private_curves]
    report["options"] = asdict(opts)
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    _write_report(private, run_dir / PRIVATE_REPORT, private=True)
    _write_report(report, run_dir / PUBLIC_REPORT, private=False)
    from privimage.release import refresh_privacy_statement

    refresh_privacy_statement(run_dir)
    return report


def _write_report(report: dict, path: Path, *, private: bool) -> None:
    save_json(report, path)
    with atomic_write(path.with_suffix(".md"), "w") as f:
        f.write(render_markdown(report, private=private))
