"""An epsilon sweep: one run directory per (epsilon, seed), sharing everything public and nothing private.

Makes runs/NNNNN-sweep-NAME/ with one complete run directory per point (eps5-seed0/, ...: what `privimage run
--config NAME --epsilon 5 --seed 0` makes alone), plus sweep.json, sweep.md and sweep.png (FID or proxy FID and
CA against epsilon, mean +- std over seeds; a sample grid per epsilon).

Shared, because it is public or computed once and kept in memory: the query classifier (public data only,
once per seed); the sensitive images' votes (counted once per seed, NEVER written: each point makes its own
noisy release with its own sigma and its own ledger); the pre-training, once per distinct selected subset
(points whose queries picked the same public classes share one pre-trained model, linked read-only into each
point). The fine-tunes, sampling and evaluation run as a queue over the devices (one worker per device).

Privacy: each point is its own (epsilon, delta) release on the same sensitive data. Publishing several points
spends their composition, which sweep.md prints (the project's accountant, every point's mechanisms
composed). `inf` adds the NON-PRIVATE reference (sigma = 0: no noise on the query or the gradients), labelled
so everywhere and never part of a privacy statement. No point is picked as "best".

A sweep that stopped continues with --resume SWEEP_DIR: only what is missing runs; a point's query or
fine-tune steps are never spent twice.

Across machines: --shard i/n runs only the points j with j % n == i (j counts the points from 0, epsilon-major
then seed: for --epsilons 1,10 --seeds 0,1 the points are eps1-seed0, eps1-seed1, eps10-seed0, eps10-seed1),
in a sweep directory of its own (NNNNN-sweep-NAME-shardIofN), so n independent jobs cover the sweep, each
point exactly once and each complete on its own. --resume keeps the shard. A SLURM job array of 4 jobs:
  #SBATCH --array=0-3
  privimage sweep --config demo --epsilons 1,2,5,10 --seeds 0,1 --shard $SLURM_ARRAY_TASK_ID/4

Examples:
  privimage sweep --config demo --epsilons 2,5,10
  privimage sweep --config test --epsilons 1,10,inf --seeds 0,1 --dry-run
  privimage sweep --config cifar10-eps10 --epsilons 1,5,10 --seeds 0,1,2 --devices auto \\
      --sensitive-root ~/data/cifar10 --public-root ~/data/imagenet32
  privimage sweep --config demo --epsilons 1,5,10 --seeds 0,1 --shard 0/3
  privimage sweep --resume runs/00004-sweep-demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="NAME|FILE",
                        help="a preset name or a JSON config file (default: demo); its epsilon and seed are "
                             "replaced by each point's")
    parser.add_argument("--epsilons", default=None, metavar="E1,E2,...",
                        help="the epsilon of each point, comma-separated, each in (0, 100]; inf adds the "
                             "NON-PRIVATE reference (sigma = 0)")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...", help="seeds, comma-separated (default: 0)")
    parser.add_argument("--devices", default="auto", metavar="auto|cpu|cuda:0,cuda:1",
                        help="one worker per device; auto: every CUDA device, else one CPU worker (default: auto)")
    parser.add_argument("--out", type=Path, default=None, help="folder of run directories (default: runs)")
    parser.add_argument("--sensitive-root", default=None, metavar="DIR",
                        help="folder of the sensitive data files (CIFAR-10 / CelebA)")
    parser.add_argument("--public-root", default=None, metavar="DIR", help="folder of the public data (ImageNet)")
    parser.add_argument("--shard", default=None, metavar="i/n",
                        help="run only the points j with j %% n == i (0-based; points in epsilon-major, then seed "
                             "order), e.g. --shard $SLURM_ARRAY_TASK_ID/4 in a job array of 4 (default: all points)")
    parser.add_argument("--resume", type=Path, default=None, metavar="SWEEP_DIR",
                        help="finish a sweep directory that stopped (with its own config, epsilons and seeds)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print every point's sigma and steps and the composition of all "
                             "points; nothing is written")


def run(args: argparse.Namespace) -> int:
    from privimage.errors import ConfigError
    from privimage.sweep import dry_run, parse_epsilons, parse_seeds, parse_shard, resolve_devices, resume_sweep, run_sweep

    shard = parse_shard(args.shard) if args.shard is not None else None
    epsilons = parse_epsilons(args.epsilons) if args.epsilons is not None else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    resolve_devices(args.devices)  # a bad --devices is refused before anything else
    if args.resume is not None:
        given = [f for f, v in (("--out", args.out), ("--sensitive-root", args.sensitive_root),
                                ("--public-root", args.public_root), ("--dry-run", args.dry_run or None)) if v]
        if given:
            raise ConfigError(f"--resume continues {args.resume} with the settings in its sweep.json; drop "
                              f"{', '.join(given)}.")
        cfg = _config(args) if args.config is not None else None
        resume_sweep(args.resume, config=cfg, epsilons=epsilons, seeds=seeds, shard=shard, devices=args.devices)
        return 0
    if epsilons is None:
        raise ConfigError("--epsilons is required (e.g. --epsilons 1,5,10), or --resume SWEEP_DIR.")
    cfg = _config(args)
    out = args.out or Path("runs")
    seeds = seeds or (0,)
    if args.dry_run:
        print(json.dumps(dry_run(cfg, epsilons=epsilons, seeds=seeds, shard=shard, devices=args.devices, out=out), indent=2,
                         default=str))
        return 0
    run_sweep(cfg, epsilons=epsilons, seeds=seeds, shard=shard, devices=args.devices, out=out)
    return 0


def _config(args: argparse.Namespace):
    from privimage.commands.run import resolve

    ns = argparse.Namespace(config=args.config, epsilon=None, seed=None, device=None,
                            sensitive_root=args.sensitive_root, public_root=args.public_root)
    return resolve(ns)
