"""Shared by the privimage tests: writers of tiny data sets in the publishers' exact file formats (CIFAR-10
python pickles, aligned CelebA, downsampled ImageNet npz batches), used by the reader tests and the
official-config pipeline tests, and a one-thread fixture.

Each writer fixture returns the writer function; a writer takes the folder to write into and a numpy
Generator, and returns what it wrote so a test can compare the loaded data with it.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow", "Male", "Smiling")


def write_cifar10(root: Path, rng: np.random.Generator, *, per_batch: int = 4):
    """``root/cifar-10-batches-py``: batches.meta, data_batch_1..5 and test_batch, pickled with byte keys
    (Python 2) like the real files. Returns (folder, class names, {split: images}, {split: labels})."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"name{i}" for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    all_x, all_y = {}, {}
    for split, files in {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.items():
        xs, ys = [], []
        for name in files:
            x, y = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, per_batch).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x.reshape(per_batch, -1),
                             b"filenames": [b"x.png"] * per_batch}, f)
            xs.append(x), ys.extend(y)
        all_x[split], all_y[split] = np.concatenate(xs), np.asarray(ys)
    return folder, names, all_x, all_y


def write_celeba(root: Path, rng: np.random.Generator, *, partitions=(0, 1, 2, 0, 1, 2)):
    """``root/img_align_celeba/000001.jpg...`` (178×218 JPEGs), ``list_attr_celeba.txt`` (count line,
    attribute names, ±1 rows) and ``list_eval_partition.txt`` (0 train, 1 valid, 2 test), one image per
    entry of ``partitions``. Returns [(file name, attribute values, partition)]."""
    (root / "img_align_celeba").mkdir(parents=True)
    rows, parts, files = [], [], []
    for i, part in enumerate(partitions):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
        values = [int(rng.choice([-1, 1])) for _ in CELEBA_ATTRIBUTES]
        rows.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
        parts.append(f"{name} {part}")
        files.append((name, values, part))
    header = f"{len(files)}\n{' '.join(CELEBA_ATTRIBUTES)}\n"
    (root / "list_attr_celeba.txt").write_text(header + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return files


def write_imagenet_npz(root: Path, rng: np.random.Generator, *, side: int, labels: dict[str, list[int]]):
    """Downsampled ImageNet batches ``root/<stem>.npz`` (stem: train_data_batch_<i> or val_data) holding
    ``data`` uint8 (N, 3·side·side), ``labels`` 1..1000 and ``mean``, one file per entry of ``labels``.
    Returns {stem: images (N, 3, side, side)}."""
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, file_labels in labels.items():
        x = rng.integers(0, 256, (len(file_labels), 3, side, side), dtype=np.uint8)
        np.savez(root / f"{stem}.npz", data=x.reshape(len(file_labels), -1), labels=list(file_labels),
                 mean=np.zeros(3 * side * side))
        written[stem] = x
    return written


@pytest.fixture(scope="session")
def cifar10_writer():
    return write_cifar10


@pytest.fixture(scope="session")
def celeba_writer():
    return write_celeba


@pytest.fixture(scope="session")
def imagenet_npz_writer():
    return write_imagenet_npz
