"""Image data for privimage: one dataset type, readers for real formats, and the embedded default.

Every reader returns an :class:`ImageDataset` (uint8 images (N, C, H, W), int64 labels, class names);
:func:`load_dataset` picks the reader by name, and :func:`load_spec` parses the command line's
``name:split,key=value`` form.

Names and splits:

======================  ==========================================  =========================================
name                    splits                                      ``root``
======================  ==========================================  =========================================
``embedded``            public, sensitive, sensitive_test           none: generated from ``seed``
``fmnist``              public, sensitive, sensitive_test           default /usr/share/datasets/fashion-mnist
``mnist``, ``fashion-   train, test                                 folder of the four idx files (raw or .gz)
mnist``
``cifar10``             train, test                                 ``cifar-10-batches-py`` (or its parent)
``cifar100``            train, test                                 ``cifar-100-python`` (or its parent)
``celeba``              train, valid, test, all                     folder with img_align_celeba/ + txt files
``imagenet``            the sub-folder name (train, val)            ILSVRC root holding <split>/<wnid>/
``imagenet32/64``       train, val                                  folder of the npz batches
``folder``              a sub-folder name, or "all" for root        any <class>/<image> tree
======================  ==========================================  =========================================

Example:
    >>> data = load_dataset("embedded", split="sensitive", size=8, seed=1)
    >>> tuple(data.images.shape), data.images.dtype, data.resolution
    ((8, 3, 32, 32), torch.uint8, 32)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from privimage.data import embedded
from privimage.data.dataset import DataError, ImageDataset, pick_subset, resize_images
from privimage.data.readers import (
    FASHION_MNIST_CLASSES,
    read_celeba,
    read_cifar,
    read_image_folder,
    read_imagenet_folder,
    read_imagenet_npz,
    read_mnist_idx,
)

from privimage.data.specs import DATASETS, SpecInfo, inspect_spec, parse_spec, resolve_spec

__all__ = ["DATASETS", "DataError", "FMNIST_ROOT", "FMNIST_SENSITIVE_CLASSES", "ImageDataset", "SpecInfo",
           "inspect_spec", "load_dataset", "load_spec", "parse_spec", "resize_images", "resolve_spec"]

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
# The sensitive part of the "fmnist" config: three visually distinct classes (label ids in Fashion-MNIST).
FMNIST_SENSITIVE_CLASSES = (1, 5, 8)  # Trouser, Sandal, Bag


def load_dataset(name: str, *, split: str, root: str | os.PathLike | None = None, resolution: int | None = None,
                 seed: int = 0, size: int | None = None, **options) -> ImageDataset:
    """Load split ``split`` of data set ``name`` (see the module docstring for names and splits).

    Args:
        root: where the files are (not needed for "embedded"; "fmnist" defaults to the Debian package's
            folder).
        resolution: side length to resize to (centre crop to square first); ``None`` keeps the native size
            (32 for "embedded" and CelebA).
        seed: for "embedded", fixes the images; for every data set, fixes which ``size`` examples are kept.
        size: keep a seeded random subset of this many examples (``None``: all).
        options: ``attribute`` (CelebA label, default "Male"), ``skip_corrupt`` (image trees: skip and count
            undecodable files instead of raising), ``num_sensitive_classes`` (embedded).

    Raises:
        DataError: a missing, truncated or corrupt file, or contents of the wrong shape or label range;
            the message names the file.
    """
    name = name.lower()
    if name not in DATASETS:
        from privimage.checks import suggest

        raise DataError(f"Unknown data set {name!r}{suggest(name, DATASETS)} (known: {', '.join(DATASETS)}).")
    if name == "embedded":
        return embedded.generate(split, seed=seed, size=size, resolution=resolution, **options)
    if name == "fmnist":
        return _fmnist(split, root=root, resolution=resolution, seed=seed, size=size)
    if root is None:
        raise DataError(f"Data set {name!r} needs root= (the folder holding its files).")
    if name in ("celeba", "imagenet", "folder"):
        kwargs = dict(resolution=resolution, size=size, seed=seed, skip_corrupt=options.pop("skip_corrupt", False))
        if name == "celeba":
            kwargs["resolution"] = resolution or 32
            data = read_celeba(root, split=split, attribute=options.pop("attribute", "Male"), **kwargs)
        elif name == "imagenet":
            data = read_imagenet_folder(root, split=split, **kwargs)
        else:
            data = read_image_folder(root if split in ("all", "") else Path(root) / split, **kwargs)
        _no_options_left(name, options)
        return data
    _no_options_left(name, options)
    if name in ("mnist", "fashion-mnist"):
        data = read_mnist_idx(root, split=split, class_names=FASHION_MNIST_CLASSES if name == "fashion-mnist" else None)
    elif name in ("cifar10", "cifar100"):
        data = read_cifar(root, split=split, num_classes=10 if name == "cifar10" else 100)
    else:  # imagenet32, imagenet64
        data = read_imagenet_npz(root, split=split)
    return data.subset(pick_subset(len(data), size, seed)).resized(resolution)


def _no_options_left(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"Data set {name!r} takes no option(s) {sorted(options)}.")


def _fmnist(split: str, *, root, resolution, seed, size) -> ImageDataset:
    """Real Fashion-MNIST split into disjoint public and sensitive parts.

    public: a seeded half of the 60k training images, all 10 classes. sensitive: the other half, only the
    classes :data:`FMNIST_SENSITIVE_CLASSES` (labels 0..2, names as in Fashion-MNIST). sensitive_test: the
    10k test images of those classes.
    """
    root = Path(root or FMNIST_ROOT)
    if not root.is_dir():
        raise DataError(f"{root}: missing. The 'fmnist' data set reads the real Fashion-MNIST idx files; on "
                        f"Debian/Ubuntu install them with `apt-get install dataset-fashion-mnist`, or pass root=.")
    if split not in embedded.SPLITS:
        raise ValueError(f"Expected split in {list(embedded.SPLITS)} for 'fmnist', got {split!r}.")
    data = read_mnist_idx(root, split="test" if split == "sensitive_test" else "train",
                          class_names=FASHION_MNIST_CLASSES)
    if split != "sensitive_test":
        # A fixed half/half split of the training set (seed 0 always), so public and sensitive never overlap
        # whatever seed later picks subsets.
        perm = torch.from_numpy(np.random.default_rng(20200523).permutation(len(data)))
        half = len(data) // 2
        data = data.subset(perm[:half] if split == "public" else perm[half:])
    if split != "public":
        classes = torch.tensor(FMNIST_SENSITIVE_CLASSES)
        keep = torch.isin(data.labels, classes)
        remap = torch.full((len(FASHION_MNIST_CLASSES),), -1, dtype=torch.long)
        remap[classes] = torch.arange(len(classes))
        data = ImageDataset(data.images[keep], remap[data.labels[keep]],
                            [FASHION_MNIST_CLASSES[c] for c in FMNIST_SENSITIVE_CLASSES])
    return data.subset(pick_subset(len(data), size, seed)).resized(resolution)


def load_spec(spec: str, *, split: str | None = None, **defaults) -> ImageDataset:
    """Load a data set from a spec string; ``split`` and ``defaults`` fill in what the spec leaves out."""
    args = {**defaults, **parse_spec(spec)}
    args.setdefault("split", split)
    if args["split"] is None:
        raise DataError(f"Data spec {spec!r} needs a split (name:split).")
    return load_dataset(args.pop("name"), **args)
