"""Per-sample gradients of a normalisation layer's affine parameters (GroupNorm, LayerNorm), fused with x̂.

Row r's affine gradients are reductions of its output gradient G_r: ``∇γ_r = Σ_positions G_r ∘ x̂_r`` and
``∇β_r = Σ_positions G_r``, with x̂ the normalised INPUT of the layer. Torch forms x̂ (a full copy of the
activations) and then reduces; the kernel has one program per (row, normalisation group) compute the
group's mean and variance, then x̂ on the fly while it reduces, and add the row's two gradients into its
sample's slot (several rows of one sample add up). Only vectors of length C per sample are ever written: the
engine keeps them for its clipped sum (C numbers per sample) instead of a second pass over x and G.

Both layouts are one view of the data as (R, NG, CG, L), statistics over (CG, L) for each (r, ng):

* GroupNorm (R, C, *spatial): NG = num_groups, CG = C / NG, L = spatial size; channel = ng·CG + c.
* LayerNorm (R, *, N): NG = positions T, CG = N (normalised elements), L = 1; channel = c (summed over T).

Backends (:mod:`.dispatch`): the kernel; the native CPU build for GroupNorm (the layout where it measured
faster: bench/results/native.md); else torch (x̂ by torch's own norm function, product, reductions).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch, native
from . import forms as cm
from ._triton import jit, tl, triton
from .grouping import Grouping

__all__ = ["group_norm_grads", "group_norm_grads_ref", "layer_norm_grads", "layer_norm_grads_ref"]

_GROUP_NORM, _LAYER_NORM = 2, 3  # layouts (the `kind` argument; the native build shares the numbering)


@jit
def _norm_affine_kernel(
        x_ptr, g_ptr, target_ptr, pad_ptr, out_ptr,
        CG, L, P, eps,
        sxr, sxg, sxc, sxl, sgr, sgg, sgc, sgl,
        PER_POSITION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[target[r], 0, ch] += Σ_l g·x̂,  out[target[r], 1, ch] += Σ_l g  for the group (r, ng).

    x̂ = (x − mean) / sqrt(var + eps) over the group's (CG, L) elements (biased variance, as torch's norms).
    ch = c when PER_POSITION (LayerNorm: groups are positions sharing the parameters), else ng·CG + c. A
    padding row is never read (it adds zeros). Grid: (R, NG).
    """
    r = tl.program_id(0)
    ng = tl.program_id(1)
    l_end = tl.where(tl.load(pad_ptr + r) == 0, L, 0)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < CG
    x_base = x_ptr + r.to(tl.int64) * sxr + ng.to(tl.int64) * sxg
    g_base = g_ptr + r.to(tl.int64) * sgr + ng.to(tl.int64) * sgg
    total = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        m = c_mask[:, None] & (l < l_end)[None, :]
        total += tl.load(x_base + c[:, None] * sxc + l[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(total) / (CG * L)
    sq = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):  # two passes: E[x²] − E[x]² cancels badly for large means
        l = l0 + tl.arange(0, BLOCK_L)
        m = c_mask[:, None] & (l < l_end)[None, :]
        xv = tl.load(x_base + c[:, None] * sxc + l[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
        sq += tl.where(m, (xv - mean) * (xv - mean), 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(sq) / (CG * L) + eps)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        m = c_mask[:, None] & (l < l_end)[None, :]
        g = tl.load(g_base + c[:, None] * sgc + l[None, :] * sgl, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_base + c[:, None] * sxc + l[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
        acc_b += tl.sum(g, axis=1)
        acc_w += tl.sum(g * (xv - mean) * rstd, axis=1)
    if PER_POSITION:
        ch = c
    else:
        ch = ng * CG + c
    out = out_ptr + tl.load(target_ptr + r) * (2 * P) + ch
    tl.atomic_add(out, acc_w, mask=c_mask)
    tl.atomic_add(out + P, acc_b, mask=c_mask)


def _view(kind, t, num_groups, norm_ndim):
    """``t`` as the (R, NG, CG, L) view of its layout, and P (the parameter length)."""
    R = t.shape[0]
    if kind == _GROUP_NORM:
        C = t.shape[1]
        return t.reshape(R, num_groups, C // num_groups, math.prod(t.shape[2:])), C
    n = math.prod(t.shape[t.dim() - norm_ndim:])
    return t.reshape(R, -1, n, 1), n


def _launch(x, go, rows: Grouping, kind, num_groups, norm_ndim, eps):
    xv, P = _view(kind, x, num_groups, norm_ndim)
    gv, _ = _view(kind, go, num_groups, norm_ndim)
    R, NG, CG, L = gv.shape
    out = torch.zeros(rows.num_samples, 2, P, dtype=torch.float32, device=go.device)
    if R == 0 or rows.num_samples == 0 or gv.numel() == 0:
        return out
    block_c = triton.next_power_of_2(CG)
    block_l = min(triton.next_power_of_2(L), max(1, 4096 // block_c))
    _norm_affine_kernel[(R, NG)](
        xv, gv, rows.row_index(go.device), rows.padding_flags(go.device), out, CG, L, P, float(eps),
        *xv.stride(), *gv.stride(), PER_POSITION=kind == _LAYER_NORM, BLOCK_C=block_c, BLOCK_L=block_l)
    return out


def _torch(x, go, rows: Grouping, kind, num_groups, norm_ndim, eps):
    """The torch path: x̂ by torch's norm function, G ∘ x̂ and G reduced over the positions, in G's dtype (as
    autocast left it), then per sample in float32 or wider; padding rows zeroed."""
    if kind == _GROUP_NORM:
        prod = go * F.group_norm(x, num_groups, eps=eps).to(go.dtype)
        dims = tuple(range(2, go.dim()))
        gw, gb = (prod.sum(dims), go.sum(dims)) if dims else (prod, go)
    else:
        shape = go.shape[go.dim() - norm_ndim:]
        prod = go * F.layer_norm(x, shape, eps=eps).to(go.dtype)
        dims = tuple(range(1, go.dim() - norm_ndim))
        gw, gb = (prod.sum(dims), go.sum(dims)) if dims else (prod, go)
        gw, gb = gw.reshape(go.shape[0], -1), gb.reshape(go.shape[0], -1)
    per_row = cm.as_acc(torch.stack([gw, gb], 1))
    return rows.to_samples(rows.drop_padding(per_row))


def _ref(x, go, rows: Grouping, kind, num_groups, norm_ndim, eps):
    """(S, 2, P): per-row gradients in float32 or wider from torch's own norm functions, summed per sample."""
    dtype = cm.acc_dtype(go)
    go = go.to(dtype)
    R = go.shape[0]
    if kind == _GROUP_NORM:
        gb = go.flatten(2).sum(2)
        gw = (go * F.group_norm(x.to(dtype), num_groups, eps=eps)).flatten(2).sum(2)
    else:
        shape = go.shape[go.dim() - norm_ndim:]
        gb = go.reshape(R, -1, math.prod(shape)).sum(1)
        gw = (go * F.layer_norm(x.to(dtype), shape, eps=eps)).reshape(R, -1, math.prod(shape)).sum(1)
    return rows.to_samples(rows.drop_padding(torch.stack([gw, gb], 1)))


def _impl(x, go, rows: Grouping, kind, num_groups, norm_ndim, eps):
    """The op on checked arguments: the backend :mod:`.dispatch` picks, then its code."""
    which = dispatch.backend("norm_affine_grads", x, go, native_pays=True if kind == _GROUP_NORM else None)
    if which == dispatch.TRITON:
        return _launch(x, go, rows, kind, num_groups, norm_ndim, eps)
    if which == dispatch.NATIVE:
        return native.norm_affine_grads(x, go, rows.row_index(go.device), torch.ones(go.shape[0]), rows.is_padding,
                                        rows.num_samples, kind, num_groups, norm_ndim, eps)
    return _torch(x, go, rows, kind, num_groups, norm_ndim, eps)


@torch.library.custom_op("privimage::norm_affine_grads", mutates_args=())
def _norm_affine_op(x: torch.Tensor, go: torch.Tensor, sample_index: Optional[torch.Tensor],
                    is_padding: Optional[torch.Tensor], num_samples: int, kind: int, num_groups: int,
                    norm_ndim: int, eps: float) -> torch.Tensor:
    return _impl(x, go, Grouping.trusted(sample_index, go.shape[0], is_padding, num_samples), kind, num_groups,
                 norm_ndim, eps)


def _call(x, go, rows: Grouping, kind, num_groups, norm_ndim, eps):
    if torch.compiler.is_compiling():
        return _norm_affine_op(x, go, rows.sample_index, rows.is_padding, rows.num_samples, kind, num_groups,
                               norm_ndim, eps)
    return _impl(x, go, rows, kind, num_groups, norm_ndim, eps)


@_norm_affine_op.register_fake
def _(x, go, sample_index, is_padding, num_samples, kind, num_groups, norm_ndim, eps):
    _, P = _view(kind, go, num_groups, norm_ndim)
    return go.new_empty((num_samples, 2, P), dtype=cm.acc_dtype(go))


# ---- host functions ---------------------------------------------------------------------------------------

def _check_group_norm(op, x, go, num_groups):
    if x.shape != go.shape or x.dim() < 2:
        raise ValueError(f"{op}: x {tuple(x.shape)} and grad_out {tuple(go.shape)} must have one shape (R, C, *).")
    cm.check_float(op, x=x, grad_out=go)
    if num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"{op}: num_groups={num_groups} must divide the {x.shape[1]} channels.")


def _check_layer_norm(op, x, go, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape != go.shape or x.dim() < len(shape) + 1 or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{op}: x {tuple(x.shape)} and grad_out {tuple(go.shape)} must have one shape "
                         f"(R, *, {', '.join(map(str, shape))}).")
    cm.check_float(op, x=x, grad_out=go)
    return shape


def _rows(op, go, sample_index, is_padding, num_samples) -> Grouping:
    return Grouping(sample_index, go.shape[0], is_padding=is_padding, num_samples=num_samples, device=go.device,
                    where=op)


def group_norm_grads(x: torch.Tensor, grad_out: torch.Tensor, num_groups: int, *, eps: float = 1e-5,
                     sample_index: torch.Tensor | None = None, is_padding: torch.Tensor | None = None,
                     num_samples: int | None = None):
    """Each sample's GroupNorm affine gradients (∇γ, ∇β), each (S, C) float32; x (R, C, *) the layer's INPUT.

    Rows/padding arguments as :func:`privimage.kernels.per_sample_sq_norms` (without ``sample_index``: one
    row per sample, i.e. each row's gradients).
    """
    op = "group_norm_grads"
    _check_group_norm(op, x, grad_out, num_groups)
    rows = _rows(op, grad_out, sample_index, is_padding, num_samples)
    out = _call(x, grad_out, rows, _GROUP_NORM, num_groups, 1, eps)
    return out[:, 0], out[:, 1]


def layer_norm_grads(x: torch.Tensor, grad_out: torch.Tensor, normalized_shape, *, eps: float = 1e-5,
                     sample_index: torch.Tensor | None = None, is_padding: torch.Tensor | None = None,
                     num_samples: int | None = None):
    """Each sample's LayerNorm affine gradients (∇γ, ∇β), each (S, *normalized_shape) float32, summed over
    the extra dims (positions); x (R, *, *normalized_shape) the layer's INPUT."""
    op = "layer_norm_grads"
    shape = _check_layer_norm(op, x, grad_out, normalized_shape)
    rows = _rows(op, grad_out, sample_index, is_padding, num_samples)
    out = _call(x, grad_out, rows, _LAYER_NORM, 1, len(shape), eps)
    return out[:, 0].view(-1, *shape), out[:, 1].view(-1, *shape)


def group_norm_grads_ref(x, grad_out, num_groups, *, eps=1e-5, sample_index=None, is_padding=None,
                         num_samples=None):
    """Plain-torch reference of :func:`group_norm_grads` (x̂ by ``F.group_norm``)."""
    op = "group_norm_grads_ref"
    _check_group_norm(op, x, grad_out, num_groups)
    out = _ref(x, grad_out, _rows(op, grad_out, sample_index, is_padding, num_samples), _GROUP_NORM, num_groups, 1,
               eps)
    return out[:, 0], out[:, 1]


def layer_norm_grads_ref(x, grad_out, normalized_shape, *, eps=1e-5, sample_index=None, is_padding=None,
                         num_samples=None):
    """Plain-torch reference of :func:`layer_norm_grads` (x̂ by ``F.layer_norm``)."""
    op = "layer_norm_grads_ref"
    shape = _check_layer_norm(op, x, grad_out, normalized_shape)
    out = _ref(x, grad_out, _rows(op, grad_out, sample_index, is_padding, num_samples), _LAYER_NORM, 1, len(shape),
               eps)
    return out[:, 0].view(-1, *shape), out[:, 1].view(-1, *shape)
