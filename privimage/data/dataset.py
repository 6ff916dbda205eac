"""The one in-memory data set type every reader returns, and the resizing all readers share.

Images are kept as uint8 (N, C, H, W): a 50k×3×32×32 set is 150 MB, a quarter of float32, and uint8 is
what the FFCV file and the device-resident loader store. Conversion to float (and normalisation) happens
per batch, on the device, in :mod:`privimage.query.loaders`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from privimage.errors import DataError  # its home: privimage.errors (re-exported by privimage.data)


@dataclass
class ImageDataset:
    """uint8 images with integer labels.

    Attributes:
        images: uint8 tensor (N, C, H, W), C in {1, 3}.
        labels: int64 tensor (N,), each in ``[0, len(class_names))``.
        class_names: one name per label.
        num_skipped: how many corrupt files the reader skipped (only when asked to skip, else 0).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    num_skipped: int = field(default=0)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"Expected uint8 images of shape (N, 1|3, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}.")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"Expected int64 labels of shape ({self.images.shape[0]},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}.")
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < len(self.class_names)):
            raise ValueError(f"Labels span [{int(self.labels.min())}, {int(self.labels.max())}] but there are "
                             f"{len(self.class_names)} class names.")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        """Side length of the (square) images."""
        h, w = self.images.shape[-2:]
        if h != w:
            raise ValueError(f"Images are {h}x{w}, not square; resize them first.")
        return int(h)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> "ImageDataset":
        """The examples at ``indices`` (same class names)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], self.labels[idx], list(self.class_names))

    def resized(self, resolution: int | None) -> "ImageDataset":
        """The same examples at ``resolution`` × ``resolution`` (a no-op for ``None`` or the same size)."""
        if resolution is None or tuple(self.images.shape[-2:]) == (resolution, resolution):
            return self
        return ImageDataset(resize_images(self.images, resolution), self.labels, list(self.class_names),
                            self.num_skipped)


def resize_images(images: torch.Tensor, resolution: int, *, chunk: int = 4096) -> torch.Tensor:
    """Centre-crop uint8 (N, C, H, W) images to a square and resize them to ``resolution`` (uint8 out).

    Bilinear interpolation with antialiasing (area-weighted when shrinking, so no aliasing from skipped
    pixels), rounded to the nearest integer; done in chunks so a 50k set never exists in float32 at once.
    """
    if resolution < 1:
        raise ValueError(f"Expected resolution={resolution} >= 1.")
    n, c, h, w = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[:, :, top:top + side, left:left + side]
    if side == resolution:
        return images.contiguous()
    out = torch.empty(n, c, resolution, resolution, dtype=torch.uint8)
    for start in range(0, n, chunk):
        x = images[start:start + chunk].float()
        y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def pick_subset(n: int, size: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``size`` of ``n`` examples, in increasing order (all for None)."""
    if size is None or size >= n:
        return np.arange(n)
    if size < 0:
        raise ValueError(f"Expected size={size} >= 0.")
    rng = np.random.default_rng([seed, 0x5EED])
    return np.sort(rng.choice(n, size=size, replace=False))


def require_file(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`DataError` naming ``path`` if it is not a file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing ({what}).")
