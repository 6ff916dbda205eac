"""DP-SGD fine-tune (or resume) the pre-trained UNet of a run directory on the sensitive images.

Privacy: the noise multiplier, Poisson rate and number of steps come from the run's budget.json (planned
by `privimage run` so the query and this fine-tune together meet the total epsilon). Each step is recorded
in the budget ledger before its noisy gradient exists; --resume continues from checkpoints/finetune.pt with
the ledger, sampler and noise state it holds, so no step is counted or released twice and the final epsilon
and parameters equal those of an uninterrupted run. Checkpoints hold the sampler seed, the noise state and the
secret key of the diffusion randomness: keep them private (publish `privimage export`'s release/ instead).
Without --resume, a run directory that already holds fine-tune outputs or counted steps is refused.

Example:
  privimage finetune runs/00000-demo --resume
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory made by `privimage run`")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/finetune.pt")
    parser.add_argument("--sensitive-root", default=None, metavar="DIR", help="folder of the sensitive data")


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import load_run_config, stage_finetune

    stage_finetune(args.run_dir, load_run_config(args.run_dir), resume=args.resume,
                   sensitive_root=args.sensitive_root)
    return 0
