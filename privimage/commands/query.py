"""Run the DP semantic query: the first stage of a run, into a run directory the later stages continue.

Steps (the query stage of `privimage run`, exactly): (1) train the query classifier on the PUBLIC data at the
sensitive resolution (cached; it never sees sensitive images, so this spends no privacy); (2) every
sensitive image votes for the classifier's top-k public classes in its own class's row of a histogram;
(3) Gaussian noise of std sigma*sqrt(k) is added to the whole histogram (one image changes k counts of one
row by 1: L2 sensitivity sqrt(k)) and each sensitive class gets its top public classes of the noisy
histogram; (4) the public images of those classes, relabelled to the sensitive class that chose them, are
the pre-training subset. Then `privimage pretrain RUN_DIR`, `privimage finetune RUN_DIR` and
`privimage sample RUN_DIR` continue the run.

Settings come from a run config (--config, default demo); the flags below override its fields. A run
directory that already holds a config.json keeps it (a flag that would change it is refused).

Privacy meaning of the settings:
  budget       without --epsilon-query, the whole run's budget is planned from the config's epsilon and
               delta, as `privimage run` does (the query takes query.epsilon_fraction of epsilon, the
               fine-tune the rest); a budget.json already in the run directory is used as it is.
  --epsilon-query E, --delta D   a standalone query: the (E, D)-DP guarantee of this one release, sigma
               calibrated so one Gaussian release meets it. Such a directory can be pre-trained but not
               fine-tuned: no fine-tune is planned.
  --top-k K    votes per sensitive image. Larger K spreads each image's vote over more classes but raises
               the sensitivity to sqrt(K), so the noise grows with it.
  --top-n N    public classes selected in all, split over the sensitive classes. Free (post-processing),
               but the noisy ranking is less reliable deep down.
  Only the noisy histogram and the selected labels leave this command; the exact votes are never written.
  The spend is in budget.json before the noise is drawn. The noise comes from a cryptographically seeded
  generator; --insecure-test-noise (tests only) seeds it from the public seed instead, which makes the
  histogram NOT private (and sets finetune.secure_noise = false in the run's config, so the reports say so).

Writes into the run directory: config.json, budget.json (the ledger with the query's spend), plan.json
(when the fine-tune is planned), query/classifier.pt, query/histogram.npy (noisy), query/selected_labels.json
and query/subset.npz (the relabelled public subset; pre-training writes query/subset.ffcv from it when it
streams from FFCV).

Example:
  privimage query --config test --run-dir runs/q && privimage pretrain runs/q && privimage finetune runs/q
  privimage query --sensitive embedded:sensitive,size=2000 --public embedded:public,size=20000 \\
      --epsilon-query 1 --delta 1e-5 --top-k 2 --top-n 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from privimage.commands.validators import epsilon as _epsilon, positive_int as _positive_int, seed as _seed
from privimage.commands.validators import unit_interval as _unit_interval
from privimage.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", metavar="NAME|FILE",
                        help="the run config (data, query and the later stages' settings): a preset name or a JSON "
                             "file (default: %(default)s; a RUN_DIR's own config.json wins)")
    parser.add_argument("--sensitive", default=None, metavar="SPEC",
                        help="sensitive data, name[:split][,key=value] (e.g. embedded:sensitive, "
                             "cifar10:train,root=DIR); default: the config's data.sensitive")
    parser.add_argument("--public", default=None, metavar="SPEC",
                        help="public data spec (e.g. embedded:public, imagenet32:train,root=DIR); default: the "
                             "config's data.public")
    parser.add_argument("--epsilon-query", type=_epsilon, default=None,
                        help="a standalone query spending this epsilon alone (no fine-tune planned); default: plan "
                             "the whole run's budget from the config, as `privimage run` does")
    parser.add_argument("--delta", type=_unit_interval, default=None,
                        help="delta, below 1/n (default: the config's)")
    parser.add_argument("--top-k", type=_positive_int, default=None, help="votes per sensitive image (default: config)")
    parser.add_argument("--top-n", type=_positive_int, default=None,
                        help="public classes to select in all (default: config)")
    parser.add_argument("--max-per-label", type=_positive_int, default=None,
                        help="cap on public images per selected class in the subset (default: config)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory to write into (default: a new runs/NNNNN-NAME)")
    parser.add_argument("--classifier-width", type=_positive_int, default=None,
                        help="query classifier width (default: config)")
    parser.add_argument("--classifier-epochs", type=_positive_int, default=None,
                        help="query classifier epochs on the public data (default: config)")
    parser.add_argument("--seed", type=_seed, default=None, help="the run's public seed (default: config)")
    parser.add_argument("--no-ffcv", action="store_true",
                        help="deprecated, no effect: the subset is query/subset.npz, and pre-training writes "
                             "query/subset.ffcv from it when it streams from FFCV (will be removed)")
    parser.add_argument("--insecure-test-noise", action="store_true",
                        help="FOR TESTS ONLY, NOT PRIVATE: draw the query noise from a generator seeded by the "
                             "public seed, so the noisy histogram can be reproduced and its noise subtracted (sets "
                             "finetune.secure_noise = false). Without it (the default) the noise comes from a "
                             "cryptographically seeded generator")
    parser.add_argument("--secure-noise", action="store_true",
                        help="deprecated, no effect: secure noise is the default (will be removed)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")


def _resolve_config(args: argparse.Namespace):
    """The run config: RUN_DIR's config.json if there is one (flags may not change it), else --config with
    the flags applied. Returns (config, whether it came from RUN_DIR)."""
    from dataclasses import replace

    from privimage.config import load_config
    from privimage.pipeline import load_run_config

    existing = args.run_dir is not None and (args.run_dir / "config.json").is_file()
    cfg = load_run_config(args.run_dir) if existing else load_config(args.config)
    sections = {"data": {"sensitive": args.sensitive, "public": args.public},
                "query": {"top_k": args.top_k, "top_n": args.top_n, "max_per_label": args.max_per_label,
                          "classifier_width": args.classifier_width, "classifier_epochs": args.classifier_epochs},
                "finetune": {"secure_noise": False if args.insecure_test_noise else None}}
    over = {name: replace(getattr(cfg, name), **{k: v for k, v in fields.items() if v is not None})
            for name, fields in sections.items()}
    top = {k: v for k, v in (("seed", args.seed), ("delta", args.delta)) if v is not None}
    resolved = replace(cfg, **over, **top)
    if existing and resolved != cfg:
        raise ConfigError(f"{args.run_dir / 'config.json'} fixes this run's settings, and the flags given would "
                         f"change them: drop them, or query into a new --run-dir.")
    return resolved, existing


def _budget(args: argparse.Namespace, cfg, num_sensitive):
    """(budget, where it came from): RUN_DIR's budget.json, a standalone query's, or the whole run's plan.
    ``num_sensitive()`` gives the sensitive set's size (δ must be below 1/n)."""
    from privimage.preflight import check_delta, plan_budget
    from privimage.query import query_budget
    from privimage.rundir import RunDir

    if args.run_dir is not None and RunDir(args.run_dir).budget_path.is_file():
        run = RunDir(args.run_dir)
        if args.epsilon_query is not None:
            print(f"privimage query: {run.budget_path} plans this run's budget; --epsilon-query is ignored.",
                  file=sys.stderr)
        return run.load_budget(), str(run.budget_path)
    if args.epsilon_query is not None:
        check_delta(cfg.delta, num_sensitive(), allow=cfg.allow_large_delta)
        return query_budget(epsilon=args.epsilon_query, delta=cfg.delta), "a standalone query (--epsilon-query)"
    return plan_budget(cfg, num_sensitive()), "the whole run, planned from the config"


def run(args: argparse.Namespace) -> int:
    from privimage.pipeline import config_json, load_split, stage_query, write_run_plan
    from privimage.preflight import preflight, sensitive_size
    from privimage.privacy import QUERY
    from privimage.rundir import RunDir

    for flag, used in (("--secure-noise", args.secure_noise), ("--no-ffcv", args.no_ffcv)):
        if used:
            print(f"privimage query: {flag} is deprecated and has no effect.", file=sys.stderr)
    cfg, existing = _resolve_config(args)
    if args.insecure_test_noise:
        print("privimage query: --insecure-test-noise: the query noise is seeded by the PUBLIC seed. The released "
              "histogram is NOT private; use this for tests only.", file=sys.stderr)
    found = preflight(cfg, splits=("sensitive", "public"), plan=False,
                      out=None if args.run_dir is not None else Path("runs"))  # before anything is written
    if args.dry_run:
        budget, source = _budget(args, cfg, lambda: sensitive_size(cfg, found.specs.get("sensitive"))[0])
        sigma = budget.noise_multiplier(QUERY)
        print(json.dumps({"config": config_json(cfg), "checked": found.checked(), "budget": source,
                          "query_noise_multiplier": sigma, "query_noise_std": sigma * cfg.query.top_k ** 0.5,
                          "query_epsilon_alone": budget.epsilon_of(QUERY).upper, "delta": budget.delta}, indent=2))
        return 0

    sensitive = load_split(cfg, "sensitive")
    budget, source = _budget(args, cfg, lambda: len(sensitive))
    run = RunDir(args.run_dir) if args.run_dir is not None else RunDir.make(Path("runs"), cfg.name)
    run.path.mkdir(parents=True, exist_ok=True)
    with run.lock("query"):  # one writer per run directory
        if not run.budget_path.is_file():
            write_run_plan(run, cfg, budget, len(sensitive))
        elif not existing:
            run.save_config(cfg)
        label_map = stage_query(run, cfg, sensitive=sensitive)
        selected = run.load_selection()
    print(f"query: sigma={budget.noise_multiplier(QUERY):.4g}, epsilon={budget.epsilon_of(QUERY).upper:.4g} at "
          f"delta={budget.delta:g} (budget: {source})")
    print("selected: " + ", ".join(f"{name} -> {selected['sensitive_class_names'][c]}"
                                   for name, c in zip(selected["selected_names"], label_map.values())))
    print(f"run directory: {run.path} (next: privimage pretrain {run.path})")
    return 0
