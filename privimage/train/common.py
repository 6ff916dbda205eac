"""What both training loops share: devices, checkpoints, seeded generators, sample grids.

What only the two DP fine-tunes share (their secrets, the ledger checks, the ledger-first checkpoint tail) is in
:mod:`privimage.train.dp_loop`; what only the two pre-trainings share (the public subset's loader and stream) in
:mod:`privimage.train.subset`.

Checkpoints are read with :func:`privimage.rundir.read_checkpoint` (``weights_only=True``: tensors and plain
containers only, errors naming the file); the paths of a run directory come from :class:`privimage.rundir.RunDir`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from privimage.errors import DeviceError
from privimage.io import save_png_grid, save_torch, write_csv  # noqa: F401 - write_csv: re-exported
from privimage.rundir import read_checkpoint


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; a device that is not there is a :class:`DeviceError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device={name!r} was asked for, but no CUDA device is available on this machine "
                              f"(use --device cpu or auto).")
        index = name.partition(":")[2]
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device={name!r} was asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"device={name!r} is not a device torch knows ({err}).") from None


def step_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, *parts): step t's draws depend on t only, so a resumed run redraws them."""
    import numpy as np

    value = int(np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device).manual_seed(value)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Atomically write a checkpoint (temp file + fsync + rename): a crash leaves the previous one intact."""
    save_torch(state, path)


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """A checkpoint file, weights only (:func:`privimage.rundir.read_checkpoint`)."""
    return read_checkpoint(path, map_location=map_location, missing="run the stage first, or drop --resume")


def silent(message: str) -> None:
    """The log of a rank other than 0 under torchrun (rank 0 alone reports)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper, so state dicts never carry ``_orig_mod.`` keys."""
    return getattr(model, "_orig_mod", model)


def save_sample_grid(denoiser: torch.nn.Module, path: str | os.PathLike, *, shape, num_classes: int,
                     per_class: int = 8, num_steps: int = 20, seed: int = 0, device="cpu") -> None:
    """A PNG grid of samples from ``denoiser``: one row per class (or 8 rows unconditional)."""
    from privimage.diffusion import SamplerConfig, sample, to_uint8

    rows = max(num_classes, 1) if num_classes else 8
    n = rows * per_class
    labels = (torch.arange(n) // per_class) if num_classes else None
    was_training = denoiser.training
    denoiser.eval()
    x = sample(denoiser, seeds=[seed * 1_000_003 + i for i in range(n)], shape=shape, labels=labels,
               config=SamplerConfig(num_steps=num_steps), device=device)
    denoiser.train(was_training)
    save_png_grid(to_uint8(x).cpu(), path, nrow=per_class)


@dataclass(frozen=True)
class Place:
    """Where a training loop runs (:func:`place`): its process group (None in one process), rank, world size,
    whether it writes (rank 0, or the only process), its device and its log (silent on the other ranks)."""

    group: object | None
    rank: int
    world_size: int
    writer: bool
    device: torch.device
    log: object


def place(device: torch.device | str, log) -> Place:
    """This process's :class:`Place` under torchrun (:mod:`privimage.distributed`: ``cuda:LOCAL_RANK`` under
    NCCL, else ``device``), or the one process's."""
    from privimage import distributed

    launch = distributed.current()
    writer = distributed.is_writer()
    if launch is None:
        return Place(None, 0, 1, writer, torch.device(device), log)
    return Place(launch.group, launch.rank, launch.world_size, writer,
                 launch.device if launch.device is not None else torch.device(device), log if writer else silent)

