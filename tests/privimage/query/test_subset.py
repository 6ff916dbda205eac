"""The pre-training subset: exactly the public images of the selected labels."""

import pytest
import torch

from privimage.data import load_dataset
from privimage.query import select_subset, subset_indices


def test_subset_membership_is_exact():
    public = load_dataset("embedded", split="public", size=600, seed=1)
    selected = [7, 3, 42]
    subset = select_subset(public, selected)
    expected = [i for i, lab in enumerate(public.labels.tolist()) if lab in selected]
    assert len(subset) == len(expected)
    assert torch.equal(subset.images, public.images[expected]) and torch.equal(subset.labels, public.labels[expected])
    relabelled = select_subset(public, selected, relabel=True)
    assert relabelled.class_names == [public.class_names[i] for i in selected]
    assert torch.equal(torch.tensor(selected)[relabelled.labels], subset.labels)


def test_cap_per_label_is_a_seeded_choice_within_each_label():
    labels = torch.tensor([0, 1, 1, 2, 1, 0, 1, 2, 1])
    idx = subset_indices(labels, [1, 2], max_per_label=3, seed=0)
    assert (labels[idx] == 1).sum() == 3 and (labels[idx] == 2).sum() == 2
    assert set(idx.tolist()) <= {1, 2, 3, 4, 6, 7, 8}
    assert torch.equal(idx, subset_indices(labels, [1, 2], max_per_label=3, seed=0))
    assert torch.equal(idx, idx.sort().values)


def test_subset_errors():
    public = load_dataset("embedded", split="public", size=60)
    with pytest.raises(ValueError, match="repeat"):
        select_subset(public, [1, 1])
    with pytest.raises(ValueError, match="max_per_label=0"):
        select_subset(public, [1], max_per_label=0)
    assert select_subset(public, [1, 2], resolution=16).resolution == 16
