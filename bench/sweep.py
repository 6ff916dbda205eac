"""An ε sweep against one run, side by side: ``privimage sweep --config demo --epsilons 2,5,10`` vs ``privimage
run --config demo``, on this machine, in one script; then a projection for the official CIFAR-10 preset.

Both commands run as subprocesses with the same environment (``OMP_NUM_THREADS``, default 1, the README's
advice on a shared machine) and each with its own EMPTY query-classifier cache, so neither inherits the other's
public work. The run goes first, then the sweep; the 1/5/15-minute load averages (``os.getloadavg``) are
recorded before and after each, since on a shared machine they move the wall times more than anything here.
Target (DESIGN.md, issue 16): the 3-ε sweep's wall time ≤ 1.5× the one run's.

The projection (labelled as such) costs the official ``cifar10-eps*`` preset for ε ∈ {1, 5, 10} × 3 seeds from
per-image rates measured elsewhere (``bench/results/train_step.md``: the UNet "s" at 32×32, 2-core CPU,
one thread: pre-training 26.2 img/s, DP fine-tune 21.1 rows/s at K = 1); the pre-training and fine-tune
image passes come from the preset (pre-training steps × batch; epochs × N × K). Shared: one pre-training per
seed (every ε's query selects the same subset, as on the embedded data); unshared: one per point.

    python bench/sweep.py                      # writes bench/results/sweep.md
    python bench/sweep.py --epsilons 2,5 --config test --out /tmp/sweep.md   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, results_dir, write_atomic  # noqa: E402

PRETRAIN_IMG_S = 26.2   # bench/results/train_step.md, preset s, batch 16, pretrain (K=1), 2-core CPU, 1 thread
FINETUNE_ROW_S = 21.1   # same file, DP fine-tune (K=1): rows (image x noise draw) per second


def _timed(cmd: list[str], env: dict, log: Path) -> dict:
    before = os.getloadavg()
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(seconds, 1),
            "load_before": [round(x, 2) for x in before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def _stage_times(folder: Path) -> dict:
    return {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(folder.rglob("logs/timings.json"))}


def projection() -> list[dict]:
    from privimage.config import CONFIGS

    rows = []
    for eps in (1.0, 5.0, 10.0):
        cfg = CONFIGS[f"cifar10-eps{eps:g}"]
        pre = cfg.pretrain.steps * cfg.pretrain.batch_size / PRETRAIN_IMG_S / 3600
        ft = cfg.finetune.epochs * 50_000 * cfg.finetune.num_noise / FINETUNE_ROW_S / 3600
        rows.append({"epsilon": eps, "pretrain_h": pre, "finetune_h": ft})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--epsilons", default="2,5,10")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or results_dir() / "sweep.md"
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        base = {**os.environ, "OMP_NUM_THREADS": args.threads}
        one = _timed([sys.executable, "-m", "privimage", "run", "--config", args.config, "--out", str(tmp / "run")],
                     {**base, "PRIVIMAGE_CACHE_DIR": str(tmp / "cache-run")}, tmp / "run.log")
        sweep = _timed([sys.executable, "-m", "privimage", "sweep", "--config", args.config, "--epsilons",
                        args.epsilons, "--devices", "cpu", "--out", str(tmp / "sweep")],
                       {**base, "PRIVIMAGE_CACHE_DIR": str(tmp / "cache-sweep")}, tmp / "sweep.log")
        stages = {"run": _stage_times(tmp / "run"), "sweep": _stage_times(tmp / "sweep")}
        shared = [json.loads(p.read_text()).get("pretraining") for p in (tmp / "sweep").glob("*/sweep.json")]
        if one["rc"] or sweep["rc"]:
            for name in ("run.log", "sweep.log"):
                print(name, (tmp / name).read_text()[-3000:], file=sys.stderr)
    env = environment("cpu", threads=args.threads)
    ratio = sweep["seconds"] / one["seconds"]
    lines = [f"# ε sweep vs one run (`bench/sweep.py`, {env.get('date')}, git {env.get('git_sha')})", "",
             f"Machine: {env.get('device')}, torch {env['versions']['torch']}, OMP_NUM_THREADS={args.threads}; SHARED with "
             f"other agents: the load averages (1/5/15 min) are recorded before and after each command.",
             f"Command: `python bench/sweep.py --config {args.config} --epsilons {args.epsilons}`.", "",
             "| command | wall s | load before | load after | exit |", "|---|---|---|---|---|",
             f"| `privimage run --config {args.config}` | {one['seconds']} | {one['load_before']} | {one['load_after']} "
             f"| {one['rc']} |",
             f"| `privimage sweep --config {args.config} --epsilons {args.epsilons}` | {sweep['seconds']} | "
             f"{sweep['load_before']} | {sweep['load_after']} | {sweep['rc']} |", "",
             f"**Sweep / run = {ratio:.2f}×** for {len(args.epsilons.split(','))} points (target ≤ 1.5×).", "",
             f"Pre-training shared: {json.dumps(shared)}", "", "Stage times (s, each point's `logs/timings.json`):", "",
             "| point | " + " | ".join(("query", "pretrain", "finetune", "sample", "evaluate", "export", "total")) + " |",
             "|---|" + "---|" * 7]
    for kind, runs in stages.items():
        for name, t in runs.items():
            lines.append(f"| {kind}: {name} | " + " | ".join(str(t.get(k, "–")) for k in (
                "query", "pretrain", "finetune", "sample", "evaluate", "export", "total")) + " |")
    proj = projection()
    seeds = 3
    pre_unshared = sum(r["pretrain_h"] for r in proj) * seeds
    pre_shared = proj[0]["pretrain_h"] * seeds
    ft = sum(r["finetune_h"] for r in proj) * seeds
    lines += ["", "## Projection (not a measurement): the official CIFAR-10 preset, ε ∈ {1, 5, 10} × 3 seeds", "",
              f"From per-image rates measured on the 2-core CPU (`bench/results/train_step.md`: pre-training "
              f"{PRETRAIN_IMG_S} img/s, DP fine-tune {FINETUNE_ROW_S} rows/s, UNet \"s\", 32×32) and the preset's "
              f"image passes. No GPU rate of these stages is recorded yet, so the hours are CPU-hours; the shared/"
              f"unshared ratio carries over to a GPU to the extent the two stages' GPU rates keep their ratio. "
              f"Query, sampling and evaluation are left out (minutes).", "",
              "| | pre-trainings | pre-training h | fine-tune h | total h |", "|---|---|---|---|---|",
              f"| unshared (9 × `privimage run`) | 9 | {pre_unshared:,.0f} | {ft:,.0f} | {pre_unshared + ft:,.0f} |",
              f"| shared (`privimage sweep`, one subset per seed) | 3 | {pre_shared:,.0f} | {ft:,.0f} | "
              f"{pre_shared + ft:,.0f} |",
              f"| ratio | | | | {(pre_shared + ft) / (pre_unshared + ft):.2f} |", "",
              "If the queries at different ε select different subsets, the sweep pre-trains once per distinct subset "
              "(at worst as often as unshared); `sweep.json` says which points shared.", ""]
    write_atomic(out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
