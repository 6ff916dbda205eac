"""The embedded default data set: procedural images generated from a seed, so everything runs offline.

Public classes are every combination of a shape, a texture and a colour scheme (5 × 4 × 3 = 60 classes),
drawn at a random position, scale and small rotation over a smooth low-saturation gradient background.
The sensitive set uses a handful of those classes (chosen by the seed) in a shifted style: blotchy
two-tone backgrounds, dimmer foregrounds and pixel noise. So the DP semantic query has real signal to find
(the sensitive images look like some public classes and not others), and the fine-tune has a real
distribution shift to adapt to.

Generation is vectorised over chunks of images in numpy (signed-distance shapes with one pixel of
antialiasing), cheap enough to generate on every load. Every random draw comes from generators seeded by
``(seed, split)``, so the same call always returns the same images.
"""

from __future__ import annotations

import numpy as np
import torch

from privimage.data.dataset import ImageDataset

SHAPES = ("circle", "bar", "triangle", "ring", "cross")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
# (primary, secondary) RGB in [0, 1]; "solid" uses the primary only, patterns alternate the two.
SCHEMES = {
    "warm": ((0.92, 0.16, 0.10), (1.00, 0.85, 0.15)),
    "cool": ((0.10, 0.25, 0.95), (0.25, 0.95, 0.95)),
    "forest": ((0.10, 0.65, 0.15), (0.85, 0.20, 0.85)),
}
CLASS_NAMES = [f"{scheme}-{texture}-{shape}" for scheme in SCHEMES for texture in TEXTURES for shape in SHAPES]
SPLITS = {"public": 0, "sensitive": 1, "sensitive_test": 2}
DEFAULT_SIZES = {"public": 50_000, "sensitive": 10_000, "sensitive_test": 2_000}
NUM_SENSITIVE_CLASSES = 5
_CHUNK = 2048  # 32x32 images per vectorised block (bounded memory; fixed, so results never depend on it)


def sensitive_classes(seed: int = 0, num: int = NUM_SENSITIVE_CLASSES) -> list[int]:
    """Public label ids of the classes the sensitive set is drawn from (sorted; fixed by the seed)."""
    rng = np.random.default_rng([seed, 7919])
    return sorted(int(c) for c in rng.choice(len(CLASS_NAMES), size=num, replace=False))


def generate(split: str, *, seed: int = 0, size: int | None = None, resolution: int | None = None,
             num_sensitive_classes: int = NUM_SENSITIVE_CLASSES) -> ImageDataset:
    """Generate a split of the embedded data set.

    Args:
        split: "public" (all 60 classes, labels 0..59), "sensitive" or "sensitive_test" (the classes of
            :func:`sensitive_classes`, labels 0..K-1 whose ``class_names`` are the same strings as the
            public names, so a public label is found by name).
        seed: fixes every image, label and the choice of sensitive classes.
        size: number of images (defaults: public 50 000, sensitive 10 000, sensitive_test 2 000).
        resolution: side length in pixels (default 32).
    """
    if split not in SPLITS:
        raise ValueError(f"Expected split in {list(SPLITS)} for the embedded data set, got {split!r}.")
    size = DEFAULT_SIZES[split] if size is None else size
    resolution = 32 if resolution is None else resolution
    if size < 0 or resolution < 8:
        raise ValueError(f"Expected size={size} >= 0 and resolution={resolution} >= 8.")
    rng = np.random.default_rng([seed, SPLITS[split]])
    sensitive = split != "public"
    if sensitive:
        classes = sensitive_classes(seed, num_sensitive_classes)
        names = [CLASS_NAMES[c] for c in classes]
    else:
        classes, names = list(range(len(CLASS_NAMES))), list(CLASS_NAMES)
    # Balanced labels in random order.
    labels = rng.permutation(np.arange(size) % len(classes)).astype(np.int64)
    public_labels = np.asarray(classes, dtype=np.int64)[labels]
    params = _draw_params(rng, public_labels, sensitive)
    images = np.empty((size, 3, resolution, resolution), dtype=np.uint8)
    chunk = max(1, _CHUNK * 32 * 32 // (resolution * resolution))  # same pixels per block at any resolution
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        chunk_rng = np.random.default_rng([seed, SPLITS[split], start])
        images[start:stop] = _render({k: v[start:stop] for k, v in params.items()}, resolution, sensitive,
                                     chunk_rng)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), names)


def _draw_params(rng: np.random.Generator, public_labels: np.ndarray, sensitive: bool) -> dict[str, np.ndarray]:
    n = len(public_labels)
    scheme, rest = np.divmod(public_labels, len(TEXTURES) * len(SHAPES))
    texture, shape = np.divmod(rest, len(SHAPES))
    prim = np.asarray([SCHEMES[s][0] for s in SCHEMES], dtype=np.float32)[scheme]
    sec = np.asarray([SCHEMES[s][1] for s in SCHEMES], dtype=np.float32)[scheme]
    scale = rng.uniform(0.38, 0.62, n).astype(np.float32)  # radius, in half image widths
    p = {
        "shape": shape, "texture": texture,
        "scale": scale,
        "cx": (rng.uniform(-1, 1, n) * (0.95 - scale)).astype(np.float32),
        "cy": (rng.uniform(-1, 1, n) * (0.95 - scale)).astype(np.float32),
        "angle": rng.uniform(-0.3, 0.3, n).astype(np.float32),
        "freq": rng.uniform(2.2, 2.8, n).astype(np.float32),  # stripe/checker periods across the shape
        "phase": rng.uniform(0, 2 * np.pi, n).astype(np.float32),
        "primary": np.clip(prim + rng.normal(0, 0.05, prim.shape), 0, 1).astype(np.float32),
        "secondary": np.clip(sec + rng.normal(0, 0.05, sec.shape), 0, 1).astype(np.float32),
    }
    if sensitive:
        # Shifted style: blotchy two-tone backgrounds (rendered below) with a stronger tint, a dimmer
        # foreground, and pixel noise.
        grey = rng.uniform(0.1, 0.9, (n, 2, 1))
        tint = rng.normal(0, 0.1, (n, 2, 3))
        ends = np.clip(grey + tint, 0, 1).astype(np.float32)
        p["bg_a"], p["bg_b"] = ends[:, 0], ends[:, 1]
        p["fg_gain"] = rng.uniform(0.75, 0.95, (n, 1)).astype(np.float32)
    else:
        # Low-saturation gradient: a grey level plus a small tint at each end.
        grey = rng.uniform(0.2, 0.8, (n, 2, 1))
        tint = rng.normal(0, 0.05, (n, 2, 3))
        ends = np.clip(grey + tint, 0, 1).astype(np.float32)
        p["bg_a"], p["bg_b"] = ends[:, 0], ends[:, 1]
        p["bg_dir"] = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
        p["fg_gain"] = np.ones((n, 1), dtype=np.float32)
    return p


def _render(p: dict[str, np.ndarray], res: int, sensitive: bool, rng: np.random.Generator) -> np.ndarray:
    n = len(p["shape"])
    coords = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    gy, gx = coords[None, :, None], coords[None, None, :]  # (1, H, 1), (1, 1, W)
    col = lambda a: a[:, None, None]  # noqa: E731 - per-image scalar broadcast over (H, W)
    x, y = (gx - col(p["cx"])) / col(p["scale"]), (gy - col(p["cy"])) / col(p["scale"])
    cos, sin = col(np.cos(p["angle"])), col(np.sin(p["angle"]))
    u, v = cos * x + sin * y, -sin * x + cos * y  # shape-local coordinates, the shape spans about [-1, 1]
    au, av = np.abs(u), np.abs(v)
    radius = np.sqrt(u * u + v * v)
    sdf = np.stack([
        radius - 1.0,                                                            # circle
        np.maximum(au - 1.0, av - 0.4),                                          # bar (wide)
        np.maximum(-v - 0.55, 0.866 * au + 0.5 * v - 0.45) * 1.2,                # triangle (apex up)
        np.abs(radius - 0.72) - 0.28,                                            # ring
        np.minimum(np.maximum(au - 0.33, av - 1.0), np.maximum(au - 1.0, av - 0.33)),  # cross
    ])[p["shape"], np.arange(n)]
    pixel = 2.0 / res / col(p["scale"])  # one pixel in shape-local units
    alpha = np.clip(0.5 - sdf / pixel, 0, 1)[:, None]  # (n, 1, H, W), antialiased edge
    f, ph = col(p["freq"]) * np.pi, col(p["phase"])
    pattern = np.stack([
        np.zeros_like(u),
        (np.sin(f * v + ph) > 0).astype(np.float32),
        (np.sin(f * u + ph) > 0).astype(np.float32),
        ((np.sin(f * u + ph) > 0) ^ (np.sin(f * v) > 0)).astype(np.float32),
    ])[p["texture"], np.arange(n)][:, None]
    fg = (p["primary"][:, :, None, None] * (1 - pattern) + p["secondary"][:, :, None, None] * pattern)
    fg = fg * p["fg_gain"][:, :, None, None]
    if sensitive:
        # Blotchy background: a coarse 4x4 random field, bilinearly upsampled, mixes two colours.
        coarse = torch.from_numpy(rng.uniform(0, 1, (n, 1, 4, 4)).astype(np.float32))
        mix = torch.nn.functional.interpolate(coarse, size=(res, res), mode="bilinear", align_corners=False).numpy()
    else:
        d = col(np.cos(p["bg_dir"])) * gx + col(np.sin(p["bg_dir"])) * gy
        mix = ((d + 1.5) / 3.0)[:, None]
    bg = p["bg_a"][:, :, None, None] * (1 - mix) + p["bg_b"][:, :, None, None] * mix
    img = bg * (1 - alpha) + fg * alpha
    if sensitive:
        img = img + rng.normal(0, 0.06, img.shape).astype(np.float32)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
