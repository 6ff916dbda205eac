"""One DP-SGD step against one non-private step on the same UNet and batch: time, peak memory, ratios.

Workload (``bench/workload.py``): the real PrivImage UNet (``--preset``, default "s") in the EDM denoiser with
its zero-initialised weights redrawn, and the fine-tune's EDM loss on ``--batch`` images with ``--k`` noise
draws each (rows = batch·K); the engine clips each image's K rows together (``groups``). ``--dtype bfloat16``
runs the forward under bf16 autocast, as the fine-tune does on CUDA.

Methods: ``nonprivate`` (the rows' losses summed, one backward), the engine's ``bk-mixed``, ``ghost`` and
``vmap``, and Opacus 1.6's ``opacus-hooks`` (GradSampleModule + DPOptimizer) and ``opacus-ghost``
(GradSampleModuleFastGradientClipping with ghost clipping); Opacus has no groups, so it clips each row as a
sample: the same rows and arithmetic, a lower bound of what grouping would cost it. Each step includes the
optimizer step. ``nonprivate-compiled`` compiles the loss (``torch.compile(EDMLoss.compute, fullgraph=True)``,
the pre-training step's compiled region) and ``bk-mixed-compiled`` is ``DPEngine(..., compile=True)``; their
compile time is the first step's, reported apart (``first_step_s``), never in the step times.

Memory: growth of the peak over one step after a warm-up step (for the compiled methods: compilation), model
and batch allocated before (``harness.PeakMemory``). On CUDA: ``max_memory_allocated``, all methods in one
process. On the CPU: the peak resident set, each method in a fresh process. Time: all methods in one
process, round-robin (each round runs every method once), ``--warmup`` rounds then ``--repeats`` timed rounds
(the device synchronised after each step); the median wall time (p20/p80 beside), the median CPU time, and
ratios taken per round against the non-private step of the same round, so load from other jobs falls on all
methods alike. ``*_vs_compiled`` ratios are to ``nonprivate-compiled``.

Check (``--check-only``, or after the timing when compiled methods ran): compiled against eager at σ = 0, in
float32 (TF32 off), for the non-private step and for bk-mixed: per parameter max|g_compiled − g_eager| /
max|g_eager|, the worst parameter reported as ``max_rel_grad_error``.

Usage:
    python bench/dp_step.py                 # batch 64, K = 1, all methods: bench/results/dp_step.{json,csv}
    python bench/dp_step.py --device cuda --batch 256 --k 8 --dtype bfloat16 --json out.json
    python bench/dp_step.py --batch 8 --repeats 2 --methods nonprivate bk-mixed   # quick check, not saved
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import workload  # noqa: E402

METHODS = ["nonprivate", "bk-mixed", "ghost", "vmap", "opacus-hooks", "opacus-ghost", "nonprivate-compiled",
           "bk-mixed-compiled"]
MAX_GRAD_NORM = 1e-3  # the official fine-tune's C; the same in the check, so compiled regions are shared


class _RowLosses(torch.nn.Module):
    """Opacus' DPLossFastGradientClipping takes a criterion with a ``reduction``: here the "output" is already
    the rows' losses, so the criterion returns them (or their mean)."""

    reduction = "mean"

    def forward(self, losses, target):
        return losses if self.reduction == "none" else losses.mean()


def make_step(method: str, args, *, noise_multiplier: float = 1.0):
    """(one full training step of ``method``, parameter count) on a fresh UNet and the run's fixed batch."""
    from privimage.engine import DPEngine

    device = torch.device(args.device)
    den = workload.denoiser(args.preset, device=device)
    bt = workload.batch(args.batch, k=args.k, resolution=den.net.config.resolution, device=device,
                        dtype=args.torch_dtype)
    rows = float(bt.rows)
    opt = torch.optim.SGD(den.parameters(), lr=1e-4)
    params = sum(p.numel() for p in den.parameters())
    if method in ("nonprivate", "nonprivate-compiled"):
        compute = bt.loss.compute
        if method == "nonprivate-compiled":
            compute = torch.compile(compute, fullgraph=True, dynamic=False, backend=args.compile_backend)

        def step():
            with bt.autocast():
                total = compute(den, bt.x, *bt.drawn).sum() / rows
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif method in ("bk-mixed", "ghost", "vmap", "bk-mixed-compiled"):
        compiled = method == "bk-mixed-compiled"
        engine = DPEngine(den, max_grad_norm=MAX_GRAD_NORM, noise_multiplier=noise_multiplier,
                          expected_batch_size=float(args.batch), method="bk-mixed" if compiled else method,
                          compile=compiled, compile_backend=args.compile_backend,
                          generator=torch.Generator(device).manual_seed(0))

        def step():
            engine.step(bt.per_row_loss, groups=bt.groups)
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif method == "opacus-hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        gsm = GradSampleModule(den)
        dp_opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1e-4), noise_multiplier=noise_multiplier,
                             max_grad_norm=MAX_GRAD_NORM, expected_batch_size=bt.rows, loss_reduction="mean")

        def step():
            bt.per_row_loss(gsm).mean().backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    elif method == "opacus-ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        gsm = GradSampleModuleFastGradientClipping(den, max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True,
                                                   loss_reduction="mean")
        dp_opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=1e-4),
                                                 noise_multiplier=noise_multiplier, max_grad_norm=MAX_GRAD_NORM,
                                                 expected_batch_size=bt.rows, loss_reduction="mean")
        crit = DPLossFastGradientClipping(gsm, dp_opt, _RowLosses(), loss_reduction="mean")

        def step():
            crit(bt.per_row_loss(gsm), None).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
    return step, params


def compiled_gradient_error(args) -> dict:
    """Compiled against eager at σ = 0 in float32 with TF32 off (module docstring): a timing of compiled code
    is worth reporting only with its accuracy."""
    from privimage.engine import DPEngine

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def grads(method, compiled):
        den = workload.denoiser(args.preset, device=device)
        bt = workload.batch(args.batch, k=args.k, resolution=den.net.config.resolution, device=device)
        if method == "nonprivate":
            compute = bt.loss.compute
            if compiled:
                compute = torch.compile(compute, fullgraph=True, dynamic=False, backend=args.compile_backend)
            compute(den, bt.x, *bt.drawn).sum().backward()
        else:
            engine = DPEngine(den, max_grad_norm=MAX_GRAD_NORM, noise_multiplier=0.0,
                              expected_batch_size=float(args.batch), compile=compiled,
                              compile_backend=args.compile_backend)
            engine.step(bt.per_row_loss, groups=bt.groups)
            engine.close()
        return {n: p.grad for n, p in den.named_parameters()}

    out = {}
    for method in ("nonprivate", "bk-mixed"):
        t0 = time.perf_counter()
        ref = grads(method, False)
        got = grads(method, True)
        errs = {n: float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-30)) for n in ref}
        worst = max(errs, key=errs.get)
        out[f"{method}-compiled"] = {"max_rel_grad_error": errs[worst], "worst_param": worst,
                                     "check_s": round(time.perf_counter() - t0, 1), "preset": args.preset,
                                     "batch": args.batch, "k": args.k, "dtype": "float32",
                                     "compile_backend": args.compile_backend}
        print(f"{method}-compiled: max relative gradient error vs eager {errs[worst]:.2e} ({worst})", flush=True)
    return out


def measure_memory(methods, args, warm_steps: dict | None = None) -> list[dict]:
    """Peak memory growth over one step after a warm-up step, per method (``harness.PeakMemory``)."""
    rows = []
    for method in methods:
        try:
            step, params = warm_steps[method] if warm_steps else make_step(method, args)
            t0 = time.perf_counter()
            step()
            harness.sync(args.device)
            first = time.perf_counter() - t0
            with harness.PeakMemory(args.device) as mem:
                step()
            rows.append({"method": method, "peak_mem_mb": mem.mb, "params": params, "first_step_s": first})
        except Exception as e:  # a method that fails is a result (e.g. out of memory), the others go on
            rows.append({"method": method, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
        print(f"{method:>19}: " + (f"peak +{rows[-1]['peak_mem_mb']:7.1f} MB" if "error" not in rows[-1]
                                   else rows[-1]["error"]), flush=True)
    return rows


def memory_in_fresh_processes(args) -> list[dict]:
    """CPU: one process per method, so each method's peak resident set is its own."""
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--worker", method] + _forwarded(args)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{method}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method:>19}: peak +{rows[-1]['peak_mem_mb']:7.1f} MB", flush=True)
    return rows


def _forwarded(args) -> list[str]:
    out = ["--preset", args.preset, "--batch", str(args.batch), "--k", str(args.k), "--device", args.device,
           "--dtype", args.dtype, "--compile-backend", args.compile_backend]
    return out + (["--threads", str(args.threads)] if args.threads else [])


def measure_times(steps: dict, args, on_round=None) -> dict:
    """Round-robin timing in one process: every round runs each method once, so load from other jobs on a
    shared machine falls on all methods alike. Per method: wall and CPU medians of the timed rounds and the
    per-round ratios to the non-private step of the same round."""
    methods = list(steps)
    wall = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    out = {}
    for i in range(args.warmup + args.repeats):
        for m in methods:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[m]()
            harness.sync(args.device)
            if i >= args.warmup:
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        if i < args.warmup:
            continue
        print(f"round {i + 1 - args.warmup}/{args.repeats}: " + ", ".join(
            f"{m} {1e3 * wall[m][-1]:.0f} ms" for m in methods), file=sys.stderr, flush=True)
        for m in methods:
            med, p20, p80 = harness.summarize(wall[m])
            row = {"median_ms": med, "p20_ms": p20, "p80_ms": p80,
                   "cpu_median_ms": 1e3 * statistics.median(cpu[m]), "rounds": len(wall[m])}
            for base, key in (("nonprivate", "time_ratio"), ("nonprivate-compiled", "time_ratio_vs_compiled")):
                if base in methods:
                    row[key] = statistics.median(a / b for a, b in zip(wall[m], wall[base]))
            if "nonprivate" in methods:
                row["cpu_ratio"] = statistics.median(a / b for a, b in zip(cpu[m], cpu["nonprivate"]))
            out[m] = row
        if on_round:
            on_round(out)
    return out


def combine(rows: list[dict], times: dict) -> list[dict]:
    """Rows with their times and the ratios between methods (memory to non-private, speed to best Opacus)."""
    ok = {r["method"]: r for r in rows if "error" not in r}
    for r in ok.values():
        r.update(times.get(r["method"], {}))
        for base, key in (("nonprivate", "mem_ratio"), ("nonprivate-compiled", "mem_ratio_vs_compiled")):
            if base in ok and ok[base]["peak_mem_mb"] > 0:
                r[key] = r["peak_mem_mb"] / ok[base]["peak_mem_mb"]
    opacus = [r["median_ms"] for m, r in ok.items() if m.startswith("opacus") and "median_ms" in r]
    for r in ok.values():
        if opacus and "median_ms" in r:
            r["speedup_vs_best_opacus"] = min(opacus) / r["median_ms"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="s", help="UNet preset (privimage.models.PRESETS); default %(default)s")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--k", type=int, default=1, help="noise draws (rows) per image, clipped together")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: the forward under bf16 autocast")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier ratios on a CPU shared with other jobs")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--memory", choices=["auto", "in-process", "fresh-process"], default="auto",
                    help="auto: in-process on CUDA, a fresh process per method on the CPU")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (rewritten as they come)")
    ap.add_argument("--no-save", action="store_true", help="print only (default when --batch is not 64)")
    ap.add_argument("--no-check", action="store_true", help="skip the compiled-vs-eager gradient check")
    ap.add_argument("--check-only", action="store_true", help="only the compiled-vs-eager gradient check")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.torch_dtype = workload.parse_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(measure_memory([args.worker], args)[0]))
        return 0

    meta = harness.environment(device, preset=args.preset, batch=args.batch, k=args.k, rows=args.batch * args.k,
                               dtype=args.dtype, max_grad_norm=MAX_GRAD_NORM, warmup=args.warmup,
                               repeats=args.repeats, compile_backend=args.compile_backend,
                               model=f"privimage UNet preset {args.preset!r} (EDM denoiser, zero-init weights "
                                     "redrawn), EDM loss with K rows per image",
                               memory=("max_memory_allocated growth over the second step, one process"
                                       if device.type == "cuda" else
                                       "peak RSS growth (VmHWM, reset after malloc_trim) over the second step, "
                                       "fresh process per method"),
                               timing="round-robin in one process; ratios are medians of per-round ratios")
    if device.type == "cuda":
        meta["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    out_path = args.json
    if out_path is None and not args.no_save and args.batch == 64 and args.k == 1:
        out_path = harness.results_dir() / (f"dp_step_threads{args.threads}.json" if args.threads else "dp_step.json")
    result = {"meta": meta, "rows": [], "check": {}}

    def save():
        if out_path is not None:
            harness.write_json(out_path, result)

    if args.check_only:
        result["check"] = compiled_gradient_error(args)
        save()
        return 0

    if args.memory == "in-process" or (args.memory == "auto" and device.type == "cuda"):
        # memory in this process; the warm steps are then timed
        steps = {}
        for m in args.methods:
            try:
                steps[m] = make_step(m, args)
            except Exception as e:
                result["rows"].append({"method": m, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        result["rows"] += measure_memory(list(steps), args, warm_steps=steps)
        timed = {r["method"]: steps[r["method"]][0] for r in result["rows"] if "error" not in r}
    else:
        result["rows"] = memory_in_fresh_processes(args)
        timed = {r["method"]: make_step(r["method"], args)[0] for r in result["rows"] if "error" not in r}
    save()

    def on_round(times):
        combine(result["rows"], times)
        save()

    times = measure_times(timed, args, on_round=on_round)
    combine(result["rows"], times)
    if not args.no_check and any(m.endswith("-compiled") for m in timed):
        result["check"] = compiled_gradient_error(args)
        for r in result["rows"]:
            r.update(result["check"].get(r["method"], {}))
    save()
    print_table(result["rows"])
    if out_path is not None and args.json is None:
        append_csv(result, harness.results_dir() / "dp_step.csv")
        print(f"wrote {out_path} and {harness.results_dir() / 'dp_step.csv'}")
    return 0


def print_table(rows):
    nan = float("nan")
    print(f"\n{'method':>19} {'median ms':>10} {'x nonpriv':>9} {'cpu x':>6} {'mem MB':>8} {'mem x':>6} "
          f"{'x np-comp':>9} {'mem x np-c':>10} {'vs opacus':>9} {'1st step s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:>19} error: {r['error']}")
            continue
        print(f"{r['method']:>19} {r.get('median_ms', nan):10.1f} {r.get('time_ratio', nan):9.2f} "
              f"{r.get('cpu_ratio', nan):6.2f} {r['peak_mem_mb']:8.1f} {r.get('mem_ratio', nan):6.2f} "
              f"{r.get('time_ratio_vs_compiled', nan):9.2f} {r.get('mem_ratio_vs_compiled', nan):10.2f} "
              f"{r.get('speedup_vs_best_opacus', nan):9.2f} {r['first_step_s']:10.1f}")


CSV_FIELDS = ["date", "git_sha", "device", "threads", "torch", "opacus", "batch", "method", "median_ms", "p20_ms",
              "p80_ms", "cpu_median_ms", "peak_mem_mb", "time_ratio", "cpu_ratio", "mem_ratio",
              "time_ratio_vs_compiled", "mem_ratio_vs_compiled", "speedup_vs_best_opacus", "first_step_s",
              "max_rel_grad_error", "error", "preset", "k", "dtype"]


def append_csv(result: dict, path: Path) -> None:
    """Earlier runs' rows are kept; a run that adds columns rewrites the header, old rows leave them empty."""
    meta = result["meta"]
    old = list(csv.DictReader(path.open())) if path.exists() else []
    lines = [",".join(CSV_FIELDS)] + [",".join(_csv_cell(r.get(k) or None) for k in CSV_FIELDS) for r in old]
    for r in result["rows"]:
        flat = {**r, "date": meta["date"], "git_sha": meta["git_sha"], "device": meta["device"],
                "threads": meta["threads"], "torch": meta["versions"]["torch"], "opacus": meta["versions"]["opacus"],
                "batch": meta["batch"], "preset": meta["preset"], "k": meta["k"], "dtype": meta["dtype"]}
        lines.append(",".join(_csv_cell(flat.get(k)) for k in CSV_FIELDS))
    harness.write_atomic(path, "\n".join(lines) + "\n")


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return '"' + s.replace('"', "'") + '"' if "," in s else s


if __name__ == "__main__":
    sys.exit(main())
