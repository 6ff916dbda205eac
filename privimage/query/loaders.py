"""Streaming the pre-training subset: an FFCV file, or the whole subset resident on the device.

Both loaders have one interface: iterating yields one epoch of ``(images, labels)`` batches, images float32
(B, C, H, W) normalised to [-1, 1] (or raw uint8 with ``normalize=False``) with random horizontal flips,
labels int64 (B,), on ``device``; ``len(loader)`` is the number of batches per epoch. Flip and
normalisation run on the device, on the batch, in :func:`augment`, so the two loaders differ only in where
the uint8 bytes come from.

``loader.epoch(e, start=b)`` yields batches ``b, b+1, ...`` of epoch ``e``: the order is a permutation
seeded by (seed, e) only and batch b's flips by (seed, e, b) only, so a training run resumed at any step
sees exactly the batches an uninterrupted run saw, and skipping b batches costs nothing (no batch before b
is read). The order is drawn on the CPU for FFCV and on ``device`` for the device loader, so on CPU the
two stream identical epochs.

- :class:`FFCVLoader` reads a file written once by :func:`write_ffcv` (FFCV, Leclerc et al., arXiv
  2306.12517): pages of raw uint8 arrays, memory-mapped, decoded by JIT-compiled worker threads and
  prefetched ``batches_ahead`` batches ahead. It scales past memory (ImageNet at 64×64 is ~15 GB).
- :class:`DeviceLoader` keeps the uint8 subset on the device (ImageNet at 32×32 is ~4 GB, a 1% subset
  40 MB) and gathers each batch with one indexing op: no host work, no copies per step.

:func:`make_loader` chooses: the device loader whenever the uint8 data fits in a quarter of the device's
memory, else FFCV. The device loader needs no file and no extra dependency, and on a GPU it also skips every
host-to-device copy; their throughput is measured by ``bench/loaders.py`` (``bench/results/loaders.md``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from privimage.data import ImageDataset
from privimage.engine.distributed import rank_rows


def augment(images: torch.Tensor, *, flip: bool, normalize: bool, generator: torch.Generator | None,
            rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Random horizontal flip (probability ½ per image) and uint8 -> [-1, 1] float, on the batch's device.

    ``rows=(first, n)``: ``images`` are rows ``first, first + 1, ...`` of a batch of ``n`` (one rank's share):
    the flips are drawn for all ``n`` and these rows' taken, so they are the ones the whole batch would get."""
    x = images.float().div_(127.5).sub_(1.0) if normalize else images
    if flip:
        first, n = rows if rows is not None else (0, x.shape[0])
        mask = torch.rand(n, generator=generator, device=generator.device if generator else x.device)
        mask = mask[first:first + x.shape[0]]
        x = torch.where(mask.to(x.device)[:, None, None, None] < 0.5, x.flip(-1), x)
    elif not normalize:
        x = x.clone()  # FFCV reuses its batch buffers; never hand out a view of them
    return x


# Seeding streams (the second part of the seed): distinct from the training loops' own step draws
# (1: pre-training, 2: fine-tuning), so a loader's flips never reuse the noise a step draws.
_ORDER_STREAM, _FLIP_STREAM = 3, 4


def _generator(seed: int, *parts: int, device: torch.device) -> torch.Generator:
    # Imported here, not at the top: privimage.train imports this module for pre-training.
    from privimage.train.common import step_generator

    return step_generator(seed, *parts, device=device)


class _Epochs:
    """The epoch plan both loaders share; subclasses set the attributes below and define ``_gather``.

    ``_gather(order)`` yields the uint8 images and int64 labels of ``order``'s examples, ``batch_size`` at a
    time, in that order, on ``device``.
    """

    batch_size: int
    shuffle: bool
    flip: bool
    normalize: bool
    drop_last: bool
    seed: int
    device: torch.device
    _order_device: torch.device
    _next_epoch: int

    @property
    def num_examples(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_examples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        """The next epoch (0, 1, 2, ... in the order they are iterated)."""
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        yield from self.epoch(epoch)

    def epoch(self, epoch: int, *, start: int = 0, rank: int = 0, world_size: int = 1):
        """Batches ``start, start + 1, ...`` of epoch ``epoch``; each depends only on (seed, epoch, its index).

        With ``world_size > 1``: this rank's rows of each batch (:func:`privimage.engine.distributed.rank_rows`,
        flips included), so the ranks' shares of batch b together are exactly the one-process batch b."""
        if epoch < 0 or not 0 <= start <= len(self):
            raise ValueError(f"Expected epoch={epoch} >= 0 and 0 <= start={start} <= {len(self)} batches.")
        n = self.num_examples
        order = (torch.randperm(n, generator=_generator(self.seed, _ORDER_STREAM, epoch, device=self._order_device),
                                device=self._order_device) if self.shuffle
                 else torch.arange(n, device=self._order_device))
        order = order[start * self.batch_size:len(self) * self.batch_size]
        for b, (images, labels, rows) in enumerate(self._gather(order, rank, world_size), start):
            gen = _generator(self.seed, _FLIP_STREAM, epoch, b, device=self.device) if self.flip else None
            yield augment(images, flip=self.flip, normalize=self.normalize, generator=gen, rows=rows), labels

    def _gather(self, order: torch.Tensor, rank: int, world_size: int):
        """Per batch of ``order`` (``batch_size`` at a time): this rank's uint8 images and int64 labels, and
        ``(first row, batch size)``."""
        raise NotImplementedError


class DeviceLoader(_Epochs):
    """The uint8 data set held on ``device``; each epoch is a seeded permutation (see :meth:`epoch`).

    Args:
        dataset: the images to stream (uint8, kept as is: a quarter of float32's memory).
        batch_size: images per batch.
        shuffle: a new random order each epoch (else the stored order).
        flip, normalize: see :func:`augment`.
        drop_last: drop the final short batch (fixed shapes for compiled steps).
        seed: seeds the order and the flips.
    """

    def __init__(self, dataset: ImageDataset, *, batch_size: int, device: str | torch.device = "cpu",
                 shuffle: bool = True, flip: bool = True, normalize: bool = True, drop_last: bool = False,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"Expected batch_size={batch_size} >= 1.")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device).contiguous()
        self.labels = dataset.labels.to(self.device)
        # Gather whole rows as int64 words when the row size allows: indexing 8-byte elements is much faster
        # than indexing single bytes on CPU.
        n, row = self.images.shape[0], self.images[0].numel()
        rows = self.images.view(n, row)
        self._rows = rows.view(torch.int64) if row % 8 == 0 else rows
        self.batch_size, self.shuffle, self.flip, self.normalize, self.drop_last, self.seed = (
            batch_size, shuffle, flip, normalize, drop_last, seed)
        self._order_device, self._next_epoch = self.device, 0

    @property
    def num_examples(self) -> int:
        return self.images.shape[0]

    def _gather(self, order: torch.Tensor, rank: int, world_size: int):
        for i in range(0, len(order), self.batch_size):
            batch = order[i:i + self.batch_size]
            mine = rank_rows(len(batch), rank=rank, world_size=world_size)
            idx = batch[mine]  # only this rank's rows are gathered
            yield (self._rows[idx].view(torch.uint8).view(len(idx), *self.images.shape[1:]), self.labels[idx],
                   (mine.start, len(batch)))


class _Indexed:
    """The (image, label) pairs FFCV's writer asks for, as numpy."""

    def __init__(self, dataset: ImageDataset):
        self.images, self.labels = dataset.images.numpy(), dataset.labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


@contextlib.contextmanager
def _keep_torch_threads():
    """FFCV sets torch's thread count process-wide (to 1 on import, to ``num_workers`` when a loader is made
    or an epoch starts), which would silently slow every CPU op of the training loop; put it back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def ffcv_available() -> bool:
    with _keep_torch_threads():
        try:
            import ffcv  # noqa: F401
        except ImportError:
            return False
    return True


def _require_ffcv() -> None:
    if not ffcv_available():
        raise ImportError("FFCV is not installed. Install the system libraries and the extra: `apt-get install -y "
                          "libopencv-dev libturbojpeg0-dev pkg-config && pip install -e '.[ffcv]'`, or use "
                          "DeviceLoader / make_loader(kind='device').")


def write_ffcv(dataset: ImageDataset, path: str | os.PathLike, *, num_workers: int = 1) -> Path:
    """Write ``dataset`` to an FFCV file at ``path`` atomically (temporary file, then rename).

    Images are stored as raw uint8 (C, H, W) arrays (FFCV's ``NDArrayField``): exact bytes, any channel
    count, and no JPEG decoding cost when streaming small images. A crash leaves no file at ``path``.
    """
    _require_ffcv()
    with _keep_torch_threads():
        from ffcv.fields import IntField, NDArrayField
        from ffcv.writer import DatasetWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    fields = {"image": NDArrayField(np.dtype("uint8"), tuple(dataset.images.shape[1:])), "label": IntField()}
    try:
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(_Indexed(dataset))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class _PlannedOrder:
    """An FFCV traversal order that is exactly the index array set in ``plan``.

    FFCV's own random order is seeded by ``seed + epoch`` (so seed 0's epoch 1 is seed 1's epoch 0) and
    cannot start mid-epoch without decoding the skipped batches; handing FFCV our own order avoids both.
    """

    def __init__(self, indices: np.ndarray):
        self.plan = indices

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.plan


class FFCVLoader(_Epochs):
    """Stream an FFCV file written by :func:`write_ffcv`; same interface as :class:`DeviceLoader`.

    Args:
        path: the ``.ffcv`` file.
        num_workers: FFCV decoding threads.
        batches_ahead: batches prefetched (decoded, and on CUDA copied to the GPU) ahead of the consumer.
        others: as :class:`DeviceLoader`.
    """

    def __init__(self, path: str | os.PathLike, *, batch_size: int, device: str | torch.device = "cpu",
                 shuffle: bool = True, flip: bool = True, normalize: bool = True, drop_last: bool = False,
                 seed: int = 0, num_workers: int = 2, batches_ahead: int = 3):
        _require_ffcv()
        with _keep_torch_threads():
            self._make(path, batch_size=batch_size, device=device, shuffle=shuffle, flip=flip, normalize=normalize,
                       drop_last=drop_last, seed=seed, num_workers=num_workers, batches_ahead=batches_ahead)

    def _make(self, path, *, batch_size, device, shuffle, flip, normalize, drop_last, seed, num_workers,
              batches_ahead) -> None:
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (FFCV file; write it with write_ffcv).")
        self.device = torch.device(device)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        self.batch_size, self.shuffle, self.flip, self.normalize, self.drop_last, self.seed = (
            batch_size, shuffle, flip, normalize, drop_last, seed)
        self._order_device, self._next_epoch = torch.device("cpu"), 0
        self._loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                              order=OrderOption.SEQUENTIAL, drop_last=drop_last, batches_ahead=batches_ahead,
                              os_cache=True,
                              pipelines={"image": [NDArrayDecoder(), ToTensor(), *to_device],
                                         "label": [IntDecoder(), ToTensor(), Squeeze(-1), *to_device]})
        self._order = _PlannedOrder(self._loader.indices)
        self._loader.traversal_order = self._order

    @property
    def num_examples(self) -> int:
        return len(self._loader.indices)

    def _gather(self, order: torch.Tensor, rank: int, world_size: int):
        # FFCV's batch size is fixed when the loader is made: with several ranks, each decodes the whole batch
        # and keeps its rows (FFCV's point is a file larger than memory, not less decoding per rank).
        self._order.plan = self._loader.indices[order.numpy()]
        threads = torch.get_num_threads()
        for images, labels in self._loader:
            if torch.get_num_threads() != threads:  # the epoch's worker thread reset it (see _keep_torch_threads)
                torch.set_num_threads(threads)
            mine = rank_rows(len(labels), rank=rank, world_size=world_size)
            # FFCV reuses its batch buffers: the labels are copied here, the images by augment.
            yield (images[mine].to(self.device, non_blocking=True),
                   labels[mine].to(self.device, non_blocking=True).long().clone(), (mine.start, len(labels)))


def loader_kind(dataset: ImageDataset, *, device: str | torch.device = "cpu", kind: str = "auto") -> str:
    """The loader :func:`make_loader` builds: ``kind``, or for "auto" "device" when the uint8 data fits in a
    quarter of the device's memory (always on CPU, where the data set is already in RAM), else "ffcv"."""
    device = torch.device(device)
    if kind == "auto":
        budget = torch.cuda.get_device_properties(device).total_memory / 4 if device.type == "cuda" else float("inf")
        return "device" if dataset.images.numel() <= budget else "ffcv"
    return kind


def make_loader(dataset: ImageDataset, *, batch_size: int, device: str | torch.device = "cpu", kind: str = "auto",
                ffcv_path: str | os.PathLike | None = None, **kwargs) -> DeviceLoader | FFCVLoader:
    """A loader for ``dataset``: ``kind`` is "device", "ffcv" or "auto" (see :func:`loader_kind`).

    "ffcv" writes ``ffcv_path`` first if it does not exist yet (written once, then only streamed).
    """
    device = torch.device(device)
    kind = loader_kind(dataset, device=device, kind=kind)
    if kind == "device":
        return DeviceLoader(dataset, batch_size=batch_size, device=device, **kwargs)
    if kind == "ffcv":
        if ffcv_path is None:
            raise ValueError("make_loader(kind='ffcv') needs ffcv_path= (where the subset file is or goes).")
        if not Path(ffcv_path).is_file():
            write_ffcv(dataset, ffcv_path)
        return FFCVLoader(ffcv_path, batch_size=batch_size, device=device, **kwargs)
    raise ValueError(f"Expected kind in ('auto', 'device', 'ffcv'), got {kind!r}.")
