"""The distributed DP step's cost: bytes all-reduced per logical step, the 1-rank overhead, an 8-GPU projection.

1. **Communication.** One all-reduce (SUM) per logical step of one flat buffer: every trainable parameter's
   clipped sum in float32 plus three counts (:class:`privimage.engine.distributed.GradientReducer`), for the
   UNet of each preset (``--presets``). A ring all-reduce moves 2(W−1)/W × the buffer per rank.
2. **Overhead at world 1** (this machine): one logical step (``accumulate`` of one physical batch, then
   ``finalize``) of the plain engine against the same engine with a 1-rank process group (gloo on the CPU,
   NCCL with ``--device cuda``), timed in alternating rounds in one process (``--repeats``), so that a
   shared machine's load falls on both alike. The target is ≤ 5%.
3. **Flat vs bucketed all-reduce at world 2** (this machine, gloo, two processes): the engine's
   :meth:`~privimage.engine.distributed.GradientReducer.all_reduce` of every parameter's clipped sum, as one
   flat buffer or in asynchronous buckets of ``--bucket-kib`` KiB, timed in alternating rounds in one run
   (``--allreduce-repeats``); the default of ``DEFAULT_BUCKET_BYTES`` follows from this table. CPU only (a
   GPU session has one GPU: no second rank).
4. **Projection** of the official CIFAR-10 fine-tune on W GPUs (``--gpus``): steps × (T₁/W + all-reduce time),
   with T₁ the 1-GPU logical step time and the all-reduce at an NCCL bus bandwidth (``--busbw-gbs``). No GPU
   has measured T₁ yet, so it is an INPUT (``--step-s``, a list), and the table says so: a projection, never a
   measurement. (The perfectly divisible compute T₁/W ignores the straggler of an uneven Poisson split.)

    python bench/distributed.py                   # writes bench/results/distributed.{md,json}
    python bench/distributed.py --device cuda --json out/distributed.json   # NCCL at world 1; out/*.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import workload  # noqa: E402

from privimage.config import CONFIGS  # noqa: E402
from privimage.engine import DPEngine  # noqa: E402

# (channels, classes) of each preset's sensitive data (the UNet's shape depends on them)
DATA_SHAPE = {"demo": (3, 5), "test": (3, 5), "cifar10-eps10": (3, 10), "celeba32-eps10": (3, 2),
              "celeba64-eps10": (3, 2)}
COUNTS = 3  # num_samples, num_nonfinite, loss_sum ride in the buffer


def buffer_bytes(preset: str) -> dict:
    from privimage.models import UNet

    cfg = CONFIGS[preset]
    channels, classes = DATA_SHAPE[preset]
    net = UNet(cfg.unet_config(channels=channels, num_classes=classes))
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"preset": preset, "model": cfg.model, "resolution": cfg.data.resolution, "parameters": params,
            "buffer_bytes": 4 * (params + COUNTS)}


def overhead(preset: str, images: int, k: int, repeats: int, device: str = "cpu") -> dict:
    """Median ms of one logical step, plain vs with a 1-rank group (gloo; NCCL on CUDA), in alternating rounds."""
    cfg = CONFIGS[preset]
    channels, classes = DATA_SHAPE[preset]
    unet = cfg.unet_config(channels=channels, num_classes=classes)
    batch = workload.batch(images, k=k, resolution=unet.resolution, channels=channels, num_classes=classes,
                           device=device)
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            engines = {}
            for name, group in (("plain", None), ("distributed", dist.group.WORLD)):
                den = workload.denoiser(unet, device=device)
                engines[name] = DPEngine(den, max_grad_norm=1e-3, noise_multiplier=1.0, expected_batch_size=images,
                                         generator=torch.Generator(device).manual_seed(0), process_group=group)

            def step(engine):
                engine.accumulate(batch.per_row_loss, groups=batch.groups)
                engine.finalize()

            for engine in engines.values():  # warm-up (plans, allocator)
                step(engine)
            times = {name: [] for name in engines}
            for _ in range(repeats):
                for name, engine in engines.items():
                    times[name].append(harness.time_steps(lambda: step(engine), warmup=0, repeats=1,
                                                          device=device)["median_ms"])
            bytes_step = engines["distributed"]._reducer.bytes_last_step
        finally:
            dist.destroy_process_group()
    med = {name: harness.summarize([t / 1e3 for t in ts]) for name, ts in times.items()}
    plain, distributed = med["plain"][0], med["distributed"][0]
    return {"preset": preset, "device": device, "backend": backend, "images": images, "k": k, "repeats": repeats,
            "plain_ms": plain,
            "distributed_ms": distributed, "ratio": distributed / plain, "bytes_all_reduced": bytes_step,
            "plain_p20_p80_ms": med["plain"][1:], "distributed_p20_p80_ms": med["distributed"][1:]}


def _allreduce_rank(rank: int, world: int, store: str, preset: str, variants: list, repeats: int, out: str) -> None:
    """One rank of :func:`allreduce_variants` (a module-level function: it is spawned)."""
    import json

    from privimage.engine.distributed import GradientReducer, _buckets
    from privimage.models import UNet

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = CONFIGS[preset]
        channels, classes = DATA_SHAPE[preset]
        torch.manual_seed(rank)
        net = UNet(cfg.unet_config(channels=channels, num_classes=classes))
        tensors = [torch.randn_like(p) for p in net.parameters() if p.requires_grad]
        reducer = GradientReducer(dist.group.WORLD)
        times = {str(v): [] for v in variants}
        for round_ in range(repeats + 1):  # round 0 warms up
            for v in variants:
                reducer.bucket_bytes = None if v is None else v * 1024
                dist.barrier()
                t0 = time.perf_counter()
                reducer.all_reduce(tensors, (1.0, 0.0, 2.0))
                elapsed = time.perf_counter() - t0
                if round_:
                    times[str(v)].append(elapsed)
        if rank == 0:
            buffers = {str(v): len(_buckets(tensors, None if v is None else v * 1024)) for v in variants}
            Path(out).write_text(json.dumps({"times": times, "buffers": buffers}))
    finally:
        dist.destroy_process_group()


def allreduce_variants(preset: str, bucket_kib: list[int], repeats: int) -> dict:
    """Median ms of GradientReducer.all_reduce at world 2 (gloo, 2 processes): flat vs each bucket size."""
    import json

    import torch.multiprocessing as mp

    variants = [None, *bucket_kib]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.json"
        mp.spawn(_allreduce_rank, args=(2, f"{tmp}/store", preset, variants, repeats, out), nprocs=2, join=True)
        data = json.loads(Path(out).read_text())
    rows = []
    for v in variants:
        med, p20, p80 = harness.summarize(data["times"][str(v)])
        rows.append({"bucket_kib": v, "buffers": data["buffers"][str(v)], "median_ms": med, "p20_ms": p20,
                     "p80_ms": p80})
    flat = rows[0]["median_ms"]
    for r in rows:
        r["ratio_to_flat"] = r["median_ms"] / flat
    return {"preset": preset, "world_size": 2, "backend": "gloo", "repeats": repeats,
            "parameters": buffer_bytes(preset)["parameters"], "rows": rows}


def projection(preset: str, gpus: list[int], step_s: list[float], busbw_gbs: list[float]) -> dict:
    from privimage.preflight import plan_budget

    cfg = CONFIGS[preset]
    n = 50_000  # CIFAR-10's training split
    budget = plan_budget(cfg, n)
    plan = budget.plan["finetune"]
    size = buffer_bytes(preset)["buffer_bytes"]
    rows = []
    for t1 in step_s:
        for w in gpus:
            for bw in busbw_gbs:
                comm = 2 * (w - 1) / w * size / (bw * 1e9)
                step = t1 / w + comm
                rows.append({"T1_s": t1, "gpus": w, "busbw_GBs": bw, "allreduce_ms": 1e3 * comm, "step_s": step,
                             "hours": plan.count * step / 3600})
    return {"preset": preset, "steps": plan.count, "sample_rate": plan.sample_rate,
            "expected_batch": plan.sample_rate * n, "buffer_bytes": size, "rows": rows}


def markdown(env, sizes, over, proj, buckets=()) -> str:
    lines = ["# Distributed DP fine-tune: communication, 1-rank overhead, 8-GPU projection", "",
             f"Made by `{env['command']}` on {env['date']} (git {env['git_sha']}), {env['device']}, torch "
             f"{env['versions']['torch']}, {env['threads']} thread(s), load average {env['load_average_1m']}.", "",
             "## Bytes all-reduced per logical step (one flat float32 buffer: clipped sums + 3 counts)", "",
             "| preset | UNet | resolution | parameters | buffer | per rank, ring, W=8 |", "|---|---|---|---|---|---|"]
    for s in sizes:
        lines.append(f"| {s['preset']} | {s['model']} | {s['resolution']} | {s['parameters']:,} | "
                     f"{s['buffer_bytes'] / 2**20:.2f} MiB | {2 * 7 / 8 * s['buffer_bytes'] / 2**20:.2f} MiB |")
    o = over
    where = "this CPU" if o.get("device", "cpu") == "cpu" else env["device"]
    lines += ["", f"## Overhead of the 1-rank distributed path ({o.get('backend', 'gloo')}) on {where}, "
              f"{o['preset']} UNet, {o['images']} images × K={o['k']}, {o['repeats']} alternating rounds", "",
              "| path | median ms | p20–p80 ms |", "|---|---|---|",
              f"| plain engine | {o['plain_ms']:.1f} | {o['plain_p20_p80_ms'][0]:.1f}–{o['plain_p20_p80_ms'][1]:.1f} |",
              f"| process_group (world 1) | {o['distributed_ms']:.1f} | {o['distributed_p20_p80_ms'][0]:.1f}–"
              f"{o['distributed_p20_p80_ms'][1]:.1f} |", "",
              f"Ratio distributed / plain: **{o['ratio']:.3f}** (target ≤ 1.05); {o['bytes_all_reduced']:,} bytes "
              f"all-reduced per step.", ""]
    for bk in buckets:
        lines += [f"## Flat vs bucketed all-reduce, world 2 (gloo, 2 processes on this CPU), {bk['preset']} UNet "
                  f"({bk['parameters']:,} parameters), {bk['repeats']} alternating rounds", "",
                  "| buffers | bucket | median ms | p20–p80 ms | / flat |", "|---|---|---|---|---|"]
        for r in bk["rows"]:
            what = "one flat buffer" if r["bucket_kib"] is None else f"{r['bucket_kib']} KiB, async"
            lines.append(f"| {r['buffers']} | {what} | {r['median_ms']:.2f} | {r['p20_ms']:.2f}–{r['p80_ms']:.2f} | "
                         f"{r['ratio_to_flat']:.3f} |")
        lines.append("")
    if buckets:
        from privimage.engine.distributed import DEFAULT_BUCKET_BYTES

        default = "one flat buffer" if DEFAULT_BUCKET_BYTES is None else f"{DEFAULT_BUCKET_BYTES // 1024} KiB buckets"
        best = [(bk["preset"], min(bk["rows"], key=lambda r: r["median_ms"])) for bk in buckets]
        verdict = "; ".join(f"{name}: " + ("one flat buffer" if r["bucket_kib"] is None else
                                           f"{r['bucket_kib']} KiB buckets ({r['ratio_to_flat']:.3f}× flat)")
                            for name, r in best)
        flat_wins = all(r["bucket_kib"] is None for _, r in best)
        lines += [f"Fastest median here: {verdict}" + (": bucketing does not pay on this machine." if flat_wins else ".")]
        lines += [f"The engine's default (`DEFAULT_BUCKET_BYTES`) at this commit: **{default}**. Buckets overlap "
                  "packing and unpacking with the transfer, not the backward pass (a clipped sum exists only after "
                  "the whole backward: `GradientReducer`'s docstring). For scale: the 1-rank logical step above "
                  f"takes {over['plain_ms']:.0f} ms.", ""]
    lines += [f"## PROJECTION (not a measurement): official {proj['preset']} fine-tune on GPUs", "",
              f"{proj['steps']} logical steps of expected size {proj['expected_batch']:.0f} (q = "
              f"{proj['sample_rate']:.4g}); {proj['buffer_bytes'] / 2**20:.2f} MiB all-reduced per step. T₁, the "
              "1-GPU logical step time, is an ASSUMED input (no GPU measurement exists yet); the all-reduce time "
              "is 2(W−1)/W × buffer / bus bandwidth (an assumed NCCL bus bandwidth over NVLink). Compute is taken "
              "as T₁/W (perfect split).", "",
              "| T₁ (assumed, s) | GPUs | busbw (assumed, GB/s) | all-reduce ms | step s | fine-tune hours |",
              "|---|---|---|---|---|---|"]
    for r in proj["rows"]:
        lines.append(f"| {r['T1_s']:g} | {r['gpus']} | {r['busbw_GBs']:g} | {r['allreduce_ms']:.2f} | "
                     f"{r['step_s']:.3f} | {r['hours']:.2f} |")
    lines += ["", "When a GPU session measures T₁ (`bench/finetune_projection.py --device cuda`), rerun with "
              "`--step-s T1` to replace the assumption.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["demo", "cifar10-eps10"])
    ap.add_argument("--overhead-preset", default="demo")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bucket-presets", nargs="+", default=["demo", "cifar10-eps10"])
    ap.add_argument("--bucket-kib", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--allreduce-repeats", type=int, default=40)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--step-s", type=float, nargs="+", default=[10.0, 30.0, 90.0])
    ap.add_argument("--busbw-gbs", type=float, nargs="+", default=[100.0, 400.0])
    ap.add_argument("--device", default="cpu", help="cpu (gloo; default) or cuda[:N] (NCCL at world 1, no 2-rank part)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/distributed.md (and .json)")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the results to this JSON file (and the table beside it, .md) instead of --out")
    args = ap.parse_args()
    device = "cuda:0" if args.device == "cuda" else args.device
    env = harness.environment(device)
    sizes = [buffer_bytes(p) for p in args.presets]
    over = overhead(args.overhead_preset, args.images, args.k, args.repeats, device)
    buckets = ([allreduce_variants(p, args.bucket_kib, args.allreduce_repeats) for p in args.bucket_presets]
               if torch.device(device).type == "cpu" else [])
    proj = projection("cifar10-eps10", args.gpus, args.step_s, args.busbw_gbs)
    out = args.json.with_suffix(".md") if args.json else args.out or harness.results_dir() / "distributed.md"
    harness.write_json(args.json or out.with_suffix(".json"), {"environment": env, "sizes": sizes, "overhead": over,
                                                                "allreduce_buckets": buckets, "projection": proj})
    harness.write_atomic(out, markdown(env, sizes, over, proj, buckets))
    print(out.read_text())


if __name__ == "__main__":
    main()
