"""The sweep's work queue over devices, and its progress line.

One worker per device. With one device (the CPU, or a single GPU) the worker is this process: jobs run one
after another, exactly as ``privimage run`` would run them. With several CUDA devices each device gets a
process of its own (``spawn``), which takes jobs from one shared queue until it is empty; a job names a run
directory and what to do in it, so nothing but paths crosses the process boundary (never the sensitive votes:
the query is made in the main process before the queue starts). The multi-device path cannot run on a
machine without two GPUs; its code is the same ``run_job`` in another process.

:class:`SweepProgress` is the line on top of the points' own bars: points done / running / queued and an ETA
from the mean time of the jobs finished so far.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from privimage.errors import PrivimageError

__all__ = ["Job", "SweepProgress", "run_queue"]


@dataclass(frozen=True)
class Job:
    """``kind`` ("pretrain" or "finish") of the run directory ``path``, for the point named ``point``."""

    kind: str
    path: str
    point: str


class SweepProgress:
    """``sweep: 2/4 points done, 1 running, 1 queued, ETA 3m10s`` as a tqdm bar (one step per point) and log lines."""

    def __init__(self, total: int, done: int, *, workers: int, log):
        from privimage.progress import progress_bar

        self.total, self.done, self.running, self.workers, self.log = total, done, 0, workers, log
        self.durations: list[float] = []
        self.bar = progress_bar(total, desc="sweep (points)", unit="point", initial=done)

    @property
    def queued(self) -> int:
        return self.total - self.done - self.running

    def eta(self) -> float | None:
        if not self.durations:
            return None
        return sum(self.durations) / len(self.durations) * math.ceil((self.total - self.done) / self.workers)

    def line(self) -> str:
        eta = self.eta()
        return (f"sweep: {self.done}/{self.total} points done, {self.running} running, {self.queued} queued"
                + (f", ETA {_duration(eta)}" if eta is not None else ""))

    def started(self) -> None:
        self.running += 1
        self._show()

    def finished(self, seconds: float | None) -> None:
        """A point's last job ended (``seconds``: its time; ``None``: it failed)."""
        self.running -= 1
        if seconds is not None:
            self.done += 1
            self.durations.append(seconds)
            self.bar.update()
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix(running=self.running, queued=self.queued, refresh=False)
        self.log(self.line())

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def run_queue(jobs: list[Job], devices: list[str], run_job: Callable[[Job, str], None], *,
              on_start: Callable[[Job], None] = lambda job: None,
              on_end: Callable[[Job, float | None, str | None], None] = lambda job, s, e: None) -> list[tuple[Job, str]]:
    """Run ``jobs`` over ``devices`` (one worker each); returns the failed jobs with their one-line errors.

    ``run_job(job, device)`` does the work; it must be a module-level function (it is pickled for the
    device processes). ``on_start(job)`` and ``on_end(job, seconds or None, error or None)`` are called in
    this process. On one device a :class:`~privimage.errors.PrivimageError` ends the job (recorded, the next
    one runs); anything else (a bug, Ctrl-C) stops the sweep with its traceback.
    """
    if len(devices) <= 1:
        failed = []
        for job in jobs:
            on_start(job)
            t = time.perf_counter()
            try:
                run_job(job, devices[0] if devices else "cpu")
            except PrivimageError as err:
                failed.append((job, str(err)))
                on_end(job, None, str(err))
                continue
            on_end(job, time.perf_counter() - t, None)
        return failed
    return _run_processes(jobs, devices, run_job, on_start, on_end)


def _run_processes(jobs, devices, run_job, on_start, on_end) -> list[tuple[Job, str]]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    todo, events = ctx.Queue(), ctx.Queue()
    for job in jobs:
        todo.put(job)
    for _ in devices:
        todo.put(None)
    workers = [ctx.Process(target=_worker, args=(device, todo, events, run_job), daemon=True) for device in devices]
    for w in workers:
        w.start()
    failed, ended, alive = [], 0, len(workers)
    try:
        while ended < len(jobs) and alive:
            try:
                kind, job, value = events.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: check that the workers still live
                alive = sum(w.is_alive() for w in workers)
                continue
            if kind == "start":
                on_start(job)
            else:
                ended += 1
                if kind == "error":
                    failed.append((job, value))
                on_end(job, value if kind == "done" else None, value if kind == "error" else None)
    finally:
        for w in workers:
            w.join(timeout=1 if ended == len(jobs) else 0)
            if w.is_alive():
                w.terminate()
    return failed


def _worker(device: str, todo, events, run_job) -> None:
    """One device's process: jobs from ``todo`` until its ``None``; every start and end reported on ``events``."""
    while (job := todo.get()) is not None:
        events.put(("start", job, None))
        t = time.perf_counter()
        try:
            run_job(job, device)
        except Exception as err:  # noqa: BLE001 - reported to the main process, which words it
            events.put(("error", job, f"{type(err).__name__}: {' '.join(str(err).split())}"))
            continue
        events.put(("done", job, time.perf_counter() - t))
