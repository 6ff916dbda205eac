"""Feature networks for the fidelity metrics: the FID Inception (real FID) or the project's classifier (proxy).

The two are never mixed. A :class:`FeatureNet` carries its ``kind`` ("inception" or "proxy"), and every
metric computed from it is named by that kind (``fid`` vs ``proxy_fid``, ``inception_score`` vs
``proxy_inception_score``, ...), so a report can never present a proxy number as an FID.

The proxy FID is the same Fréchet distance on the features of the public-data query classifier
(:mod:`privimage.query`, saved as ``query/classifier.pt`` in a run directory). It ranks generators of one
data set usefully and runs offline with no extra weights, but its values are not comparable to published
FIDs, nor across runs whose classifiers differ.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from privimage.progress import progress_bar

INCEPTION = "inception"
PROXY = "proxy"


@dataclass
class FeatureNet:
    """A network that maps uint8 images (N, C, H, W) to (features (N, D), logits (N, K) or None).

    Attributes:
        kind: "inception" (the standard FID network) or "proxy" (the project's classifier).
        name: what it is, for the report (e.g. the weights file name).
        fingerprint: a hash of the weights, so cached reference statistics are tied to this network.
        model: the module (moved to the device by :func:`extract_features`).
        forward: (model, uint8 batch on device) -> (features, logits or None).
    """

    kind: str
    name: str
    fingerprint: str
    model: nn.Module
    forward: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

    def metric_name(self, metric: str) -> str:
        """``fid`` -> ``fid`` for the Inception, ``proxy_fid`` for the proxy: the name IS the kind label."""
        return metric if self.kind == INCEPTION else f"{PROXY}_{metric}"


def file_fingerprint(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def module_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def inception_feature_net(weights: str | os.PathLike) -> FeatureNet:
    """The standard FID network from a local ``pt_inception-2015-12-05-6726825d.pth``."""
    from privimage.evaluate.inception import load_fid_inception, preprocess

    model = load_fid_inception(weights)

    def forward(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return net(preprocess(images))

    return FeatureNet(INCEPTION, Path(weights).name, file_fingerprint(weights), model, forward)


def default_proxy_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the input convention of the project's classifiers."""
    return images.float() / 127.5 - 1.0


def proxy_feature_net(model: nn.Module, *, name: str = "query classifier",
                      preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FeatureNet:
    """Any classifier with ``.features(x) -> (N, D)`` (and ``forward(x) -> logits``) as a proxy feature net.

    ``preprocess`` maps uint8 images to the model's input; by default the model's own ``prepare`` method
    (``privimage.query.QueryClassifier``: resize to its resolution, [-1, 1]) if it has one, else
    :func:`default_proxy_input`. Logits come from ``model.head(features)`` if present (one pass), else from
    a second call of ``model(x)``.
    """
    if not callable(getattr(model, "features", None)):
        raise ValueError(f"The proxy feature network ({name}) has no .features(x) method.")
    prep = preprocess or getattr(model, "prepare", None) or default_proxy_input
    head = getattr(model, "head", None)

    def forward(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = prep(images)
        feats = net.features(x)
        if feats.ndim != 2:
            feats = torch.flatten(feats, 1)
        logits = head(feats) if callable(head) else net(x)
        return feats, logits

    return FeatureNet(PROXY, name, module_fingerprint(model), model.eval(), forward)


def load_proxy_classifier(path: str | os.PathLike) -> nn.Module:
    """Load ``query/classifier.pt``: the query engineer's format (a dict with ``state_dict`` and the shape,
    read by ``privimage.query.QueryClassifier.load``), or any pickled ``nn.Module`` (``torch.save(model)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Query classifier {path} does not exist; the proxy FID needs it "
                                f"(or give --inception-weights for the real FID).")
    try:  # the safe loader first: tensors and plain containers only
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module (the user's own run directory) needs full unpickling
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: name it (issue 19)
            raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}); delete it to evaluate "
                             f"without the proxy FID, or give --inception-weights.") from None
    if isinstance(obj, nn.Module):
        return obj.eval()
    if isinstance(obj, dict) and "state_dict" in obj:
        from privimage.query import QueryClassifier

        return QueryClassifier.load(path)
    raise ValueError(f"Query classifier {path} holds a {type(obj).__name__}; expected a QueryClassifier file "
                     f"(dict with 'state_dict') or a saved nn.Module.")


@torch.no_grad()
def extract_features(net: FeatureNet, images: torch.Tensor | np.ndarray, *, batch_size: int = 200,
                     device: str | torch.device = "cpu", bf16: bool = False,
                     desc: str = "features") -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``net`` over uint8 images (N, C, H, W) in batches; returns float32 features and logits.

    ``bf16=True`` runs the network under bfloat16 autocast on CUDA (the GPU path); preprocessing (resize,
    normalisation) stays float32 and outputs are upcast before any statistics. On CPU it is ignored.
    """
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"Expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
    device = torch.device(device)
    model = net.model.to(device).eval()
    use_bf16 = bf16 and device.type == "cuda"
    feats, logits = [], []
    bar = progress_bar(images.shape[0], desc=f"{desc} ({net.kind})", unit="img")
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            f, lg = net.forward(model, batch)
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
        bar.update(batch.shape[0])
    bar.close()
    f_all = torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)
    return f_all, (torch.cat(logits).numpy() if logits else None)
