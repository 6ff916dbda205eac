"""Where the GPU suite ran: nvidia-smi, versions, what imports, and the two ceilings measured on the device.

Ceilings (METHOD.md's "two numbers first"): a bf16 matrix product (n×n×n, random data, 2n³ FLOP per product)
in TFLOP/s, and a device-to-device copy in GB/s counting bytes read plus bytes written, each the median of
CUDA-event-timed repeats after a warm-up, within about ``--seconds`` in all. On the CPU (the suite's smoke
mode) the same in float32 at small sizes, labelled as such.

    python bench/gpu_env.py --json env.json [--seconds 10]
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

# What the suite's stages import: the project, the carried wheels and the image's own test tools.
MODULES = ["privimage", "privimage.engine", "privimage.kernels", "triton", "opacus", "prv_accountant",
           "dp_accounting", "pytest", "pytest_benchmark", "hypothesis", "safetensors", "tqdm", "scipy", "numpy"]


def nvidia_smi() -> dict:
    """nvidia-smi's summary and a CSV query of the card's state (None where the tool is missing)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False}
    query = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit," \
            "temperature.gpu,utilization.gpu"
    out = {"available": True}
    for key, cmd in (("summary", [exe]), ("query", [exe, f"--query-gpu={query}", "--format=csv"])):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            out[key] = (proc.stdout or proc.stderr).strip().splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            out[key] = [f"{type(e).__name__}: {e}"]
    return out


def imports() -> dict:
    """Each module's version, or the error importing it raised (a missing wheel shows up here first)."""
    out = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            out[name] = {"ok": True, "version": getattr(module, "__version__", None),
                         "file": getattr(module, "__file__", None)}
        except Exception as e:  # any failure to import is what this records
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    return out


def _median_seconds(fn, device, seconds: float, min_repeats: int = 3) -> float:
    """Median time of ``fn`` after three warm-up calls; CUDA events on the GPU, the host clock on the CPU."""
    for _ in range(3):
        fn()
    harness.sync(device)
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < min_repeats or (time.perf_counter() < deadline and len(times) < 50):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device, seconds: float) -> dict:
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = 8192 if cuda else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    t = _median_seconds(lambda: a @ b, device, seconds / 2)
    out = {"matmul": {"dtype": str(dtype).replace("torch.", ""), "n": n, "median_s": t,
                      "tflops": 2 * n ** 3 / t / 1e12}}
    del a, b
    numel = (2 ** 30 if cuda else 2 ** 24) // 2  # 1 GiB (CPU: 16 MiB) of bf16/fp16-sized elements
    src = torch.randn(numel, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    t = _median_seconds(lambda: dst.copy_(src), device, seconds / 2)
    out["copy"] = {"bytes": 2 * src.numel() * src.element_size(), "median_s": t,
                   "gb_per_s": 2 * src.numel() * src.element_size() / t / 1e9, "counts": "bytes read + written"}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0, help="time for the two ceilings together")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    record = {"nvidia_smi": nvidia_smi(), "imports": imports(), "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda" and not torch.cuda.is_available():  # say what is known, then fail
        record["environment"] = harness.environment("cpu")
        record["error"] = f"--device {args.device}, but torch.cuda.is_available() is False (torch " \
                          f"{torch.__version__}, CUDA build {torch.version.cuda})"
        harness.write_json(args.json, record)
        print(record["error"], file=sys.stderr)
        return 1
    record["environment"] = harness.environment(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        record["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors":
                         p.multi_processor_count, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                         "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
                         "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                  "cudnn": torch.backends.cudnn.allow_tf32}}
    harness.write_json(args.json, record)  # what is known so far, should the ceilings fail
    record["ceilings"] = ceilings(device, args.seconds)
    harness.write_json(args.json, record)
    c = record["ceilings"]
    print(f"{record['environment']['device']}: {c['matmul']['dtype']} matmul {c['matmul']['tflops']:.3g} TFLOP/s, "
          f"copy {c['copy']['gb_per_s']:.0f} GB/s")
    bad = [name for name, r in record["imports"].items() if not r["ok"]]
    if bad:
        print(f"not importable: {', '.join(bad)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
