import numpy as np
import pytest

from privimage.evaluate.fid import (
    FeatureStats,
    frechet_distance,
    load_stats,
    save_stats,
    trace_sqrt_product,
)


def _random_psd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_hand_computed_2d_case():
    # S1 = [[2,1],[1,2]], S2 = diag(1,4): S1 S2 = [[2,4],[1,8]], tr = 10, det S1 = 3, det S2 = 4.
    # For 2x2 PSD products, tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) = sqrt(10 + 2 sqrt(12)).
    # |mu1 - mu2|^2 = 1 + 4 = 5; tr S1 + tr S2 = 4 + 5.
    s1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    s2 = np.diag([1.0, 4.0])
    expected = 5 + 4 + 5 - 2 * np.sqrt(10 + 2 * np.sqrt(12))  # = 14 - 8.2287796 = 5.7712204
    assert frechet_distance(np.zeros(2), s1, np.array([1.0, 2.0]), s2) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(5.7712204, abs=1e-7)


def test_closed_form_diagonal_gaussians():
    # Commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_closed_form_scaled_dense_covariance():
    # S2 = c S1 (dense, non-diagonal): tr sqrt(S1 S2) = sqrt(c) tr S1, so d^2 = |dmu|^2 + (1 - sqrt(c))^2 tr S1.
    rng = np.random.default_rng(1)
    s1 = _random_psd(rng, 64)
    c = 2.7
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - np.sqrt(c)) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c * s1) == pytest.approx(expected, rel=1e-9)


def test_trace_sqrt_matches_eigenvalues_of_product():
    # An independent route: the eigenvalues of the non-symmetric S1 S2 are real and >= 0.
    rng = np.random.default_rng(2)
    s1, s2 = _random_psd(rng, 40), _random_psd(rng, 40)
    eig = np.linalg.eigvals(s1 @ s2)
    assert np.abs(eig.imag).max() < 1e-8
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.sqrt(np.clip(eig.real, 0, None)).sum(), rel=1e-8)


@pytest.mark.parametrize("n, d", [(500, 64), (100, 256)])  # full rank, and rank-deficient (n < d) as in FID
def test_fid_of_a_set_against_itself_is_zero(n, d):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    stats = FeatureStats.from_features(feats)
    value = frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
    assert value < 1e-8 * np.trace(stats.sigma)
    # the trace term itself, before any clipping at 0: tr((S S)^(1/2)) = tr S to round-off
    assert trace_sqrt_product(stats.sigma, stats.sigma) == pytest.approx(np.trace(stats.sigma), rel=1e-10)
    # ... while a shifted copy is exactly the shift away
    assert frechet_distance(stats.mu, stats.sigma, stats.mu + 0.5, stats.sigma) == pytest.approx(
        0.25 * d, rel=1e-6)


def test_stats_match_numpy_and_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((30, 5)).astype(np.float32)
    stats = FeatureStats.from_features(feats)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    save_stats(tmp_path / "s.npz", stats, kind="proxy")
    loaded, meta = load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    assert loaded.num == 30 and meta == {"kind": "proxy"}
    # a file written by another FID tool: just mu and sigma
    np.savez(tmp_path / "other.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    other, meta = load_stats(tmp_path / "other.npz")
    assert other.num == -1 and meta == {}


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(ValueError, match="bad.npz lacks"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats.from_features(np.full((3, 2), np.nan))


def test_unreadable_statistics_files_are_named(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"one.npy is not a readable .npz file .*unnamed array"):
        load_stats(tmp_path / "one.npy")
    np.savez(tmp_path / "pickled.npz", mu=np.array([object()], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="pickled.npz is not a readable .npz file"):
        load_stats(tmp_path / "pickled.npz")
    np.savez(tmp_path / "text.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    with pytest.raises(ValueError, match="text.npz: 'mu' and 'sigma' must be numeric"):
        load_stats(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        load_stats(tmp_path / "missing.npz")
