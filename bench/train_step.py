"""Training throughput of the PrivImage UNet: non-private pre-training step vs DP fine-tuning step.

For each preset ("s", "b") at 32×32 it times the FULL step of each loop, as the loops run it:

* ``pretrain``: draw σ/noise/label dropout, EDM loss (K = 1), backward, Adam, EMA update;
* ``dp``: the same images with K noise draws each, through ``DPEngine.accumulate`` (per-sample clipping of
  each image's K rows together, bk-mixed) and ``finalize`` (noise, divide by the expected batch size), Adam,
  EMA update.

Images/s counts images (not rows); the DP/non-private ratio is reported at K = 1 (same rows, the engine's
overhead) and at the chosen K (the cost of noise multiplicity too). Medians over ``--repeats`` steps after
``--warmup``; wall clock and process CPU time (steadier on a shared CPU). Results:
``bench/results/train_step.json`` and ``train_step.md`` with device, versions, git sha and date.

Usage:
    python bench/train_step.py                       # batch 16, K in {1, 4}, presets s and b (~2-3 min, 2-core CPU)
    python bench/train_step.py --batch 64 --device cuda --compile
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, _versions, device_name, git_sha, summarize, sync  # noqa: E402

from privimage.diffusion import EDMDenoiser, EDMLoss, EMA  # noqa: E402
from privimage.engine import DPEngine  # noqa: E402
from privimage.models import build_unet, count_parameters  # noqa: E402


def _time(fn, warmup: int, repeats: int, device) -> dict:
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


def bench_preset(name: str, *, batch: int, ks: list[int], warmup: int, repeats: int, device, compile: bool) -> dict:
    torch.manual_seed(0)
    net = build_unet(name).to(device)
    den = EDMDenoiser(net)
    ema = EMA(den, 0.999)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(10, (batch,), device=device)
    amp = dict(device_type=torch.device(device).type, dtype=torch.bfloat16,
               enabled=torch.device(device).type == "cuda")
    gen = torch.Generator(device).manual_seed(0)
    out = {"preset": name, "parameters": count_parameters(net), "batch": batch}

    loss1 = EDMLoss(num_noise=1)
    compute = torch.compile(loss1.compute, fullgraph=True) if compile else loss1.compute

    def pretrain_step():
        drawn = loss1.draw(x, y, num_classes=10, generator=gen)
        with torch.autocast(**amp):
            total = compute(den, x, *drawn).sum() / batch
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        ema.update(den)

    if compile:
        t0 = time.perf_counter()
        pretrain_step()
        sync(device)
        out["compile_s"] = time.perf_counter() - t0
    out["pretrain"] = _time(pretrain_step, warmup, repeats, device)
    out["pretrain"]["images_per_s"] = batch / (out["pretrain"]["median_ms"] / 1e3)

    engine = DPEngine(den, max_grad_norm=1e-3, noise_multiplier=1.0, expected_batch_size=batch, generator=gen)
    for k in ks:
        loss = EDMLoss(num_noise=k)

        def dp_step(loss=loss):
            drawn = loss.draw(x, y, num_classes=10, generator=gen)

            def loss_fn(model):
                with torch.autocast(**amp):
                    return loss.compute(model, x, *drawn)

            engine.accumulate(loss_fn, groups=loss.groups(batch, device))
            engine.finalize()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(den)

        r = _time(dp_step, warmup, repeats, device)
        r["images_per_s"] = batch / (r["median_ms"] / 1e3)
        r["ratio_vs_pretrain"] = r["median_ms"] / out["pretrain"]["median_ms"]
        r["cpu_ratio_vs_pretrain"] = r["cpu_median_ms"] / out["pretrain"]["cpu_median_ms"]
        out[f"dp_k{k}"] = r
    engine.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["s", "b"])
    parser.add_argument("--batch", type=int, default=16, help="images per step (default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4], help="noise draws per image for the DP step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the pre-training loss step")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch_v, triton_v = _versions()
    meta = {"device": device_name(args.device), "torch": torch_v, "triton": triton_v, "git_sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "resolution": 32, "dp_method": "bk-mixed", "compile": args.compile}
    results = []
    for name in args.presets:
        r = bench_preset(name, batch=args.batch, ks=args.k, warmup=args.warmup, repeats=args.repeats,
                         device=args.device, compile=args.compile)
        results.append(r)
        line = (f"{name}: {r['parameters'] / 1e6:.2f}M params, batch {args.batch}: pretrain "
                f"{r['pretrain']['images_per_s']:.1f} img/s")
        for k in args.k:
            d = r[f"dp_k{k}"]
            line += (f"; DP K={k} {d['images_per_s']:.1f} img/s (x{d['ratio_vs_pretrain']:.2f} wall, "
                     f"x{d['cpu_ratio_vs_pretrain']:.2f} cpu)")
        print(line, flush=True)
    if args.no_save:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"# Training step throughput ({meta['device']}, torch {torch_v}, {meta['date']}, git {meta['git_sha']})",
             "", "| preset | params | batch | mode | median ms | img/s | DP / non-private (wall) | (cpu) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["pretrain"]
        lines.append(f"| {r['preset']} | {r['parameters']:,} | {r['batch']} | pretrain (K=1) | "
                     f"{p['median_ms']:.0f} | {p['images_per_s']:.1f} | 1.00 | 1.00 |")
        for k in args.k:
            d = r[f"dp_k{k}"]
            lines.append(f"| {r['preset']} | {r['parameters']:,} | {r['batch']} | DP fine-tune (K={k}) | "
                         f"{d['median_ms']:.0f} | {d['images_per_s']:.1f} | {d['ratio_vs_pretrain']:.2f} | "
                         f"{d['cpu_ratio_vs_pretrain']:.2f} |")
    (RESULTS / "train_step.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
