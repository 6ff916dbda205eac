"""Run the whole PrivImage pipeline into one new, auto-numbered run directory.

Stages: (1) train the query classifier on PUBLIC data (no privacy spent); (2) DP semantic query: each
sensitive image votes for its top-k public classes in its own class's histogram, Gaussian noise makes the
histograms private, and the top public classes per sensitive class are selected; (3) those public images,
relabelled with the sensitive class that chose them, are the pre-training subset; (4) non-private
pre-training of the UNet on the subset; (5) DP-SGD fine-tuning on the sensitive images (Poisson batches,
per-sample clipping of the K noise draws of each image together, Gaussian noise); (6) sampling the EMA model;
(7) evaluation (FID or proxy FID, classification accuracy) when privimage.evaluate is installed; (8) the
release (privimage export).

Privacy: ONE (epsilon, delta) budget covers the query and the fine-tune. The query gets its noise from
query.epsilon_fraction of epsilon; the fine-tune's noise multiplier is then calibrated so the composition of
both (PRV accountant) meets epsilon. Every checkpoint and budget.json carry the ledger of what was spent.
Everything in the config is public; only the data are private.

Configs: a preset name (demo, test, fmnist, cifar10-eps{1,5,10}, celeba32-eps{1,5,10}, celeba64-eps{1,5,10})
or a JSON file with the same nested keys (partial is fine; "base": PRESET picks what the rest defaults to).
The official presets need the real files: --sensitive-root DIR and --public-root DIR. The roots are written
into the run's config.json, so later stages and `privimage evaluate` find the same files.

Output (runs/NNNNN-NAME/): release/ is what may be published (EMA weights in model.safetensors, the public
config, the privacy statement PRIVACY.md/privacy.json, the query's DP outputs, samples.png, the publishable
report.md). Publish release/ only: checkpoints/ (they hold the secret randomness), logs/ (noiseless losses on
sensitive batches) and private/ (the private report) are PRIVATE, and the rest (config.json, budget.json,
plan.json, query/, samples/) is working state whose publishable part is copied into release/.

Examples:
  privimage run                                # the embedded demo: offline, a few minutes on a laptop CPU
  privimage run --config demo --dry-run        # print the resolved config, sigma and steps; do nothing
                                               # (official presets: sized by the standard split, files unread)
  privimage run --config cifar10-eps10 --sensitive-root ~/data/cifar10 --public-root ~/data/imagenet32
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", metavar="NAME|FILE",
                        help="a preset name or a JSON config file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="folder of run directories; a new NNNNN-NAME is made inside (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the calibrated noise and steps, then exit")
    parser.add_argument("--epsilon", type=_positive_float, default=None,
                        help="override the total epsilon of the query + fine-tune")
    parser.add_argument("--seed", type=int, default=None, help="override the seed (data subsets, training)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's)")
    parser.add_argument("--sensitive-root", default=None, metavar="DIR",
                        help="folder of the sensitive data files (CIFAR-10 / CelebA)")
    parser.add_argument("--public-root", default=None, metavar="DIR", help="folder of the public data (ImageNet)")
    parser.add_argument("--no-evaluate", action="store_true", help="stop after sampling")


def resolve(args: argparse.Namespace):
    """The config the command line asks for: preset or file, overrides, and the data roots in its specs."""
    from privimage.config import load_config

    cfg = load_config(args.config)
    over = {}
    if args.epsilon is not None:
        over["epsilon"] = args.epsilon
    if args.seed is not None:
        over["seed"] = args.seed
    if args.device is not None:
        over["device"] = args.device
    if getattr(args, "no_evaluate", False):
        over["evaluate"] = False
    cfg = replace(cfg, **over) if over else cfg
    for flag, root in (("--sensitive-root", args.sensitive_root), ("--public-root", args.public_root)):
        if root is not None and not Path(root).expanduser().is_dir():
            raise FileNotFoundError(f"{flag} {root}: no such directory.")
    return cfg.with_roots(sensitive=args.sensitive_root, public=args.public_root)


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import config_json, describe_plan, plan_budget, run_pipeline, sensitive_size

    cfg = resolve(args)
    if args.dry_run:
        n, source = sensitive_size(cfg)
        budget = plan_budget(cfg, n)
        privacy = {**describe_plan(cfg, budget, n), "num_sensitive_from": source}
        print(json.dumps({"config": config_json(cfg), "privacy": privacy}, indent=2))
        return 0
    run_pipeline(cfg, out=args.out)
    return 0
