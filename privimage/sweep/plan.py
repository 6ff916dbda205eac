"""What a sweep is: its points (ε, seed), their configs, the devices, and the sweep directory's layout.

A sweep directory ``runs/NNNNN-sweep-NAME/`` holds::

    sweep.json        the sweep's plan (config, ε values, seeds, shard, devices), each point's state, the pre-training
                      each point used, the privacy composition                            SweepDir.save/load
    sweep.md, sweep.png   the summary (privimage.sweep.summary)
    .lock             the sweep's writer lock
    eps5-seed0/ ...   one complete run directory per point (privimage.rundir.RunDir): what `privimage run
                      --config NAME --epsilon 5 --seed 0` makes alone
    epsinf-seed0/     the non-private reference (``inf``): NOT private (privimage.privacy.NON_PRIVATE_NOTE)

A shard (``--shard i/n``, :class:`Shard`) is a sweep directory ``NNNNN-sweep-NAME-shardIofN`` holding only its
points; its ``sweep.json`` keeps the whole sweep's ε values and seeds and its ``shard``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from privimage.config import RunConfig
from privimage.errors import ConfigError, DeviceError, RunDirError
from privimage.rundir import RunDir, read_file

__all__ = ["FORMAT", "Point", "Shard", "SweepDir", "parse_epsilons", "parse_seeds", "parse_shard", "point_config",
           "resolve_devices"]

FORMAT = "privimage.sweep.v1"
MAX_EPSILON = 100.0  # RunConfig's own bound


@dataclass(frozen=True, order=True)
class Point:
    """One (ε, seed) of a sweep; ``epsilon = math.inf`` is the non-private reference."""

    epsilon: float
    seed: int

    @property
    def private(self) -> bool:
        return not math.isinf(self.epsilon)

    @property
    def name(self) -> str:
        """The point's run directory: ``eps5-seed0``, ``eps0.5-seed1``, ``epsinf-seed0``."""
        return f"eps{'inf' if not self.private else format(self.epsilon, 'g')}-seed{self.seed}"

    @property
    def label(self) -> str:
        return f"eps={self.epsilon:g}" if self.private else "eps=inf (NON-PRIVATE reference)"

    def to_json(self) -> dict:
        return {"epsilon": self.epsilon if self.private else "inf", "seed": self.seed, "private": self.private}


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,5,10,inf"`` -> (1.0, 5.0, 10.0, inf): each finite in (0, 100] or ``inf``; none twice; at least one."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ConfigError("--epsilons is empty: give one or more values, e.g. --epsilons 1,5,10 (add inf for the "
                          "non-private reference).")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--epsilons: {item!r} is not a number (values like 1,5,10,inf).") from None
        if math.isnan(value) or value <= 0 or (math.isfinite(value) and value > MAX_EPSILON):
            raise ConfigError(f"--epsilons: {item} is not an epsilon: each must be in (0, {MAX_EPSILON:g}] or inf "
                              f"(the non-private reference).")
        if value in values:
            raise ConfigError(f"--epsilons: {item} is given twice; each point is its own release, so a repeated "
                              f"value would spend twice for nothing (use --seeds for repeats).")
        values.append(value)
    return tuple(values)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2): integers in [0, 2**63), none twice, at least one."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ConfigError("--seeds is empty: give one or more, e.g. --seeds 0,1,2.")
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except ValueError:
            raise ConfigError(f"--seeds: {item!r} is not an integer.") from None
        if not 0 <= seed < 2 ** 63:
            raise ConfigError(f"--seeds: {item} is not in [0, 2**63).")
        if seed in seeds:
            raise ConfigError(f"--seeds: {item} is given twice.")
        seeds.append(seed)
    return tuple(seeds)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``): the points ``j`` of the sweep's list (ε-major, then
    seed) with ``j % count == index``, so ``count`` independent jobs (a cluster job array) cover the sweep, each
    point exactly once and each complete on its own."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, points: list[Point]) -> list[Point]:
        """This shard's points of ``points`` (the whole sweep's, in order); a shard with none is refused."""
        mine = points[self.index::self.count]
        if not mine:
            raise ConfigError(f"--shard {self}: the sweep has {len(points)} point(s), so shard {self.index} holds "
                              f"none; use at most {len(points)} shards (--shard i/{len(points)}).")
        return mine

    def to_json(self) -> dict:
        return {"index": self.index, "count": self.count}

    @classmethod
    def from_json(cls, data: dict | None) -> "Shard | None":
        return None if data is None else cls(int(data["index"]), int(data["count"]))


def parse_shard(text: str) -> Shard:
    """``"1/4"`` -> Shard(1, 4): integers ``i/n`` with ``n >= 1`` and ``0 <= i < n``."""
    index, sep, count = str(text).strip().partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise ConfigError(f"--shard {text!r} is not i/n: give this job's shard index i (from 0) and the number of "
                          f"shards n, e.g. --shard 0/4 (or --shard $SLURM_ARRAY_TASK_ID/4 in a job array).") from None
    if n < 1:
        raise ConfigError(f"--shard {text}: the number of shards must be at least 1 (e.g. --shard 0/4).")
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text}: the shard index must be in 0..{n - 1} for {n} shards (indices count "
                          f"from 0).")
    return Shard(i, n)


def resolve_devices(text: str) -> list[str]:
    """``auto`` (every CUDA device, else one CPU), ``cpu``, or a list ``cuda:0,cuda:1``: one worker each."""
    import torch

    from privimage.train import resolve_device

    text = str(text).strip()
    if text == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    devices = []
    for item in (t.strip() for t in text.split(",")):
        if item == "cuda":
            item = "cuda:0"
        if item != "cpu" and not (item.startswith("cuda:") and item[5:].isdigit()):
            raise DeviceError(f"--devices: {item!r} is not a device: use auto, cpu, or cuda:N[,cuda:M...].")
        resolve_device(item)  # refuses a device this machine does not have
        if item in devices:
            raise DeviceError(f"--devices: {item} is given twice (one worker per device).")
        devices.append(item)
    if "cpu" in devices and len(devices) > 1:
        raise DeviceError("--devices: cpu with other devices: the CPU is one worker on its own; give either cpu or "
                          "CUDA devices.")
    return devices


#: The non-private reference point's clipping norm: the largest the config allows, so no per-image gradient of
#: these models is clipped (with σ = 0 the norm scales no noise): the reference trains without clipping.
NO_CLIPPING = 1e6


def point_config(cfg: RunConfig, point: Point) -> RunConfig:
    """The config of ``point``'s run directory: ``cfg`` with its ε and seed, exactly what ``privimage run --epsilon
    E --seed S`` would use; ``inf`` keeps ``cfg.epsilon`` and sets ``non_private`` (σ = 0 for the query and the
    fine-tune) and ``finetune.max_grad_norm = NO_CLIPPING`` (no clipping)."""
    if point.private:
        return replace(cfg, epsilon=point.epsilon, seed=point.seed)
    return replace(cfg, seed=point.seed, non_private=True,
                   finetune=replace(cfg.finetune, max_grad_norm=NO_CLIPPING))


class SweepDir:
    """The sweep directory at ``path`` (module docstring)."""

    SWEEP_JSON, SWEEP_MD, SWEEP_PNG, LOCK = "sweep.json", "sweep.md", "sweep.png", ".lock"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    json_path = property(lambda self: self.path / self.SWEEP_JSON)
    md_path = property(lambda self: self.path / self.SWEEP_MD)
    png_path = property(lambda self: self.path / self.SWEEP_PNG)

    def run(self, point: Point) -> RunDir:
        return RunDir(self.path / point.name)

    def lock(self, command: str, *, log=print):
        from privimage.lockfile import hold_lock

        return hold_lock(self.path / self.LOCK, command=command, log=log)

    @classmethod
    def make(cls, out: str | os.PathLike, name: str, shard: Shard | None = None) -> "SweepDir":
        """A new ``out/NNNNN-sweep-NAME`` (``...-sweep-NAME-shard1of4`` for a shard)."""
        suffix = "" if shard is None else f"-shard{shard.index}of{shard.count}"
        return cls(RunDir.make(out, f"sweep-{name}{suffix}").path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SweepDir":
        sweep = cls(path)
        if not sweep.path.is_dir():
            raise RunDirError(f"--resume {sweep.path}: no such folder.")
        if not sweep.json_path.is_file():
            what = "a run directory of `privimage run` (resume it with `privimage run --resume`)" if (
                sweep.path / RunDir.CONFIG).is_file() else "not a sweep directory"
            raise RunDirError(f"--resume {sweep.path}: it has no {cls.SWEEP_JSON}; it is {what}.")
        return sweep

    def save(self, state: dict) -> None:
        from privimage.io import save_json

        save_json(state, self.json_path)

    def load(self) -> dict:
        def read(path: Path) -> dict:
            state = json.loads(path.read_bytes())
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            return state

        return read_file(self.json_path, read, missing="", fix="it records which points were planned; restore it, "
                         "or start a new sweep")

    def load_config(self) -> RunConfig:
        """The sweep's base config (``sweep.json``'s ``config``: ``RunConfig.to_dict()``), checked."""
        try:
            return RunConfig.from_dict(self.load()["config"])
        except ConfigError as err:
            raise RunDirError(f"{self.json_path}: {err}") from None
