"""What both training loops share: devices, checkpoints, CSV logs, seeded generators, sample grids."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from privimage.io import atomic_write, save_png_grid, save_torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an explicit cuda without a GPU is an error naming it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for, but no CUDA device is available.")
    return torch.device(name)


def step_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, *parts): step t's draws depend on t only, so a resumed run redraws them."""
    import numpy as np

    value = int(np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
    return torch.Generator(device).manual_seed(value)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Atomically write a checkpoint (temp file + fsync + rename): a crash leaves the previous one intact."""
    save_torch(state, path)


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist (run the stage first, or drop --resume).")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"Checkpoint {path} could not be read: {err}") from None


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Write the whole log atomically (rows live in the checkpoint, so a resumed run's log is exact)."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


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
