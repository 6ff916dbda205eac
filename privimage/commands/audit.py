"""Empirical privacy audit: a lower bound on the DP fine-tune's epsilon from canaries, against its claim.

Inserts canary images (each with probability 1/2) into the data of the real DP fine-tune, runs it, guesses
from the released noisy gradients which canaries were in, and turns the guesses into epsilon_lb, a lower
bound on epsilon at 95% confidence (the one-run audit of Steinke, Nasr & Jagielski 2023). A correct pipeline
gives epsilon_lb <= the claimed epsilon (the accountant's, for the planned noise); the same audit then runs
with three planted bugs, to show it can fail: noise at sigma/4 (noise-quarter), clipping per row instead of
per image (per-row-clipping) and noise drawn from the public seed (public-seed-noise). Every case is also
audited on the DP-SGD engine alone (Dirac canaries), which tells an engine fault from a pipeline fault.

Threat model: a white-box auditor who sees every step's noisy gradient and the public configuration, but
neither the canary bits, nor the secure noise, nor the sampling (the sample rate is 1). The audit crafts the
public initial model so that each canary has gradient coordinates of its own, and fine-tunes with learning
rate 0 (the guarantee covers the released gradients for any learning rate). It cannot certify a large
epsilon: it catches leaks of several times the claim, not an epsilon off by tens of percent.

--kind gan audits the GAN's DP discriminator step instead (privimage.audit_gan: canary records through
privimage.train.finetune_gan, each the only record of its class, a crafted public discriminator; cases none,
noise-quarter, no-clipping (the discriminator's clipping skipped, the noise still sigma x C) and
public-seed-noise). It has no engine-level rows (the engine is the same DPEngine).

Settings: --epsilon and --delta are the claim audited (keep epsilon small: 1 to 2); --runs sets the number
of canaries (diffusion: runs x (4 x width - 1); gan: runs x (classes - 1)): more runs, more power, more time.

Exit status: 0 if the pipeline is consistent with its claim; 1 if the audit refutes the claim (a privacy bug).
A planted bug that the audit misses is reported as "missed" (too little power: raise --runs).

Example:
  privimage audit --runs 32 --markdown audit.md
  privimage audit --kind gan --runs 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from privimage.commands.validators import epsilon as _epsilon
from privimage.commands.validators import positive_int as _positive_int, seed as _seed
from privimage.commands.validators import unit_interval as _unit_interval

_CASES = ("none", "noise-quarter", "per-row-clipping", "public-seed-noise", "no-clipping")


def _cases(text: str) -> list[str] | None:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if text.strip() == "all":
        return None  # the kind's own cases
    unknown = [name for name in names if name not in _CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'all' or a comma-separated list of {', '.join(_CASES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=_epsilon, default=2.0, help="claimed epsilon audited (default: 2)")
    parser.add_argument("--delta", type=_unit_interval, default=1e-5, help="delta of the claim (default: 1e-5)")
    parser.add_argument("--kind", choices=("diffusion", "gan"), default="diffusion",
                        help="the fine-tune audited: the UNet's (default) or the GAN's DP discriminator step")
    parser.add_argument("--runs", type=_positive_int, default=None,
                        help="fine-tunes per case; canaries = runs x (4 x width - 1), gan: runs x (classes - 1) "
                             "(default: 16, gan: 2)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="DP steps per fine-tune (default: 2, gan: 1)")
    parser.add_argument("--width", type=_positive_int, default=None,
                        help="the audited UNet's nf, a multiple of 4 (default: 32); gan: the discriminator's "
                             "d_width (default: 8)")
    parser.add_argument("--classes", type=_positive_int, default=None,
                        help="gan only: the GAN's classes, one canary each but one (default: 4096)")
    parser.add_argument("--cases", type=_cases, default=None,
                        help="'all' (default: the kind's cases: diffusion none, noise-quarter, per-row-clipping, "
                             "public-seed-noise; gan none, noise-quarter, no-clipping, public-seed-noise) or a "
                             "comma-separated subset of: " + ", ".join(_CASES))
    parser.add_argument("--seed", type=_seed, default=0, help="public configuration seed (default: 0)")
    parser.add_argument("--reproducible", type=int, default=None, metavar="SEED",
                        help="FOR TESTS: derive the canary bits, the DP noise and the auditor's draws from SEED "
                             "instead of the OS's entropy")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the table here")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from privimage.audit import CASES, AuditSettings, audit_engine, format_report, run_audit
    from privimage.io import save_json

    given = {name: getattr(args, name) for name in ("runs", "steps", "width") if getattr(args, name) is not None}
    if args.kind == "gan":
        from privimage.audit_gan import GAN_CASES, GANAuditSettings, run_gan_audit

        if args.classes is not None:
            given["classes"] = args.classes
        settings = GANAuditSettings(epsilon=args.epsilon, delta=args.delta, seed=args.seed, **given)
        results = run_gan_audit(settings, args.cases or GAN_CASES, reproducible=args.reproducible)
    else:
        if args.classes is not None:
            print("privimage audit: --classes is a GAN setting (--kind gan); the diffusion audit's classes are "
                  "4 x --width.", file=sys.stderr)
            return 2
        settings = AuditSettings(epsilon=args.epsilon, delta=args.delta, seed=args.seed, **given)
        cases = args.cases or CASES
        results = audit_engine(settings, cases, reproducible=args.reproducible)
        results += run_audit(settings, cases, reproducible=args.reproducible)
    report = format_report(results, settings)
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    if args.json:
        save_json([{**asdict(r), "bug": r.bug.value, "bound": asdict(r.bound), "verdict": r.verdict,
                    "replay_correlation": None if math.isnan(r.replay_correlation) else r.replay_correlation}
                   for r in results], args.json)
    missed = [f"{r.level}/{r.bug.value}" for r in results if r.verdict == "missed"]
    if missed:
        print(f"Planted bug(s) missed: {', '.join(missed)}: the audit lacked power; raise --runs.")
    return 1 if any(r.verdict.startswith("VIOLATION") for r in results) else 0
