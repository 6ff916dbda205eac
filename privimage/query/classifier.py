"""The query classifier: a small ResNet trained on PUBLIC data only, cached by a hash of what it learnt from.

PrivImage (arXiv 2311.12850, §4.1) labels each sensitive image with a classifier trained on the public
data set, at the sensitive data's resolution, and lets each image vote for its top-k public classes. The
classifier never sees a sensitive image while training, so it spends no privacy and may use BatchNorm.
Only its predictions on sensitive images are private, and those are released only through the noisy
histogram of :mod:`privimage.query.semantic`.

The network is a small ResNet (He et al., arXiv 1512.03385): a 3×3 stem, three stages of basic blocks that
each halve the resolution (the first one too, which keeps the cost low at 32×32), global average pooling (so
position does not matter) and a linear head; ``features(x)`` is the pooled vector, also used by the
evaluation's proxy FID. Its accuracy and the query it serves are measured by ``bench/query.py``
(``bench/results/query.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage.data import ImageDataset, resize_images


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of the query classifier and its training (all public)."""

    width: int = 32            # channels of the first stage; stages use width, 2·width, 4·width
    blocks: int = 1            # basic blocks per stage
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3           # Adam, decayed linearly to 0
    weight_decay: float = 5e-4
    holdout: float = 0.1       # share of the public data held out to measure accuracy
    seed: int = 0
    # Style augmentation (public data only, so free of privacy cost): each training image's pixels, in
    # [-1, 1] units, are scaled by U(1 - style_gain, 1) around black and get N(0, style_noise²) noise, so the
    # classifier keeps recognising classes under the dimmer, noisier style that sensitive data often has
    # (the demo's 0.15 / 0.3: bench/results/query.md).
    style_noise: float = 0.0
    style_gain: float = 0.0

    def __post_init__(self) -> None:
        if not (self.style_noise >= 0 and 0 <= self.style_gain < 1):
            raise ValueError(f"Expected style_noise={self.style_noise} >= 0 and style_gain={self.style_gain} "
                             f"in [0, 1).")
        for name in ("width", "blocks", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected {name}={getattr(self, name)} >= 1.")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"Expected holdout={self.holdout} in [0, 1).")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class QueryClassifier(nn.Module):
    """A small ResNet over images normalised to [-1, 1]; ``prepare`` turns uint8 data into its input.

    Attributes:
        resolution, channels: the input it was trained on (``prepare`` resizes and converts to match).
        class_names: the public classes, one per logit.
    """

    def __init__(self, *, num_classes: int, channels: int, resolution: int, width: int = 32, blocks: int = 1,
                 class_names: list[str] | None = None):
        super().__init__()
        self.num_classes, self.channels, self.resolution = num_classes, channels, resolution
        self.width, self.blocks = width, blocks
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(_Block(cin, cout, 2 if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of normalised images (N, C, H, W)."""
        return self.layers(self.stem(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes)."""
        return self.head(self.features(x))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float in [-1, 1] at this classifier's resolution and channel count."""
        if images.dtype != torch.uint8:
            raise ValueError(f"Expected uint8 images, got {images.dtype}.")
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = resize_images(images.cpu(), self.resolution)
        x = images.to(next(self.parameters()).device).float() / 127.5 - 1
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(1, keepdim=True)  # colour to grey: plain average
            else:
                raise ValueError(f"Cannot feed {x.shape[1]}-channel images to a {self.channels}-channel classifier.")
        return x

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
        """Logits of uint8 images, in eval mode and in batches (CPU float32 out)."""
        was_training = self.training
        self.eval()
        out = [self(self.prepare(images[i:i + batch_size])).float().cpu() for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def save(self, path: str | os.PathLike, **extra) -> None:
        """Atomically save weights and shape (``extra`` goes into the file too, e.g. accuracy)."""
        from privimage.io import save_torch

        save_torch({"state_dict": self.state_dict(), "num_classes": self.num_classes, "channels": self.channels,
                    "resolution": self.resolution, "width": self.width, "blocks": self.blocks,
                    "class_names": self.class_names, **extra}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> "QueryClassifier":
        return cls.from_state(torch.load(path, map_location=map_location, weights_only=True)).to(map_location)

    @classmethod
    def from_state(cls, state: dict) -> "QueryClassifier":
        """The classifier a :meth:`save` file holds (already loaded with ``torch.load``), in eval mode."""
        model = cls(num_classes=state["num_classes"], channels=state["channels"], resolution=state["resolution"],
                    width=state["width"], blocks=state["blocks"], class_names=state["class_names"])
        model.load_state_dict(state["state_dict"])
        model.public_accuracy = state.get("public_accuracy")
        return model.eval()


# Part of every cache key: bump it when the network or its training changes, so old files are not reused.
CACHE_VERSION = 1


def _fingerprint(public: ImageDataset, resolution: int, config: ClassifierConfig) -> str:
    """The cache key: everything the trained weights depend on (settings, resolution, the public data's
    shape, channels, class names, pixel bytes and labels, and :data:`CACHE_VERSION`)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "config": asdict(config), "resolution": resolution,
                         "shape": list(public.images.shape), "classes": public.class_names}, sort_keys=True).encode())
    h.update(public.images.contiguous().numpy().tobytes())
    h.update(public.labels.numpy().tobytes())
    return h.hexdigest()[:20]


def _load_cached(path: Path, public: ImageDataset, resolution: int, config: ClassifierConfig,
                 device: str | torch.device, log) -> "QueryClassifier | None":
    """The cached classifier at ``path`` if it is exactly the one asked for, else ``None`` (retrain).

    The key already covers the settings; this check also catches a file that is unreadable or that was
    written for other settings (copied in by hand, or a key collision), so a hit never returns a model that
    disagrees with ``config``.
    """
    try:
        stored = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable cache file is simply retrained
        if log:
            log(f"query classifier: cache file {path} is unreadable ({err}); training afresh")
        return None
    expected = {"config": asdict(config), "resolution": resolution, "channels": public.channels,
                "num_classes": public.num_classes, "class_names": list(public.class_names)}
    if {key: stored.get(key) for key in expected} != expected:
        if log:
            log(f"query classifier: cache file {path} was trained with other settings; training afresh")
        return None
    return QueryClassifier.from_state(stored).to(device)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRIVIMAGE_CACHE_DIR", Path.home() / ".cache" / "privimage")) / "query"


def train_query_classifier(public: ImageDataset, *, resolution: int | None = None,
                           config: ClassifierConfig = ClassifierConfig(), cache_dir: str | os.PathLike | None = None,
                           use_cache: bool = True, device: str | torch.device = "cpu", log=print) -> QueryClassifier:
    """Train (or load from the cache) the query classifier on ``public`` at ``resolution``.

    Args:
        public: the public data set; never pass sensitive data here.
        resolution: the sensitive data's resolution (default: the public one).
        config: architecture and training settings.
        cache_dir: where classifiers are cached, keyed by a hash of config, resolution and the public data
            (shape, channels, class names, bytes, labels) (default ``$PRIVIMAGE_CACHE_DIR/query`` or
            ``~/.cache/privimage/query``). A cached file is used only if its stored settings match.
        use_cache: ``False`` always trains and stores nothing.
        log: where to report progress and the public accuracy (``None``: silent).

    Returns:
        The classifier in eval mode; ``.public_accuracy`` is its accuracy on the held-out public images.
    """
    from privimage.progress import progress_bar

    resolution = resolution or public.resolution
    cache = Path(cache_dir or default_cache_dir()) if use_cache else None
    key = _fingerprint(public, resolution, config)
    path = cache / f"classifier-{key}.pt" if cache is not None else None
    if path is not None and path.is_file():
        model = _load_cached(path, public, resolution, config, device, log)
        if model is not None:
            if log:
                log(f"query classifier: loaded from cache ({path}), public accuracy {model.public_accuracy:.3f}")
            return model

    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(public), generator=gen)
    n_hold = int(round(config.holdout * len(public)))
    train_idx, hold_idx = perm[n_hold:], perm[:n_hold]
    images = resize_images(public.images, resolution) if public.resolution != resolution else public.images
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG state
        torch.manual_seed(config.seed)
        model = QueryClassifier(num_classes=public.num_classes, channels=public.channels, resolution=resolution,
                                width=config.width, blocks=config.blocks, class_names=public.class_names)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)
    bar = progress_bar(total, desc="query classifier (public data)", unit="step", enabled=log is not None)
    start = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size:(s + 1) * config.batch_size]
            x = model.prepare(images[idx])
            flip = torch.rand(len(idx), generator=gen).to(x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if config.style_noise or config.style_gain:
                gain = 1 - config.style_gain * torch.rand(len(idx), 1, 1, 1, generator=gen)
                noise = config.style_noise * torch.randn(x.shape, generator=gen)
                x = (x + 1) * gain.to(x.device) - 1 + noise.to(x.device)
            loss = F.cross_entropy(model(x), public.labels[idx].to(x.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=loss.item(), refresh=False)
            bar.update()
    bar.close()
    model.eval()
    if n_hold:
        pred = model.predict_logits(images[hold_idx]).argmax(1)
        accuracy = float((pred == public.labels[hold_idx]).float().mean())
    else:
        accuracy = float("nan")
    model.public_accuracy = accuracy
    if log:
        log(f"query classifier: {config.epochs} epochs on {len(train_idx)} public images in "
            f"{time.perf_counter() - start:.1f} s, held-out public accuracy {accuracy:.3f}")
    if path is not None:
        model.save(path, public_accuracy=accuracy, config=asdict(config))
    return model


def train_classifier(*args, **kwargs) -> QueryClassifier:
    """Deprecated name of :func:`train_query_classifier` (kept for one release)."""
    import warnings

    warnings.warn("privimage.query.train_classifier is renamed train_query_classifier; the old name will be "
                  "removed in the next release.", DeprecationWarning, stacklevel=2)
    return train_query_classifier(*args, **kwargs)
