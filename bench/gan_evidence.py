"""PRIVIMAGE+G on the embedded data: selected-subset pre-training vs random public vs none, at the same ε.

For each seed, three GANs of one architecture get the identical DP fine-tune (the same budget plan: σ, q,
discriminator steps; test-mode randomness from the seed) from three starting points
(:mod:`privimage.train.gan_evidence`): pre-trained on the public images of the sensitive classes (what a
correct semantic query selects; the embedded data's sensitive classes by name), on as many random public
images with random labels, or not at all. Each fine-tuned generator (its EMA) is scored on held-out
sensitive images by the proxy FID (query classifier features, trained on public data only) and by CA (the
small classifier trained on 1000 samples, tested on the held-out images); the pre-trained generator's proxy
FID before the fine-tune is recorded too. Reported: every run, and mean ± std (sample std) over seeds.

Results: ``bench/results/gan_evidence.json`` and ``gan_evidence.md``.

Usage:
    python bench/gan_evidence.py                    # 3 seeds; about an hour on a shared 2-core CPU
    python bench/gan_evidence.py --seeds 0 1 2 3 4 --pretrain-steps 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, _versions, device_name, git_sha  # noqa: E402

from privimage.data import load_dataset  # noqa: E402
from privimage.data.embedded import sensitive_classes  # noqa: E402
from privimage.engine import Mechanism, PrivacyBudget, calibrate_noise_multiplier, compute_epsilon  # noqa: E402
from privimage.privacy import FINETUNE  # noqa: E402
from privimage.evaluate import SMALL, proxy_feature_net  # noqa: E402
from privimage.models import GAN_PRESETS  # noqa: E402
from privimage.query import ClassifierConfig, train_classifier  # noqa: E402
from privimage.train.gan_evidence import STARTS, compare_gan_starting_points  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--num-sensitive", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100, help="expected logical batch q·N (default: %(default)s)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="discriminator steps")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = args.resolution
    public = load_dataset("embedded", split="public", size=12000, resolution=res)
    sensitive = load_dataset("embedded", split="sensitive", size=args.num_sensitive, resolution=res)
    heldout = load_dataset("embedded", split="sensitive_test", size=500, resolution=res)
    clf_config = ClassifierConfig(width=16, epochs=10, style_noise=0.15, style_gain=0.3)
    classifier = train_classifier(public, resolution=res, config=clf_config, log=print)
    features = proxy_feature_net(classifier)
    q = args.batch / args.num_sensitive
    sigma = calibrate_noise_multiplier(target_epsilon=args.epsilon, sample_rate=q, steps=args.finetune_steps,
                                       delta=args.delta)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=args.finetune_steps, delta=args.delta).upper
    budget = PrivacyBudget(args.epsilon, args.delta, plan={FINETUNE: Mechanism(sigma, q, args.finetune_steps)})
    gan = replace(GAN_PRESETS[args.preset], num_classes=len(sensitive.class_names), resolution=res)
    pretrain = dict(batch_size=32, d_lr=1e-3, g_lr=1e-3, betas=(0.5, 0.999), d_steps_per_g_step=1, ema_decay=0.99)
    finetune = dict(physical_batch_size=100, max_grad_norm=1e-3, d_lr=2e-4, g_lr=2e-4, betas=(0.5, 0.999),
                    d_steps_per_g_step=2, ema_decay=0.9)
    runs = []
    for seed in args.seeds:
        t = time.perf_counter()
        r = compare_gan_starting_points(public=public, sensitive=sensitive, heldout=heldout,
                                        selected=sensitive_classes(0), gan=gan, budget_state=budget.state_dict(),
                                        features=features, pretrain_steps=args.pretrain_steps, pretrain=pretrain,
                                        finetune=finetune, num_samples=args.num_samples, ca=SMALL, seed=seed)
        runs.append({"seed": seed, "results": r, "seconds": round(time.perf_counter() - t, 1)})
        print(f"seed {seed}: {json.dumps(r)}", flush=True)
    summary = {}
    for start in STARTS:
        for metric in runs[0]["results"][start]:
            values = [run["results"][start][metric] for run in runs]
            summary.setdefault(start, {})[metric] = {"mean": statistics.mean(values),
                                                     "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    if args.no_save:
        return 0
    torch_v, triton_v = _versions()
    meta = {"device": device_name("cpu"), "torch": torch_v, "git_sha": git_sha(), "threads": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "seconds": round(time.perf_counter() - t0, 1),
            "gan": gan.to_dict(), "pretrain": {"steps": args.pretrain_steps, **pretrain},
            "finetune": {**finetune, "sigma": sigma, "sample_rate": q, "steps": args.finetune_steps,
                         "epsilon": eps, "delta": args.delta},
            "data": {"resolution": res, "public": len(public), "sensitive": len(sensitive), "heldout": len(heldout),
                     "proxy_classifier_public_accuracy": classifier.public_accuracy},
            "num_samples": args.num_samples, "ca": "privimage.evaluate.SMALL"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gan_evidence.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs},
                                                          indent=2) + "\n")
    lines = [f"# PRIVIMAGE+G evidence: pre-training on the selected subset ({meta['device']}, torch {torch_v}, "
             f"{meta['date']}, git {meta['git_sha']})", "",
             f"Command: `{meta['command']}` ({meta['seconds'] / 60:.0f} min). Embedded data at {res}x{res}: "
             f"{len(sensitive)} sensitive training images (5 classes), {len(heldout)} held out; GAN preset "
             f"`{args.preset}`; pre-training {args.pretrain_steps} steps on the subset (or as many random public "
             f"images), then the same DP fine-tune: {args.finetune_steps} discriminator steps, q = {q:g}, "
             f"sigma = {sigma:.3f}, C = {finetune['max_grad_norm']:g}: epsilon = {eps:.2f} at delta = "
             f"{args.delta:g} for every starting point. Proxy FID: query-classifier features (public accuracy "
             f"{classifier.public_accuracy:.3f}), {args.num_samples} samples vs the held-out images, lower is better; "
             f"CA: small CNN trained on the samples, accuracy on the held-out images (chance 0.2).", "",
             "| start | proxy FID after DP fine-tune | CA after DP fine-tune | proxy FID of the pre-trained start |",
             "|---|---|---|---|"]
    for start in STARTS:
        s = summary[start]
        before = s.get("pretrained_proxy_fid")
        lines.append(f"| {start} | {s['proxy_fid']['mean']:.1f} ± {s['proxy_fid']['std']:.1f} | "
                     f"{s['ca']['mean']:.3f} ± {s['ca']['std']:.3f} | "
                     + (f"{before['mean']:.1f} ± {before['std']:.1f} |" if before else "(random init) |"))
    lines += ["", "Mean ± sample std over seeds " + ", ".join(str(s) for s in args.seeds) + ". Every run:", "",
              "| seed | start | proxy FID | CA | pre-trained proxy FID |", "|---|---|---|---|---|"]
    for run in runs:
        for start in STARTS:
            r = run["results"][start]
            before = r.get("pretrained_proxy_fid")
            lines.append(f"| {run['seed']} | {start} | {r['proxy_fid']:.1f} | {r['ca']:.3f} | "
                         + (f"{before:.1f} |" if before is not None else "- |"))
    (RESULTS / "gan_evidence.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
