"""Calibrate the DP-SGD noise for a total (epsilon, delta) budget and show how it splits.

PrivImage spends the budget twice on the sensitive data: the semantic query (one Gaussian release of the
top-k label histogram) and the DP-SGD fine-tune (STEPS steps, each a Poisson sample at rate Q). This tool
plans both so their composition meets (E, D), then prints the noise multipliers and each part's epsilon.

Privacy meaning of the settings:
  --epsilon, --delta   the guarantee for everything released about the sensitive data.
                       delta must be below 1/n for n sensitive examples (--num-examples n
                       checks it); 1/(10 n) or less is the usual choice.
  --sample-rate Q      each example joins a step's batch with probability Q (expected batch = Q * n).
                       Smaller Q amplifies privacy; more steps spend more.
  --query-sigma S      the query's noise std over its sensitivity sqrt(top-k); by default it is chosen so
                       the query alone spends --query-fraction of epsilon.

Example:
  privimage budget --epsilon 10 --delta 1e-5 --sample-rate 0.01 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from privimage.commands.validators import epsilon, positive_float, positive_int, rate, unit_interval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=epsilon, required=True, help="total epsilon (> 0)")
    parser.add_argument("--delta", type=unit_interval, required=True, help="total delta, in (0, 1); < 1/n")
    parser.add_argument("--sample-rate", type=rate, required=True, help="Poisson sampling rate q, in (0, 1]")
    parser.add_argument("--steps", type=positive_int, required=True, help="number of DP-SGD steps")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--query-sigma", type=positive_float, default=None,
                       help="noise multiplier of the semantic query (default: from --query-fraction)")
    group.add_argument("--query-fraction", type=unit_interval, default=0.1,
                       help="share of epsilon the query may spend on its own (default: %(default)s)")
    parser.add_argument("--num-examples", type=positive_int, default=None,
                        help="sensitive data set size n: delta >= 1/n is refused; prints the expected batch size")
    parser.add_argument("--allow-large-delta", action="store_true",
                        help="EXPERIMENTS ONLY: accept delta >= 1/n (it permits publishing a record outright)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from privimage.privacy import FINETUNE, QUERY, plan_privimage_budget

    from privimage.preflight import check_delta

    note = check_delta(args.delta, args.num_examples, allow=args.allow_large_delta) if args.num_examples else None
    if note:
        print(f"privimage budget: WARNING: {note}", file=sys.stderr)
    start = time.perf_counter()
    budget = plan_privimage_budget(
        epsilon=args.epsilon, delta=args.delta, sample_rate=args.sample_rate, steps=args.steps,
        query_noise_multiplier=args.query_sigma, query_epsilon_fraction=args.query_fraction)
    seconds = time.perf_counter() - start
    result = {
        "epsilon": args.epsilon, "delta": args.delta,
        "query_noise_multiplier": budget.noise_multiplier(QUERY),
        "query_epsilon_alone": budget.epsilon_of(QUERY).upper,
        "finetune_noise_multiplier": budget.noise_multiplier(FINETUNE),
        "finetune_epsilon_alone": budget.epsilon_of(FINETUNE).upper,
        "composed_epsilon": budget.epsilon_planned().upper,
        "sample_rate": args.sample_rate, "steps": args.steps, "calibration_seconds": round(seconds, 2),
    }
    if args.num_examples:
        result["expected_batch_size"] = args.sample_rate * args.num_examples
    if note:
        result["large_delta"] = note
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"Budget (epsilon={args.epsilon:g}, delta={args.delta:g}) for the semantic query + "
          f"{args.steps} DP-SGD steps at sample rate {args.sample_rate:g}:")
    print(f"  semantic query : noise multiplier {result['query_noise_multiplier']:.4f}"
          f"  (epsilon alone {result['query_epsilon_alone']:.4f})")
    print(f"  DP-SGD fine-tune: noise multiplier {result['finetune_noise_multiplier']:.4f}"
          f"  (epsilon alone {result['finetune_epsilon_alone']:.4f})")
    print(f"  composed        : epsilon {result['composed_epsilon']:.4f} <= {args.epsilon:g}"
          f"  (PRV accountant upper bound)")
    if args.num_examples:
        print(f"  expected batch size q*n = {result['expected_batch_size']:g}")
    print(f"Calibrated in {seconds:.1f} s. These noise multipliers are what `privimage run` would use.")
    return 0
