"""Sample the released (EMA) model of a run directory: samples/samples.npz and samples/grid.png.

Reads RUN_DIR/release/model.safetensors, never the private checkpoint; when release/ is missing, the finished
fine-tune is exported first (`privimage export`). Sampling is post-processing of the DP model and costs no
privacy. Image i comes from seed (seed, i), so the same command gives the same images at any --batch-size.

Example:
  privimage sample runs/00000-demo --num-samples 5000 --guidance 1.0
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory with a release (or a finished fine-tune to export)")
    parser.add_argument("--num-samples", type=_positive_int, default=None, help="images to draw (default: config)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default: config)")
    parser.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: config, 50)")
    parser.add_argument("--guidance", type=_non_negative_float, default=None,
                        help="classifier-free guidance scale w; 0 = off (default: config)")
    parser.add_argument("--stochastic", action="store_true", help="use the stochastic (SDE) sampler")


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import load_run_config, stage_sample

    cfg = load_run_config(args.run_dir)
    over = {k: v for k, v in (("num_samples", args.num_samples), ("batch_size", args.batch_size),
                              ("num_steps", args.steps), ("guidance", args.guidance)) if v is not None}
    if args.stochastic:
        over["stochastic"] = True
    if args.steps is not None and args.steps < 2:
        raise ValueError(f"--steps {args.steps} must be >= 2.")
    cfg = replace(cfg, sample=replace(cfg.sample, **over))
    stage_sample(args.run_dir, cfg)
    return 0
