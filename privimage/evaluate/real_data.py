"""The real images an evaluation compares with: the only place the evaluation reads real data.

From a run's ``config.json`` (the pipeline's ``data`` section, :func:`data_options`) through
:mod:`privimage.data`, or from ``.npz`` files given on the command line (arrays ``images`` uint8
(N, C, H, W) and ``labels`` int64 (N,), :func:`load_npz_images`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from privimage.evaluate.figures import match_images
from privimage.evaluate.fid import read_npz

__all__ = ["data_options", "load_npz_images", "load_real", "load_test_set"]


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
    """Real images and labels of ``split``: from ``override`` (.npz) if given, else ``privimage.data``."""
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


def load_test_set(config: dict, override: str | None, samples: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """The held-out test set (the ``sensitive_test`` split, or ``override``) matched to the samples' shape,
    and a note for the report when it had to be resized; ``(None, None, None)`` when there is none."""
    if not (override or config):
        return None, None, None
    images, labels = load_real(config, split="sensitive_test", override=override)
    if images.shape[1:] == samples.shape[1:]:
        return images, labels, None
    note = (f"Real images {tuple(images.shape[1:])} were resized to the samples' {tuple(samples.shape[1:])} for "
            f"CA and the grid.")
    return match_images(images, samples), labels, note
