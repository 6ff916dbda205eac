import numpy as np
import pytest

from privimage.evaluate.metrics import inception_score, precision_recall


def test_inception_score_extremes():
    assert inception_score(np.zeros((40, 10)), splits=4) == pytest.approx((1.0, 0.0))
    # confident, perfectly balanced predictions over C classes: IS = C
    c = 8
    logits = np.full((160, c), -50.0)
    logits[np.arange(160), np.arange(160) % c] = 50.0
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(c, rel=1e-6) and std < 1e-6
    # confident but always the same class: IS = 1 (no diversity)
    logits = np.full((40, c), -50.0)
    logits[:, 3] = 50.0
    assert inception_score(logits, splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 16))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_partial_overlap():
    # Half the generated samples sit on real ones, half are far away: precision 1/2. The generated manifold
    # covers the 100 copied real points and, through its k-NN balls, some but not all of the rest.
    rng = np.random.default_rng(1)
    real = rng.standard_normal((200, 8))
    fake = np.concatenate([real[:100], real[100:] + 1000.0])
    precision, recall = precision_recall(real, fake, k=3, block=64)
    assert precision == 0.5
    assert 0.5 <= recall < 1.0


def test_precision_recall_checks_shapes():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="one D"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
