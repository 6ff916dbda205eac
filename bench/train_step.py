"""Training throughput of the PrivImage UNet: non-private pre-training step vs DP fine-tuning step.

For each preset ("s", "b") at 32×32 it times the FULL step of each loop, as the loops run it:

* ``pretrain``: draw σ/noise/label dropout, EDM loss (K = 1), backward, Adam, EMA update;
* ``dp``: the same images with K noise draws each, through ``DPEngine.accumulate`` (per-sample clipping of
  each image's K rows together, bk-mixed) and ``finalize`` (noise, divide by the expected batch size), Adam,
  EMA update.

Images/s counts images (not rows); the DP/non-private ratio is reported at K = 1 (same rows, the engine's
overhead) and at the chosen K (the cost of noise multiplicity too). Medians over ``--repeats`` steps after
``--warmup``; wall clock and process CPU time (steadier on a shared CPU). ``--compile`` compiles both steps
(the pre-training loss with ``torch.compile(fullgraph=True)``, the DP step with ``DPEngine(compile=True)``);
the first step, which compiles, is reported apart (``compile_s``). Results: ``train_step.json`` and
``train_step.md`` in ``bench/results`` (``harness.results_dir``), or ``--json PATH``, with device, versions,
git sha and date.

The GAN generator (PRIVIMAGE+G): ``--gan`` times the DP discriminator step against the non-private one and GAN
sampling against the diffusion model's (:mod:`gan_step`, whose options follow ``--gan``); results in
``train_step_gan.json`` and ``train_step_gan.md``.

Usage:
    python bench/train_step.py                       # batch 16, K in {1, 4}, presets s and b (~2-3 min, 2-core CPU)
    python bench/train_step.py --gan --presets demo 32   # the GAN's discriminator step and sampling
    python bench/train_step.py --batch 256 --k 8 --device cuda --compile --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from privimage.diffusion import EDMDenoiser, EDMLoss, EMA  # noqa: E402
from privimage.engine import DPEngine  # noqa: E402
from privimage.models import build_unet, count_parameters  # noqa: E402


def _first(fn, device) -> float:
    """Seconds of one call (the one that compiles, when compiled)."""
    t0 = time.perf_counter()
    fn()
    harness.sync(device)
    return time.perf_counter() - t0


def bench_preset(name: str, *, batch: int, ks: list[int], warmup: int, repeats: int, device, compile: bool,
                 on_result=None) -> dict:
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
        out["compile_s"] = _first(pretrain_step, device)
    out["pretrain"] = harness.time_steps(pretrain_step, warmup=warmup, repeats=repeats, device=device)
    out["pretrain"]["images_per_s"] = batch / (out["pretrain"]["median_ms"] / 1e3)
    if on_result:
        on_result(out)

    engine = DPEngine(den, max_grad_norm=1e-3, noise_multiplier=1.0, expected_batch_size=batch, generator=gen,
                      compile=compile)
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

        first = _first(dp_step, device) if compile else None
        r = harness.time_steps(dp_step, warmup=warmup, repeats=repeats, device=device)
        if first is not None:
            r["compile_s"] = first
        r["images_per_s"] = batch / (r["median_ms"] / 1e3)
        r["ratio_vs_pretrain"] = r["median_ms"] / out["pretrain"]["median_ms"]
        r["cpu_ratio_vs_pretrain"] = r["cpu_median_ms"] / out["pretrain"]["cpu_median_ms"]
        out[f"dp_k{k}"] = r
        if on_result:
            on_result(out)
    engine.close()
    return out


def main() -> int:
    if "--gan" in sys.argv[1:]:
        import gan_step

        return gan_step.main([a for a in sys.argv[1:] if a != "--gan"], stem="train_step_gan",
                             prog="train_step.py --gan")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["s", "b"])
    parser.add_argument("--batch", type=int, default=16, help="images per step (default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4], help="noise draws per image for the DP step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="compile the pre-training loss and the DP step (DPEngine(compile=True))")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (rewritten as results come)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    meta = harness.environment(args.device, resolution=32, dp_method="bk-mixed", compile=args.compile,
                               batch=args.batch, k=args.k, amp="bf16 autocast" if "cuda" in args.device else "none")
    meta["torch"], meta["triton"] = meta["versions"]["torch"], meta["versions"]["triton"]  # the earlier keys
    results = []
    json_path = args.json or (None if args.no_save else harness.results_dir() / "train_step.json")

    def save(partial=None):
        if json_path is not None:
            harness.write_json(json_path, {"meta": meta, "results": results + ([partial] if partial else [])})

    for name in args.presets:
        r = bench_preset(name, batch=args.batch, ks=args.k, warmup=args.warmup, repeats=args.repeats,
                         device=args.device, compile=args.compile, on_result=save)
        results.append(r)
        save()
        line = (f"{name}: {r['parameters'] / 1e6:.2f}M params, batch {args.batch}: pretrain "
                f"{r['pretrain']['images_per_s']:.1f} img/s")
        for k in args.k:
            d = r[f"dp_k{k}"]
            line += (f"; DP K={k} {d['images_per_s']:.1f} img/s (x{d['ratio_vs_pretrain']:.2f} wall, "
                     f"x{d['cpu_ratio_vs_pretrain']:.2f} cpu)")
        print(line, flush=True)
    if args.no_save or args.json:
        return 0
    lines = [f"# Training step throughput ({meta['device']}, torch {meta['torch']}, {meta['date']}, git "
             f"{meta['git_sha']})", "", f"Command: `python bench/{meta['command']}`",
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
    harness.write_atomic(harness.results_dir() / "train_step.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
