"""Per-record diffusion randomness: the replaced generator loop against the vectorised Philox draw.

Times ``EDMLoss.draw_per_record`` (the fine-tune's label dropout, ln σ and noise images for every record of a
micro-batch, from :class:`privimage.randomness.RecordRandomness`) against the implementation it replaced:
one BLAKE2b-keyed ``torch.Generator`` per record and three draws from it, in a Python loop (kept below,
verbatim in substance, as the baseline). Shapes: the demo fine-tune's micro-batch (50 records, K = 2,
3×16×16), 64 records of 3×32×32 with K = 8, and the official PrivImage micro-batch (256 records, K = 8,
3×32×32). Old and new alternate call by call, so a shared CPU's drift hits both alike; each shape runs at
1 thread and at torch's default thread count. Then the peak memory of one call beyond its outputs, each
measurement in a fresh process (``harness.PeakMemory``).

Results: ``bench/results/randomness.json`` and ``randomness.md``, with the environment record; with
``--json PATH`` only that file (the GPU suite). On CUDA (``--device cuda``) the loop keeps one CUDA generator
per record, the device is synchronised after every call, and the memory is ``max_memory_allocated`` in-process.

Usage:
    python bench/randomness.py             # 2-core CPU: about a minute
    python bench/randomness.py --device cuda --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakMemory, environment, results_dir, summarize, write_atomic, write_json  # noqa: E402

from privimage.diffusion import EDMLoss  # noqa: E402
from privimage.randomness import CHUNK_WORDS, RecordRandomness  # noqa: E402

SHAPES = {  # name: (records, K, (C, H, W))
    "demo micro-batch": (50, 2, (3, 16, 16)),
    "64 × 3×32×32, K=8": (64, 8, (3, 32, 32)),
    "official micro-batch": (256, 8, (3, 32, 32)),
}
NUM_CLASSES = 10


def loop_draw(loss: EDMLoss, x, labels, *, key: bytes, step: int, records: list[int | None], num_classes: int):
    """The replaced implementation: record i's generator seeded with BLAKE2b(key; step, i), then its dropout
    uniform, K normals for ln σ and K noise images from it, one record per loop iteration (on ``x``'s device)."""
    B, K, dev = x.shape[0], loss.num_noise, x.device
    drop = torch.zeros(B, dtype=torch.bool, device=dev)
    z = torch.zeros(B, K, device=dev)
    noise = torch.zeros((B, K, *x.shape[1:]), device=dev)
    for i, record in enumerate(records):
        if record is None:
            continue
        seed = hashlib.blake2b(struct.pack("<QQ", step, record), key=key, digest_size=8).digest()
        gen = torch.Generator(dev).manual_seed(int.from_bytes(seed, "little"))
        drop[i] = torch.rand((), generator=gen, device=dev) < loss.label_dropout
        torch.randn(K, generator=gen, device=dev, out=z[i])
        torch.randn((K, *x.shape[1:]), generator=gen, device=dev, out=noise[i])
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return labels, (z.reshape(B * K) * loss.p_std + loss.p_mean).exp(), noise.reshape(B * K, *x.shape[1:])


def _inputs(name: str, device: str = "cpu"):
    B, K, chw = SHAPES[name]
    loss = EDMLoss(num_noise=K, label_dropout=0.1)
    x = torch.zeros(B, *chw, device=device)
    labels = torch.arange(B, device=device) % NUM_CLASSES
    indices = torch.randperm(50_000, generator=torch.Generator().manual_seed(0))[:B].to(device)
    return loss, x, labels, indices


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _callers(name: str, device: str = "cpu"):
    loss, x, labels, indices = _inputs(name, device)
    key, randomness = secrets.token_bytes(32), RecordRandomness.secret()
    records = indices.tolist()
    is_padding = torch.zeros(len(records), dtype=torch.bool, device=device)
    state = {"step": 0}

    def old():
        state["step"] += 1
        loop_draw(loss, x, labels, key=key, step=state["step"], records=records, num_classes=NUM_CLASSES)

    def new():
        state["step"] += 1
        loss.draw_per_record(x, labels, num_classes=NUM_CLASSES, randomness=randomness, step=state["step"],
                             indices=indices, is_padding=is_padding)

    return old, new


def time_pair(name: str, *, threads: int, warmup: int, repeats: int, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    fns = dict(zip(("loop", "vectorised"), _callers(name, device)))
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    wall = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            wall[k].append(time.perf_counter() - t0)
    out = {k: dict(zip(("median_ms", "p20_ms", "p80_ms"), summarize(v))) for k, v in wall.items()}
    B, K, chw = SHAPES[name]
    return {"shape": name, "records": B, "K": K, "image": list(chw), "threads": threads, **out,
            "vectorised / loop": out["vectorised"]["median_ms"] / out["loop"]["median_ms"]}


def peak_child(name: str, which: str) -> None:
    """In a fresh process: the peak memory growth of one call, minus its outputs' size."""
    torch.set_num_threads(1)
    old, new = _callers(name)
    fn = {"loop": old, "vectorised": new}[which]
    B, K, chw = SHAPES[name]
    outputs_mb = (B * K * (1 + torch.Size(chw).numel()) * 4 + B * 8) / 2 ** 20
    fn()  # warm-up: lazily loaded kernels (MKL, Sleef) count in the resident set, not in the call's cost
    with PeakMemory("cpu") as m:
        fn()
    print(json.dumps({"peak_mb": m.mb, "outputs_mb": outputs_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write only this JSON file (the GPU suite)")
    parser.add_argument("--peak", nargs=2, metavar=("SHAPE", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        return peak_child(*args.peak)
    default_threads = torch.get_num_threads()
    env = environment(args.device, default_threads=default_threads, chunk_words=dict(CHUNK_WORDS))
    if torch.device(args.device).type == "cuda":
        rows = [time_pair(name, threads=default_threads, warmup=2, repeats=args.repeats, device=args.device)
                for name in SHAPES]
        write_json(args.json or results_dir() / "randomness-cuda.json", {"environment": env, "timings": rows})
        print(json.dumps(rows, indent=1))
        return None
    rows = [time_pair(name, threads=t, warmup=2, repeats=args.repeats)
            for t in sorted({1, default_threads}) for name in SHAPES]
    if args.json:
        write_json(args.json, {"environment": env, "timings": rows})
        return None
    peaks = []
    for name in SHAPES:
        for which in ("loop", "vectorised"):
            res = subprocess.run([sys.executable, __file__, "--peak", name, which], check=True, capture_output=True,
                                 text=True)
            peaks.append({"shape": name, "which": which, **json.loads(res.stdout.strip().splitlines()[-1])})
    env["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    write_json(results_dir() / "randomness.json", {"environment": env, "timings": rows, "peak_memory": peaks})
    write_atomic(results_dir() / "randomness.md", _markdown(env, rows, peaks))
    print(_markdown(env, rows, peaks))


def _markdown(env: dict, rows: list[dict], peaks: list[dict]) -> str:
    v = env["versions"]
    lines = [f"# Per-record diffusion randomness: generator loop vs vectorised Philox ({env['device']}, torch "
             f"{v['torch']}, numpy {v['numpy']}, python {v['python']}, {env['date']}, git {env['git_sha']})", "",
             f"Command: `python bench/{env['command']}` (load average {env['load_average_1m']} at the start, "
             f"{env['load_average_1m_end']} at the end, on a shared 2-core machine; CHUNK_WORDS "
             f"{env['chunk_words']}).", "",
             "`loop`: one BLAKE2b-seeded `torch.Generator` per record (the replaced `PerRecordRandomness`); "
             "`vectorised`: `EDMLoss.draw_per_record` on `RecordRandomness` (Philox4x32-10 in int64 torch ops, "
             "float64 Box–Muller). Both draw label dropout, K ln σ normals and K noise images per record; "
             "no padding. Old and new alternate call by call; medians (p20–p80) in ms. For scale: the DP step "
             "these draws feed costs seconds per micro-batch on this CPU (`bench/results/train_step.md`).", "",
             "| shape | records | K | image | threads | loop ms | vectorised ms | vectorised / loop |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, ve = r["loop"], r["vectorised"]
        lines.append(f"| {r['shape']} | {r['records']} | {r['K']} | {'×'.join(map(str, r['image']))} | "
                     f"{r['threads']} | {lo['median_ms']:.2f} ({lo['p20_ms']:.2f}–{lo['p80_ms']:.2f}) | "
                     f"{ve['median_ms']:.2f} ({ve['p20_ms']:.2f}–{ve['p80_ms']:.2f}) | "
                     f"{r['vectorised / loop']:.2f} |")
    lines += ["", "Peak memory of one call beyond its outputs (fresh process each, after one warm-up call; growth "
              "of the peak resident set, `harness.PeakMemory`, 1 thread):", "",
              "| shape | outputs MB | loop: peak − outputs MB | vectorised: peak − outputs MB |",
              "|---|---|---|---|"]
    by = {(p["shape"], p["which"]): p for p in peaks}
    for name in SHAPES:
        lo, ve = by[(name, "loop")], by[(name, "vectorised")]
        lines.append(f"| {name} | {lo['outputs_mb']:.1f} | {lo['peak_mb'] - lo['outputs_mb']:.1f} | "
                     f"{ve['peak_mb'] - ve['outputs_mb']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
