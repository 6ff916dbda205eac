"""The ``privimage`` subcommands, one module each (see :mod:`privimage.cli`), and what the stage commands share."""

from __future__ import annotations

import argparse
import json
from typing import Callable


def add_stage_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """RUN_DIR and --dry-run, as every command that continues a run directory takes them."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help=what)
    parser.add_argument("--dry-run", action="store_true",
                        help="check the run directory, its config, the device and the data this command reads, "
                             "print them and exit; nothing is written")


def run_stage(args: argparse.Namespace, command: str, body: Callable, *, splits=(), roots: dict | None = None) -> int:
    """Open ``args.run_dir``, check its config (with ``roots`` put into its data specs), the device and the data
    ``splits`` (:func:`privimage.preflight.preflight`); with ``--dry-run`` print that and stop, else run
    ``body(run, cfg)`` holding the run directory's lock."""
    from privimage.preflight import preflight
    from privimage.rundir import RunDir, config_json

    run = RunDir.open(args.run_dir)
    cfg = run.load_config()
    if roots:
        cfg = cfg.with_roots(**roots)
    found = preflight(cfg, splits=splits, plan=False)
    if args.dry_run:
        print(json.dumps({"run_dir": str(run.path), "config": config_json(cfg), "checked": found.checked()}, indent=2))
        return 0
    with run.lock(command):
        body(run, cfg)
    return 0


def resume_after_restart(run, stage: str, resume: bool) -> bool:
    """Whether ``privimage <stage> RUN_DIR`` resumes: ``resume`` (its --resume), or, under torchrun in a restarted
    attempt of the job (:func:`privimage.distributed.restarted`) whose earlier attempt wrote
    ``checkpoints/<stage>.pt`` (its ``"launch"`` names the job, :func:`privimage.distributed.written_by_this_job`),
    True: the restart continues from that checkpoint, with its ledger, as ``privimage run`` continues the run
    directory its earlier attempt made (:mod:`privimage.commands.run`). Collective under torchrun: every rank
    calls it and gets rank 0's answer."""
    from privimage import distributed

    if resume or distributed.current() is None or distributed.torchrun_job() is None or not distributed.restarted():
        return resume
    path = run.checkpoint_path(stage)
    ours = distributed.is_writer() and distributed.written_by_this_job(run.checkpoint_launch(stage))
    if not distributed.share(ours):
        return False
    distributed.announce_restart(f"{path} was written by an earlier attempt of this job; resuming from it")
    return True
