"""Write RUN_DIR/release/: everything from a run that may be published, and nothing else.

release/ holds the fine-tuned EMA weights (model.safetensors, with the UNet config in its metadata), the
public config (config.json), the privacy statement (privacy.json and PRIVACY.md: epsilon, delta, the
accountant, each mechanism with its sigma / sampling rate / steps / clipping norm, and what the guarantee does
not cover), the DP query's outputs (query/), the samples grid (samples.png) and the publishable evaluation
report (report.md, written there by `privimage evaluate`).

Everything else in a run directory is PRIVATE: checkpoints/ (they hold the Poisson sampler's seed, the DP
noise generator's state and the secret key of the diffusion randomness: whoever has them can replay every
batch and noise draw), logs/ (noiseless losses on sensitive batches), private/ (the private report, cached
statistics of real images).

The export refuses an unfinished fine-tune, and a checkpoint whose steps budget.json does not count.
`privimage run` exports at its end; `privimage sample` exports first when release/ is missing.

Example:
  privimage export runs/00000-demo
"""

from __future__ import annotations

import argparse

from privimage.commands import add_stage_arguments, run_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "a run directory with a finished fine-tune")


def run(args: argparse.Namespace) -> int:
    from privimage.release import export_release

    return run_stage(args, "export", lambda run, cfg: export_release(run))
