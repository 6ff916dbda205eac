"""Sample the released (EMA) model of a run directory: samples/samples.npz and samples/grid.png.

Reads RUN_DIR/release/model.safetensors, never the private checkpoint; when release/ is missing, the finished
fine-tune is exported first (`privimage export`). Sampling is post-processing of the DP model and costs no
privacy. Image i comes from seed (seed, i), so the same command gives the same images at any --batch-size. A GAN
run (config kind "gan") draws each image in one generator forward: --steps, --guidance and --stochastic are
diffusion settings and are refused there.

Example:
  privimage sample runs/00000-demo --num-samples 5000 --guidance 1.0
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from privimage.commands import add_stage_arguments, run_stage
from privimage.commands.validators import non_negative_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "a run directory with a release (or a finished fine-tune to export)")
    parser.add_argument("--num-samples", type=positive_int, default=None, help="images to draw (default: config)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default: config)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampler steps, >= 2 (default: config, 50)")
    parser.add_argument("--guidance", type=non_negative_float, default=None,
                        help="classifier-free guidance scale w; 0 = off (default: config)")
    parser.add_argument("--stochastic", action="store_true", help="use the stochastic (SDE) sampler")


def run(args: argparse.Namespace) -> int:
    from privimage.config import SampleConfig
    from privimage.errors import ConfigError
    from privimage.pipeline import stage_sample

    over = {k: v for k, v in (("num_samples", args.num_samples), ("batch_size", args.batch_size),
                              ("num_steps", args.steps), ("guidance", args.guidance)) if v is not None}
    if args.stochastic:
        over["stochastic"] = True
    if args.steps is not None and args.steps < 2:
        raise ConfigError(f"--steps {args.steps} must be >= 2.")
    SampleConfig(**over)  # the overrides' ranges, checked before anything runs

    def sample(run, cfg):
        sampler = [flag for flag, key in (("--steps", "num_steps"), ("--guidance", "guidance"),
                                          ("--stochastic", "stochastic")) if key in over]
        if cfg.kind == "gan" and sampler:
            raise ConfigError(f"{', '.join(sampler)}: diffusion sampler settings, but {run} is a GAN run (kind='gan'): "
                              f"each image is one generator forward. Drop them.")
        stage_sample(run, replace(cfg, sample=replace(cfg.sample, **over)))

    return run_stage(args, "sample", sample)
