"""How well the DP semantic query finds the sensitive classes: the query classifier's accuracy and the
release's hits, with and without the classifier's style augmentation (``privimage.query``).

On a run config's data (``--config``, default the demo: embedded data at 16×16, 20,000 public images of 60
classes, 4,000 sensitive images of 5 of them in a shifted style): for each style setting, the query
classifier is trained on the public data (no cache), the sensitive images' votes are counted once, and
``--draws`` Gaussian releases are made at the config's query σ (its ε share, alone). A sensitive class is a
hit when the public class assigned to it is the one it was drawn from (``embedded.sensitive_classes``).
Results: ``query.json`` and ``query.md`` in ``bench/results`` (``harness.results_dir``).

    python bench/query.py [--config demo] [--draws 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from privimage.config import load_config  # noqa: E402
from privimage.data.embedded import sensitive_classes  # noqa: E402
from privimage.privacy import QUERY  # noqa: E402
from privimage.pipeline import load_split  # noqa: E402
from privimage.query import (ClassifierConfig, SemanticQuery, query_budget, query_votes,  # noqa: E402
                             release_histogram, train_query_classifier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    public, sensitive = load_split(cfg, "public"), load_split(cfg, "sensitive")
    truth = {j: c for c, j in enumerate(sensitive_classes(cfg.data.seed))}  # public label -> sensitive class
    budget = query_budget(epsilon=cfg.epsilon * cfg.query.epsilon_fraction, delta=cfg.delta)
    query = SemanticQuery.from_budget(budget, top_k=cfg.query.top_k, top_n=cfg.query.top_n)
    qc = cfg.query
    base = ClassifierConfig(width=qc.classifier_width, epochs=qc.classifier_epochs, seed=cfg.seed)
    meta = harness.environment("cpu", config=args.config, public_images=len(public), sensitive_images=len(sensitive),
                               resolution=cfg.data.resolution, query_epsilon=budget.epsilon, delta=cfg.delta,
                               sigma=query.sigma, top_k=query.top_k, top_n=query.top_n, draws=args.draws)
    results = []
    for noise, gain in ((0.0, 0.0), (qc.classifier_style_noise, qc.classifier_style_gain)):
        t0 = time.perf_counter()
        classifier = train_query_classifier(public, resolution=sensitive.resolution, use_cache=False, log=None,
                                            config=replace(base, style_noise=noise, style_gain=gain))
        seconds = time.perf_counter() - t0
        votes = query_votes(classifier, sensitive.images, sensitive.labels, num_classes=sensitive.num_classes,
                            top_k=query.top_k)
        hits = []
        for draw in range(args.draws):
            label_map = release_histogram(votes, query, generator=torch.Generator().manual_seed(draw)).label_map
            hits.append(sum(truth.get(j) == c for j, c in label_map.items()))
        results.append({"style_noise": noise, "style_gain": gain,
                        "train_images": round(len(public) * (1 - base.holdout)),
                        "public_accuracy": classifier.public_accuracy, "classifier_s": round(seconds, 1),
                        "mean_hits": sum(hits) / len(hits),
                        "all_hit_share": sum(h == len(truth) for h in hits) / len(hits)})
        print(results[-1], flush=True)
        harness.write_json(harness.results_dir() / "query.json", {"meta": meta, "results": results})
    lines = [f"# The DP semantic query on `{args.config}` ({meta['date']})", "",
             f"{meta['device']}, load average {meta['load_average_1m']}, torch {meta['versions']['torch']}, git "
             f"{meta['git_sha']}. Command: `python bench/{meta['command']}`. {len(public)} public images "
             f"({public.num_classes} classes), {len(sensitive)} sensitive ({sensitive.num_classes} classes) at "
             f"{cfg.data.resolution}x{cfg.data.resolution}; query ε = {budget.epsilon:g} alone at δ = {cfg.delta:g} "
             f"(σ = {query.sigma:.3g}, top-k {query.top_k}); {args.draws} noise draws of one set of votes.", "",
             "| style noise / gain | classifier train images | held-out public accuracy | classifier s | "
             f"sensitive classes hit (mean of {len(truth)}) | draws with all hit |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['style_noise']:g} / {r['style_gain']:g} | {r['train_images']:,} | "
                     f"{r['public_accuracy']:.3f} | {r['classifier_s']} | {r['mean_hits']:.2f} | "
                     f"{r['all_hit_share']:.2f} |")
    harness.write_atomic(harness.results_dir() / "query.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
