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
  noisy selection), written before either report.

:func:`evaluate_run` assembles them from one module per concern: :mod:`.options` (what to compute),
:mod:`.real_data` (the only reader of real images), :mod:`.fidelity`, :mod:`.utility` (one function per CA
protocol), :mod:`.figures`, :mod:`.privacy` (coverage, the ledgers, the privacy section) and :mod:`.markdown`
(the files).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from privimage.evaluate.fidelity import add_fidelity
from privimage.evaluate.figures import read_log, report_figures, samples_vs_real_grid
from privimage.evaluate.markdown import write_report
from privimage.evaluate.options import EvaluateOptions
from privimage.evaluate.privacy import Reports, add_privacy, read_json
from privimage.evaluate.real_data import data_options, load_npz_images, load_real, load_test_set
from privimage.evaluate.utility import add_classification_accuracy
from privimage.rundir import RunDir

__all__ = ["EvaluateOptions", "PRIVATE_REPORT", "PUBLIC_REPORT", "data_options", "evaluate_run", "load_real",
           "samples_vs_real_grid"]

#: Where the two reports go, relative to the run directory (figures in ``figures/`` beside each).
PUBLIC_REPORT = Path(RunDir.PUBLIC_REPORT)
PRIVATE_REPORT = Path(RunDir.PRIVATE_REPORT)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def versions() -> dict:
    from privimage import __version__

    return {"privimage": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


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


def _load_samples(run_dir: Path, opts: EvaluateOptions) -> tuple[torch.Tensor, torch.Tensor]:
    samples, labels = load_npz_images(RunDir(run_dir).samples_path)
    if opts.num_samples:
        if opts.num_samples > samples.shape[0]:
            raise ValueError(f"--num-samples {opts.num_samples} > {samples.shape[0]} images in samples.npz.")
        samples, labels = samples[:opts.num_samples], labels[:opts.num_samples]
    return samples, labels


def _new_reports(run_dir: Path, config: dict, samples: torch.Tensor, sample_labels: torch.Tensor,
                 created: str) -> Reports:
    provenance = {"run_dir": run_dir.name, "created": created, "config_hash": config_hash(config),
                  "versions": versions()}  # the folder's name only: its path is the operator's business
    counts = zip(*np.unique(sample_labels.numpy(), return_counts=True))
    public = {**provenance, "notes": [], "metrics": {},
              "samples": {"num": int(samples.shape[0]), "shape": list(samples.shape[1:]),
                          "per_class": {str(c): int(n) for c, n in counts}}}
    private = {**provenance, "notes": [], "metrics": {}, "diagnostics": _training_diagnostics(run_dir)}
    return Reports(public, private)


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
    samples, sample_labels = _load_samples(run_dir, opts)
    t_start = time.perf_counter()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reports = _new_reports(run_dir, config, samples, sample_labels, created)
    timings: dict[str, float] = {}

    # the CA test set, also shown beside the samples in the private grid
    test_images, test_labels, note = load_test_set(config, opts.real, samples)
    if note:
        reports.note(note)
    if test_images is None and opts.ca_protocol != "none":
        raise ValueError("CA needs a real test set: config.json names no data set and --real is not given.")
    seconds = add_fidelity(reports, run_dir, config, opts, samples, test_images, log)
    if seconds is not None:
        timings["fidelity_s"] = seconds
    release = None
    if opts.ca_protocol != "none":
        release, timings["classification_accuracy_s"] = add_classification_accuracy(
            reports, samples, sample_labels, test_images, test_labels, config=config, opts=opts, created=created,
            log=log)

    public_dir, private_dir = run_dir / PUBLIC_REPORT.parent, run_dir / PRIVATE_REPORT.parent
    public_figures, private_figures = report_figures(run_dir, public_dir, private_dir, samples, sample_labels,
                                                     test_images, test_labels, per_class=opts.grid_per_class,
                                                     max_classes=opts.max_grid_classes)
    add_privacy(reports, run_dir, release, secure=secure)  # the release is in the ledger before any report
    if reports.private["metrics"] or private_figures:
        reports.note("Metrics and figures computed on sensitive data without noise are in the private report (not "
                     "publishable).")
    reports.public["figures"] = [str(p.relative_to(public_dir)) for p in public_figures]
    reports.private["figures"] = [str(p.relative_to(private_dir)) for p in private_figures]
    # how the run directory was trained (config.json's record; the evaluation itself runs in one process)
    launch = config.get("launch") if isinstance(config.get("launch"), dict) else {}
    reports.public["launch"] = {"world_size": launch.get("world_size", 1), "backend": launch.get("backend")}
    reports.public["options"] = asdict(opts)
    timings["total_s"] = time.perf_counter() - t_start
    reports.public["timings"] = timings
    write_report(reports.private, run_dir / PRIVATE_REPORT, private=True)
    write_report(reports.public, run_dir / PUBLIC_REPORT, private=False)
    from privimage.release import refresh_privacy_statement

    refresh_privacy_statement(run_dir)
    return reports.public
