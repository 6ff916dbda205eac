"""Run the DP semantic query: pick the public classes that the sensitive images resemble, build the subset.

Steps: (1) train the query classifier on the PUBLIC data at the sensitive resolution (cached; it never sees
sensitive images, so this spends no privacy); (2) every sensitive image votes for the classifier's top-k
public classes; (3) Gaussian noise of std sigma*sqrt(k) is added to the vote histogram (one image changes
k counts by 1: L2 sensitivity sqrt(k)) and the top-N classes of the noisy histogram are selected; (4) the
public images of those classes become the pre-training subset, written once to an FFCV file.

Privacy meaning of the settings:
  --epsilon-query E, --delta D   the (E, D)-DP guarantee of this one release; sigma is calibrated so one
                                 Gaussian release meets it. If the run directory already holds a
                                 budget.json (planned by `privimage run`), its query plan is used instead
                                 and the spend is recorded in that same ledger.
  --top-k K    votes per sensitive image. Larger K spreads each image's vote over more classes but raises
               the sensitivity to sqrt(K), so the noise grows with it.
  --top-n N    classes selected. Free (post-processing), but the noisy ranking is less reliable deep down.
  Only the noisy histogram and the selected labels leave this command; the exact votes are never written.
  The noise comes from a cryptographically seeded generator; --insecure-test-noise (tests only) seeds it from
  the public --seed instead, which makes the histogram NOT private.

Writes into the run directory: query/selected_labels.json, query/histogram.npy (noisy), query/classifier.pt,
query/subset.ffcv (or query/subset.npz without FFCV), budget.json (the ledger with the query's spend) and,
unless one exists, config.json (these settings).

Example:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sensitive", required=True, metavar="SPEC",
                        help="sensitive data, name[:split][,key=value] (e.g. embedded:sensitive, "
                             "cifar10:train,root=DIR); default split 'sensitive'")
    parser.add_argument("--public", required=True, metavar="SPEC",
                        help="public data spec (e.g. embedded:public, imagenet32:train,root=DIR); default split "
                             "'public'")
    parser.add_argument("--epsilon-query", type=_epsilon, default=None,
                        help="epsilon of this query alone (required unless the run directory has a budget.json)")
    parser.add_argument("--delta", type=_unit_interval, default=1e-5, help="delta, below 1/n (default: %(default)s)")
    parser.add_argument("--top-k", type=_positive_int, default=1, help="votes per sensitive image (default: %(default)s)")
    parser.add_argument("--top-n", type=_positive_int, required=True, help="number of public classes to select")
    parser.add_argument("--max-per-label", type=_positive_int, default=None,
                        help="cap on public images per selected class in the subset (default: no cap)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="run directory to write into (default: a new runs/NNNNN-query)")
    parser.add_argument("--classifier-width", type=_positive_int, default=32,
                        help="query classifier width (default: %(default)s)")
    parser.add_argument("--classifier-epochs", type=_positive_int, default=5,
                        help="query classifier epochs on the public data (default: %(default)s)")
    parser.add_argument("--no-ffcv", action="store_true", help="write the subset as npz even if FFCV is installed")
    parser.add_argument("--seed", type=_seed, default=0, help="seed for data subsets and the classifier (public)")
    parser.add_argument("--insecure-test-noise", action="store_true",
                        help="FOR TESTS ONLY, NOT PRIVATE: draw the query noise from a generator seeded by --seed "
                             "(public), so the noisy histogram can be reproduced and its noise subtracted. Without "
                             "it (the default) the noise comes from a cryptographically seeded generator")
    parser.add_argument("--secure-noise", action="store_true",
                        help="deprecated, no effect: secure noise is the default (will be removed)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")


def _new_run_dir(root: Path, name: str) -> Path:
    from privimage.rundir import RunDir

    return RunDir.make(root, name).path


def _noise_generator(args: argparse.Namespace):
    """The query noise's source: secure (OS-seeded) unless --insecure-test-noise, which says it is not private."""
    import torch

    from privimage.engine import secure_generator

    if args.secure_noise:
        print("privimage query: --secure-noise is deprecated and has no effect: secure noise is the default.",
              file=sys.stderr)
    if args.insecure_test_noise:
        print("privimage query: --insecure-test-noise: the query noise is seeded by the PUBLIC --seed. The released "
              "histogram is NOT private; use this for tests only.", file=sys.stderr)
        return torch.Generator().manual_seed(args.seed + 11)
    return secure_generator()


def run(args: argparse.Namespace) -> int:
    if args.run_dir is not None and args.run_dir.is_dir() and not args.dry_run:  # one writer per run directory
        from privimage.rundir import RunDir

        with RunDir(args.run_dir).lock("query"):
            return _query(args)
    return _query(args)


def _query(args: argparse.Namespace) -> int:
    from privimage.data import load_spec
    from privimage.engine import PrivacyBudget
    from privimage.engine.budget import QUERY
    from privimage.io import save_json, save_npz
    from privimage.query import (ClassifierConfig, SemanticQuery, ffcv_available, query_budget, select_subset,
                                 train_classifier, write_ffcv)

    run_dir = args.run_dir
    budget_path = run_dir / "budget.json" if run_dir else None
    if budget_path is not None and budget_path.is_file():
        budget = PrivacyBudget.from_state_dict(json.loads(budget_path.read_text()))
        if QUERY not in budget.plan:
            raise ValueError(f"{budget_path}: the budget plans no 'query' mechanism.")
        if budget.spent.get(QUERY, 0) >= budget.plan[QUERY].count:
            raise ValueError(f"{budget_path}: the planned query was already spent; a second query would cost "
                             f"more privacy. Start a new run directory.")
    elif args.epsilon_query is None:
        raise ValueError("--epsilon-query is required (no budget.json in the run directory to take it from).")
    else:
        budget = query_budget(epsilon=args.epsilon_query, delta=args.delta)
    query = SemanticQuery.from_budget(budget, top_k=args.top_k, top_n=args.top_n)
    config = ClassifierConfig(width=args.classifier_width, epochs=args.classifier_epochs, seed=args.seed)
    settings = {"sensitive": args.sensitive, "public": args.public, "top_k": query.top_k, "top_n": query.top_n,
                "sigma": query.sigma, "noise_std": query.noise_std, "epsilon_query": budget.epsilon_of(QUERY).upper,
                "delta": budget.delta, "max_per_label": args.max_per_label, "classifier": config.__dict__}
    if args.dry_run:
        print(json.dumps(settings, indent=2))
        return 0

    sensitive = load_spec(args.sensitive, split="sensitive", seed=args.seed)
    from privimage.preflight import check_delta

    check_delta(budget.delta, len(sensitive))  # delta >= 1/n promises nothing
    public = load_spec(args.public, split="public", seed=args.seed)
    if query.top_n > public.num_classes or query.top_k > public.num_classes:
        raise ValueError(f"--top-k {query.top_k} / --top-n {query.top_n} exceed the {public.num_classes} public "
                         f"classes.")
    run_dir = run_dir or _new_run_dir(Path("runs"), "query")
    out = run_dir / "query"
    if not (run_dir / "config.json").exists():  # a standalone query run; `privimage run` writes its own
        save_json({"command": "query", **settings}, run_dir / "config.json")
    classifier = train_classifier(public, resolution=sensitive.resolution, config=config)
    classifier.save(out / "classifier.pt", public_accuracy=classifier.public_accuracy)
    result = query.run(classifier, sensitive.images, budget=budget, generator=_noise_generator(args))
    save_json(budget.state_dict(), run_dir / "budget.json")  # the spend is on disk before anything else
    result.save(out, class_names=public.class_names)
    subset = select_subset(public, result.selected, max_per_label=args.max_per_label,
                           resolution=sensitive.resolution, seed=args.seed)
    if ffcv_available() and not args.no_ffcv:
        subset_path = write_ffcv(subset, out / "subset.ffcv")
    else:
        subset_path = out / "subset.npz"
        save_npz(subset_path, images=subset.images.numpy(), labels=subset.labels.numpy())
    print(f"query: sigma={query.sigma:.4g} (noise std {query.noise_std:.4g}), epsilon={budget.epsilon_of(QUERY).upper:.4g} "
          f"at delta={budget.delta:g}; classifier public accuracy {classifier.public_accuracy:.3f}")
    print("selected: " + ", ".join(f"{i} {public.class_names[i]}" for i in result.selected))
    print(f"subset: {len(subset)} public images -> {subset_path}")
    print(f"run directory: {run_dir}")
    return 0
