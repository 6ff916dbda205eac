"""Data specs ``name[:split][,key=value...]``: parsing, and the cheap checks a run makes before it starts.

:func:`parse_spec` checks the syntax and the words: a known data set name (a typo gets "did you mean"), the
keys that data set takes, typed values. :func:`inspect_spec` checks what can be known without loading the
images, so that a run refuses bad data before it writes or spends anything (:mod:`privimage.preflight`),
and returns a :class:`SpecInfo` (class count, channels, native side, size, where known). What it reads:

============================  ===============================================================================
``embedded``                  nothing (generated): the split, and the size against what fits in memory
``fmnist``                    the root folder; each idx file's header (magic, 28×28 images, as many labels)
``mnist``, ``fashion-mnist``  the split's two idx files' headers (magic, 28×28 images, as many labels)
``cifar10``, ``cifar100``     the class names in ``batches.meta`` / ``meta`` (10 / 100); each batch file there
``celeba``                    the two txt lists exist, the attribute is in the header, ``img_align_celeba/``;
                              the split's size (lines of the partition list)
``imagenet32``, ``imagenet64``  each npz batch's ``data`` header (uint8, (N, 3·S·S)) and its ``labels``
``imagenet``, ``folder``      the folder holds class sub-folders (their count), the first holds an image file
============================  ===============================================================================

Every problem is a :class:`~privimage.errors.DataError` naming the spec or the file.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privimage.checks import suggest
from privimage.errors import DataError

__all__ = ["DATASETS", "SPLITS", "SpecInfo", "inspect_spec", "parse_spec", "resolve_spec"]

#: Each data set's splits (``None``: any sub-folder name).
SPLITS: dict[str, tuple[str, ...] | None] = {
    "embedded": ("public", "sensitive", "sensitive_test"), "fmnist": ("public", "sensitive", "sensitive_test"),
    "mnist": ("train", "test"), "fashion-mnist": ("train", "test"), "cifar10": ("train", "test"),
    "cifar100": ("train", "test"), "celeba": ("train", "valid", "test", "all"), "imagenet": None,
    "imagenet32": ("train", "val"), "imagenet64": ("train", "val"), "folder": None}
DATASETS = tuple(SPLITS)
_COMMON_KEYS = ("root", "size", "resolution", "seed")
_KEYS = {"embedded": ("size", "resolution", "seed"), "celeba": (*_COMMON_KEYS, "attribute", "skip_corrupt"),
         "imagenet": (*_COMMON_KEYS, "skip_corrupt"), "folder": (*_COMMON_KEYS, "skip_corrupt")}
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
#: The embedded data set is generated in memory: at most this many images per split.
MAX_EMBEDDED_SIZE = 2_000_000


def parse_spec(spec: str) -> dict:
    """Parse ``name[:split][,key=value...]`` into :func:`privimage.data.load_dataset` arguments.

    Keys: ``root``, ``size``, ``resolution``, ``seed`` (all data sets but ``embedded``, which takes no root),
    ``attribute`` (celeba), ``skip_corrupt`` (celeba, imagenet, folder).

    Example:
        >>> parse_spec("cifar10:train,root=/data/cifar,size=5000")
        {'name': 'cifar10', 'split': 'train', 'root': '/data/cifar', 'size': 5000}
        >>> parse_spec("embeded:public")
        Traceback (most recent call last):
        ...
        privimage.errors.DataError: Data spec 'embeded:public': unknown data set 'embeded'; did you mean 'embedded'? (known: embedded, fmnist, mnist, fashion-mnist, cifar10, cifar100, celeba, imagenet, imagenet32, imagenet64, folder)
    """
    if not isinstance(spec, str):
        raise DataError(f"A data spec must be a string name[:split][,key=value...], got {spec!r}.")
    head, *pairs = spec.split(",")
    name, _, split = head.partition(":")
    if not name:
        raise DataError(f"Data spec {spec!r} has no name; expected name[:split][,key=value...].")
    if name.lower() not in SPLITS:
        raise DataError(f"Data spec {spec!r}: unknown data set {name!r}{suggest(name.lower(), DATASETS)} (known: "
                        f"{', '.join(DATASETS)})")
    name = name.lower()
    out: dict = {"name": name, "split": split} if split else {"name": name}
    if split:
        _check_split(spec, name, split)
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise DataError(f"Data spec {spec!r}: {pair!r} is not key=value.")
        allowed = _KEYS.get(name, _COMMON_KEYS)
        if key not in allowed:
            why = (", it is generated and reads no files" if name == "embedded" and key == "root" else "")
            raise DataError(f"Data spec {spec!r}: unknown key {key!r} for {name}{why}{suggest(key, allowed)} (it "
                            f"takes: {', '.join(allowed)})")
        if key in out:
            raise DataError(f"Data spec {spec!r}: key {key!r} is given twice.")
        if key in ("size", "resolution", "seed"):
            try:
                number = int(value)
            except ValueError:
                raise DataError(f"Data spec {spec!r}: {key}={value!r} is not an integer.") from None
            low = {"size": 1, "resolution": 8, "seed": 0}[key]
            high = {"size": 2 ** 40, "resolution": 1024, "seed": 2 ** 63 - 1}[key]
            if not low <= number <= high:
                raise DataError(f"Data spec {spec!r}: {key}={number} is not in [{low}, {high}].")
            out[key] = number
        elif key == "skip_corrupt":
            if value.lower() not in _BOOLEANS:
                raise DataError(f"Data spec {spec!r}: skip_corrupt={value!r} is not true or false.")
            out[key] = _BOOLEANS[value.lower()]
        else:
            if not value:
                raise DataError(f"Data spec {spec!r}: {key}= is empty.")
            out[key] = value
    return out


def _check_split(spec: str, name: str, split: str) -> None:
    splits = SPLITS[name]
    if splits is not None and split not in splits:
        raise DataError(f"Data spec {spec!r}: {name} has no split {split!r}{suggest(split, splits)} (its splits: "
                        f"{', '.join(splits)})")
    if splits is None and (not split or "/" in split or split in (".", "..")):
        raise DataError(f"Data spec {spec!r}: split {split!r} must name a sub-folder of the root.")


def resolve_spec(spec: str, default_split: str) -> dict:
    """:func:`parse_spec`, with ``default_split`` where the spec gives none (checked like a given one)."""
    out = parse_spec(spec)
    if "split" not in out:
        _check_split(spec, out["name"], default_split)
        out["split"] = default_split
    if out["name"] == "embedded" and out.get("size", 0) > MAX_EMBEDDED_SIZE:
        raise DataError(f"Data spec {spec!r}: size={out['size']} exceeds {MAX_EMBEDDED_SIZE} images (the embedded "
                        f"data set is generated in memory).")
    return out


@dataclass(frozen=True)
class SpecInfo:
    """What :func:`inspect_spec` found out without loading images (``None``: not known cheaply)."""

    name: str
    split: str
    num_classes: int | None
    channels: int | None
    resolution: int | None           # native side length (before any resize)
    size: int | None                 # examples, after ``size=``
    checked: str                     # what was checked, in words


def inspect_spec(spec: str, default_split: str) -> SpecInfo:
    """The cheap checks of the module docstring's table; raises :class:`DataError` naming spec or file."""
    args = resolve_spec(spec, default_split)
    name, split, root = args["name"], args["split"], args.get("root")
    if name not in ("embedded", "fmnist") and root is None:
        raise DataError(f"Data spec {spec!r}: data set {name!r} needs root= (the folder holding its files; on the "
                        f"command line: --sensitive-root / --public-root).")
    if root is not None and not Path(root).is_dir():
        raise DataError(f"Data spec {spec!r}: root {root} is not a folder.")
    info = _INSPECTORS[name](Path(root) if root else None, split, args)
    size = info["size"]
    if "size" in args:
        size = args["size"] if size is None else min(size, args["size"])
    return SpecInfo(name, split, info["classes"], info["channels"], info["side"], size, info["checked"])


def _embedded(root, split, args):
    from privimage.data import embedded

    classes = len(embedded.CLASS_NAMES) if split == "public" else embedded.NUM_SENSITIVE_CLASSES
    return dict(classes=classes, channels=3, side=32, size=embedded.DEFAULT_SIZES[split],
                checked="generated (no files)")


def _idx_header(path: Path, ndim: int) -> tuple[int, ...]:
    """The shape an idx file's header announces (raw or gzip), reading only its first bytes."""
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
        opener = gzip.open if magic == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable idx file ({err}).") from None
    if len(head) < 4 + 4 * ndim or head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        raise DataError(f"{path}: not an idx file of {ndim}-D unsigned bytes (header {head[:4].hex()}).")
    return tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))


def _idx_pair(root: Path, prefix: str) -> int:
    paths = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = [p for p in (root / stem, root / f"{stem}.gz") if p.is_file()]
        if not found:
            raise DataError(f"{root / stem}(.gz): missing (idx file).")
        paths.append(found[0])
    shape, (count,) = _idx_header(paths[0], 3), _idx_header(paths[1], 1)
    if shape[1:] != (28, 28) or shape[0] != count:
        raise DataError(f"{paths[0]}: {shape[0]} images of {shape[1]}x{shape[2]} with {count} labels in "
                        f"{paths[1]}; expected 28x28 images, one label each.")
    return count


def _mnist(root, split, args):
    count = _idx_pair(root, "train" if split == "train" else "t10k")
    return dict(classes=10, channels=1, side=28, size=count, checked="idx headers")


def _fmnist(root, split, args):
    from privimage.data import FMNIST_ROOT, FMNIST_SENSITIVE_CLASSES

    root = root or Path(FMNIST_ROOT)
    if not root.is_dir():
        raise DataError(f"{root}: missing. The 'fmnist' data set reads the real Fashion-MNIST idx files; on "
                        f"Debian/Ubuntu install them with `apt-get install dataset-fashion-mnist`, or pass root=.")
    count = _idx_pair(root, "t10k" if split == "sensitive_test" else "train")
    return dict(classes=10 if split == "public" else len(FMNIST_SENSITIVE_CLASSES), channels=1, side=28,
                size=count // 2 if split == "public" else None, checked="idx headers")


def _cifar(root, split, args, num_classes):
    from privimage.data.readers import _load_pickle

    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    root = root / folder if (root / folder).is_dir() else root
    meta, key = ("batches.meta", "label_names") if num_classes == 10 else ("meta", "fine_label_names")
    names = _load_pickle(root / meta).get(key)
    if names is None or len(names) != num_classes:
        raise DataError(f"{root / meta}: expected {num_classes} class names under {key!r}.")
    files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if num_classes == 10
             else {"train": ["train"], "test": ["test"]})[split]
    for name in files:
        if not (root / name).is_file() or (root / name).stat().st_size == 0:
            raise DataError(f"{root / name}: missing or empty (CIFAR python batch).")
    return dict(classes=num_classes, channels=3, side=32, size=None, checked="class names, batch files present")


def _celeba(root, split, args):
    attribute = args.get("attribute", "Male")
    attr, part = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    for path in (attr, part):
        if not path.is_file():
            raise DataError(f"{path}: missing (CelebA list).")
    if not (root / "img_align_celeba").is_dir():
        raise DataError(f"{root / 'img_align_celeba'}: missing (CelebA image folder).")
    try:
        with open(attr, encoding="utf-8", errors="replace") as f:
            f.readline()
            names = f.readline().split()
        codes = {"train": "0", "valid": "1", "test": "2"}
        with open(part, encoding="utf-8", errors="replace") as f:
            size = sum(1 for line in f if line.split()[1:2] == [codes.get(split, "")] or
                       (split == "all" and line.strip()))
    except OSError as err:
        raise DataError(f"{root}: unreadable CelebA list ({err}).") from None
    if attribute not in names:
        raise DataError(f"{attr}: no attribute {attribute!r}{suggest(attribute, names)} (have: {', '.join(names)}).")
    return dict(classes=2, channels=3, side=None, size=size, checked="lists, attribute header, image folder")


def _npz_data_shape(path: Path) -> tuple[int, ...]:
    """Shape and dtype of ``data`` in an npz batch from its header alone; ``labels`` must be there too."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if not {"data.npy", "labels.npy"} <= names:
                raise DataError(f"{path}: expected arrays 'data' and 'labels', found {sorted(n[:-4] for n in names)}.")
            with z.open("data.npy") as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(f)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: truncated or corrupt npz ({err}).") from None
    if dtype != np.uint8 or len(shape) != 2:
        raise DataError(f"{path}: data is {dtype} {shape}; expected uint8 (N, 3*S*S).")
    return shape


def _imagenet_npz(root, split, args, side):
    paths = (sorted(root.glob("train_data_batch_*.npz")) if split == "train" else [root / "val_data.npz"])
    if not paths or not all(p.is_file() for p in paths):
        raise DataError(f"{root}/{'train_data_batch_*.npz' if split == 'train' else 'val_data.npz'}: missing "
                        f"(downsampled ImageNet batches).")
    size = 0
    for path in paths:
        n, row = _npz_data_shape(path)
        if row != 3 * side * side:
            raise DataError(f"{path}: rows of {row} bytes; expected 3x{side}x{side} = {3 * side * side} "
                            f"(imagenet{side}).")
        size += n
    return dict(classes=1000, channels=3, side=side, size=size, checked="npz headers")


def _folders(root: Path, what: str) -> int:
    from privimage.data.readers import IMAGE_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"{root}: missing (a folder of class sub-folders, {what}).")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in classes[0].iterdir()):
        raise DataError(f"{classes[0]}: no image files ({', '.join(IMAGE_EXTENSIONS)}).")
    return len(classes)


def _imagenet(root, split, args):
    return dict(classes=_folders(root / split, "ILSVRC"), channels=3, side=None, size=None,
                checked="class sub-folders")


def _folder(root, split, args):
    folder = root if split in ("all", "") else root / split
    return dict(classes=_folders(folder, "an image tree"), channels=3, side=None, size=None,
                checked="class sub-folders")


_INSPECTORS = {
    "embedded": _embedded, "fmnist": _fmnist, "mnist": _mnist, "fashion-mnist": _mnist,
    "cifar10": lambda r, s, a: _cifar(r, s, a, 10), "cifar100": lambda r, s, a: _cifar(r, s, a, 100),
    "celeba": _celeba, "imagenet": _imagenet, "imagenet32": lambda r, s, a: _imagenet_npz(r, s, a, 32),
    "imagenet64": lambda r, s, a: _imagenet_npz(r, s, a, 64), "folder": _folder}
