"""Fréchet distance between Gaussians fitted to features, and the statistics files that hold them.

FID (Heusel et al. 2017, arXiv 1706.08500) fits a Gaussian N(mu, Sigma) to the features of each image set and
reports the Fréchet (2-Wasserstein) distance between the two Gaussians:

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The last term is the fragile one. ``scipy.linalg.sqrtm(S1 @ S2)`` (what pytorch-fid calls) works on a
non-symmetric product, can return complex values and needs an epsilon offset when S1 is singular (fewer
samples than feature dimensions). Here it is computed from symmetric PSD matrices only: S1 S2 is similar to
S1^(1/2) S2 S1^(1/2) = A^T A with A = S2^(1/2) S1^(1/2), so tr((S1 S2)^(1/2)) is the sum of the singular
values of A, computed from the two symmetric eigendecompositions (``eigh``, stable; round-off eigenvalues
below the numerical-rank tolerance set to zero). Statistics are float64 throughout.

Statistics files are ``.npz`` with arrays ``mu`` (D,) and ``sigma`` (D, D): the format pytorch-fid, DPDM and
DPImageBench write, so precomputed reference statistics can be brought in.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privimage.io import save_npz


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of N feature vectors (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FeatureStats":
        """Fit mean and unbiased covariance (``np.cov``, ddof=1, as pytorch-fid) to (N, D) features."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"Expected features of shape (N >= 2, D), got {feats.shape}.")
        if not np.isfinite(feats).all():
            raise ValueError("Features contain NaN or inf; the feature network or its input is broken.")
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), feats.shape[0])


def save_stats(path: str | os.PathLike, stats: FeatureStats, **meta: str) -> None:
    """Write ``mu``, ``sigma`` (and ``num`` plus string metadata, e.g. the feature kind) atomically."""
    save_npz(path, mu=stats.mu, sigma=stats.sigma, num=np.int64(stats.num),
             **{k: np.array(str(v)) for k, v in meta.items()})


def read_npz(path: str | os.PathLike, *, what: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, read eagerly; errors name the file and say what it was meant to be.

    ``np.load`` reports a truncated or non-zip file as ``BadZipFile``, ``EOFError``, ``OSError`` or a pickle
    ``ValueError`` without the file's name, and may only fail when a member is read; reading every member
    inside one ``try`` turns all of these into one message a user can act on. Pickled (object) arrays are
    refused: loading them would run code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds one unnamed array (.npy), not named arrays")
        with data:
            return {name: data[name] for name in data.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{what} {path} is not a readable .npz file ({type(err).__name__}: {err}).") from err


def load_stats(path: str | os.PathLike) -> tuple[FeatureStats, dict[str, str]]:
    """Read a statistics ``.npz`` (ours or another FID tool's); returns the stats and any string metadata.

    Raises:
        ValueError naming the file: unreadable or corrupt, ``mu``/``sigma`` missing, shapes other than (D,)
        and (D, D), non-finite values, or a ``sigma`` that is not symmetric (not a covariance matrix).
    """
    return stats_from_arrays(read_npz(path, what="Statistics file"), path)


def stats_from_arrays(data: dict[str, np.ndarray], path: str | os.PathLike) -> tuple[FeatureStats, dict[str, str]]:
    """:func:`load_stats` on arrays already read from ``path`` (named in the errors)."""
    if "mu" not in data or "sigma" not in data:
        raise ValueError(f"Statistics file {path} lacks 'mu' and/or 'sigma' (has {sorted(data)}).")
    try:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Statistics file {path}: 'mu' and 'sigma' must be numeric ({err}).") from err
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"Statistics file {path}: mu {mu.shape} and sigma {sigma.shape} do not fit (D,), (D, D).")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"Statistics file {path}: mu or sigma contains NaN or inf.")
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-6 * max(np.abs(sigma).max(initial=0.0), 1e-300):
        raise ValueError(f"Statistics file {path}: sigma is not symmetric, so it is not a covariance matrix.")
    num = int(data["num"]) if "num" in data and data["num"].ndim == 0 else -1
    meta = {k: str(v) for k, v in data.items() if k not in ("mu", "sigma", "num") and v.ndim == 0}
    return FeatureStats(mu, sigma, num), meta


def _check_covariance(sigma: np.ndarray, name: str) -> np.ndarray:
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"Expected {name} to be a square matrix, got shape {sigma.shape}.")
    scale = max(np.abs(sigma).max(), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"{name} is not symmetric; a covariance matrix must be.")
    return (sigma + sigma.T) / 2


def psd_factor(sigma: np.ndarray) -> np.ndarray:
    """B (D, r) with B B^T = sigma for symmetric PSD ``sigma``: eigenvectors scaled by sqrt(eigenvalues).

    Only the r eigenvalues above the numerical-rank tolerance ``D * eps * max|w|`` (the one
    ``np.linalg.matrix_rank`` uses) are kept; the others are round-off of true zeros, and their square roots
    (~1e-8 * scale each) would add up over the hundreds of null directions that a covariance of fewer than
    2048 samples has.
    """
    w, v = np.linalg.eigh(sigma)
    tol = sigma.shape[0] * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    keep = w > tol
    return v[:, keep] * np.sqrt(w[keep])


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) as the nuclear norm of B2^T B1, where B_i B_i^T = S_i (:func:`psd_factor`).

    With S_i = V_i W_i V_i^T, the matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2) equals A^T A for
    A = S2^(1/2) S1^(1/2) = V2 (W2^(1/2) V2^T V1 W1^(1/2)) V1^T, whose singular values are those of
    B2^T B1 = W2^(1/2) V2^T V1 W1^(1/2) (V_i have orthonormal columns). So the trace is the sum of the singular
    values of a small (r2, r1) matrix; an SVD gets them with absolute error eps * ||S||^(1/2), where taking
    eigenvalues of S1^(1/2) S2 S1^(1/2) and then square roots would have error (eps * ||S||^2)^(1/2), visible
    in FID over many null directions.
    """
    s1 = _check_covariance(sigma1, "sigma1")
    s2 = _check_covariance(sigma2, "sigma2")
    if s1.shape != s2.shape:
        raise ValueError(f"Covariances differ in shape: {s1.shape} vs {s2.shape}.")
    b1, b2 = psd_factor(s1), psd_factor(s2)
    if b1.shape[1] == 0 or b2.shape[1] == 0:
        return 0.0
    return float(np.linalg.svd(b2.T @ b1, compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (what papers call FID).

    Example:
        >>> import numpy as np
        >>> round(frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)), 6)  # 2 + 2*(2-1)^2
        4.0
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"Means must be vectors of one length, got {mu1.shape} and {mu2.shape}.")
    if np.shape(sigma1) != (mu1.shape[0],) * 2 or np.shape(sigma2) != (mu1.shape[0],) * 2:
        raise ValueError(f"Covariances {np.shape(sigma1)}, {np.shape(sigma2)} do not match means of "
                         f"length {mu1.shape[0]}.")
    diff = mu1 - mu2
    tr1 = float(np.trace(sigma1))
    tr2 = float(np.trace(sigma2))
    value = float(diff @ diff) + tr1 + tr2 - 2 * trace_sqrt_product(sigma1, sigma2)
    # Exact arithmetic gives value >= 0; round-off on equal inputs can leave about -1e-12 * scale. Anything
    # more negative is a bug (or not-PSD input), not round-off, and is not hidden.
    if value < 0:
        if value < -1e-7 * (tr1 + tr2 + 1.0):
            raise ValueError(f"Fréchet distance came out {value:.3g} < 0: the covariances are not PSD.")
        value = 0.0
    return value


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
