"""Evaluate a run directory: FID (or proxy FID), Inception Score, precision/recall, classification accuracy.

Reads RUN_DIR (config.json, budget.json, samples/samples.npz drawn from the released model, logs/*.csv,
query/classifier.pt; never a checkpoint) and writes two reports:
  RUN_DIR/release/report.{json,md} + figures/   PUBLISHABLE: metrics on the samples, on held-out test images
                                                 or on reference data you declared public (each metric says
                                                 what it was computed on), the privacy section, samples grid,
                                                 epsilon curve
  RUN_DIR/private/report-private.{json,md} + figures/   PRIVATE: metrics against the sensitive training images,
                                                 the fine-tune's loss curve, real test images beside samples

FID needs the standard FID Inception-v3 weights, pt_inception-2015-12-05-6726825d.pth, as a LOCAL file
(nothing is downloaded): --inception-weights PATH or $PRIVIMAGE_INCEPTION_WEIGHTS. Without it, the proxy
FID is computed on the run's query classifier features and labelled proxy_fid: good for comparing runs on
one data set, not comparable to published FIDs. Reference statistics of real images (mu and sigma only) are
cached in RUN_DIR/private/fid/ (--cache-dir to move them; they are statistics of your data: keep them
private); --reference-stats takes a .npz with mu and sigma written by this or another FID tool.

Classification accuracy (CA) trains on the synthetic images and tests on the real test set:
  official      ResNet-9, SGD 0.1, momentum 0.9, wd 5e-4, cosine, 50 epochs, batch 512, flips
                (--ca-preset small: a few-epoch CNN for CPU demos)
  dpimagebench  several classifiers; each one's epoch is chosen on a NOISY validation split of the sensitive
                data (Report Noisy Max), mean and std over classifiers. This SPENDS PRIVACY on top of the
                training budget: --selection-epsilon E (required) per classifier, so E x (number of
                classifiers) in all, pure epsilon-DP on the generator's training data. Each such evaluation is
                appended to RUN_DIR/evaluation_ledger.json, and the report's privacy section gives the total
                epsilon = training epsilon + all evaluation epsilons (basic composition), at the training delta.
                Validation images that are copies of test images are dropped. Selecting on the test set is a
                privacy leak and is not offered.

Not covered by epsilon: with the default --fid-split sensitive, (proxy) FID and precision/recall compare the
samples with the sensitive training images without noise: they go to the private report only.
--fid-split sensitive_test (held-out test images) or --reference-stats puts them in the publishable report.

Example:
  privimage evaluate runs/00001-demo --ca-preset small
  privimage evaluate runs/00001-demo --inception-weights ~/weights/pt_inception-2015-12-05-6726825d.pth
  privimage evaluate runs/00001-demo --ca-protocol dpimagebench --selection-epsilon 0.1   # spends 0.3 more
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


from privimage.commands.validators import device as _device, epsilon as _epsilon, positive_int as _positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory to evaluate")
    fid = parser.add_argument_group("fidelity")
    fid.add_argument("--inception-weights", default=None, metavar="PTH",
                     help="local pt_inception-2015-12-05-6726825d.pth (default: $PRIVIMAGE_INCEPTION_WEIGHTS; "
                          "neither: proxy FID)")
    fid.add_argument("--reference-stats", default=None, metavar="NPZ",
                     help="precomputed reference statistics (mu, sigma) instead of real images")
    fid.add_argument("--fid-split", default="sensitive", choices=["sensitive", "sensitive_test"],
                     help="real split for the reference statistics (default: %(default)s; its FID is not DP)")
    fid.add_argument("--num-samples", type=_positive_int, default=None,
                     help="generated images to use (default: all; the official protocol uses 5000)")
    fid.add_argument("--num-reference", type=_positive_int, default=None, help="real images (default: all)")
    fid.add_argument("--pr-k", type=_positive_int, default=3, help="k of k-NN precision/recall (default: 3)")
    data = parser.add_argument_group("real data overrides (.npz with images uint8 (N,C,H,W) and labels (N,))")
    data.add_argument("--real", default=None, metavar="NPZ",
                      help="real test set (and FID reference unless --fid-real) instead of config's data set")
    data.add_argument("--fid-real", default=None, metavar="NPZ", help="real images for the FID reference")
    data.add_argument("--val", default=None, metavar="NPZ", help="sensitive validation set (dpimagebench)")
    ca = parser.add_argument_group("classification accuracy")
    ca.add_argument("--ca-protocol", default="official", choices=["official", "dpimagebench", "none"],
                    help="default: %(default)s")
    ca.add_argument("--ca-preset", default="official", choices=["official", "small"],
                    help="training recipe (default: %(default)s)")
    ca.add_argument("--ca-epochs", type=_positive_int, default=None, help="override the preset's epochs")
    ca.add_argument("--ca-archs", default="resnet9,wrn,cnn",
                    help="dpimagebench classifiers, comma-separated (default: %(default)s)")
    ca.add_argument("--selection-epsilon", type=_epsilon, default=None, metavar="E",
                    help="dpimagebench, and required with it: epsilon of the noisy epoch selection per classifier, "
                         "spent on the sensitive validation data ON TOP of the training budget (E x number of "
                         "classifiers in all; added to the report's total epsilon and to evaluation_ledger.json)")
    ca.add_argument("--val-size", type=_positive_int, default=1000,
                    help="dpimagebench: sensitive validation images (default: %(default)s)")
    run = parser.add_argument_group("execution")
    run.add_argument("--device", type=_device, default="cpu", help="torch device (default: %(default)s)")
    run.add_argument("--bf16", action="store_true", help="bfloat16 feature extraction on CUDA")
    run.add_argument("--batch-size", type=_positive_int, default=200, help="feature batch (default: %(default)s)")
    run.add_argument("--cache-dir", default=None,
                     help="where reference statistics of real images are cached (default: RUN_DIR/private/fid; "
                          "they are statistics of your data: keep the folder private)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved options and exit")


def options_from_args(args: argparse.Namespace):
    from privimage.evaluate import classify
    from privimage.evaluate.report import EvaluateOptions

    ca = classify.PRESETS[args.ca_preset]
    if args.ca_epochs:
        ca = replace(ca, epochs=args.ca_epochs)
    archs = tuple(a.strip() for a in args.ca_archs.split(",") if a.strip())
    for arch in archs:
        if arch not in classify.ARCHITECTURES:
            raise ValueError(f"--ca-archs: unknown classifier {arch!r}; choose from {classify.ARCHITECTURES}.")
    return EvaluateOptions(
        inception_weights=args.inception_weights, reference_stats=args.reference_stats, real=args.real,
        fid_real=args.fid_real, val=args.val, fid_split=args.fid_split, num_samples=args.num_samples,
        num_reference=args.num_reference, pr_k=args.pr_k, ca_protocol=args.ca_protocol, ca=ca, ca_archs=archs,
        selection_epsilon=args.selection_epsilon, val_size=args.val_size, batch_size=args.batch_size,
        device=args.device, bf16=args.bf16, cache_dir=args.cache_dir)


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from privimage.evaluate.report import PRIVATE_REPORT, PUBLIC_REPORT, evaluate_run

    from privimage.errors import MissingRunFile
    from privimage.rundir import RunDir
    from privimage.train import resolve_device

    opts = options_from_args(args)
    run = RunDir(args.run_dir)
    if not run.path.is_dir():
        RunDir.open(run.path)  # the error naming it
    if not run.samples_path.is_file():
        raise MissingRunFile(f"{run.samples_path} does not exist: run `privimage sample {run.path}` first.")
    resolve_device(opts.device)
    if args.dry_run:
        print(json.dumps({"run_dir": args.run_dir, **asdict(opts),
                          "selection_epsilon_total": opts.selection_epsilon_total}, indent=2))
        return 0
    with run.lock("evaluate"):
        report = evaluate_run(args.run_dir, opts)
    _print_metrics(report["metrics"])
    private = json.loads(run.private_report_path.read_text())
    if private["metrics"]:
        print(f"PRIVATE (computed on sensitive training data without noise; in {PRIVATE_REPORT} only):")
        _print_metrics(private["metrics"], indent="  ")
    gen, ev, total = (report["privacy"][k] for k in ("generator", "evaluation", "total"))
    if gen:
        print(f"privacy: training epsilon spent {gen['epsilon_spent']:.4g} of its budget {gen['epsilon_budget']:g} "
              f"(delta {gen['delta']:g})")
    else:
        print("privacy: no budget.json, the training epsilon is unknown")
    if ev["epsilon"]:
        print(f"privacy: evaluation epsilon {ev['epsilon']:.4g} ({len(ev['releases'])} release(s) in "
              f"{ev['ledger_file']}, pure epsilon-DP on sensitive data)")
    if total:
        print(f"privacy: total epsilon {total['epsilon']:.4g} at delta {total['delta']:g} (basic composition)"
              + ("" if total["within_budget"] else f", OVER the budget epsilon {gen['epsilon_budget']:g}"))
    print(f"wrote {Path(args.run_dir) / PUBLIC_REPORT.with_suffix('.md')} (publishable) and "
          f"{Path(args.run_dir) / PRIVATE_REPORT.with_suffix('.md')} (private)")
    return 0


def _print_metrics(metrics: dict, indent: str = "") -> None:
    for name, metric in metrics.items():
        if "value" in metric:
            print(f"{indent}{name}: {metric['value']:.4g}")
        elif "mean" in metric:
            print(f"{indent}{name}: {metric['mean']:.4g} ± {metric['std']:.2g}")
        elif "precision" in metric:
            print(f"{indent}{name}: precision {metric['precision']:.3f}, recall {metric['recall']:.3f}")
        else:
            print(f"{indent}{name} ({metric['protocol']}): {100 * metric['accuracy']:.2f}%")
