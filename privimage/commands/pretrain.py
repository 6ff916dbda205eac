"""Pre-train (or resume pre-training) the UNet of a run directory on its public subset (query/subset.npz).

Non-private: only public images of the classes the DP query selected are used, relabelled to the
sensitive classes. Writes checkpoints/pretrain.pt, logs/pretrain.csv and samples/pretrain*.png.

Example:
  privimage pretrain runs/00000-demo --resume
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory made by `privimage run`")
    parser.add_argument("--resume", action="store_true",
                        help="continue from checkpoints/pretrain.pt (exactly where it stopped)")


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import load_run_config, stage_pretrain

    stage_pretrain(args.run_dir, load_run_config(args.run_dir), resume=args.resume)
    return 0
