"""DP-SGD fine-tune (or resume) the pre-trained UNet of a run directory on the sensitive images.

Privacy: the noise multiplier, Poisson rate and number of steps come from the run's budget.json (planned
by `privimage run` so the query and this fine-tune together meet the total epsilon). Each step is recorded
in the budget ledger before its noisy gradient exists; --resume continues from checkpoints/finetune.pt with
the ledger, sampler and noise state it holds, so no step is counted or released twice and the final epsilon
and parameters equal those of an uninterrupted run. Checkpoints hold the sampler seed, the noise state and the
secret key of the diffusion randomness: keep them private (publish `privimage export`'s release/ instead).
Without --resume, a run directory that already holds fine-tune outputs or counted steps is refused, except
under `torchrun --max-restarts`: a restarted attempt resumes from the checkpoint its job's earlier attempt
wrote. The config, the device and the sensitive data are checked before anything runs (--dry-run: only
that), and the run directory is locked while the fine-tune writes into it.

Example:
  privimage finetune runs/00000-demo --resume
"""

from __future__ import annotations

import argparse

from privimage.commands import add_stage_arguments, resume_after_restart, run_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "a run directory made by `privimage run`")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/finetune.pt")
    parser.add_argument("--sensitive-root", default=None, metavar="DIR",
                        help="folder of the sensitive data (replaces the root in the run's config)")


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import stage_finetune

    return run_stage(args, "finetune", lambda run, cfg: stage_finetune(
        run, cfg, resume=resume_after_restart(run, "finetune", args.resume)),
                     splits=("sensitive",), roots={"sensitive": args.sensitive_root})
