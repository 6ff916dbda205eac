"""Pre-train (or resume pre-training) the UNet of a run directory on its public subset (query/subset.npz).

Non-private: only public images of the classes the DP query selected are used, relabelled to the
sensitive classes. Writes checkpoints/pretrain.pt, logs/pretrain.csv and samples/pretrain*.png. Under
`torchrun --max-restarts`, a restarted attempt resumes from the checkpoint its job's earlier attempt wrote.

Example:
  privimage pretrain runs/00000-demo --resume
"""

from __future__ import annotations

import argparse

from privimage.commands import add_stage_arguments, resume_after_restart, run_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "a run directory made by `privimage run`")
    parser.add_argument("--resume", action="store_true",
                        help="continue from checkpoints/pretrain.pt (exactly where it stopped)")


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import stage_pretrain

    return run_stage(args, "pretrain", lambda run, cfg: stage_pretrain(
        run, cfg, resume=resume_after_restart(run, "pretrain", args.resume)))
