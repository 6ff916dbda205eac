"""The embedded default data set and the real Fashion-MNIST config."""

import os

import pytest
import torch

from privimage.data import FMNIST_ROOT, DataError, load_dataset
from privimage.data import embedded


def test_deterministic_per_seed_and_different_across_seeds():
    a = load_dataset("embedded", split="public", size=300, seed=3)
    b = load_dataset("embedded", split="public", size=300, seed=3)
    c = load_dataset("embedded", split="public", size=300, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (300, 3, 32, 32) and a.num_classes == len(embedded.CLASS_NAMES) >= 50


def test_public_classes_balanced_and_images_vary():
    data = load_dataset("embedded", split="public", size=600, resolution=16)
    assert data.resolution == 16
    assert torch.equal(data.labels.bincount(minlength=60), torch.full((60,), 10))
    # No two images identical (random position, scale, colours), and images are not flat.
    flat = data.images.reshape(len(data), -1)
    assert torch.unique(flat, dim=0).shape[0] == len(data)
    assert data.images.float().std((1, 2, 3)).min() > 5


def test_sensitive_split_is_a_few_public_classes_in_a_shifted_style():
    seed = 5
    sens = load_dataset("embedded", split="sensitive", size=500, seed=seed)
    test = load_dataset("embedded", split="sensitive_test", size=100, seed=seed)
    pub = load_dataset("embedded", split="public", size=500, seed=seed)
    classes = embedded.sensitive_classes(seed)
    assert len(classes) == embedded.NUM_SENSITIVE_CLASSES
    assert sens.class_names == test.class_names == [embedded.CLASS_NAMES[c] for c in classes]
    assert set(sens.labels.tolist()) == set(range(len(classes)))
    assert not torch.equal(sens.images[:100], test.images)
    assert embedded.sensitive_classes(seed + 1) != classes or embedded.sensitive_classes(seed + 2) != classes
    # Shifted style: pixel noise makes neighbouring pixels differ more than in the smooth public images.
    rough = lambda x: (x.float()[..., 1:] - x.float()[..., :-1]).abs().mean()  # noqa: E731
    assert rough(sens.images) > 1.5 * rough(pub.images)


@pytest.mark.skipif(not os.path.isdir(FMNIST_ROOT), reason="needs `apt-get install dataset-fashion-mnist`")
def test_fmnist_splits_are_disjoint_real_images():
    pub = load_dataset("fmnist", split="public")
    sens = load_dataset("fmnist", split="sensitive")
    test = load_dataset("fmnist", split="sensitive_test", size=50, resolution=32)
    assert len(pub) == 30_000 and pub.num_classes == 10 and pub.images.shape[1:] == (1, 28, 28)
    assert sens.class_names == ["Trouser", "Sandal", "Bag"] and 8_000 < len(sens) < 10_000
    assert test.images.shape == (50, 1, 32, 32)
    # Disjoint: no sensitive image appears among the public ones (compare by content hash).
    pub_set = {hash(bytes(x)) for x in pub.images.reshape(len(pub), -1).numpy()}
    assert not any(hash(bytes(x)) in pub_set for x in sens.images.reshape(len(sens), -1).numpy())


def test_fmnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fmnist", split="public", root=tmp_path / "nowhere")
