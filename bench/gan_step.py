"""PRIVIMAGE+G costs: the DP discriminator step against a non-private one, and GAN vs diffusion sampling.

1. Discriminator step, as the loops run it, on fixed real images, labels and fakes (the fakes' generation is
   the same in both and timed apart): non-private (the pre-training's batch-mean paired hinge, backward,
   Adam) against DP (the same pairs through ``DPEngine.accumulate`` with the pair grouping, bk-mixed, then
   ``finalize``: noise, divide by the expected batch size; Adam). The two are timed alternately, step by
   step, so a shared CPU's drift hits both alike; medians and the ratio come from one run.
2. Sampling images/s: the GAN generator (one forward per image, per-image latents) against the diffusion
   model of the same setting: the CIFAR-10 sizes (GAN "32" vs UNet "s" with DPDM's 50-step sampler) and the
   CPU demo (GAN "demo" vs the demo's UNet with its 30 steps and guidance 1.0, i.e. two forwards a step).

Results: ``bench/results/gan_step.json`` and ``gan_step.md`` with device, versions, git sha and date.

Usage:
    python bench/gan_step.py                      # 2-core CPU: a few minutes
    python bench/gan_step.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, _versions, device_name, git_sha, summarize, sync  # noqa: E402

from privimage.diffusion import EDMDenoiser, SamplerConfig, sample  # noqa: E402
from privimage.engine import DPEngine  # noqa: E402
from privimage.gan import generate, pair_groups, paired_rows, sample_gan  # noqa: E402
from privimage.models import GAN_PRESETS, Discriminator, Generator, build_unet, count_parameters  # noqa: E402


def _timed(fn, device) -> tuple[float, float]:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _stats(wall: list[float], cpu: list[float]) -> dict:
    med, p20, p80 = summarize(wall)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "cpu_median_ms": 1e3 * statistics.median(cpu)}


def bench_discriminator(preset: str, *, batch: int, warmup: int, repeats: int, device) -> dict:
    gan = GAN_PRESETS[preset]
    torch.manual_seed(0)
    G, D = Generator(gan).to(device), Discriminator(gan).to(device)
    shape = (batch, gan.in_channels, gan.resolution, gan.resolution)
    x = torch.rand(shape, device=device) * 2 - 1
    y = torch.randint(gan.num_classes, (batch,), device=device)
    z = torch.randn(batch, gan.z_dim, device=device)
    fake = generate(G, z, y)
    opt = torch.optim.Adam(D.parameters(), lr=5e-4, betas=(0.0, 0.999))
    engine = DPEngine(D, max_grad_norm=1e-3, noise_multiplier=1.0, expected_batch_size=batch,
                      generator=torch.Generator(device).manual_seed(0))
    groups = pair_groups(batch, device)

    def non_private():
        loss = paired_rows(D, x, y, fake, y).sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def dp():
        engine.accumulate(lambda m: paired_rows(m, x, y, fake, y), groups=groups)
        engine.finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        non_private(), dp()
    times = {"non_private": ([], []), "dp": ([], []), "fakes": ([], [])}
    for _ in range(repeats):  # alternate, so drift of a shared machine hits both
        for name, fn in (("non_private", non_private), ("dp", dp), ("fakes", lambda: generate(G, z, y))):
            wall, cpu = _timed(fn, device)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    engine.close()
    out = {"preset": preset, "resolution": gan.resolution, "batch": batch,
           "discriminator_parameters": count_parameters(D), **{k: _stats(*v) for k, v in times.items()}}
    out["dp_over_non_private"] = out["dp"]["median_ms"] / out["non_private"]["median_ms"]
    out["dp_over_non_private_cpu"] = out["dp"]["cpu_median_ms"] / out["non_private"]["cpu_median_ms"]
    return out


def bench_sampling(name: str, gan_preset: str, unet: dict, sampler: SamplerConfig, *, gan_batch: int,
                   unet_batch: int, repeats: int, device) -> dict:
    gan = GAN_PRESETS[gan_preset]
    torch.manual_seed(0)
    G = Generator(gan).to(device).eval()
    den = EDMDenoiser(build_unet(**unet)).to(device).eval()
    k = gan.num_classes
    res, ch = gan.resolution, gan.in_channels

    def gan_draw():
        sample_gan(G, indices=torch.arange(gan_batch), labels=torch.arange(gan_batch) % k, seed=1, device=device)

    def unet_draw():
        sample(den, seeds=list(range(unet_batch)), shape=(ch, res, res), labels=torch.arange(unet_batch) % k,
               config=sampler, device=device)

    gan_draw(), unet_draw()  # warm-up
    walls = {"gan": [], "diffusion": []}
    for _ in range(repeats):
        walls["gan"].append(_timed(gan_draw, device)[0])
        walls["diffusion"].append(_timed(unet_draw, device)[0])
    g_ips = gan_batch / statistics.median(walls["gan"])
    d_ips = unet_batch / statistics.median(walls["diffusion"])
    return {"setting": name, "resolution": res, "gan_preset": gan_preset, "generator_parameters": count_parameters(G),
            "unet_parameters": count_parameters(den), "sampler_steps": sampler.num_steps,
            "guidance": sampler.guidance, "gan_batch": gan_batch, "unet_batch": unet_batch,
            "gan_images_per_s": g_ips, "diffusion_images_per_s": d_ips, "gan_over_diffusion": g_ips / d_ips}


def main(argv: list[str] | None = None, *, stem: str = "gan_step", prog: str | None = None) -> int:
    """The command line; results go to ``bench/results/<stem>.{json,md}`` (``bench/train_step.py --gan``: stem
    ``train_step_gan``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="pairs per discriminator step (default: %(default)s)")
    parser.add_argument("--presets", nargs="+", default=["32", "demo"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--sample-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--skip-cifar-sampling", action="store_true",
                        help="time sampling at the CPU demo's sizes only (the CIFAR-10 UNet's 50 steps take minutes)")
    args = parser.parse_args(argv)
    torch_v, triton_v = _versions()
    meta = {"device": device_name(args.device), "torch": torch_v, "triton": triton_v, "git_sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dp_method": "bk-mixed", "threads": torch.get_num_threads(),
            "command": "python " + " ".join(sys.argv), "load_average": list(os.getloadavg())}
    steps = []
    for preset in args.presets:
        r = bench_discriminator(preset, batch=args.batch, warmup=args.warmup, repeats=args.repeats,
                                device=args.device)
        steps.append(r)
        print(f"D step {preset}: non-private {r['non_private']['median_ms']:.1f} ms, DP {r['dp']['median_ms']:.1f} ms "
              f"(x{r['dp_over_non_private']:.2f} wall, x{r['dp_over_non_private_cpu']:.2f} cpu); "
              f"fakes {r['fakes']['median_ms']:.1f} ms", flush=True)
    demo_unet = dict(preset="s", ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                     num_classes=10)
    samplings = [] if args.skip_cifar_sampling else [
        bench_sampling("CIFAR-10 sizes", "32", dict(preset="s"), SamplerConfig(num_steps=50), gan_batch=64,
                       unet_batch=8, repeats=args.sample_repeats, device=args.device)]
    samplings.append(bench_sampling("CPU demo", "demo", demo_unet, SamplerConfig(num_steps=30, guidance=1.0),
                                    gan_batch=100, unet_batch=20, repeats=args.sample_repeats, device=args.device))
    for s in samplings:
        print(f"sampling ({s['setting']}): GAN {s['gan_images_per_s']:.1f} img/s, diffusion "
              f"{s['diffusion_images_per_s']:.2f} img/s: x{s['gan_over_diffusion']:.0f}", flush=True)
    if args.no_save:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "discriminator_step": steps,
                                                       "sampling": samplings}, indent=2) + "\n")
    lines = [f"# PRIVIMAGE+G costs ({meta['device']}, torch {torch_v}, {meta['date']}, git {meta['git_sha']})", "",
             f"Command: `{meta['command']}`; DP method bk-mixed; {meta['threads']} torch thread(s); load average "
             f"(1, 5, 15 min) at the start {', '.join(f'{x:.2f}' for x in meta['load_average'])}.", "",
             "## Discriminator step (real/fake pairs; fakes generated once, timed apart)", "",
             "| GAN preset | side | D params | pairs | non-private ms | DP ms | DP / non-private (wall) | (cpu) | "
             "fakes ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        lines.append(f"| {r['preset']} | {r['resolution']} | {r['discriminator_parameters']:,} | {r['batch']} | "
                     f"{r['non_private']['median_ms']:.1f} | {r['dp']['median_ms']:.1f} | "
                     f"{r['dp_over_non_private']:.2f} | {r['dp_over_non_private_cpu']:.2f} | "
                     f"{r['fakes']['median_ms']:.1f} |")
    lines += ["", "## Sampling", "", "| setting | side | generator params | UNet params | sampler | GAN img/s | "
              "diffusion img/s | GAN / diffusion |", "|---|---|---|---|---|---|---|---|"]
    for s in samplings:
        sampler = f"{s['sampler_steps']} steps" + (f", guidance {s['guidance']:g}" if s["guidance"] else "")
        lines.append(f"| {s['setting']} | {s['resolution']} | {s['generator_parameters']:,} | "
                     f"{s['unet_parameters']:,} | {sampler} | {s['gan_images_per_s']:.1f} | "
                     f"{s['diffusion_images_per_s']:.2f} | {s['gan_over_diffusion']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
