"""PRIVIMAGE+G costs: the DP discriminator step against a non-private one, and GAN vs diffusion sampling.

1. Discriminator step, as the loops run it, on fixed real images, labels and fakes (the fakes' generation is
   the same in both and timed apart): non-private (the pre-training's batch-mean paired hinge, backward,
   Adam) against DP (the same pairs through ``DPEngine.accumulate`` with the pair grouping, bk-mixed, then
   ``finalize``: noise, divide by the expected batch size; Adam). The two are timed alternately, step by
   step, so a shared CPU's drift hits both alike; medians and the ratio come from one run. Each preset runs
   at ``--batch`` pairs and, with ``--config-batches``, also at the physical batch its run config uses
   (``demo-gan``: 100 pairs, ``cifar10-gan-eps*``: 256), where the fakes are not timed.
2. Sampling images/s: the GAN generator (one forward per image, per-image latents) against the diffusion
   model of the same setting, both as the run configs build them: ``cifar10-gan-eps10`` against
   ``cifar10-eps10`` (PrivImage's CIFAR-10 diffusion preset: UNet "s", its sampler's 50 steps, no guidance)
   and ``demo-gan`` against ``demo`` (30 steps, guidance 1.0: two forwards a step). Each row also counts the
   floating-point operations of one image (``torch.utils.flop_counter``: one generator forward; the
   diffusion sampler's forwards), whose ratio bounds what a faster implementation could reach.

Results: ``bench/results/gan_step.json`` and ``gan_step.md`` with device, versions, git sha and date.

Usage:
    python bench/gan_step.py                      # 2-core CPU: a few minutes
    python bench/gan_step.py --config-batches     # also at the configs' physical batches (CPU: ~10 minutes)
    python bench/gan_step.py --device cuda --batch 256
    python bench/train_step.py --gan --presets 32 --device cuda --json out.json   # the GPU suite's stage
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

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from privimage.config import CONFIGS  # noqa: E402
from privimage.diffusion import EDMDenoiser, SamplerConfig, sample  # noqa: E402
from privimage.engine import DPEngine  # noqa: E402
from privimage.gan import generate, pair_groups, paired_rows, sample_gan  # noqa: E402
from privimage.models import GAN_PRESETS, Discriminator, Generator, UNet, count_parameters  # noqa: E402

# The run configs each sampling row compares: (setting, GAN config, diffusion config).
SAMPLING_SETTINGS = [("CIFAR-10", "cifar10-gan-eps10", "cifar10-eps10"), ("CPU demo", "demo-gan", "demo")]


def _timed(fn, device) -> tuple[float, float]:
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _stats(wall: list[float], cpu: list[float]) -> dict:
    med, p20, p80 = summarize(wall)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "cpu_median_ms": 1e3 * statistics.median(cpu)}


def config_batches() -> dict[str, int]:
    """{GAN preset: the largest physical batch (pairs) a GAN run config uses it with}."""
    out: dict[str, int] = {}
    for cfg in CONFIGS.values():
        if cfg.kind == "gan" and not cfg.model_overrides:
            out[cfg.model] = max(out.get(cfg.model, 0), cfg.finetune.physical_batch_size)
    return out


def bench_discriminator(preset: str, *, batch: int, warmup: int, repeats: int, device, time_fakes: bool = True) -> dict:
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
    fns = [("non_private", non_private), ("dp", dp)] + ([("fakes", lambda: generate(G, z, y))] if time_fakes else [])
    for _ in range(repeats):  # alternate, so drift of a shared machine hits both
        for name, fn in fns:
            wall, cpu = _timed(fn, device)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    engine.close()
    out = {"preset": preset, "resolution": gan.resolution, "batch": batch,
           "discriminator_parameters": count_parameters(D), **{k: _stats(*v) for k, v in times.items() if v[0]}}
    out["dp_over_non_private"] = out["dp"]["median_ms"] / out["non_private"]["median_ms"]
    out["dp_over_non_private_cpu"] = out["dp"]["cpu_median_ms"] / out["non_private"]["cpu_median_ms"]
    return out


def flops(fn) -> float:
    """Floating-point operations of ``fn()`` (multiply-adds count two), by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def bench_sampling(name: str, gan_config: str, diffusion_config: str, *, gan_batch: int, unet_batch: int,
                   repeats: int, device) -> dict:
    gcfg, dcfg = CONFIGS[gan_config], CONFIGS[diffusion_config]
    gan = gcfg.gan_config(channels=3, num_classes=10)
    sampler = SamplerConfig(**{f: getattr(dcfg.sample, f) for f in SamplerConfig.__dataclass_fields__})
    torch.manual_seed(0)
    G = Generator(gan).to(device).eval()
    den = EDMDenoiser(UNet(dcfg.unet_config(channels=3, num_classes=10))).to(device).eval()
    k = gan.num_classes
    res, ch = gan.resolution, gan.in_channels
    forwards = sampler.num_steps * (2 if sampler.guidance > 0 else 1)  # the last step included; cond + uncond

    def gan_draw(n=gan_batch):
        sample_gan(G, indices=torch.arange(n), labels=torch.arange(n) % k, seed=1, device=device)

    def unet_draw(n=unet_batch):
        sample(den, seeds=list(range(n)), shape=(ch, res, res), labels=torch.arange(n) % k, config=sampler,
               device=device)

    def unet_forward():
        den(torch.zeros(1, ch, res, res, device=device), torch.ones(1, device=device),
            torch.zeros(1, dtype=torch.long, device=device))

    g_flops, d_flops = flops(lambda: gan_draw(1)), flops(lambda: unet_draw(1))
    gan_draw(), unet_draw()  # warm-up
    walls = {"gan": [], "diffusion": []}
    for _ in range(repeats):
        walls["gan"].append(_timed(gan_draw, device)[0])
        walls["diffusion"].append(_timed(unet_draw, device)[0])
    g_ips = gan_batch / statistics.median(walls["gan"])
    d_ips = unet_batch / statistics.median(walls["diffusion"])
    return {"setting": name, "gan_config": gan_config, "diffusion_config": diffusion_config, "resolution": res,
            "gan_preset": gcfg.model, "unet_preset": dcfg.model, "generator_parameters": count_parameters(G),
            "unet_parameters": count_parameters(den), "sampler_steps": sampler.num_steps,
            "guidance": sampler.guidance, "forwards_per_image": forwards, "gan_batch": gan_batch,
            "unet_batch": unet_batch, "gan_gflop_per_image": g_flops / 1e9,
            "unet_gflop_per_forward": flops(unet_forward) / 1e9, "diffusion_gflop_per_image": d_flops / 1e9,
            "flop_ratio": d_flops / g_flops, "gan_images_per_s": g_ips, "diffusion_images_per_s": d_ips,
            "gan_over_diffusion": g_ips / d_ips}


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
    parser.add_argument("--json", type=Path, default=None,
                        help="write the JSON here instead of bench/results (no markdown), e.g. for the GPU suite")
    parser.add_argument("--config-batches", action="store_true",
                        help="also time each preset's discriminator step at its run config's physical batch")
    parser.add_argument("--skip-cifar-sampling", action="store_true",
                        help="time sampling at the CPU demo's sizes only (the CIFAR-10 UNet's 50 steps take minutes)")
    args = parser.parse_args(argv)
    torch_v, triton_v = _versions()
    meta = {"device": device_name(args.device), "torch": torch_v, "triton": triton_v, "git_sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dp_method": "bk-mixed", "threads": torch.get_num_threads(),
            "command": "python " + " ".join(sys.argv), "load_average": list(os.getloadavg())}
    runs = [(preset, args.batch, True) for preset in args.presets]
    if args.config_batches:
        physical = config_batches()
        runs += [(preset, physical[preset], False) for preset in args.presets
                 if physical.get(preset, args.batch) != args.batch]
    steps = []
    for preset, batch, time_fakes in runs:
        r = bench_discriminator(preset, batch=batch, warmup=args.warmup, repeats=args.repeats, device=args.device,
                                time_fakes=time_fakes)
        steps.append(r)
        print(f"D step {preset}, {batch} pairs: non-private {r['non_private']['median_ms']:.1f} ms, DP "
              f"{r['dp']['median_ms']:.1f} ms (x{r['dp_over_non_private']:.2f} wall, "
              f"x{r['dp_over_non_private_cpu']:.2f} cpu)", flush=True)
    settings = [s for s in SAMPLING_SETTINGS if not (args.skip_cifar_sampling and s[0] == "CIFAR-10")]
    batches = {"CIFAR-10": (64, 8), "CPU demo": (100, 20)}  # (GAN, diffusion) images per timed call
    samplings = [bench_sampling(name, gan_cfg, diff_cfg, gan_batch=batches[name][0], unet_batch=batches[name][1],
                                repeats=args.sample_repeats, device=args.device)
                 for name, gan_cfg, diff_cfg in settings]
    for s in samplings:
        print(f"sampling ({s['setting']}): GAN {s['gan_images_per_s']:.1f} img/s, diffusion "
              f"{s['diffusion_images_per_s']:.2f} img/s: x{s['gan_over_diffusion']:.0f} (FLOPs x{s['flop_ratio']:.0f})",
              flush=True)
    meta["load_average_end"] = list(os.getloadavg())
    record = {"meta": meta, "discriminator_step": steps, "sampling": samplings}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if args.no_save or args.json is not None:
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    load = ", ".join(f"{x:.2f}" for x in meta["load_average"])
    load_end = ", ".join(f"{x:.2f}" for x in meta["load_average_end"])
    lines = [f"# PRIVIMAGE+G costs ({meta['device']}, torch {torch_v}, {meta['date']}, git {meta['git_sha']})", "",
             f"Command: `{meta['command']}`; DP method bk-mixed; {meta['threads']} torch thread(s); load average "
             f"(1, 5, 15 min) {load} at the start, {load_end} at the end.", "",
             "## Discriminator step (real/fake pairs; fakes generated once, timed apart)", "",
             "| GAN preset | side | D params | pairs | non-private ms | DP ms | DP / non-private (wall) | (cpu) | "
             "fakes ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        fakes = f"{r['fakes']['median_ms']:.1f}" if "fakes" in r else "not timed"
        lines.append(f"| {r['preset']} | {r['resolution']} | {r['discriminator_parameters']:,} | {r['batch']} | "
                     f"{r['non_private']['median_ms']:.1f} | {r['dp']['median_ms']:.1f} | "
                     f"{r['dp_over_non_private']:.2f} | {r['dp_over_non_private_cpu']:.2f} | {fakes} |")
    lines += ["", "## Sampling", "", "| setting (configs) | side | generator params | UNet params | sampler | "
              "GFLOP/image GAN | GFLOP/image diffusion | FLOP ratio | GAN img/s | diffusion img/s | GAN / diffusion |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in samplings:
        sampler = (f"{s['sampler_steps']} steps" + (f", guidance {s['guidance']:g}" if s["guidance"] else "")
                   + f" ({s['forwards_per_image']} forwards)")
        lines.append(f"| {s['setting']} ({s['gan_config']} vs {s['diffusion_config']}) | {s['resolution']} | "
                     f"{s['generator_parameters']:,} | {s['unet_parameters']:,} | {sampler} | "
                     f"{s['gan_gflop_per_image']:.3f} | {s['diffusion_gflop_per_image']:.2f} | "
                     f"{s['flop_ratio']:.0f} | {s['gan_images_per_s']:.1f} | {s['diffusion_images_per_s']:.2f} | "
                     f"{s['gan_over_diffusion']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
