"""The pre-training subset: the public images of the classes the DP query selected.

Only public data and the query's DP output (the selected labels) go in, so building the subset costs no
privacy (post-processing). PrivImage pre-trains on about 1% of ImageNet chosen this way (arXiv 2311.12850).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from privimage.data import ImageDataset

if TYPE_CHECKING:
    from privimage.query.semantic import QueryRelease

__all__ = ["relabelled_subset", "select_subset", "subset_for", "subset_indices"]


def subset_indices(labels: torch.Tensor, selected: Sequence[int], *, max_per_label: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of the examples whose label is in ``selected``, at most ``max_per_label`` per label.

    When capping, which examples are kept is a seeded random choice within each label.
    """
    if max_per_label is not None and max_per_label < 1:
        raise ValueError(f"Expected max_per_label={max_per_label} >= 1 (or None for no cap).")
    selected = torch.as_tensor(list(selected), dtype=torch.long)
    if len(torch.unique(selected)) != len(selected):
        raise ValueError(f"Selected labels repeat: {selected.tolist()}.")
    if max_per_label is None:
        return torch.nonzero(torch.isin(labels, selected)).flatten()
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for label in selected.tolist():
        idx = torch.nonzero(labels == label).flatten()
        if len(idx) > max_per_label:
            idx = idx[torch.randperm(len(idx), generator=gen)[:max_per_label]]
        parts.append(idx)
    return torch.sort(torch.cat(parts)).values if parts else torch.empty(0, dtype=torch.long)


def select_subset(public: ImageDataset, selected: Sequence[int], *, max_per_label: int | None = None,
                  resolution: int | None = None, relabel: bool = False, seed: int = 0) -> ImageDataset:
    """The public images of labels ``selected``, optionally capped per label and resized.

    Args:
        relabel: ``False`` keeps the public label ids and class names; ``True`` numbers the selected classes
            0..N-1 in the order of ``selected`` (class names follow), for a generator conditioned on N
            classes.
    """
    idx = subset_indices(public.labels, selected, max_per_label=max_per_label, seed=seed)
    if len(idx) == 0:
        raise ValueError(f"No public images carry the selected labels {list(selected)}.")
    subset = public.subset(idx)
    if relabel:
        remap = torch.full((public.num_classes,), -1, dtype=torch.long)
        remap[torch.as_tensor(list(selected))] = torch.arange(len(selected))
        subset = ImageDataset(subset.images, remap[subset.labels], [public.class_names[i] for i in selected])
    return subset.resized(resolution)


def subset_for(release: "QueryRelease", public: ImageDataset, *, max_per_label: int | None = None, seed: int = 0,
               class_names: Sequence[str] | None = None) -> ImageDataset:
    """The public images of the classes ``release`` selected, each labelled with the sensitive class that
    chose it: :func:`relabelled_subset` of ``release.label_map``."""
    return relabelled_subset(release.label_map, public, num_classes=release.noisy_histogram.shape[0],
                             max_per_label=max_per_label, seed=seed, class_names=class_names)


def relabelled_subset(label_map: dict[int, int], public: ImageDataset, *, num_classes: int,
                      max_per_label: int | None = None, seed: int = 0,
                      class_names: Sequence[str] | None = None) -> ImageDataset:
    """The public images of the classes in ``label_map`` (public label -> sensitive class), each labelled with
    the sensitive class that chose it: the pre-training subset of a conditional model.

    Post-processing of the query's release and public data only. ``max_per_label`` caps the images per selected
    class (a seeded choice); ``class_names`` names the ``num_classes`` sensitive classes (default "0", "1", ...).
    """
    from privimage.errors import DataError

    idx = subset_indices(public.labels, list(label_map), max_per_label=max_per_label, seed=seed)
    if len(idx) == 0:
        raise DataError(f"The public data holds no images of the selected classes {list(label_map)}; "
                        f"nothing to pre-train on.")
    remap = torch.full((public.num_classes,), -1, dtype=torch.long)
    for j, c in label_map.items():
        remap[j] = c
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    return ImageDataset(public.images[idx], remap[public.labels[idx]], names)
