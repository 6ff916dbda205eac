"""The report's figures, each one publishable or private by what it shows.

Publishable: grids of synthetic samples, ε over steps (a function of the public σ, q and step count), and
curves of stages that never touch sensitive data (pre-training on the public subset). Private: anything that
shows or is computed from sensitive images without noise: real test images beside the samples, the
fine-tune's loss (the mean over each drawn sensitive batch, no noise). A log this module does not know is
treated as private.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privimage.evaluate.plots import save_line_plot
from privimage.io import save_png_grid
from privimage.rundir import RunDir

__all__ = ["PUBLIC_CURVES", "match_images", "read_log", "report_figures", "samples_grid", "samples_vs_real_grid",
           "training_plots"]

#: (log name, column) pairs whose curve may be published: ε is computed from public parameters, and the
#: pre-training loss from public images only. Every other curve goes to the private report.
PUBLIC_CURVES = {("finetune", "epsilon"), ("pretrain", "loss"), ("pretrain", "epsilon")}


def match_images(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Real images resized / channel-matched to the samples' shape (for CA and the side-by-side grid)."""
    if images.shape[1] != like.shape[1]:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float().mean(1, True).byte()
    if images.shape[-2:] != like.shape[-2:]:
        images = F.interpolate(images.float(), size=like.shape[-2:], mode="bilinear", align_corners=False)
        images = images.round().clamp(0, 255).byte()
    return images.contiguous()


def _class_rows(samples, sample_labels, classes, per_class: int) -> list[list[torch.Tensor]]:
    blank = torch.zeros_like(samples[:1])
    rows = []
    for c in classes:
        mine = samples[sample_labels == c][:per_class]
        rows.append([mine, blank.expand(per_class - mine.shape[0], -1, -1, -1)])
    return rows


def samples_grid(samples, sample_labels, path: Path, *, per_class: int = 8, max_classes: int = 10) -> None:
    """One row of ``per_class`` synthetic samples per class (publishable: no real image in it)."""
    classes = sorted(set(sample_labels.tolist()))[:max_classes]
    rows = _class_rows(samples, sample_labels, classes, per_class)
    save_png_grid(torch.cat([t for row in rows for t in row]), path, nrow=per_class)


def samples_vs_real_grid(samples, sample_labels, real, real_labels, path: Path, *, per_class: int = 8,
                         max_classes: int = 10) -> None:
    """One row per class: ``per_class`` samples, a blank gap, then ``per_class`` real images of that class.

    PRIVATE when ``real`` are sensitive images (the test split of the sensitive data is).
    """
    classes = sorted(set(sample_labels.tolist()))[:max_classes]
    real = match_images(real, samples) if real is not None else None
    blank = torch.zeros_like(samples[:1])
    tiles = []
    for c, row in zip(classes, _class_rows(samples, sample_labels, classes, per_class)):
        theirs = real[real_labels == c][:per_class] if real is not None else blank[:0]
        tiles.append(torch.cat([*row, blank, theirs, blank.expand(per_class - theirs.shape[0], -1, -1, -1)]))
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


def training_plots(run_dir: Path, public_dir: Path, private_dir: Path) -> tuple[list[Path], list[Path]]:
    """Loss and ε over steps for every ``logs/*.csv``, each into ``public_dir`` or ``private_dir`` by
    :data:`PUBLIC_CURVES`; returns the written (public, private) paths."""
    written: tuple[list[Path], list[Path]] = ([], [])
    for out_dir in (public_dir, private_dir):  # from an earlier evaluation
        for stale in [*out_dir.glob("loss_*.png"), *out_dir.glob("epsilon_*.png")]:
            stale.unlink()
    for log_path in sorted(RunDir(run_dir).logs_dir.glob("*.csv")):
        cols = read_log(log_path)
        if "step" not in cols:
            continue
        for column, label in (("loss", "loss"), ("epsilon", "epsilon spent")):
            values = cols.get(column)
            if values is None or not np.isfinite(values).any():
                continue
            if column == "epsilon" and not np.nanmax(np.abs(values[np.isfinite(values)])) > 0:
                continue  # a non-private stage (pre-training) logs epsilon 0 throughout: nothing to plot
            public = (log_path.stem, column) in PUBLIC_CURVES
            target = (public_dir if public else private_dir) / f"{column}_{log_path.stem}.png"
            save_line_plot(target, {log_path.stem: (cols["step"], values)}, title=f"{label} ({log_path.stem})",
                           xlabel="step", ylabel=label)
            written[0 if public else 1].append(target)
    return written


def report_figures(run_dir: Path, public_dir: Path, private_dir: Path, samples, sample_labels, real, real_labels, *,
                   per_class: int = 8, max_classes: int = 10) -> tuple[list[Path], list[Path]]:
    """Every figure of the two reports: the samples grid (public), the samples beside the real test images
    (private; only with ``real``), the training curves (:func:`training_plots`). Returns the written
    (public, private) paths, each under ``<dir>/figures/``."""
    public = [public_dir / "figures" / "samples.png"]
    samples_grid(samples, sample_labels, public[0], per_class=per_class, max_classes=max_classes)
    private = []
    if real is not None:
        private.append(private_dir / "figures" / "samples_vs_real.png")
        samples_vs_real_grid(samples, sample_labels, real, real_labels, private[0], per_class=per_class,
                             max_classes=max_classes)
    public_curves, private_curves = training_plots(run_dir, public_dir / "figures", private_dir / "figures")
    return public + public_curves, private + private_curves
