"""Line plots of training curves without matplotlib: lines rasterised into a numpy canvas, saved by pillow.

matplotlib is not a dependency, and a loss or epsilon curve needs little: axes, a few ticks with numbers, one
polyline per series, a title and a legend. Lines are drawn by sampling each segment densely (one point per
pixel along its longer axis); text uses pillow's built-in bitmap font.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from privimage.io import atomic_write

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 30, 45


def _nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** np.floor(np.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=10 * mag)
    ticks = np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step
    return ticks + 0.0  # no "-0" labels


def _draw_segment(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour, thick: int = 1) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
    h, w = canvas.shape[:2]
    for dx in range(-(thick // 2), thick - thick // 2):
        for dy in range(-(thick // 2), thick - thick // 2):
            x, y = xs + dx, ys + dy
            keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            canvas[y[keep], x[keep]] = colour


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "", xlabel: str = "",
              ylabel: str = "", width: int = 640, height: int = 360) -> np.ndarray:
    """Render named (x, y) series into an (height, width, 3) uint8 image. Non-finite points are skipped."""
    from PIL import Image, ImageDraw

    canvas = np.full((height, width, 3), 255, np.uint8)
    pw, ph = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    clean = {}
    for name, (x, y) in series.items():
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        clean[name] = (x[keep], y[keep])
    xs = np.concatenate([x for x, _ in clean.values()] or [np.zeros(1)])
    ys = np.concatenate([y for _, y in clean.values()] or [np.zeros(1)])
    xs, ys = (xs, ys) if xs.size else (np.zeros(1), np.zeros(1))
    x_lo, x_hi = float(xs.min()), float(xs.max())
    y_lo, y_hi = float(ys.min()), float(ys.max())
    if x_hi == x_lo:
        x_hi = x_lo + 1
    pad = (y_hi - y_lo) * 0.05 or max(abs(y_hi) * 0.05, 1e-3)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def to_px(x, y):
        return _LEFT + (x - x_lo) / (x_hi - x_lo) * pw, _TOP + ph - (y - y_lo) / (y_hi - y_lo) * ph

    x_ticks = [t for t in _nice_ticks(x_lo, x_hi) if x_lo <= t <= x_hi]
    y_ticks = [t for t in _nice_ticks(y_lo, y_hi) if y_lo <= t <= y_hi]
    for t in y_ticks:  # light grid
        _, py = to_px(x_lo, t)
        _draw_segment(canvas, _LEFT, py, _LEFT + pw, py, (230, 230, 230))
    _draw_segment(canvas, _LEFT, _TOP, _LEFT, _TOP + ph, (0, 0, 0))
    _draw_segment(canvas, _LEFT, _TOP + ph, _LEFT + pw, _TOP + ph, (0, 0, 0))
    for i, (name, (x, y)) in enumerate(clean.items()):
        colour = COLOURS[i % len(COLOURS)]
        if x.size == 1:
            px, py = to_px(x[0], y[0])
            _draw_segment(canvas, px - 2, py, px + 2, py, colour, thick=3)
        for j in range(x.size - 1):
            _draw_segment(canvas, *to_px(x[j], y[j]), *to_px(x[j + 1], y[j + 1]), colour, thick=2)

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for t in x_ticks:
        px, _ = to_px(t, y_lo)
        draw.line([(px, _TOP + ph), (px, _TOP + ph + 4)], fill=(0, 0, 0))
        draw.text((px - 12, _TOP + ph + 6), f"{t:g}", fill=(0, 0, 0))
    for t in y_ticks:
        _, py = to_px(x_lo, t)
        draw.line([(_LEFT - 4, py), (_LEFT, py)], fill=(0, 0, 0))
        draw.text((4, py - 5), f"{t:.4g}", fill=(0, 0, 0))
    draw.text((_LEFT, 8), title, fill=(0, 0, 0))
    draw.text((_LEFT + pw // 2 - 3 * len(xlabel), height - 16), xlabel, fill=(0, 0, 0))
    draw.text((4, _TOP - 18), ylabel, fill=(0, 0, 0))
    for i, name in enumerate(clean):
        y = _TOP + 4 + 12 * i
        draw.rectangle([_LEFT + pw - 110, y + 3, _LEFT + pw - 100, y + 8], fill=COLOURS[i % len(COLOURS)])
        draw.text((_LEFT + pw - 95, y), name[:16], fill=(0, 0, 0))
    return np.asarray(image)


def save_line_plot(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]],
                   **kwargs) -> None:
    """:func:`line_plot` written as a PNG, atomically."""
    from PIL import Image

    with atomic_write(path) as f:
        Image.fromarray(line_plot(series, **kwargs)).save(f, format="PNG")
