"""One DP-SGD step against one non-private step on the same UNet and batch: time, peak memory, ratios.

Methods: ``nonprivate`` (per-sample losses summed, one backward), the engine's ``bk-mixed``, ``ghost`` and
``vmap``, and Opacus 1.6's ``opacus-hooks`` (GradSampleModule + DPOptimizer) and ``opacus-ghost``
(GradSampleModuleFastGradientClipping with ghost clipping); each step includes the optimizer step.
``nonprivate-compiled`` runs the non-private step through ``torch.compile(model, fullgraph=True)`` and
``bk-mixed-compiled`` is ``DPEngine(..., compile=True)`` (compiled forward, and the norms, clip factors and
clipped sums as compiled regions; Inductor); their compile time is the first step's, reported apart
(``first_step_s``), never in the step times.

Memory: each method runs in a fresh subprocess: one warm-up step (for the compiled methods: compilation),
then the process's peak resident set size is reset (``/proc/self/clear_refs``, after ``malloc_trim``
returns the freed heap), and the number is the growth of the peak (``VmHWM``) over one more step, i.e.
activations, gradients and temporaries (model and batch are allocated before). Time: all methods in one
process, round-robin (each round runs every method once), ``--warmup`` rounds then ``--repeats`` timed
rounds; the median wall time (p20/p80 alongside), the median CPU time (``time.process_time``), and ratios
taken per round against the non-private step of the same round, so load from other jobs on a shared CPU
falls on all methods alike. ``*_vs_compiled`` ratios are to ``nonprivate-compiled``.

The model is a stand-in UNet of the PrivImage "s" shape (DDPM++-like: nf 32, ch_mult (1, 2, 2), 2 res blocks
per level, attention at 16×16, GroupNorm, class embedding, 32×32 inputs, ~1.75M parameters) until the real
one lands in privimage/models; the loss is an EDM-like per-sample denoising loss.

Usage:
    python bench/dp_step.py                 # batch 64, all methods, writes bench/results/dp_step.{json,csv}
    python bench/dp_step.py --batch 8 --repeats 2 --methods nonprivate bk-mixed   # quick check, not saved
"""

from __future__ import annotations

import argparse
import ctypes
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["nonprivate", "bk-mixed", "ghost", "vmap", "opacus-hooks", "opacus-ghost", "nonprivate-compiled",
           "bk-mixed-compiled"]


# ---- stand-in UNet (PrivImage "s" shape) -------------------------------------------------------------------

def _gn(c):
    return nn.GroupNorm(min(32, c // 4), c)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, temb_dim):
        super().__init__()
        self.norm0, self.conv0 = _gn(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm1, self.conv1 = _gn(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv1(F.silu(self.norm1(h)))
        return (h + (x if self.skip is None else self.skip(x))) / math.sqrt(2)


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = _gn(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        att = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(c), -1)
        out = torch.bmm(v, att.transpose(1, 2)).reshape(b, c, h, w)
        return (x + self.proj(out)) / math.sqrt(2)


class StandInUNet(nn.Module):
    """DDPM++-like UNet: nf=32, ch_mult=(1, 2, 2), 2 res blocks, attention at 16×16, class-conditional."""

    def __init__(self, nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(16,), resolution=32,
                 in_ch=3, num_classes=10):
        super().__init__()
        self.nf = nf
        temb_dim = 4 * nf
        self.temb0, self.temb1 = nn.Linear(nf, temb_dim), nn.Linear(temb_dim, temb_dim)
        self.label = nn.Embedding(num_classes, temb_dim)
        self.conv_in = nn.Conv2d(in_ch, nf, 3, padding=1)
        self.down, skips, c, res = nn.ModuleList(), [nf], nf, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, nf * mult, temb_dim))
                c = nf * mult
                if res in attn_res:
                    self.down.append(AttnBlock(c))
                skips.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                res //= 2
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, temb_dim), AttnBlock(c), ResBlock(c, c, temb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), nf * mult, temb_dim))
                c = nf * mult
                if res in attn_res:
                    self.up.append(AttnBlock(c))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2))
                self.up.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.norm_out, self.conv_out = _gn(c), nn.Conv2d(c, in_ch, 3, padding=1)

    def forward(self, x, sigma, labels):
        half = self.nf // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype, device=x.device) / half)
        ang = sigma.log()[:, None] / 4 * freqs * 1000
        temb = self.temb1(F.silu(self.temb0(torch.cat([ang.sin(), ang.cos()], 1))))
        temb = F.silu(temb + self.label(labels))
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
            if not isinstance(m, AttnBlock):
                hs.append(h)
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], 1), temb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def make_batch(batch, resolution=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, resolution, resolution, generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
    labels = torch.randint(0, 10, (batch,), generator=g)
    noise = torch.randn(batch, 3, resolution, resolution, generator=g)
    return x, sigma, labels, noise


def per_sample_loss(model, x, sigma, labels, noise):
    """EDM-like denoising loss, one value per image (B,)."""
    noisy = x + sigma[:, None, None, None] * noise
    return (model(noisy, sigma, labels) - x).square().flatten(1).mean(1)


class _PerSampleMSE(nn.Module):
    """Criterion with a ``reduction`` attribute, as Opacus' DPLossFastGradientClipping requires."""

    reduction = "mean"

    def forward(self, out, target):
        per = (out - target).square().flatten(1).mean(1)
        return per if self.reduction == "none" else per.mean()


# ---- one method, in this process ---------------------------------------------------------------------------

def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss():
    """Return freed heap pages to the OS, then reset the peak RSS (VmHWM) to the current RSS (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_step(method, batch):
    """A function doing one full training step of ``method`` on a fresh stand-in UNet and a fixed batch."""
    from privimage.engine import DPEngine

    torch.manual_seed(0)
    model = StandInUNet()
    x, sigma, labels, noise = make_batch(batch)
    B = float(batch)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    if method in ("nonprivate", "nonprivate-compiled"):
        net = torch.compile(model, fullgraph=True, dynamic=False) if method == "nonprivate-compiled" else model

        def step():
            (per_sample_loss(net, x, sigma, labels, noise).sum() / B).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif method in ("bk-mixed", "ghost", "vmap", "bk-mixed-compiled"):
        compiled = method == "bk-mixed-compiled"
        engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=B,
                          method="bk-mixed" if compiled else method, compile=compiled)

        def step():
            engine.step(lambda m: per_sample_loss(m, x, sigma, labels, noise))
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif method == "opacus-hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        gsm = GradSampleModule(model)
        dp_opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                             expected_batch_size=batch, loss_reduction="mean")

        def step():
            per_sample_loss(gsm, x, sigma, labels, noise).mean().backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    elif method == "opacus-ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True,
                                                   loss_reduction="mean")
        dp_opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=1e-4), noise_multiplier=1.0,
                                                 max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean")
        crit = DPLossFastGradientClipping(gsm, dp_opt, _PerSampleMSE(), loss_reduction="mean")

        def step():
            noisy = x + sigma[:, None, None, None] * noise
            crit(gsm(noisy, sigma, labels), x).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
    return step, sum(p.numel() for p in model.parameters())


def compiled_gradient_error(batch):
    """Max over parameters of max|g_compiled - g_eager| / max|g_eager| after one step at sigma = 0, for the
    non-private step and for bk-mixed: a timing of compiled code is worth reporting only with its accuracy."""
    from privimage.engine import DPEngine

    x, sigma, labels, noise = make_batch(batch)

    def grads(method, compiled):
        torch.manual_seed(0)
        model = StandInUNet()
        if method == "nonprivate":
            net = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
            per_sample_loss(net, x, sigma, labels, noise).sum().backward()
        else:
            DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=batch,
                     compile=compiled).step(lambda m: per_sample_loss(m, x, sigma, labels, noise))
        return {n: p.grad for n, p in model.named_parameters()}

    out = {}
    for method in ("nonprivate", "bk-mixed"):
        ref, got = grads(method, False), grads(method, True)
        errs = {n: float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)) for n in ref}
        worst = max(errs, key=errs.get)
        out[f"{method}-compiled"] = {"max_rel_grad_error": errs[worst], "worst_param": worst}
    return out


def measure_memory(method, batch):
    """Peak RSS growth (MB) over one step after a warm-up step, in this (fresh) process."""
    step, params = make_step(method, batch)
    step()
    _reset_peak_rss()
    rss_before = _status_mb("VmRSS")
    step()
    return {"method": method, "peak_mem_mb": _status_mb("VmHWM") - rss_before, "params": params}


def measure_times(methods, batch, warmup, repeats):
    """Round-robin timing in one process: every round runs each method once, so load from other jobs on a
    shared machine falls on all methods alike. Returns per method the wall and CPU times of the timed rounds
    and the per-round ratio to the non-private step of the same round."""
    steps = {m: make_step(m, batch)[0] for m in methods}
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    first = {}
    for i in range(warmup + repeats):
        for m in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[m]()
            first.setdefault(m, time.perf_counter() - t0)
            if i >= warmup:
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        print(f"round {i + 1}/{warmup + repeats}: " + ", ".join(
            f"{m} {1e3 * (wall[m][-1] if i >= warmup else 0):.0f} ms" for m in methods), file=sys.stderr, flush=True)
    out = {}
    for m in methods:
        w = sorted(wall[m])
        q = statistics.quantiles(w, n=5) if len(w) > 1 else [w[0]] * 4
        row = {"median_ms": 1e3 * statistics.median(w), "p20_ms": 1e3 * q[0], "p80_ms": 1e3 * q[3],
               "cpu_median_ms": 1e3 * statistics.median(cpu[m]), "first_step_s": first[m]}
        if "nonprivate" in methods:
            row["time_ratio"] = statistics.median(a / b for a, b in zip(wall[m], wall["nonprivate"]))
            row["cpu_ratio"] = statistics.median(a / b for a, b in zip(cpu[m], cpu["nonprivate"]))
        if "nonprivate-compiled" in methods:
            row["time_ratio_vs_compiled"] = statistics.median(
                a / b for a, b in zip(wall[m], wall["nonprivate-compiled"]))
        out[m] = row
    return out


# ---- driver ------------------------------------------------------------------------------------------------

def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("opacus", "triton", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _device():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a CPU shared with other jobs")
    ap.add_argument("--no-save", action="store_true", help="print only (default when --batch is not 64)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the compiled-vs-eager gradient check (two more compilations)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure_memory(args.worker, args.batch)))
        return 0

    rows = []
    for method in args.methods:  # memory: a fresh process per method, so each peak is its own
        cmd = [sys.executable, __file__, "--worker", method, "--batch", str(args.batch)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "error": proc.stderr.strip().splitlines()[-1][:300]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method:>19}: peak +{rows[-1]['peak_mem_mb']:7.1f} MB", flush=True)
    ok = [r["method"] for r in rows if "error" not in r]
    times = measure_times(ok, args.batch, args.warmup, args.repeats)
    base = next((r for r in rows if r["method"] == "nonprivate" and "error" not in r), None)
    base_c = next((r for r in rows if r["method"] == "nonprivate-compiled" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        r.update(times[r["method"]])
        if base:
            r["mem_ratio"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        if base_c:
            r["mem_ratio_vs_compiled"] = r["peak_mem_mb"] / base_c["peak_mem_mb"]
    if not args.no_check and any(m.endswith("-compiled") for m in ok):
        for method, check in compiled_gradient_error(args.batch).items():
            print(f"{method}: max relative gradient error vs eager {check['max_rel_grad_error']:.2e} "
                  f"({check['worst_param']})", flush=True)
            for r in rows:
                if r["method"] == method:
                    r.update(check)
    best_opacus = min((r["median_ms"] for r in rows if r["method"].startswith("opacus") and "error" not in r),
                      default=None)
    for r in rows:
        if best_opacus and "error" not in r:
            r["speedup_vs_best_opacus"] = best_opacus / r["median_ms"]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": _git_sha(), "device": _device(), "threads": torch.get_num_threads(),
            "versions": _versions(), "batch": args.batch, "resolution": 32, "warmup": args.warmup,
            "repeats": args.repeats, "model": "StandInUNet nf32 ch_mult(1,2,2) 2 res blocks attn@16",
            "memory": "peak RSS growth (VmHWM, reset after malloc_trim) over the second step, fresh process "
                      "per method",
            "timing": "round-robin in one process; ratios are medians of per-round ratios to non-private"}
    nan = float("nan")
    print(f"\n{'method':>19} {'median ms':>10} {'x nonpriv':>9} {'cpu x':>6} {'mem MB':>8} {'mem x':>6} "
          f"{'x np-comp':>9} {'mem x np-c':>10} {'vs opacus':>9} {'1st step s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:>19} error: {r['error']}")
            continue
        print(f"{r['method']:>19} {r['median_ms']:10.1f} {r.get('time_ratio', nan):9.2f} "
              f"{r.get('cpu_ratio', nan):6.2f} {r['peak_mem_mb']:8.1f} {r.get('mem_ratio', nan):6.2f} "
              f"{r.get('time_ratio_vs_compiled', nan):9.2f} {r.get('mem_ratio_vs_compiled', nan):10.2f} "
              f"{r.get('speedup_vs_best_opacus', nan):9.2f} {r['first_step_s']:10.1f}")
    if args.no_save or args.batch != 64:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / (f"dp_step_threads{args.threads}.json" if args.threads else "dp_step.json")
    _write_atomic(json_path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    fields = ["date", "git_sha", "device", "threads", "torch", "opacus", "batch", "method", "median_ms", "p20_ms",
              "p80_ms", "cpu_median_ms", "peak_mem_mb", "time_ratio", "cpu_ratio", "mem_ratio", "time_ratio_vs_compiled",
              "mem_ratio_vs_compiled", "speedup_vs_best_opacus", "first_step_s", "max_rel_grad_error", "error"]
    csv_path = RESULTS / "dp_step.csv"
    # Earlier runs' rows are kept; a run that adds columns rewrites the header, old rows leave them empty.
    old = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    lines = [",".join(fields)] + [",".join(_csv_cell(r.get(k) or None) for k in fields) for r in old]
    for r in rows:
        flat = {**r, "date": meta["date"], "git_sha": meta["git_sha"], "device": meta["device"],
                "threads": meta["threads"],
                "torch": meta["versions"]["torch"], "opacus": meta["versions"]["opacus"], "batch": args.batch}
        lines.append(",".join(_csv_cell(flat.get(k)) for k in fields))
    _write_atomic(csv_path, "\n".join(lines) + "\n")
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return '"' + s.replace('"', "'") + '"' if "," in s else s


if __name__ == "__main__":
    sys.exit(main())
