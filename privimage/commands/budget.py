"""Calibrate the DP-SGD noise for a total (epsilon, delta) budget and show how it splits.

PrivImage spends the budget twice on the sensitive data: the semantic query (one Gaussian release of the
top-k label histogram) and the DP-SGD fine-tune (STEPS steps, each a Poisson sample at rate Q). This tool
plans both so their composition meets (E, D), then prints the noise multipliers and each part's epsilon.

Privacy meaning of the settings:
  --epsilon, --delta   the guarantee for everything released about the sensitive data.
                       delta should be below 1/n for n sensitive examples.
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
import time


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1)")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epsilon", type=_positive_float, required=True, help="total epsilon (> 0)")
    parser.add_argument("--delta", type=_unit_interval, required=True, help="total delta, in (0, 1); < 1/n")
    parser.add_argument("--sample-rate", type=_rate, required=True, help="Poisson sampling rate q, in (0, 1]")
    parser.add_argument("--steps", type=_positive_int, required=True, help="number of DP-SGD steps")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--query-sigma", type=_positive_float, default=None,
                       help="noise multiplier of the semantic query (default: from --query-fraction)")
    group.add_argument("--query-fraction", type=_unit_interval, default=0.1,
                       help="share of epsilon the query may spend on its own (default: %(default)s)")
    parser.add_argument("--num-examples", type=_positive_int, default=None,
                        help="sensitive data set size: warns if delta >= 1/n, prints the expected batch size")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from privimage.privacy import FINETUNE, QUERY, plan_privimage_budget

    start = time.perf_counter()
    budget = plan_privimage_budget(
        epsilon=args.epsilon, delta=args.delta, sample_rate=args.sample_rate, steps=args.steps,
        query_noise_multiplier=args.query_sigma, query_epsilon_fraction=args.query_fraction,
        num_examples=args.num_examples)
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
