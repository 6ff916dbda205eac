"""Inception Score and k-NN precision/recall, on whatever features and logits the feature network gives.

* Inception Score (Salimans et al. 2016, arXiv 1606.03498): exp(E_x KL(p(y|x) || p(y))), computed on the
  softmax of the classifier's logits (the FID Inception's 1008-way head, or the proxy classifier's), in
  ``splits`` equal chunks, reporting mean and standard deviation over chunks as the original code does.
* Improved precision and recall (Kynkäänniemi et al. 2019, arXiv 1904.06991): the real manifold is the union of
  balls around each real feature with radius its distance to its k-th nearest real neighbour; precision is the
  share of generated samples inside it, recall the share of real samples inside the generated manifold built
  the same way. k = 3 as in the paper.
"""

from __future__ import annotations

import numpy as np
import torch


def inception_score(logits: np.ndarray | torch.Tensor, *, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` chunks of (N, C) logits.

    Example:
        >>> import numpy as np
        >>> inception_score(np.zeros((20, 5)), splits=2)  # uniform predictions: no information, score 1
        (1.0, 0.0)
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"Expected (N, C) logits with N >= splits={splits}, got {tuple(logits.shape)}.")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(chunk, dim=0) - np.log(chunk.shape[0])  # log of the chunk's mean p(y)
        kl = (chunk.exp() * (chunk - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(feats: torch.Tensor, k: int, block: int) -> torch.Tensor:
    radii = []
    for start in range(0, feats.shape[0], block):
        d = torch.cdist(feats[start:start + block], feats)
        # index 0 of each sorted row is the point itself (distance 0); index k is its k-th neighbour
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    inside = []
    for start in range(0, queries.shape[0], block):
        d = torch.cdist(queries[start:start + block], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, *, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` features, both (N, D).

    Distances are float64 (so a sample identical to a real one is at distance 0, not round-off away from it),
    in row blocks of ``block`` so memory stays O(block * N).
    """
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"Expected (N, D) features of one D, got {tuple(real.shape)} and {tuple(fake.shape)}.")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"Need more than k={k} samples in each set, got {real.shape[0]} real and "
                         f"{fake.shape[0]} generated.")
    real_radii = _kth_neighbour_radii(real, k, block)
    fake_radii = _kth_neighbour_radii(fake, k, block)
    precision = _coverage(fake, real, real_radii, block)
    recall = _coverage(real, fake, fake_radii, block)
    return precision, recall
