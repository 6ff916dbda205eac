"""The benchmark harness shared by ``bench/test_bench_<op>.py``: timing summaries, run metadata, CSV rows.

Each bench file times one op over the UNet's layer shapes for every provider (``torch_ref``, ``triton``,
``native``, ``opacus``) with pytest-benchmark, then hands the per-round timings to :func:`record`, which
appends one row per (op, provider, shape) to ``bench/results/kernels-<device kind>.csv``: median, p20 and
p80 in milliseconds (warm-up rounds excluded; Liger's quantiles [0.5, 0.2, 0.8]), with the device, torch and
triton versions, git sha and date, so every number says where it came from.

Run: ``pytest bench/ --benchmark-enable`` (pyproject's addopts disable benchmarks so the test suite stays
fast; disabled, each case runs once as a smoke test and nothing is recorded). ``PRIVIMAGE_BENCH_FULL=1`` runs
the full shape set (batch 64–512) on CPU as well; on CUDA it is the default.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return torch.__version__, triton_version


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a round's time is the op's, not its launch's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def full_shapes(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" or os.environ.get("PRIVIMAGE_BENCH_FULL") == "1"


def csv_path(device: torch.device | str) -> Path:
    return RESULTS / f"kernels-{torch.device(device).type}.csv"


def append_rows(rows: list[Row], path: Path) -> None:
    """Append rows to a CSV atomically (write a temp file beside it, then rename): a killed run never leaves
    a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(Row)]
    existing = path.read_text() if path.exists() else ""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            if existing:
                f.write(existing)
            writer = csv.DictWriter(f, fieldnames=fields)
            if not existing:
                writer.writeheader()
            for row in rows:
                writer.writerow(dataclasses.asdict(row))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
