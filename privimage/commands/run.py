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

Configs: a preset name (demo, test, fmnist, cifar10-eps{1,5,10}, celeba32-eps{1,5,10}, celeba64-eps{1,5,10};
with the GAN generator, "kind": "gan": demo-gan, test-gan, cifar10-gan-eps{1,10}) or a JSON file with the same
nested keys (partial is fine; "base": PRESET picks what the rest defaults to).
The official presets need the real files: --sensitive-root DIR and --public-root DIR. The roots are written
into the run's config.json, so later stages and `privimage evaluate` find the same files.

Output (runs/NNNNN-NAME/): release/ is what may be published (EMA weights in model.safetensors, the public
config, the privacy statement PRIVACY.md/privacy.json, the query's DP outputs, samples.png, the publishable
report.md). Publish release/ only: checkpoints/ (they hold the secret randomness), logs/ (noiseless losses on
sensitive batches) and private/ (the private report) are PRIVATE, and the rest (config.json, budget.json,
plan.json, query/, samples/) is working state whose publishable part is copied into release/.

Before anything is written or spent, everything is checked (--dry-run runs exactly these checks and prints
what it found): every config value (types, ranges, names), the device, the data files (present, headers of the
expected shape and class count), delta below 1/n, a budget that can be planned, the --out folder. A run that
stopped (a crash, a full disk, Ctrl-C) continues with --resume RUN_DIR: finished stages are skipped, the
others resume from their checkpoints with the same ledger as an uninterrupted run. One command at a time
writes a run directory (RUN_DIR/.lock).

Under `torchrun --max-restarts N`, a restarted job resumes the run directory its earlier attempt made (found by
torchrun's job id, recorded in config.json) instead of starting a new one: no step is counted twice.

Examples:
  privimage run                                # the embedded demo: offline, a few minutes on a laptop CPU
  privimage run --config demo --dry-run        # check everything, print the config, sigma and steps; do nothing
                                               # (official presets: sized by the standard split's size)
  privimage run --config cifar10-eps10 --sensitive-root ~/data/cifar10 --public-root ~/data/imagenet32
  privimage run --resume runs/00003-demo       # finish a run that stopped
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from privimage.commands import validators


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="NAME|FILE",
                        help="a preset name or a JSON config file (default: demo)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of run directories; a new NNNNN-NAME is made inside (default: runs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything a run checks first, print the resolved config and the calibrated "
                             "noise and steps, then exit; nothing is written")
    parser.add_argument("--epsilon", type=validators.epsilon, default=None,
                        help="override the total epsilon of the query + fine-tune")
    parser.add_argument("--seed", type=validators.seed, default=None,
                        help="override the seed (data subsets, training)")
    parser.add_argument("--device", type=validators.device, default=None,
                        help="cpu, cuda, cuda:N or auto (default: the config's)")
    parser.add_argument("--sensitive-root", default=None, metavar="DIR",
                        help="folder of the sensitive data files (CIFAR-10 / CelebA)")
    parser.add_argument("--public-root", default=None, metavar="DIR", help="folder of the public data (ImageNet)")
    parser.add_argument("--no-evaluate", action="store_true", help="stop after sampling")
    parser.add_argument("--allow-large-delta", action="store_true",
                        help="EXPERIMENTS ONLY: accept delta >= 1/n, which permits publishing a sensitive image "
                             "outright; every report and the release's privacy statement then say so")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="finish a run directory whose `privimage run` stopped, with its own config.json")


def resolve(args: argparse.Namespace):
    """The config the command line asks for: preset or file, overrides, and the data roots in its specs."""
    from privimage.config import load_config
    from privimage.errors import ConfigError

    cfg = load_config(args.config or "demo")
    over = {}
    if args.epsilon is not None:
        over["epsilon"] = args.epsilon
    if args.seed is not None:
        over["seed"] = args.seed
    if args.device is not None:
        over["device"] = args.device
    if getattr(args, "no_evaluate", False):
        over["evaluate"] = False
    if getattr(args, "allow_large_delta", False):
        over["allow_large_delta"] = True
    cfg = replace(cfg, **over) if over else cfg
    for flag, root in (("--sensitive-root", args.sensitive_root), ("--public-root", args.public_root)):
        if root is not None and not Path(root).expanduser().is_dir():
            raise ConfigError(f"{flag} {root}: no such directory.")
    return cfg.with_roots(sensitive=args.sensitive_root, public=args.public_root)


def run(args: argparse.Namespace) -> int:
    from privimage.preflight import describe_plan, preflight
    from privimage.rundir import config_json

    if args.resume is not None:
        return _resume(args)
    cfg = resolve(args)
    out = args.out or Path("runs")
    if args.dry_run:
        found = preflight(cfg, out=out)
        privacy = {**describe_plan(cfg, found.budget, found.num_sensitive),
                   "num_sensitive_from": found.num_sensitive_from}
        print(json.dumps({"config": config_json(cfg), "privacy": privacy, "checked": found.checked()}, indent=2))
        return 0
    from privimage import distributed
    from privimage.pipeline import resume_pipeline, run_pipeline

    if distributed.current() is not None and distributed.torchrun_job() is not None:
        earlier = distributed.share(_made_by_this_job(cfg, out) if distributed.is_writer() else None)
        if earlier is not None:  # (path, finished), as rank 0 sees it
            return _continue_this_job(Path(earlier[0]), earlier[1], resume_pipeline)
    run_pipeline(cfg, out=out)
    return 0


def _made_by_this_job(cfg, out: Path) -> tuple[str, bool] | None:
    """(path, finished) of the newest run directory under ``out`` that an earlier attempt of this torchrun job
    made with this config (its config.json names the job's run id, :func:`privimage.distributed.torchrun_job`),
    else None."""
    from privimage.distributed import written_by_this_job
    from privimage.rundir import RunDir, config_json

    wanted = json.loads(json.dumps({k: v for k, v in config_json(cfg).items() if k != "launch"}))  # as read back
    for path in sorted(out.glob("[0-9][0-9][0-9][0-9][0-9]-*"), reverse=True) if out.is_dir() else ():
        try:
            made = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(made, dict) and written_by_this_job(made.get("launch")) and {
                k: v for k, v in made.items() if k != "launch"} == wanted:
            return str(path), RunDir(path).timings_path.is_file()
    return None


def _continue_this_job(path: Path, finished: bool, resume_pipeline) -> int:
    """A restarted torchrun job: finish the run directory its earlier attempt made (nothing if it finished)."""
    from privimage import distributed

    what = "already finished; nothing to do" if finished else "resuming it from its last checkpoints"
    distributed.announce_restart(f"run directory {path} was made by an earlier attempt of this job; {what}")
    if not finished:
        resume_pipeline(path)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from privimage.errors import ConfigError
    from privimage.preflight import preflight
    from privimage.rundir import RunDir, config_json

    given = [flag for flag, value in (("--config", args.config), ("--out", args.out), ("--epsilon", args.epsilon),
                                      ("--seed", args.seed), ("--device", args.device),
                                      ("--sensitive-root", args.sensitive_root), ("--public-root", args.public_root),
                                      ("--no-evaluate", args.no_evaluate or None),
                                      ("--allow-large-delta", args.allow_large_delta or None)) if value is not None]
    if given:
        raise ConfigError(f"--resume continues {args.resume} with the settings in its config.json; drop "
                          f"{', '.join(given)}.")
    if args.dry_run:
        cfg = RunDir.open(args.resume).load_config()
        found = preflight(cfg, plan=False)
        print(json.dumps({"run_dir": str(args.resume), "config": config_json(cfg), "checked": found.checked()},
                         indent=2))
        return 0
    from privimage.pipeline import resume_pipeline

    resume_pipeline(args.resume)
    return 0
