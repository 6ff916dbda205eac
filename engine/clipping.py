"""Stages 2 and 3 of the DP step: per-sample norms and clip factors, then the clipped sums.

Stage 2, :func:`norms_and_clip`: each sample's gradient norm over ALL trainable parameters together,
‖g_s‖² = Σ_layers ‖g_s^layer‖², and its clip factor c_s = min(1, C / (‖g_s‖ + 1e-6)) (Abadi et al. arXiv
1607.00133; the 1e-6 is Opacus' convention). A padding-only sample (no real row) and a sample whose norm is
NaN/inf get c_s = 0: they contribute nothing, and the second are counted.

Stage 3, :func:`clipped_sums`: each parameter's Σ_s c_s g_s, by the layer rules (book-keeping: a weighted
GEMM per layer, or a weighted sum of kept per-row gradients). Trap: a non-finite row times a zero factor is
still NaN, so when any sample is non-finite its rows' A, G and kept gradients are zeroed first
(:func:`zero_rows`): a data-dependent branch, one host sync per step, and the split between the compiled
regions (:mod:`privimage.engine.compiled`).

Both run with autocast off and accumulate in float32 or wider: the clip factor is a privacy-critical
quantity, and bf16's 8-bit mantissa would make it visibly wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from privimage.engine.layers import Factors
from privimage.engine.plan import Plan
from privimage.kernels import Grouping

__all__ = ["CLIP_EPS", "Layer", "clip_factors", "clipped_sums", "norms_and_clip", "zero_rows"]

CLIP_EPS = 1e-6  # the 1e-6 of c_s = min(1, C / (‖g_s‖ + 1e-6))


class Layer(NamedTuple):
    """One parameterised module's share of a step: rule, plan, calls [(A, G)], finished norms if any, and the
    gradients its rule kept {param: (R, *shape)}, or (S, *shape) for a per-sample plan."""

    module: nn.Module
    rule: object
    plan: Plan
    calls: list
    sq: torch.Tensor | None  # squared norms already taken (during the backward pass, or eagerly), else None
    kept: dict


def clip_factors(sq_norms: torch.Tensor, grouping: Grouping, max_grad_norm: float):
    """Squared norms (S,) → norms, clip factors c (0 for padding-only and non-finite samples), finite, real."""
    norms = sq_norms.sqrt()
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    finite = torch.isfinite(norms)
    pad = grouping.is_padding
    if pad is not None:
        real = grouping.to_samples((~pad).to(norms.dtype)) > 0
    elif grouping.trivial:
        real = torch.ones_like(finite)
    else:
        real = grouping.to_samples(torch.ones(grouping.num_rows, device=norms.device)) > 0
    c = torch.where(finite & real, c, torch.zeros_like(c))
    return norms, c, finite, real


def norms_and_clip(layers, grouping: Grouping, max_grad_norm: float, dtype: torch.dtype, device):
    """Stage 2: every layer's per-sample squared norms, summed over layers; then the clip factors.

    Returns norms (S,), c (S,), finite (S,) and the counts of real and of dropped (non-finite) samples.
    """
    sq = torch.zeros(grouping.num_samples, dtype=dtype, device=device)
    for layer in layers:
        sq = sq + (layer.sq if layer.sq is not None else
                   layer.rule.sq_norms(layer.module, layer.calls, grouping, layer.plan, layer.kept))
    norms, c, finite, real = clip_factors(sq, grouping, max_grad_norm)
    return norms, c, finite, real.sum(), (~finite & real).sum()


def zero_rows(x, row_ok: torch.Tensor):
    """Rows of ``x`` (R, ...) where ``row_ok`` is False set to exactly 0 (not 0·NaN); non-floats pass."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return torch.where(row_ok.view((-1,) + (1,) * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype,
                                                                                 device=x.device))


def clipped_sums(layers, factors: Factors, row_ok: torch.Tensor | None):
    """Stage 3: each layer's {param: Σ_s c_s g_s}; ``row_ok`` (R,) bool, if given, zeroes the other rows first."""
    sums = []
    # a sample is ok when all its rows are (for the per-sample gradients a per-sample plan keeps)
    sample_ok = None if row_ok is None else factors.grouping.to_samples((~row_ok).to(factors.c.dtype)) == 0
    for layer in layers:
        calls, kept = layer.calls, layer.kept
        if row_ok is not None:
            calls = [(zero_rows(a, row_ok), zero_rows(g, row_ok)) for a, g in calls]
            ok = sample_ok if layer.plan.per_sample else row_ok
            kept = {p: zero_rows(g, ok) for p, g in kept.items()}
        sums.append(layer.rule.clipped(layer.module, calls, factors, layer.plan, kept))
    return sums
