"""Images/s of the two subset loaders (device-resident uint8, FFCV file), and what each costs to set up.

For each resolution: the embedded public set (``--size`` images) is generated, then
- ``device``: :class:`privimage.query.DeviceLoader` (uint8 on the device, a seeded permutation per epoch,
  flip + normalisation on the batch);
- ``ffcv``: :func:`write_ffcv` once (timed), then :class:`FFCVLoader` with ``--workers`` decoding threads;
  the first epoch includes FFCV's JIT compilation and is reported apart from the steady epochs.
Every loader yields float32 batches normalised to [-1, 1] with random flips, on ``--device``; the
timed loop touches each batch (a sum) so nothing is left lazily undone.

Results are appended to ``loaders.csv`` and summarised in ``loaders.md`` in ``bench/results``
(``harness.results_dir``).

    python bench/loaders.py [--size 20000] [--resolutions 32 64] [--batch 256] [--epochs 3] [--device cpu]
                            [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from privimage.data import load_dataset  # noqa: E402
from privimage.query import DeviceLoader, FFCVLoader, ffcv_available, write_ffcv  # noqa: E402

COLUMNS = ["loader", "resolution", "images", "batch", "workers", "setup_s", "first_epoch_s", "images_per_s",
           "device", "torch", "numpy", "ffcv", "git_sha", "date"]


def _time_epochs(loader, epochs: int, device: torch.device) -> tuple[float, float]:
    """(first epoch seconds, steady images/s over the remaining epochs)."""
    times, count = [], 0
    for e in range(epochs):
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        n = 0
        for x, y in loader:
            total += x.sum()  # consume the batch
            n += x.shape[0]
        harness.sync(device)
        times.append(time.perf_counter() - start)
        if e > 0:
            count += n
    steady = sum(times[1:])
    return times[0], (count / steady if steady > 0 else float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader; the first is reported apart")
    parser.add_argument("--workers", type=int, default=2, help="FFCV decoding threads")
    parser.add_argument("--loaders", nargs="+", choices=["device", "ffcv"], default=["device", "ffcv"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable numbers on a shared machine; 2 threads at load ~5 on a "
                             "2-core CPU measured 10x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Not `import ffcv` here: importing it sets torch's thread count to 1 (ffcv_available() restores it).
    ffcv_version = importlib.metadata.version("ffcv") if "ffcv" in args.loaders and ffcv_available() else \
        "not installed" if "ffcv" in args.loaders else "not measured"
    env = harness.environment(device)
    common = {"device": env["device"], "torch": torch.__version__, "numpy": np.__version__,
              "ffcv": ffcv_version, "git_sha": env["git_sha"], "date": env["date"]}
    rows = []
    for res in args.resolutions:
        start = time.perf_counter()
        data = load_dataset("embedded", split="public", size=args.size, resolution=res)
        print(f"{res}x{res}: generated {len(data)} embedded images in {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        loader = DeviceLoader(data, batch_size=args.batch, device=device, seed=0)
        harness.sync(device)
        setup = time.perf_counter() - start
        first, rate = _time_epochs(loader, args.epochs, device)
        rows.append({"loader": "device", "resolution": res, "images": len(data), "batch": args.batch, "workers": 0,
                     "setup_s": round(setup, 3), "first_epoch_s": round(first, 3), "images_per_s": round(rate),
                     **common})
        print(f"  device: {rate:,.0f} images/s (setup {setup:.2f} s)", flush=True)
        if "ffcv" not in args.loaders:
            continue
        if not ffcv_available():
            print("  ffcv: not installed, skipped", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            path = write_ffcv(data, Path(tmp) / "subset.ffcv", num_workers=args.workers)
            written = time.perf_counter() - start
            loader = FFCVLoader(path, batch_size=args.batch, device=device, seed=0, num_workers=args.workers)
            first, rate = _time_epochs(loader, args.epochs, device)
        rows.append({"loader": "ffcv", "resolution": res, "images": len(data), "batch": args.batch,
                     "workers": args.workers, "setup_s": round(written, 3), "first_epoch_s": round(first, 3),
                     "images_per_s": round(rate), **common})
        print(f"  ffcv:   {rate:,.0f} images/s (write {written:.1f} s, first epoch with JIT {first:.1f} s)", flush=True)

    results = harness.results_dir()
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "loaders.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Subset loaders: images/s ({common['date']}, {common['device']})", "",
             f"torch {common['torch']}, numpy {common['numpy']}, ffcv {common['ffcv']}, git {common['git_sha']}; "
             f"{args.size} embedded images, batch {args.batch}, flip + normalisation, {args.epochs} epochs "
             f"(the first reported apart). Command: `python bench/loaders.py {' '.join(sys.argv[1:])}`", "",
             "| loader | resolution | images/s (steady) | setup s (ffcv: write) | first epoch s |", "|---|---|---|---|---|"]
    lines += [f"| {r['loader']} | {r['resolution']} | {r['images_per_s']:,} | {r['setup_s']} | {r['first_epoch_s']} |"
              for r in rows]
    harness.write_atomic(results / "loaders.md", "\n".join(lines) + "\n")
    print(f"wrote {csv_path} and {results / 'loaders.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
