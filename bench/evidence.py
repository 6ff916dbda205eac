"""Does pre-training on the query's classes help, over seeds and noise levels? (``privimage.train.evidence``)

For each seed, the toy comparison of the test suite (``evidence.embedded_setup``: embedded data at 16×16, a
small UNet, one DP fine-tune plan for all): the three starting points (public images of the selected classes,
the same number of random public images, no pre-training), the same DP fine-tune, then the held-out EDM loss
at ``EVAL_SIGMAS`` (the test's score, lower is better) and at each σ of ``--sigmas``. Results:
``evidence.json`` and ``evidence.md`` in ``bench/results`` (``harness.results_dir``).

    python bench/evidence.py [--seeds 0 1 2 3] [--pretrain-steps 300] [--sigmas 0.1 0.3 0.68 1.5 2 4 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from privimage.train import evidence  # noqa: E402

STARTS = ("subset", "random", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3, 0.68, 1.5, 2.0, 4.0, 8.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = evidence.embedded_setup()
    meta = harness.environment("cpu", pretrain_steps=args.pretrain_steps, eval_sigmas=list(evidence.EVAL_SIGMAS))
    results = []
    for seed in args.seeds:
        states = evidence.fine_tune_starting_points(**{k: v for k, v in setup.items() if k != "heldout"},
                                                    pretrain_steps=args.pretrain_steps, seed=seed)
        held = setup["heldout"]
        row = {"seed": seed}
        for name, state in states.items():
            row[name] = evidence.heldout_loss(setup["unet"], state, held.images, held.labels, seed=seed)
            row[f"{name}_per_sigma"] = evidence.heldout_losses(setup["unet"], state, held.images, held.labels,
                                                              sigmas=args.sigmas, seed=seed)
        results.append(row)
        print(row, flush=True)
        harness.write_json(harness.results_dir() / "evidence.json",
                           {"meta": meta, "sigmas": args.sigmas, "results": results})
    _markdown(meta, args.sigmas, results)


def _markdown(meta: dict, sigmas: list[float], results: list[dict]) -> None:
    lines = [f"# Pre-training evidence: held-out denoising loss after the same DP fine-tune ({meta['date']})", "",
             f"{meta['device']}, torch {meta['versions']['torch']}, git {meta['git_sha']}. Command: "
             f"`python bench/{meta['command']}`. Embedded data at 16x16 (`privimage.train.evidence.embedded_setup`), "
             f"{meta['pretrain_steps']} pre-training steps, 10 DP steps (σ = 1, q = 0.1). Lower is better.", "",
             f"Mean over EVAL_SIGMAS {tuple(meta['eval_sigmas'])} (the test's score):", "",
             "| seed | subset | random | none | random - subset | none - random |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['subset']:.4f} | {r['random']:.4f} | {r['none']:.4f} | "
                     f"{r['random'] - r['subset']:+.4f} | {r['none'] - r['random']:+.4f} |")
    lines += ["", "Per σ (a separate fixed-noise draw per σ): which start is best, and subset − random:", "",
              "| seed | " + " | ".join(f"σ={s:g}" for s in sigmas) + " |", "|---|" + "---|" * len(sigmas)]
    for r in results:
        cells = []
        for i in range(len(sigmas)):
            losses = {name: r[f"{name}_per_sigma"][i] for name in STARTS}
            best = min(losses, key=losses.get)
            cells.append(f"{best} ({losses['subset'] - losses['random']:+.4f})")
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    harness.write_atomic(harness.results_dir() / "evidence.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
