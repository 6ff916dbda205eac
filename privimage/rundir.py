"""The run directory: every path in it, the typed load and save of what it holds, and its writer's lock.

One run of ``privimage run`` lives in ``runs/NNNNN-<config name>/``; every stage reads what the previous one
wrote. :class:`RunDir` is the one place that knows the layout::

    config.json          the RunConfig (+ data.name/root/resolution for the evaluator)      save/load_config
    budget.json          PrivacyBudget state: plan and ledger of privacy spent               save/load_budget
    plan.json            the planned σ, q, steps, N (informational)                          save/load_plan
    query/               classifier.pt, histogram.npy (noisy), selected_labels.json,         load_selection
                         subset.npz (public pre-training subset), subset.ffcv                save/load_subset
    checkpoints/         pretrain.pt, finetune.pt (PRIVATE: secret randomness)               save/load_checkpoint
    logs/                pretrain.csv, finetune.csv, timings.json (PRIVATE)                  save_log, save_timings
    samples/             samples.npz, grid.png, <stage>[-<step>].png                         save/load_samples
    private/             the private evaluation report, cached statistics (PRIVATE)
    release/             what may be published (privimage.release)
    evaluation_ledger.json   privacy spent by `privimage evaluate` (privimage.evaluate.privacy)
    .lock                the writer's lock (privimage.lockfile)

Reading: every ``load_*`` raises :class:`~privimage.errors.MissingRunFile` (the file is not there: which
command makes it) or :class:`~privimage.errors.RunDirError` (it is unreadable: truncated, corrupt, of another
format), each naming the file and what to do. Checkpoints are loaded with ``torch.load(weights_only=True)``:
tensors and plain containers only, so a checkpoint from elsewhere cannot run code when it is read.
Writing: every ``save_*`` is atomic (:mod:`privimage.io`); a refused write raises
:class:`~privimage.errors.StorageError` and leaves the previous file in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from privimage.errors import ConfigError, MissingRunFile, RunDirError, StorageError
from privimage.io import file_in_the_way, save_json, save_npz, save_torch, write_csv

__all__ = ["RunDir", "config_json", "read_checkpoint"]

STAGES = ("pretrain", "finetune")


class RunDir:
    """The run directory at ``path`` (it need not exist yet: see :meth:`create` and :meth:`open`)."""

    # Names relative to the run directory (the one home of each; modules that need a name take it from here).
    CONFIG, BUDGET, PLAN, LOCK = "config.json", "budget.json", "plan.json", ".lock"
    QUERY, CHECKPOINTS, LOGS, SAMPLES, PRIVATE, RELEASE = "query", "checkpoints", "logs", "samples", "private", "release"
    EVALUATION_LEDGER = "evaluation_ledger.json"
    PUBLIC_REPORT, PRIVATE_REPORT = "release/report.json", "private/report-private.json"
    #: What a fine-tune derives from the sensitive data (globs); a fresh fine-tune refuses a directory with any.
    FINETUNE_OUTPUTS = ("checkpoints/finetune.pt", "logs/finetune.csv", "samples/finetune-*.png",
                        "release/model.safetensors")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of(cls, run: "RunDir | str | os.PathLike") -> "RunDir":
        """``run`` itself if it is a RunDir, else the RunDir at that path."""
        return run if isinstance(run, RunDir) else cls(run)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- paths -----------------------------------------------------------------------------------------------
    config_path = property(lambda self: self.path / self.CONFIG)
    budget_path = property(lambda self: self.path / self.BUDGET)
    plan_path = property(lambda self: self.path / self.PLAN)
    lock_path = property(lambda self: self.path / self.LOCK)
    evaluation_ledger_path = property(lambda self: self.path / self.EVALUATION_LEDGER)
    query_dir = property(lambda self: self.path / self.QUERY)
    classifier_path = property(lambda self: self.query_dir / "classifier.pt")
    histogram_path = property(lambda self: self.query_dir / "histogram.npy")
    selection_path = property(lambda self: self.query_dir / "selected_labels.json")
    subset_path = property(lambda self: self.query_dir / "subset.npz")
    subset_ffcv_path = property(lambda self: self.query_dir / "subset.ffcv")
    checkpoints_dir = property(lambda self: self.path / self.CHECKPOINTS)
    logs_dir = property(lambda self: self.path / self.LOGS)
    timings_path = property(lambda self: self.logs_dir / "timings.json")
    samples_dir = property(lambda self: self.path / self.SAMPLES)
    samples_path = property(lambda self: self.samples_dir / "samples.npz")
    grid_path = property(lambda self: self.samples_dir / "grid.png")
    private_dir = property(lambda self: self.path / self.PRIVATE)
    fid_cache_dir = property(lambda self: self.private_dir / "fid")
    public_report_path = property(lambda self: self.path / self.PUBLIC_REPORT)
    private_report_path = property(lambda self: self.path / self.PRIVATE_REPORT)
    release_dir = property(lambda self: self.path / self.RELEASE)
    release_model_path = property(lambda self: self.release_dir / "model.safetensors")
    release_config_path = property(lambda self: self.release_dir / "config.json")
    release_privacy_path = property(lambda self: self.release_dir / "privacy.json")
    release_statement_path = property(lambda self: self.release_dir / "PRIVACY.md")
    release_samples_path = property(lambda self: self.release_dir / "samples.png")
    release_query_dir = property(lambda self: self.release_dir / self.QUERY)

    def checkpoint_path(self, stage: str) -> Path:
        return self.checkpoints_dir / f"{_stage(stage)}.pt"

    def log_path(self, stage: str) -> Path:
        return self.logs_dir / f"{_stage(stage)}.csv"

    def training_grid_path(self, stage: str, step: int | None = None) -> Path:
        """``samples/<stage>.png`` (end of the stage) or ``samples/<stage>-<step>.png`` (during it)."""
        stage = _stage(stage)
        return self.samples_dir / (f"{stage}.png" if step is None else f"{stage}-{step:06d}.png")

    def finetune_outputs(self) -> list[Path]:
        """The :attr:`FINETUNE_OUTPUTS` that exist."""
        return sorted(p for pattern in self.FINETUNE_OUTPUTS for p in self.path.glob(pattern))

    # ---- making, opening, locking ----------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def create(cls, root: str | os.PathLike, name: str, *, command: str, config, budget, plan: dict,
               log: Callable[[str], None] = print) -> Iterator["RunDir"]:
        """Make ``root/NNNNN-name`` (the next free number), lock it, write config, budget and plan; yield it.

        If those first writes fail (nothing is spent yet), the new folder is removed again. The lock is held
        until the ``with`` block ends.
        """
        from privimage import distributed

        if not distributed.is_writer():  # under torchrun: rank 0 makes it; the others learn its path
            yield cls(distributed.share(None))
            return
        run = cls.make(root, name)
        ready = False
        try:
            with run.lock(command, log=log):
                run.save_config(config)
                run.save_budget(budget)
                run.save_plan(plan)
                ready = True
                distributed.share(str(run.path))
                yield run
        finally:
            if not ready:
                shutil.rmtree(run.path, ignore_errors=True)

    @classmethod
    def make(cls, root: str | os.PathLike, name: str) -> "RunDir":
        """A new, empty ``root/NNNNN-name`` with the next free number (EDM's auto-numbered run directories)."""
        root = Path(root)
        blocker = file_in_the_way(root)
        if blocker is not None:
            raise RunDirError(f"{root}: {blocker} is a file, not a folder; run directories cannot go there.")
        try:
            root.mkdir(parents=True, exist_ok=True)
            for _ in range(100):
                numbers = [int(p.name[:5]) for p in root.iterdir() if p.name[:5].isdigit()]
                path = root / f"{max(numbers, default=-1) + 1:05d}-{name}"
                try:
                    path.mkdir()
                    return cls(path)
                except FileExistsError:  # another run took the number first
                    continue
        except OSError as err:
            raise StorageError(root, err, note="cannot make a run directory there") from err
        raise RunDirError(f"Could not create a new run directory under {root}.")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """The existing run directory ``path``: a folder with a ``config.json``, else a :class:`RunDirError`."""
        run = cls(path)
        if not run.path.is_dir():
            raise MissingRunFile(f"Run directory {run.path} does not exist (make one with `privimage run`).")
        if not run.config_path.is_file():
            raise MissingRunFile(f"{run.path} is not a run directory: it has no {cls.CONFIG} (make one with "
                                 f"`privimage run`).")
        return run

    def lock(self, command: str, *, log: Callable[[str], None] = print):
        """Context manager: hold this directory's writer lock (:mod:`privimage.lockfile`); under torchrun, rank
        0 holds it for the whole job and the other ranks take nothing."""
        from privimage import distributed
        from privimage.lockfile import hold_lock

        if not distributed.is_writer():
            return contextlib.nullcontext()

        return hold_lock(self.lock_path, command=command, log=log)

    # ---- typed load and save ---------------------------------------------------------------------------------
    def save_config(self, cfg) -> None:
        save_json(config_json(cfg), self.config_path)

    def load_config(self):
        """config.json as a checked :class:`~privimage.config.RunConfig`."""
        from privimage.config import CONFIGS, RunConfig

        fix = f"restore it (release/config.json holds the same settings) or start a new run directory"
        d = self._read(self.config_path, lambda p: json.loads(p.read_bytes()), "make one with `privimage run`", fix)
        if not isinstance(d, dict) or not isinstance(d.get("data", {}), dict):
            raise RunDirError(f"{self.config_path} does not hold a run config (a JSON object); {fix}.")
        data = d.setdefault("data", {})
        for key in ("name", "root"):
            data.pop(key, None)
        if data.get("resolution", 0) is None:
            data["resolution"] = data.get("pad_to") or 32
        name = d.get("name")
        try:
            return RunConfig.from_dict(d, CONFIGS.get(name, CONFIGS["demo"]) if isinstance(name, str) else None)
        except ConfigError as err:
            raise RunDirError(f"{self.config_path}: {err} Correct it, or start a new run directory.") from None

    def save_budget(self, budget) -> None:
        save_json(budget.state_dict(), self.budget_path)

    def load_budget(self):
        """budget.json as a :class:`~privimage.engine.PrivacyBudget` (plan and ledger)."""
        from privimage.engine import PrivacyBudget

        def read(path: Path):
            return PrivacyBudget.from_state_dict(json.loads(path.read_bytes()))

        return self._read(self.budget_path, read, "every run directory made by `privimage run` has one; start a new "
                          "one", "it is the ledger of privacy spent: restore it from a backup (deleting it would "
                          "not undo the spending), or start a new run directory")

    def save_plan(self, plan: dict) -> None:
        save_json(plan, self.plan_path)

    def load_plan(self) -> dict | None:
        """plan.json (None when absent: it is informational)."""
        if not self.plan_path.is_file():
            return None
        return self._read(self.plan_path, lambda p: dict(json.loads(p.read_bytes())), "", "it is informational: "
                          "delete it")

    def load_selection(self) -> dict:
        """query/selected_labels.json: the DP query's selection (``label_map``, ``sensitive_class_names``, ...)."""
        def read(path: Path) -> dict:
            d = json.loads(path.read_bytes())
            if not isinstance(d, dict) or not isinstance(d.get("sensitive_class_names", []), list):
                raise ValueError("not a selection of the per-class query")
            return d

        return self._read(self.selection_path, read, "run the query stage first (`privimage run`)",
                          "the query that made it is spent: restore the file, or start a new run directory")

    def save_subset(self, images: np.ndarray, labels: np.ndarray) -> None:
        save_npz(self.subset_path, images=images, labels=labels)

    def load_subset(self):
        """query/subset.npz: uint8 images (N, C, H, W) and int64 labels (N,), as tensors."""
        import torch

        def read(path: Path):
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
            if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
                raise ValueError(f"images {images.dtype} {images.shape} with labels {labels.shape}")
            return torch.from_numpy(images), torch.from_numpy(labels).long()

        return self._read(self.subset_path, read, "run the query stage first (`privimage run`)",
                          f"delete it and run `privimage run --resume {self.path}`: the subset is rebuilt from the "
                          f"query's selection, at no privacy cost")

    def save_checkpoint(self, stage: str, state: dict) -> None:
        """checkpoints/<stage>.pt, atomically, with ``"launch"`` (:func:`privimage.distributed.launch_info`, as
        config.json records it): a restarted attempt of the torchrun job that wrote it resumes from it
        (:func:`privimage.commands.resume_after_restart`)."""
        from privimage.distributed import launch_info

        save_torch({**state, "launch": launch_info()}, self.checkpoint_path(stage))

    def checkpoint_launch(self, stage: str) -> dict | None:
        """The ``"launch"`` record of checkpoints/<stage>.pt; None when there is no checkpoint, it records none or
        it cannot be read (the stage's own read then names the file and the fix)."""
        try:
            return read_checkpoint(self.checkpoint_path(stage)).get("launch")
        except RunDirError:  # MissingRunFile included
            return None

    def load_checkpoint(self, stage: str, *, map_location="cpu", model_kind: str | None = "diffusion") -> dict:
        """checkpoints/<stage>.pt (weights only: tensors and plain containers) of the run's ``model_kind``:
        "diffusion" (``kind`` = the stage), "gan" (``gan-<stage>``) or None (either)."""
        path = self.checkpoint_path(stage)
        fix = (f"delete it and run `privimage pretrain {self.path}` again (pre-training is public: nothing is spent)"
               if stage == "pretrain" else
               "the fine-tune cannot resume without it and the steps budget.json counts stay spent: start a new "
               "run directory")
        state = read_checkpoint(path, map_location=map_location, missing=f"the {stage} stage has not checkpointed "
                                f"yet: run `privimage {stage} {self.path}` (without --resume if it never started)",
                                fix=fix)
        kinds = {"diffusion": (stage,), "gan": (f"gan-{stage}",), None: (stage, f"gan-{stage}")}[model_kind]
        if state.get("kind", stage) not in kinds:
            raise RunDirError(f"{path} is a {state.get('kind')!r} checkpoint, not {' or '.join(map(repr, kinds))} "
                              f"(config.json's kind and the checkpoint disagree); {fix}.")
        return state

    def save_log(self, stage: str, rows: list[dict]) -> None:
        write_csv(rows, self.log_path(stage))

    def save_timings(self, timings: dict) -> None:
        save_json(timings, self.timings_path)

    def save_samples(self, images: np.ndarray, labels: np.ndarray) -> None:
        save_npz(self.samples_path, images=images, labels=labels)

    def load_samples(self):
        """samples/samples.npz: uint8 images (N, C, H, W) and labels (N,), as numpy arrays."""
        def read(path: Path):
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["labels"]

        return self._read(self.samples_path, read, f"run `privimage sample {self.path}` first",
                          f"delete it and run `privimage sample {self.path}`")

    # ---- reading with named errors ---------------------------------------------------------------------------
    def _read(self, path: Path, reader: Callable[[Path], Any], missing: str, fix: str) -> Any:
        return read_file(path, reader, missing=missing, fix=fix)


def read_file(path: Path, reader: Callable[[Path], Any], *, missing: str, fix: str) -> Any:
    """``reader(path)``; a missing file or ANY failure to read it becomes an error naming ``path`` and the fix."""
    if not path.is_file():
        raise MissingRunFile(f"{path} does not exist" + (f": {missing}." if missing else "."))
    try:
        return reader(path)
    except (RunDirError, StorageError):
        raise
    except OSError as err:
        raise RunDirError(f"{path} cannot be read ({err.strerror or err}).") from None
    except (ValueError, KeyError, TypeError, EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError,
            AttributeError, IndexError, RecursionError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise RunDirError(f"{path} is truncated or corrupt ({type(err).__name__}: {detail}); {fix}.") from None


def read_checkpoint(path: str | os.PathLike, *, map_location="cpu", missing: str = "run the stage first",
                    fix: str = "delete it and run the stage again") -> dict:
    """A checkpoint written by :func:`privimage.io.save_torch`, loaded with ``weights_only=True``.

    Only tensors and plain containers (dict, list, tuple, str, numbers, bytes) are admitted: a file holding
    other pickled objects is refused before any of them is built, since building them can run code.
    """
    import torch

    path = Path(path)

    def read(p: Path) -> dict:
        try:
            state = torch.load(p, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" not in str(err) and "Weights only" not in str(err):
                raise
            found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                         "a pickled object")
            raise RunDirError(f"{p} holds more than tensors and plain containers ({found[:160]}); it is refused "
                              f"because unpickling it could run code. Use checkpoints written by privimage only."
                              ) from None
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, found {type(state).__name__}")
        return state

    return read_file(path, read, missing=missing, fix=fix)


def config_json(cfg) -> dict:
    """config.json: the RunConfig, with ``data.name/root/resolution`` added for ``privimage evaluate``."""
    from privimage.data import parse_spec

    from privimage.distributed import launch_info

    d = cfg.to_dict()
    d["launch"] = launch_info()  # {"world_size": N, "backend": ...}: how this run directory was made
    spec = parse_spec(cfg.data.sensitive)
    d["data"].update({"name": spec["name"], "root": spec.get("root"),
                      "resolution": None if cfg.data.pad_to else cfg.data.resolution})
    return d


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"Expected a training stage in {STAGES}, got {stage!r}.")
    return stage
