"""Readers for the image formats users hold, each returning an :class:`ImageDataset`.

Formats (each exactly as its publisher distributes it):

- CIFAR-10 / CIFAR-100 "python version": pickled dicts with ``data`` (N, 3072) uint8 rows (R plane, G plane,
  B plane) and ``labels`` / ``fine_labels``; names in ``batches.meta`` / ``meta``. Pickles can run code
  when loaded, so they are read with an unpickler that only admits numpy arrays and plain containers.
- MNIST / Fashion-MNIST idx files (``train-images-idx3-ubyte`` etc., raw or ``.gz``): a big-endian header
  (magic 0x0803 / 0x0801, then the dimensions) followed by the bytes.
- CelebA: ``img_align_celeba/*.jpg`` with ``list_attr_celeba.txt`` (±1 per attribute) and
  ``list_eval_partition.txt`` (0 train, 1 valid, 2 test); one attribute becomes the binary label.
- ImageNet: the ILSVRC class-per-synset tree (``<root>/<split>/n01440764/*.JPEG``), and the downsampled
  ImageNet32/64 npz batches (Chrabaszcz et al., arXiv 1707.08819: ``data`` rows in the CIFAR layout,
  ``labels`` 1-based).
- Any class-per-folder tree of image files (``<root>/<class>/<image>``).

Every problem with a file raises :class:`DataError` naming the file and what is wrong; image-tree readers
can instead skip undecodable images and count them (``skip_corrupt=True``).
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from privimage.data.dataset import DataError, ImageDataset, pick_subset, require_file, resize_images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")


# ---- CIFAR ----------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admit only what a CIFAR batch contains: numpy arrays, dtypes and numpy scalars."""

    _ALLOWED = {
        "_reconstruct": np.ndarray(0).__reduce__()[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
        "scalar": np.float64(0).__reduce__()[0],
    }

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return self._ALLOWED[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def _load_pickle(path: Path) -> dict:
    require_file(path, "CIFAR python batch")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: truncated or corrupt pickle ({type(err).__name__}: {err}).") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_root(root: Path, folder: str) -> Path:
    return root / folder if (root / folder).is_dir() else root


def read_cifar(root: str | os.PathLike, *, split: str, num_classes: int = 10) -> ImageDataset:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``); split "train" or "test"."""
    if num_classes == 10:
        root = _cifar_root(Path(root), "cifar-10-batches-py")
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
    elif num_classes == 100:
        root = _cifar_root(Path(root), "cifar-100-python")
        files = {"train": ["train"], "test": ["test"]}
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    else:
        raise ValueError(f"Expected num_classes=10 or 100 for CIFAR, got {num_classes}.")
    if split not in files:
        raise ValueError(f"Expected split in {sorted(files)} for CIFAR-{num_classes}, got {split!r}.")
    meta = _load_pickle(root / meta_file)
    if names_key not in meta:
        raise DataError(f"{root / meta_file}: no '{names_key}' entry.")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    images, labels = [], []
    for name in files[split]:
        path = root / name
        batch = _load_pickle(path)
        if "data" not in batch or labels_key not in batch:
            raise DataError(f"{path}: expected entries 'data' and '{labels_key}', found {sorted(batch)}.")
        data, lab = np.asarray(batch["data"]), np.asarray(batch[labels_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(lab) != len(data):
            raise DataError(f"{path}: wrong shape: data {data.dtype} {data.shape} with {len(lab)} labels "
                            f"(expected uint8 (N, 3072) and N labels).")
        _check_labels(lab, len(class_names), path)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                        class_names)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path | str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"{path}: label {int(bad)} out of range [0, {num_classes}).")


# ---- idx (MNIST, Fashion-MNIST) ---------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One idx file (raw or gzip-compressed) as a uint8 array of the shape its header gives."""
    path = Path(path)
    require_file(path, "idx file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: truncated or corrupt gzip ({err}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (magic {raw[:4].hex()}, expected 000008..).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: wrong size: {len(raw)} bytes, the header's shape {shape} needs {expected}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / stem}(.gz): missing (idx file).")


def read_mnist_idx(root: str | os.PathLike, *, split: str,
                   class_names: list[str] | None = None) -> ImageDataset:
    """MNIST-format idx files in ``root``; split "train" or "test". Images come out (N, 1, 28, 28)."""
    if split not in ("train", "test"):
        raise ValueError(f"Expected split 'train' or 'test' for idx data, got {split!r}.")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    img_path, lab_path = _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
    if images.ndim != 3:
        raise DataError(f"{img_path}: wrong shape {images.shape}, expected (N, H, W).")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{lab_path}: wrong shape {labels.shape}, expected ({len(images)},) to match {img_path}.")
    class_names = class_names or [str(i) for i in range(10)]
    _check_labels(labels, len(class_names), lab_path)
    return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), class_names)


# ---- image files (CelebA, ImageNet tree, any class folders) -------------------------------------------------

def decode_image(path: Path, resolution: int | None, *, crop: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 RGB (3, S, S): centre crop (to ``crop`` or the short side), resize."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h, crop) if crop else min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if resolution is not None and side != resolution:
                img = img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: missing (image file).") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({err}).") from None


def decode_images(paths: list[Path], resolution: int | None, *, crop: int | None = None,
                  skip_corrupt: bool = False, desc: str = "decoding") -> tuple[np.ndarray, np.ndarray, int]:
    """Decode ``paths`` in parallel threads (Pillow releases the GIL while decoding).

    Returns the (M, 3, S, S) array, the indices of ``paths`` kept, and the number skipped as corrupt.
    Without ``resolution`` every image must have the same size after cropping.
    """
    from privimage.progress import progress_bar

    def one(path: Path):
        try:
            return decode_image(path, resolution, crop=crop)
        except DataError:
            if skip_corrupt:
                return None
            raise

    bar = progress_bar(len(paths), desc=desc, unit="img")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = []
        for arr in pool.map(one, paths, chunksize=64):
            decoded.append(arr)
            bar.update()
    bar.close()
    kept = [i for i, a in enumerate(decoded) if a is not None]
    if not kept:
        raise DataError(f"No readable images among {len(paths)} files (first: {paths[0] if paths else '-'}).")
    shapes = {decoded[i].shape for i in kept}
    if len(shapes) > 1:
        first, other = kept[0], next(i for i in kept if decoded[i].shape != decoded[kept[0]].shape)
        raise DataError(f"Images differ in size ({paths[first]}: {decoded[first].shape[1:]}, {paths[other]}: "
                        f"{decoded[other].shape[1:]}); pass a resolution to resize them.")
    return np.stack([decoded[i] for i in kept]), np.asarray(kept), len(paths) - len(kept)


def _list_class_folders(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    if not root.is_dir():
        raise DataError(f"{root}: missing (a folder of class sub-folders).")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class sub-folders.")
    return classes, paths, np.asarray(labels, dtype=np.int64)


def read_image_folder(root: str | os.PathLike, *, resolution: int | None = None, size: int | None = None,
                      seed: int = 0, skip_corrupt: bool = False, crop: int | None = None) -> ImageDataset:
    """Any ``<root>/<class>/<image>`` tree: classes are the sorted sub-folder names."""
    classes, paths, labels = _list_class_folders(Path(root))
    keep = pick_subset(len(paths), size, seed)
    paths, labels = [paths[i] for i in keep], labels[keep]
    images, kept, skipped = decode_images(paths, resolution, crop=crop, skip_corrupt=skip_corrupt,
                                          desc=f"reading {root}")
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels[kept]), classes, skipped)


def read_imagenet_folder(root: str | os.PathLike, *, split: str, resolution: int | None = None,
                         size: int | None = None, seed: int = 0, skip_corrupt: bool = False) -> ImageDataset:
    """The ILSVRC tree ``<root>/<split>/<wnid>/*.JPEG`` (the validation set arranged by synset, as most
    tooling does). Class names are the synset ids, with their words appended when ``LOC_synset_mapping.txt``
    (``n01440764 tench, Tinca tinca``) sits in ``root``."""
    root = Path(root)
    data = read_image_folder(root / split, resolution=resolution, size=size, seed=seed,
                             skip_corrupt=skip_corrupt)
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        words = dict(line.strip().split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
        data.class_names = [f"{w} {words[w]}" if w in words else w for w in data.class_names]
    return data


CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


def read_celeba(root: str | os.PathLike, *, split: str, attribute: str = "Male", resolution: int = 32,
                crop: int = 140, size: int | None = None, seed: int = 0,
                skip_corrupt: bool = False) -> ImageDataset:
    """Aligned CelebA: ``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``.

    The label is ``attribute`` (1 where the file says +1, else 0). Images are centre-cropped to
    ``crop`` × ``crop`` (the face region of the 178×218 aligned images) and resized to ``resolution``.
    """
    root = Path(root)
    attr_path, part_path = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    require_file(attr_path, "CelebA attributes")
    require_file(part_path, "CelebA partition")
    if split not in (*CELEBA_SPLITS, "all"):
        raise ValueError(f"Expected split in {[*CELEBA_SPLITS, 'all']} for CelebA, got {split!r}.")
    lines = attr_path.read_text().splitlines()
    if len(lines) < 2:
        raise DataError(f"{attr_path}: truncated (expected a count line and an attribute-name line).")
    names = lines[1].split()
    if attribute not in names:
        raise DataError(f"{attr_path}: no attribute {attribute!r} (have: {', '.join(names)}).")
    col = names.index(attribute)
    values: dict[str, int] = {}
    for n, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or fields[col + 1] not in ("1", "-1"):
            raise DataError(f"{attr_path}: line {n} is malformed (expected a file name and {len(names)} "
                            f"values of 1/-1).")
        values[fields[0]] = int(fields[col + 1] == "1")
    files = []
    for n, line in enumerate(part_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{part_path}: line {n} is malformed (expected '<file> 0|1|2').")
        if split == "all" or int(fields[1]) == CELEBA_SPLITS[split]:
            if fields[0] not in values:
                raise DataError(f"{part_path}: line {n}: {fields[0]} has no attributes in {attr_path}.")
            files.append(fields[0])
    if not files:
        raise DataError(f"{part_path}: no images in split {split!r}.")
    keep = pick_subset(len(files), size, seed)
    files = [files[i] for i in keep]
    images, kept, skipped = decode_images([root / "img_align_celeba" / f for f in files], resolution, crop=crop,
                                          skip_corrupt=skip_corrupt, desc="reading CelebA")
    labels = np.asarray([values[files[i]] for i in kept], dtype=np.int64)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), [f"not {attribute}", attribute],
                        skipped)


# ---- downsampled ImageNet (npz) -------------------------------------------------------------------------

def read_imagenet_npz(root: str | os.PathLike, *, split: str, resolution: int | None = None) -> ImageDataset:
    """Downsampled ImageNet (32×32 or 64×64) npz batches: ``train_data_batch_1..10.npz``, ``val_data.npz``.

    Labels in the files are 1..1000 and become 0..999. Class names come from ``map_clsloc.txt``
    (``n02119789 1 kit_fox``) if it sits in ``root``, else ``class_<i>``.
    """
    root = Path(root)
    if split == "train":
        paths = sorted(root.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
        if not paths:
            raise DataError(f"{root}/train_data_batch_*.npz: missing (downsampled ImageNet training batches).")
    elif split == "val":
        paths = [root / "val_data.npz"]
    else:
        raise ValueError(f"Expected split 'train' or 'val' for downsampled ImageNet, got {split!r}.")
    images, labels, side = [], [], None
    for path in paths:
        require_file(path, "downsampled ImageNet batch")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data, lab = npz["data"], np.asarray(npz["labels"], dtype=np.int64) - 1
        except KeyError as err:
            raise DataError(f"{path}: missing array {err} (expected 'data' and 'labels').") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: truncated or corrupt npz ({err}).") from None
        s = int(round((data.shape[1] / 3) ** 0.5)) if data.ndim == 2 else 0
        if data.dtype != np.uint8 or data.ndim != 2 or 3 * s * s != data.shape[1] or len(lab) != len(data):
            raise DataError(f"{path}: wrong shape: data {data.dtype} {data.shape} with {len(lab)} labels "
                            f"(expected uint8 (N, 3*S*S) and N labels).")
        if side is not None and s != side:
            raise DataError(f"{path}: {s}x{s} images, but {paths[0]} holds {side}x{side}.")
        side = s
        _check_labels(lab, 1000, path)
        images.append(data.reshape(-1, 3, s, s))
        labels.append(lab)
    names = [f"class_{i}" for i in range(1000)]
    mapping = root / "map_clsloc.txt"
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[1].isdigit() and 1 <= int(fields[1]) <= 1000:
                names[int(fields[1]) - 1] = f"{fields[0]} {fields[2]}"
    data = ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), names)
    return data.resized(resolution)

