"""Files that survive crashes: atomic writes, torch/JSON/NPZ saves, and PNG image grids.

Every file the project writes goes through :func:`atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and only then renamed over the target. A crash mid-write leaves the old
file (or none), never a half-written one that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success, fsync and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def save_json(obj: Any, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def image_grid(images: torch.Tensor | np.ndarray, *, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile uint8 images (N, C, H, W), C in {1, 3}, into one (H', W', C) uint8 array, row-major."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected uint8 images of shape (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}.")
    n, c, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = max(1, -(-n // ncol))
    grid = torch.zeros(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def save_png_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, *, nrow: int = 8) -> None:
    """Write uint8 images (N, C, H, W) as one PNG grid, atomically."""
    from PIL import Image

    grid = image_grid(images, nrow=nrow)
    pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with atomic_write(path) as f:
        pil.save(f, format="PNG")
