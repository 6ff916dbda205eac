"""The pre-training loops' data (:mod:`privimage.train.pretrain`, :mod:`privimage.train.gan_pretrain`): the
public subset the DP query selected, streamed through the project's loaders (:mod:`privimage.query.loaders`).

Step s reads batch ``s % B`` of epoch ``s // B`` (B batches per epoch), and a loader's batches depend only on
(seed, epoch, batch index), so a resumed run streams exactly the batches the interrupted one would have. Under
torchrun each rank reads its rows of every batch (``loader.epoch(e, start=b, rank=r, world_size=W)``).
"""

from __future__ import annotations

import torch

from privimage.data import ImageDataset
from privimage.errors import RunDirError
from privimage.query.loaders import loader_kind, make_loader, write_ffcv
from privimage.rundir import RunDir

__all__ = ["subset_batches", "subset_loader_kind", "stream"]


def subset_loader_kind(run: RunDir, subset: ImageDataset, choice: str, *, device: torch.device, resume: bool,
                       writer: bool) -> str:
    """The loader for ``subset`` ("device" or "ffcv", :func:`~privimage.query.loaders.loader_kind` of the config's
    ``choice``). With "ffcv", the writer of a fresh run (or of a resumed one whose file is gone) writes
    ``query/subset.ffcv`` from ``subset``, whatever an earlier run left at the path; under torchrun the other
    ranks must wait (a barrier) before :func:`subset_batches` reads it."""
    kind = loader_kind(subset, device=device, kind=choice)
    if kind == "ffcv" and not (resume and run.subset_ffcv_path.is_file()) and writer:
        write_ffcv(subset, run.subset_ffcv_path)
    return kind


def subset_batches(run: RunDir, subset: ImageDataset, batch_size: int, *, device: torch.device, kind: str, seed: int):
    """The shuffled, flipped, [-1, 1] batches of ``subset`` (``kind``: :func:`subset_loader_kind`). drop_last keeps
    every step's batch the same size (one compiled shape, the same loss scale); a subset smaller than one batch is
    one short batch per epoch instead. An FFCV file of another subset is a :class:`RunDirError`."""
    batches = make_loader(subset, batch_size=batch_size, device=device, kind=kind, ffcv_path=run.subset_ffcv_path,
                          seed=seed, shuffle=True, flip=True, normalize=True, drop_last=len(subset) >= batch_size)
    if batches.num_examples != len(subset):
        raise RunDirError(f"{run.subset_ffcv_path} holds {batches.num_examples} images but the subset has "
                          f"{len(subset)}: it is not this run's subset (delete it, or pre-train without --resume).")
    return batches


def stream(batches, step: int, rank: int = 0, world_size: int = 1):
    """Batches from step ``step`` on: batch ``step % B`` of epoch ``step // B``, then on, epoch after epoch
    (this rank's rows of each)."""
    epoch, start = divmod(step, len(batches))
    while True:
        yield from batches.epoch(epoch, start=start, rank=rank, world_size=world_size)
        epoch, start = epoch + 1, 0
