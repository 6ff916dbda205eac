"""Evaluate a run directory: fidelity (FID or proxy FID, IS, precision/recall), utility (CA), privacy spent.

Reads the run directory that ``privimage run`` writes (``config.json``, ``budget.json``,
``samples/samples.npz``, ``logs/*.csv``, ``query/classifier.pt``) and writes beside them:

* ``report.json``: every metric under a name that is its kind (``fid`` or ``proxy_fid``, never both from one
  network), sample counts, the privacy section (the generator's ledger and ε/δ from ``budget.json``, every
  evaluation release that touched sensitive data, and the total by composition), the config hash, library
  versions, timings;
* ``report.md``: the same as tables a person reads;
* ``evaluation_ledger.json``: append-only record of the evaluation's own privacy releases (the DPImageBench
  noisy selection), see :func:`privacy_summary`;
* ``evaluate/samples_vs_real.png``: per class, generated samples beside real test images of that class;
* ``evaluate/loss_<log>.png``, ``evaluate/epsilon_<log>.png``: the training curves.

Real images come from :func:`load_real` (the only call into :mod:`privimage.data`), or from ``.npz`` files
given on the command line (arrays ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)).
"""

from __future__ import annotations

import csv
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
from privimage.evaluate.fid import FeatureStats, fid_from_stats, load_stats, read_npz, stats_from_arrays
from privimage.evaluate.inception import WEIGHTS_ENV, WEIGHTS_FILE_NAME, find_inception_weights
from privimage.evaluate.metrics import inception_score, precision_recall
from privimage.evaluate.plots import save_line_plot
from privimage.io import atomic_write, save_json, save_npz, save_png_grid

CACHE_ENV = "PRIVIMAGE_CACHE_DIR"


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
    cache_dir: str | None = None             # None: $PRIVIMAGE_CACHE_DIR, else ~/.cache/privimage/fid
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


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


def _cache_dir(opts: EvaluateOptions) -> Path:
    return Path(opts.cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "privimage" / "fid")


def reference_features(net: FeatureNet, images: torch.Tensor, opts: EvaluateOptions
                       ) -> tuple[FeatureStats, np.ndarray, str]:
    """Reference statistics (and up to ``pr_max`` features for precision/recall) of real ``images``.

    Cached as ``<cache>/<kind>-<key>.npz`` where the key hashes the feature network's weights and the real
    images' bytes, so a cached file is reused exactly when it would be recomputed identically.
    """
    bf16 = opts.bf16 and torch.device(opts.device).type == "cuda"  # bf16 features are not fp32 features
    digest = hashlib.sha256(f"{net.kind}:{net.fingerprint}:{tuple(images.shape)}:bf16={bf16}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    path = _cache_dir(opts) / f"{net.kind}-{digest.hexdigest()[:24]}.npz"
    if path.is_file():
        cached = read_npz(path, what="Cached reference statistics")
        stats, _ = stats_from_arrays(cached, path)
        if "pr_features" in cached:
            return stats, cached["pr_features"], f"cache {path}"
    feats, _ = extract_features(net, images, batch_size=opts.batch_size, device=opts.device, bf16=opts.bf16,
                                desc="reference features")
    stats = FeatureStats.from_features(feats)
    pr = feats[:opts.pr_max]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(path, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num), pr_features=pr,
             kind=np.array(net.kind), network=np.array(net.name))
    return stats, pr, f"computed, cached at {path}"


def fidelity(net: FeatureNet, samples: torch.Tensor, real: torch.Tensor | None, opts: EvaluateOptions) -> dict:
    """FID (or proxy FID), Inception Score and precision/recall of ``samples``, named by ``net.kind``."""
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
        ref, ref_feats, source = reference_features(net, real, opts)
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
    classifier = run_dir / "query" / "classifier.pt"
    log(f"No Inception weights file (--inception-weights or ${WEIGHTS_ENV}; the file is {WEIGHTS_FILE_NAME}).")
    if not classifier.is_file():
        log(f"No proxy either ({classifier} does not exist): fidelity metrics are skipped.")
        return None
    log(f"Computing the PROXY FID on features of {classifier}: useful to compare runs of this data set, "
        f"NOT comparable to published FIDs. Every such number is labelled proxy_*.")
    return proxy_feature_net(load_proxy_classifier(classifier), name=str(Path("query") / "classifier.pt"))


# -------------------------------------------------------------------------------------------------------------
# Figures


def _match(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Real images resized / channel-matched to the samples' shape (for CA and the side-by-side grid)."""
    if images.shape[1] != like.shape[1]:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float().mean(1, True).byte()
    if images.shape[-2:] != like.shape[-2:]:
        images = F.interpolate(images.float(), size=like.shape[-2:], mode="bilinear", align_corners=False)
        images = images.round().clamp(0, 255).byte()
    return images.contiguous()


def samples_vs_real_grid(samples, sample_labels, real, real_labels, path: Path, *, per_class: int = 8,
                         max_classes: int = 10) -> None:
    """One row per class: ``per_class`` samples, a blank gap, then ``per_class`` real images of that class."""
    classes = sorted(set(sample_labels.tolist()))[:max_classes]
    real = _match(real, samples) if real is not None else None
    blank = torch.zeros_like(samples[:1])
    tiles = []
    for c in classes:
        row = [samples[sample_labels == c][:per_class]]
        row.append(blank.expand(per_class - row[0].shape[0], -1, -1, -1))
        row.append(blank)
        theirs = real[real_labels == c][:per_class] if real is not None else blank[:0]
        row += [theirs, blank.expand(per_class - theirs.shape[0], -1, -1, -1)]
        tiles.append(torch.cat(row))
    save_png_grid(torch.cat(tiles), path, nrow=2 * per_class + 1)


def read_log(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns of a training log CSV (non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    cols = {}
    for key in rows[0]:
        vals = []
        for row in rows:
            try:
                vals.append(float(row[key]))
            except (TypeError, ValueError):
                vals.append(np.nan)
        cols[key] = np.array(vals)
    return cols


def training_plots(run_dir: Path, out_dir: Path) -> list[str]:
    """Loss and epsilon over steps for every ``logs/*.csv``; returns the written paths (relative)."""
    written = []
    for stale in [*out_dir.glob("loss_*.png"), *out_dir.glob("epsilon_*.png")]:  # from an earlier evaluation
        stale.unlink()
    for log_path in sorted((run_dir / "logs").glob("*.csv")):
        cols = read_log(log_path)
        if "step" not in cols:
            continue
        for column, label in (("loss", "loss"), ("epsilon", "epsilon spent")):
            values = cols.get(column)
            if values is None or not np.isfinite(values).any():
                continue
            if column == "epsilon" and not np.nanmax(np.abs(values[np.isfinite(values)])) > 0:
                continue  # a non-private stage (pre-training) logs epsilon 0 throughout: nothing to plot
            target = out_dir / f"{column}_{log_path.stem}.png"
            save_line_plot(target, {log_path.stem: (cols["step"], values)}, title=f"{label} ({log_path.stem})",
                           xlabel="step", ylabel=label)
            written.append(str(target.relative_to(run_dir)))
    return written


# -------------------------------------------------------------------------------------------------------------
# Privacy, provenance


EVALUATION_LEDGER = "evaluation_ledger.json"
COMPOSITION = ("basic composition (Dwork & Roth 2014, Thm 3.16): the generator's (epsilon, delta) plus each "
               "pure epsilon-DP evaluation release on the same sensitive data gives (sum of epsilons, delta)")


def generator_privacy(run_dir: Path) -> dict | None:
    """What training spent, from ``budget.json`` (the engine's PrivacyBudget state); None if it is absent."""
    path = run_dir / "budget.json"
    if not path.is_file():
        return None
    from privimage.engine import PrivacyBudget

    state = _read_json(path)
    try:
        budget = PrivacyBudget.from_state_dict(state)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a PrivacyBudget state dict (missing {err}).") from err
    spent = budget.epsilon_spent()
    return {"epsilon_budget": budget.epsilon, "delta": budget.delta, "epsilon_spent": spent.upper,
            "epsilon_spent_estimate": spent.estimate, "ledger": dict(budget.spent),
            "plan": state.get("plan", {})}


def load_evaluation_ledger(run_dir: Path) -> list[dict]:
    """The evaluation releases recorded for ``run_dir`` so far (see :func:`privacy_summary`)."""
    path = run_dir / EVALUATION_LEDGER
    if not path.is_file():
        return []
    releases = _read_json(path).get("releases")
    if not (isinstance(releases, list) and all(isinstance(r, dict) and isinstance(r.get("epsilon"), (int, float))
                                               and r["epsilon"] >= 0 for r in releases)):
        raise ValueError(f"{path} is not an evaluation ledger (expected {{\"releases\": [{{\"epsilon\": ...}}, ...]}});"
                         f" it records privacy already spent, so it is not ignored.")
    return releases


def record_evaluation_release(run_dir: Path, release: dict) -> list[dict]:
    """Append ``release`` to the run's evaluation ledger (atomically) and return all releases."""
    releases = [*load_evaluation_ledger(run_dir), release]
    save_json({"about": "privacy spent on sensitive data by `privimage evaluate`, one entry per release; "
                        "report.json adds these to the generator's epsilon (" + COMPOSITION + ")",
               "releases": releases}, run_dir / EVALUATION_LEDGER)
    return releases


def privacy_summary(generator: dict | None, releases: list[dict], not_private: list[str]) -> dict:
    """The report's privacy section: what training spent, what evaluation spent, and their total.

    Why a separate evaluation ledger and not the engine's PrivacyBudget: the budget
    (:class:`privimage.engine.PrivacyBudget`) plans and composes subsampled *Gaussian* mechanisms (noise
    multiplier, sample rate, count) in one PRV/RDP accountant, and ``budget.json`` is the training run's
    resumable state. The DPImageBench selection is Report Noisy Max with *Laplace* noise, a pure ε-DP
    mechanism it cannot represent, and writing it into the training ledger after the fact would change the
    state a resumed fine-tune reads. So every evaluation that touches sensitive data appends an entry to
    ``evaluation_ledger.json`` beside ``budget.json`` (append-only: evaluating again releases again, and the
    ledger keeps the earlier releases, whose reports may have been read), and the total composes both by
    basic composition: (ε_gen, δ) followed by ε_i-DP releases is (ε_gen + Σ ε_i, δ)-DP (Dwork & Roth 2014,
    Thm 3.16). That bound is valid but loose; converting pure ε-DP to ε²/2-zCDP (Bun & Steinke 2016, Prop.
    1.4) and composing in the engine's accountant would be tighter, and needs an engine change.

    Args:
        generator: :func:`generator_privacy` (None when the run has no ``budget.json``: the total is unknown).
        releases: the evaluation ledger, each with ``epsilon`` (pure, δ = 0).
        not_private: statistics in the report computed from sensitive data *without* noise, said plainly.
    """
    evaluation_epsilon = float(sum(r["epsilon"] for r in releases))
    total = None
    if generator is not None:
        total = {"epsilon": generator["epsilon_spent"] + evaluation_epsilon, "delta": generator["delta"],
                 "within_budget": generator["epsilon_spent"] + evaluation_epsilon <= generator["epsilon_budget"]}
    return {"generator": generator,
            "evaluation": {"epsilon": evaluation_epsilon, "delta": 0.0, "releases": releases,
                           "ledger_file": EVALUATION_LEDGER},
            "total": total, "composition": COMPOSITION, "not_private": not_private}


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


def evaluate_run(run_dir: str | os.PathLike, opts: EvaluateOptions | None = None, *, log=None) -> dict:
    """Evaluate ``run_dir``; writes report.json, report.md and the figures; returns the report dict."""
    opts = opts or EvaluateOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist.")
    config_path = run_dir / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if not config:
        log(f"Note: {config_path} is missing or empty; real data must come from --real/--fid-real.")
    samples, sample_labels = load_npz_images(run_dir / "samples" / "samples.npz")
    if opts.num_samples:
        if opts.num_samples > samples.shape[0]:
            raise ValueError(f"--num-samples {opts.num_samples} > {samples.shape[0]} images in samples.npz.")
        samples, sample_labels = samples[:opts.num_samples], sample_labels[:opts.num_samples]
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = run_dir / "evaluate"
    report: dict = {"run_dir": str(run_dir), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "config_hash": config_hash(config), "versions": versions(), "notes": [],
                    "samples": {"num": int(samples.shape[0]), "shape": list(samples.shape[1:]),
                                "per_class": {str(c): int(n) for c, n in
                                              zip(*np.unique(sample_labels.numpy(), return_counts=True))}}}
    metrics: dict = {}
    not_private: list[str] = []
    release: dict | None = None

    test_images = test_labels = None
    if opts.real or config:  # the CA test set, also shown beside the samples in the grid
        test_images, test_labels = load_real(config, split="sensitive_test", override=opts.real)
        if test_images.shape[1:] != samples.shape[1:]:
            report["notes"].append(f"Real images {tuple(test_images.shape[1:])} were resized to the samples' "
                                   f"{tuple(samples.shape[1:])} for CA and the grid.")
            test_images = _match(test_images, samples)
    elif opts.ca_protocol != "none":
        raise ValueError("CA needs a real test set: config.json names no data set and --real is not given.")

    net = feature_network(run_dir, opts, log)
    if net is None:
        report["notes"].append("No Inception weights and no query/classifier.pt: fidelity metrics skipped.")
    else:
        if net.kind != INCEPTION:
            report["notes"].append("proxy_* metrics use the project's query classifier features: not comparable "
                                   "to published FID/IS/precision/recall.")
        fid_real = None
        if opts.reference_stats:
            pass
        elif opts.fid_real:
            fid_real, _ = load_real(config, split=opts.fid_split, override=opts.fid_real, size=opts.num_reference)
        elif opts.real:  # the --real override doubles as the FID reference unless --fid-real is given
            fid_real = test_images[:opts.num_reference] if opts.num_reference else test_images
        else:
            fid_real, _ = load_real(config, split=opts.fid_split, size=opts.num_reference)
            if opts.fid_split == "sensitive":
                not_private.append(f"{net.metric_name('fid')} and {net.metric_name('precision_recall')} compare "
                                   f"the samples with the sensitive training split without noise: like every "
                                   f"FID on training data, these values are not covered by epsilon.")
        if opts.reference_stats:
            report["notes"].append("Precision/recall need real features: skipped with --reference-stats.")
        if samples.shape[0] < 5000:
            report["notes"].append(f"{net.metric_name('fid')} from {samples.shape[0]} samples: FID is biased upward "
                                   f"at small N (the official protocol uses 5,000, the community 50,000); compare "
                                   f"values only at equal N.")
        fid = fidelity(net, samples, fid_real, opts)
        timings["fidelity_s"] = fid.pop("_seconds")
        metrics.update(fid)
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
            val_images, val_labels, dropped = _drop_test_copies(_match(val_images, samples), val_labels,
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
            release = {"created": report["created"], "what": "DPImageBench CA epoch selection",
                       "mechanism": "Report Noisy Max, Laplace(1/epsilon_per_classifier) on validation counts",
                       "epsilon": ca["selection_epsilon_total"], "delta": 0.0,
                       "epsilon_per_classifier": opts.selection_epsilon, "classifiers": list(opts.ca_archs),
                       "data": f"{ca['num_val']} validation images from {source}"}
        ca["kind"] = "classification_accuracy"
        metrics["classification_accuracy"] = ca
        timings["classification_accuracy_s"] = time.perf_counter() - t0

    figures = []
    grid = out_dir / "samples_vs_real.png"
    samples_vs_real_grid(samples, sample_labels, test_images, test_labels, grid, per_class=opts.grid_per_class,
                         max_classes=opts.max_grid_classes)
    figures.append(str(grid.relative_to(run_dir)))
    figures += training_plots(run_dir, out_dir)

    report["metrics"] = metrics
    # The release is recorded before anything it produced is written or returned.
    releases = record_evaluation_release(run_dir, release) if release else load_evaluation_ledger(run_dir)
    privacy = report["privacy"] = privacy_summary(generator_privacy(run_dir), releases, not_private)
    if privacy["generator"] is None:
        report["notes"].append("No budget.json: the privacy spent by training, and so the total, is unknown.")
    elif not privacy["total"]["within_budget"]:
        report["notes"].append(f"The total epsilon {privacy['total']['epsilon']:.4g} (training plus evaluation) "
                               f"exceeds the run's budget epsilon {privacy['generator']['epsilon_budget']:g}.")
    report["figures"] = figures
    report["options"] = asdict(opts)
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    save_json(report, run_dir / "report.json")
    with atomic_write(run_dir / "report.md", "w") as f:
        f.write(render_markdown(report))
    return report


# -------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _privacy_markdown(p: dict) -> list[str]:
    """Who spent what on the sensitive data, one row per release, and the total."""
    gen, ev, total = p["generator"], p["evaluation"], p["total"]
    lines = ["| release | ε | δ | on |", "|---|---|---|---|"]
    if gen:
        ledger = ", ".join(f"{k}: {n}" for k, n in gen["ledger"].items())
        lines.append(f"| training (budget.json ledger: {ledger}; budget ε {_fmt(gen['epsilon_budget'])}) | "
                     f"{_fmt(gen['epsilon_spent'])} | {gen['delta']:g} | sensitive training data |")
    else:
        lines.append("| training (no budget.json in the run directory) | unknown | unknown | sensitive training data |")
    for r in ev["releases"]:
        lines.append(f"| evaluation: {r.get('what', 'release')}, {r.get('created', '')} ({r.get('mechanism', '')}) | "
                     f"{_fmt(float(r['epsilon']))} | 0 | {r.get('data', '')} |")
    if total:
        lines.append(f"| **total** | **{_fmt(total['epsilon'])}** | **{total['delta']:g}** | |")
    else:
        lines.append(f"| **total** | unknown (evaluation alone: {_fmt(ev['epsilon'])}) | unknown | |")
    lines += ["", f"Composition: {p['composition']}. Evaluation releases are recorded in `{ev['ledger_file']}`."]
    if p["not_private"]:
        lines += ["", "Not covered by ε:", ""] + [f"- {n}" for n in p["not_private"]]
    return lines


def render_markdown(report: dict) -> str:
    """report.json as tables: metrics (with their kind), privacy, samples, provenance, figures."""
    m = report["metrics"]
    lines = [f"# Evaluation of `{report['run_dir']}`", "", f"Created {report['created']}, config hash "
             f"`{report['config_hash']}`.", ""]
    lines += ["## Metrics", "", "| metric | kind | value | images |", "|---|---|---|---|"]
    for name, v in m.items():
        if name.endswith("fid"):
            value, n = _fmt(v["value"]), f"{v['num_samples']} generated vs {v['num_reference']} real"
        elif name.endswith("inception_score"):
            value, n = f"{_fmt(v['mean'])} ± {_fmt(v['std'], 2)}", f"{v['num_samples']} ({v['splits']} splits)"
        elif name.endswith("precision_recall"):
            value = f"precision {_fmt(v['precision'], 3)}, recall {_fmt(v['recall'], 3)} (k={v['k']})"
            n = f"{v['num_generated']} generated vs {v['num_real']} real"
        else:
            value = f"{100 * v['accuracy']:.2f}%" + (f" ± {100 * v['std']:.2f}" if "std" in v else "")
            n = f"train {v['num_train']} synthetic, test {v['num_test']} real"
            name = f"{name} ({v['protocol']})"
        lines.append(f"| {name} | {v['kind']} | {value} | {n} |")
    if "feature_network" in report:
        fn = report["feature_network"]
        lines += ["", f"Feature network: **{fn['kind']}** (`{fn['name']}`, fingerprint `{fn['fingerprint']}`)."]
    ca = m.get("classification_accuracy")
    if ca and ca.get("per_classifier"):
        lines += ["", "| classifier | selected epoch | test accuracy |", "|---|---|---|"]
        lines += [f"| {a['arch']} | {a['selected_epoch']} | {100 * a['accuracy']:.2f}% |" for a in ca["per_classifier"]]
    lines += ["", "## Privacy", ""] + _privacy_markdown(report["privacy"])
    s = report["samples"]
    lines += ["", "## Samples", "", f"{s['num']} images of shape {tuple(s['shape'])}; per class: "
              + ", ".join(f"{c}: {n}" for c, n in s["per_class"].items()) + "."]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in report["figures"]]
    v = report["versions"]
    lines += ["", "## Versions", "", ", ".join(f"{k} {val}" for k, val in v.items() if val), "",
              "Timings: " + ", ".join(f"{k} {t:.1f}" for k, t in report["timings"].items()), ""]
    return "\n".join(lines)
