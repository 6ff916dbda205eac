import math

import pytest
import torch

from privimage.data import load_dataset
from privimage.evaluate.classify import (
    CAConfig,
    _laplace,
    build_classifier,
    classification_accuracy,
    dpimagebench_accuracy,
)

FAST = CAConfig(arch="cnn", width=16, epochs=5, batch_size=50, lr=0.05)


@pytest.fixture(scope="module")
def embedded():
    train = load_dataset("embedded", split="sensitive", size=500, seed=0)
    test = load_dataset("embedded", split="sensitive_test", size=400, seed=0)
    return train, test


def test_ca_trained_on_real_sensitive_images_is_high(embedded):
    train, test = embedded
    result = classification_accuracy(train.images, train.labels, test.images, test.labels, num_classes=5,
                                     config=FAST)
    assert result["accuracy"] > 0.85
    assert result["num_test"] == 400 and result["protocol"] == "official"


def test_ca_trained_on_noise_is_near_chance(embedded):
    train, test = embedded
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, train.images.shape, dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 5, (train.images.shape[0],), generator=gen)
    result = classification_accuracy(noise, labels, test.images, test.labels, num_classes=5, config=FAST)
    assert result["accuracy"] < 0.4  # chance is 0.2


def _separable(n_per_class: int, seed: int):
    """4 classes of 8x8 images: a bright quadrant per class on a noisy background."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(n_per_class)
    images = torch.randint(0, 80, (labels.numel(), 3, 8, 8), generator=gen)
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        images[i, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 170
    return images.to(torch.uint8), labels


def test_dpimagebench_protocol_selects_on_noisy_validation_and_averages():
    train, val, test = _separable(40, 0), _separable(10, 1), _separable(20, 2)
    config = CAConfig(arch="cnn", width=8, epochs=3, batch_size=32, lr=0.05, flips=False)
    result = dpimagebench_accuracy(*train, *val, *test, num_classes=4, archs=("cnn", "resnet9"), config=config,
                                   selection_epsilon=2.0, generator=torch.Generator().manual_seed(0))
    per = result["per_classifier"]
    assert [a["arch"] for a in per] == ["cnn", "resnet9"]
    assert all(1 <= a["selected_epoch"] <= 3 for a in per)
    accs = torch.tensor([a["accuracy"] for a in per], dtype=torch.float64)
    assert result["accuracy"] == pytest.approx(float(accs.mean()))
    assert result["std"] == pytest.approx(float(accs.std(unbiased=False)))
    assert result["accuracy"] > 0.8
    assert result["selection_epsilon_total"] == 4.0 and result["num_val"] == 40


def test_laplace_noise_has_the_right_scale():
    # E|Laplace(0, b)| = b; the mean of 20000 draws is within ~4 standard errors (std of |X| is b).
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([_laplace(0.5, gen) for _ in range(20000)])
    assert abs(float(draws.abs().mean()) - 0.5) < 4 * 0.5 / math.sqrt(20000)
    assert abs(float(draws.mean())) < 4 * 0.5 * math.sqrt(2) / math.sqrt(20000)


@pytest.mark.parametrize("arch", ["resnet9", "wrn", "cnn"])
def test_classifiers_accept_grey_and_colour_and_expose_features(arch):
    for channels, size in ((1, 28), (3, 32)):
        net = build_classifier(arch, channels, 7, width=8).eval()
        x = torch.randn(2, channels, size, size)
        assert net(x).shape == (2, 7)
        assert net.features(x).ndim == 2


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="arch in"):
        CAConfig(arch="vgg")
    with pytest.raises(ValueError, match="epochs=0"):
        CAConfig(epochs=0)
    images, labels = _separable(2, 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        classification_accuracy(images, labels, images, labels, num_classes=2, config=FAST)
