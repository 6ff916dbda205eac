"""Files that survive crashes: atomic writes, torch/JSON/NPZ saves, and PNG image grids.

Every file the project writes goes through :func:`atomic_write`: the bytes land in a temporary file in the
same folder, are flushed to disk, and only then renamed over the target. A crash mid-write leaves the old
file (or none), never a half-written one that looks complete.

A write the file system refuses (a full disk, a read-only file system, no permission, a path under a
file) raises :class:`~privimage.errors.StorageError` naming the target path and the cause; the previous
file is left as it was and no temporary file stays behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from privimage.errors import StorageError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success, fsync and rename it onto ``path``.

    An ``OSError`` of this write (making the folder or the temporary file, writing, flushing, renaming)
    becomes a :class:`~privimage.errors.StorageError` naming ``path``; one about another file (raised in the
    caller's block with that file's name) passes through unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _storage_error(path, err) from err
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, StorageError) and err.filename in (None, tmp, str(path)):
            raise _storage_error(path, err) from err
        raise


def _storage_error(path: Path, err: OSError) -> StorageError:
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        return StorageError(path, err, note=f"{blocker} is a file, not a folder")
    return StorageError(path, err, note=f"the previous {path.name} is unchanged" if path.is_file() else "")


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The first part of ``folder`` (itself or an ancestor) that exists and is not a folder, else ``None``."""
    folder = Path(folder).absolute()
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            return None if part.is_dir() else part
    return None


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


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Write the whole table atomically (a header from the first row's keys); nothing for no rows."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


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
