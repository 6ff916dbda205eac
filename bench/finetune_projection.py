"""A short real fine-tune at the official CIFAR-10 shapes, timed per logical step, and what the whole run costs.

Runs the pipeline's own loop, :func:`privimage.train.finetune.finetune`, with the official settings of a run
config (``--config``, default ``cifar10-eps10``: UNet "s", Poisson logical batches of expected size 16384
split into physical batches of 256 images, K = 8 noise draws each, C = 1e-3, Adam, EMA, bf16 autocast and the
fused kernels on CUDA, the privacy ledger) for ``--steps`` logical steps, on ``--images`` random 32×32 uint8
images (CIFAR-10's 50,000) with random labels, starting from random weights (``workload.denoiser``). q and
the official number of steps come from the config; σ from its budget plan (:func:`privimage.pipeline.
plan_budget`, a calibration of some seconds), or ``--sigma`` skips the calibration: a step costs the same
whatever σ is, and the loop still keeps its ledger (the fine-tune alone, without the query).

The loop runs one logical step per call (``stop_at_step``, then ``resume=True`` from its checkpoint, as an
interrupted run continues), and the results are written after each, so a run stopped by a time cap keeps
the steps it finished. Per-step seconds: the loop logs images/s per step; the step's size is the Poisson
draw, which the sampler reproduces from its seed (``secure_noise=False`` here: a benchmark on random images,
no privacy at stake).

Projection of the fine-tune: the plan's steps × (the median step time, the first step with cuDNN's and
Triton's autotuning left out when there are two or more, + the ε the loop computes for its log after every
step, which the per-call step times leave out and is timed here once). Pre-training: given the time of one
pre-training step (``--pretrain-step-ms`` at ``--pretrain-batch`` images, from ``train_step.py``), the
config's pre-training steps × that time, scaled linearly to the config's batch when it was measured at
another.

    python bench/finetune_projection.py --device cuda --steps 3 --json finetune.json
    python bench/finetune_projection.py --config test --images 64 --steps 2        # CPU check, tiny
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import workload  # noqa: E402

from privimage.config import CONFIGS  # noqa: E402
from privimage.engine import PoissonSampler, PrivacyBudget  # noqa: E402
from privimage.engine.accounting import Mechanism  # noqa: E402
from privimage.privacy import FINETUNE  # noqa: E402
from privimage.pipeline import plan_budget  # noqa: E402
from privimage.train.finetune import finetune  # noqa: E402

SEED = 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cifar10-eps10", choices=sorted(CONFIGS))
    ap.add_argument("--images", type=int, default=50_000, help="sensitive set size (CIFAR-10: 50,000)")
    ap.add_argument("--steps", type=int, default=3, help="logical steps to run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="the DP step compiled (finetune.compile)")
    ap.add_argument("--sigma", type=float, default=None, help="noise multiplier (default: calibrated by the plan)")
    ap.add_argument("--pretrain-step-ms", type=float, default=None, help="one pre-training step, measured elsewhere")
    ap.add_argument("--pretrain-batch", type=int, default=None, help="the batch it was measured at")
    ap.add_argument("--json", type=Path, default=None, help="default: finetune_projection.json in the results folder")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    ft = cfg.finetune
    unet = cfg.unet_config(channels=3, num_classes=10)
    res = unet.resolution
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (args.images, unet.in_channels, res, res), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, max(unet.num_classes, 1), (args.images,), generator=g)
    t0 = time.perf_counter()
    if args.sigma is None:
        budget = plan_budget(cfg, args.images)
    else:
        q = ft.sample_rate(args.images)
        budget = PrivacyBudget(cfg.epsilon, cfg.delta,
                               plan={FINETUNE: Mechanism(args.sigma, q, ft.steps(args.images))})
    plan = budget.plan[FINETUNE]
    path = args.json or harness.results_dir() / "finetune_projection.json"
    out = {"meta": harness.environment(args.device, config=args.config, images=args.images, model=cfg.model,
                                       resolution=res, physical_batch_size=ft.physical_batch_size,
                                       num_noise=ft.num_noise, expected_batch_size=plan.sample_rate * args.images,
                                       noise_multiplier=plan.noise_multiplier, planned_steps=plan.count,
                                       compile=args.compile, budget_plan_s=round(time.perf_counter() - t0, 1))}
    harness.write_json(path, out)
    if args.pretrain_step_ms:
        pt = cfg.pretrain
        step_ms = args.pretrain_step_ms * pt.batch_size / (args.pretrain_batch or pt.batch_size)
        out["pretrain"] = {"steps": pt.steps, "batch": pt.batch_size, "step_ms": step_ms,
                           "measured_batch": args.pretrain_batch or pt.batch_size}
        out["projected_pretrain_s"] = pt.steps * step_ms / 1e3
    init = workload.denoiser(unet).net.state_dict()
    sampler = PoissonSampler(sample_rate=plan.sample_rate, steps=plan.count,
                             physical_batch_size=ft.physical_batch_size, seed=SEED)
    with tempfile.TemporaryDirectory() as run_dir:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            config = dataclasses.replace(ft, compile=args.compile, secure_noise=False, checkpoint_every=10 ** 9,
                                         log_every=1, sample_every=0)
            finetune(run_dir, config, images=images, labels=labels, unet=unet, budget=budget, init_state=init,
                     seed=SEED, device=args.device, resume=step > 1, stop_at_step=step, log=lambda message: None)
            call_s = time.perf_counter() - t0
            with open(Path(run_dir) / "logs" / "finetune.csv") as f:
                row = list(csv.DictReader(f))[-1]
            size = sampler.logical_batch(args.images, int(row["step"]) - 1).size
            out.setdefault("steps", []).append(
                {"step": int(row["step"]), "images": size, "seconds": size / float(row["images_per_s"]),
                 "images_per_s": float(row["images_per_s"]), "call_s": call_s,
                 "physical_batches": -(-size // ft.physical_batch_size)})
            if "epsilon_s" not in out:
                t0 = time.perf_counter()
                budget.epsilon_spent()
                out["epsilon_s"] = time.perf_counter() - t0
            timed = [s["seconds"] for s in out["steps"][1:] or out["steps"]]
            out["median_step_s"] = statistics.median(timed)
            out["projected_finetune_s"] = plan.count * (out["median_step_s"] + out["epsilon_s"])
            harness.write_json(path, out)
            s = out["steps"][-1]
            print(f"step {s['step']}: {s['images']} images in {s['seconds']:.2f} s ({s['images_per_s']:.0f} img/s; "
                  f"the call with its set-up {call_s:.1f} s)", flush=True)
    print(f"projection: {plan.count} steps x ({out['median_step_s']:.2f} s + epsilon {out['epsilon_s']:.2f} s) = "
          f"{out['projected_finetune_s'] / 60:.1f} min ({args.config}, {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
