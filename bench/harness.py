"""The benchmark harness shared by ``bench/test_bench_<op>.py``: timing summaries, run metadata, CSV rows.

Each bench file times one op over the UNet's layer shapes for every provider (``torch_ref``, ``triton``,
``native``, ``opacus``) with pytest-benchmark, then hands the per-round timings to :func:`record`, which
appends one row per (op, provider, shape) to ``bench/results/kernels-<device kind>.csv``: median, p20 and
p80 in milliseconds (warm-up rounds excluded; Liger's quantiles [0.5, 0.2, 0.8]), with the device, torch and
triton versions, git sha and date, so every number says where it came from.

Run: ``pytest bench/ --benchmark-enable`` (pyproject's addopts disable benchmarks so the test suite stays
fast; disabled, each case runs once as a smoke test and nothing is recorded). ``PRIVIMAGE_BENCH_FULL=1`` runs
the full shape set (batch 64–512) on CPU as well; on CUDA it is the default. ``PRIVIMAGE_BENCH_BATCHES``
(e.g. ``256`` or ``64,512``) fixes the batch sizes instead (the GPU suite uses one batch to fit its time cap).

The end-to-end scripts (``dp_step.py``, ``train_step.py``, ``loaders.py``, ``evaluate.py``, ``accounting.py``,
``layer_strategies.py``, ``finetune_projection.py``, ``gpu_env.py``) share the rest: :func:`environment` (the one
record of where a number came from: date, git sha, device, versions), :func:`results_dir` (``bench/results``, or
``PRIVIMAGE_BENCH_RESULTS``, so the GPU suite and its CPU smoke test never write into the repository), atomic
writes, :func:`time_steps` (warm-up, then timed repeats with the device synchronised) and :class:`PeakMemory`.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"  # the default of results_dir()


def results_dir() -> Path:
    """Where results go: ``$PRIVIMAGE_BENCH_RESULTS`` if set (the GPU suite's work folder, the smoke test's
    temporary folder), else ``bench/results``."""
    return Path(os.environ.get("PRIVIMAGE_BENCH_RESULTS") or RESULTS)


@dataclasses.dataclass(frozen=True)
class Row:
    """One CSV row (STYLE.md §13 columns)."""

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    p20: float
    p80: float
    device: str
    torch: str
    triton: str
    git_sha: str
    date: str


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (q in [0, 1])."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(seconds: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of per-round times given in seconds (warm-up already excluded)."""
    ms = [1e3 * t for t in seconds]
    return statistics.median(ms), quantile(ms, 0.2), quantile(ms, 0.8)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} threads)"


def _versions() -> tuple[str, str]:
    return torch.__version__, package_versions(["triton"])["triton"] or "none"


def package_versions(names) -> dict[str, str | None]:
    """Installed versions of the distributions ``names`` (None where not installed), without importing them."""
    import importlib.metadata

    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str:
    """The commit the numbers were made at (``-dirty`` when the tree had changes). ``$PRIVIMAGE_GIT_SHA`` wins:
    a copy of the tree without ``.git`` (the GPU machine) gets it from the suite."""
    if os.environ.get("PRIVIMAGE_GIT_SHA"):
        return os.environ["PRIVIMAGE_GIT_SHA"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude", "*"],
                             cwd=BENCH, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment(device: torch.device | str = "cpu", **extra) -> dict:
    """The record every result carries: date, git sha, device, threads, load, versions, the command line."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                **package_versions(["triton", "numpy", "opacus", "prv-accountant", "ffcv"])}
    if torch.device(device).type == "cuda":
        versions["cuda"] = torch.version.cuda
    return {"date": now_utc(), "git_sha": git_sha(), "device": device_name(device),
            "threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2),
            "versions": versions, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **extra}


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_json(path: Path, data) -> Path:
    """JSON, atomically; the scripts rewrite their file after every measurement, so a run stopped by a time
    cap leaves everything measured so far."""
    return write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a round's time is the op's, not its launch's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, *, warmup: int, repeats: int, device) -> dict:
    """``warmup`` untimed calls, then ``repeats`` timed ones (device synchronised around each): wall-clock
    median/p20/p80 in ms and the median process CPU time (steadier on a shared CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med, p20, p80 = summarize(wall)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "cpu_median_ms": 1e3 * statistics.median(cpu)}


class PeakMemory:
    """Peak memory growth (MB) over a region: ``with PeakMemory(device) as m: ...; m.mb``.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before (the
    caching allocator's reserve is not counted). CPU (Linux): the growth of the process's peak resident set
    (``VmHWM``) after returning freed heap pages (``malloc_trim``) and resetting the peak
    (``/proc/self/clear_refs``); meaningful for one region per process, since freed pages may stay mapped.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2 ** 20
        else:
            self.mb = _status_mb("VmHWM") - self._base
        return False


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def full_shapes(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" or os.environ.get("PRIVIMAGE_BENCH_FULL") == "1"


def bench_batches(device: torch.device | str, full=(64, 256, 512), small=(64,)) -> list[int]:
    """Batch sizes of the op benchmarks: ``$PRIVIMAGE_BENCH_BATCHES`` (comma-separated) if set, else ``full``
    on CUDA / with ``PRIVIMAGE_BENCH_FULL=1`` and ``small`` otherwise."""
    env = os.environ.get("PRIVIMAGE_BENCH_BATCHES")
    if env:
        return [int(b) for b in env.split(",") if b.strip()]
    return list(full if full_shapes(device) else small)


def csv_path(device: torch.device | str) -> Path:
    return results_dir() / f"kernels-{torch.device(device).type}.csv"


def append_rows(rows: list[Row], path: Path) -> None:
    """Append rows to a CSV atomically (the old text plus the new rows, renamed into place): a killed run
    never leaves a half-written file."""
    existing = path.read_text() if path.exists() else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in dataclasses.fields(Row)])
    if not existing:
        writer.writeheader()
    writer.writerows(dataclasses.asdict(row) for row in rows)
    write_atomic(path, existing + buf.getvalue())


def record(benchmark, *, op: str, provider: str, shape: str, dtype: torch.dtype, device, mode: str = "forward"):
    """Write the row of a finished pytest-benchmark run (nothing when benchmarks are disabled)."""
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(benchmark, "disabled", False):
        return None
    median, p20, p80 = summarize(list(stats.stats.data))
    torch_version, triton_version = _versions()
    row = Row(op=op, provider=provider, mode=mode, shape=shape, dtype=str(dtype).replace("torch.", ""),
              median_ms=round(median, 4), p20=round(p20, 4), p80=round(p80, 4), device=device_name(device),
              torch=torch_version, triton=triton_version, git_sha=git_sha(),
              date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    append_rows([row], csv_path(device))
    return row


def run(benchmark, fn, *, device, rounds: int, warmup_rounds: int = 1):
    """Time ``fn`` with pytest-benchmark: ``warmup_rounds`` untimed calls, then ``rounds`` timed ones."""

    def timed():
        out = fn()
        sync(device)
        return out

    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
