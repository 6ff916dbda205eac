"""Per-sample norms and clipped sums of bias and GroupNorm/LayerNorm affine gradients, fused with their reductions.

Row r's gradients are reductions of its output gradient: bias ``Σ_positions G_r``, and for a normalisation
layer's affine weight ``Σ_positions G_r ∘ x̂_r`` with x̂ the normalised input. Torch forms x̂ (a full copy of
the activations) and then reduces; here one program per (row, normalisation group) computes the group's mean
and variance, then x̂ on the fly while it reduces, and adds the row's (weight, bias) gradients into its
sample's slot (for norms) or, scaled by the row's clip factor, into the one clipped sum (book-keeping, Bu et al.
arXiv 2210.00038). Only per-sample vectors of length C are ever written.

All four layouts are one view of the data as (R, NG, CG, L), statistics over (CG, L) for each (r, ng):

* GroupNorm (R, C, *spatial): NG = num_groups, CG = C / NG, L = spatial size; channel = ng·CG + c.
* LayerNorm (R, *, N): NG = positions T, CG = N (normalised elements), L = 1; channel = c (summed over T).
* bias of a Conv2d (R, C, *spatial): NG = 1, CG = C, L = spatial, no x.
* bias of a Linear (R, *, p): as LayerNorm's layout without x.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _common as cm
from ._triton import jit, tl, triton, use_triton

__all__ = ["bias_clipped_grad", "bias_clipped_grad_ref", "bias_sq_norms", "bias_sq_norms_ref",
           "group_norm_clipped_grads", "group_norm_clipped_grads_ref", "group_norm_grads", "group_norm_grads_ref",
           "group_norm_sq_norms",
           "group_norm_sq_norms_ref", "layer_norm_clipped_grads", "layer_norm_clipped_grads_ref",
           "layer_norm_sq_norms", "layer_norm_sq_norms_ref"]

_BIAS_LAST, _BIAS_FIRST, _GROUP_NORM, _LAYER_NORM = 0, 1, 2, 3  # layouts (the `kind` argument)


@jit
def _norm_affine_kernel(
        x_ptr, g_ptr, target_ptr, scale_ptr, pad_ptr, out_ptr,
        CG, L, P, eps,
        sxr, sxg, sxc, sxl, sgr, sgg, sgc, sgl,
        HAS_X: tl.constexpr, PER_POSITION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[target[r], 0, ch] += s_r Σ_l g·x̂,  out[target[r], 1, ch] += s_r Σ_l g  for the group (r, ng).

    x̂ = (x − mean) / sqrt(var + eps) over the group's (CG, L) elements (biased variance, as torch's norms).
    ch = c when PER_POSITION (LayerNorm, Linear bias: groups are positions sharing the parameters), else
    ng·CG + c. s_r = scale[r], 0 for padding; a zero-scale row is never read. Grid: (R, NG).
    """
    r = tl.program_id(0)
    ng = tl.program_id(1)
    scale = tl.load(scale_ptr + r)
    scale = tl.where(tl.load(pad_ptr + r) == 0, scale, 0.0)
    l_end = tl.where(scale != 0.0, L, 0)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < CG
    x_base = x_ptr + r.to(tl.int64) * sxr + ng.to(tl.int64) * sxg
    g_base = g_ptr + r.to(tl.int64) * sgr + ng.to(tl.int64) * sgg
    mean = 0.0
    rstd = 0.0
    if HAS_X:
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
        acc_b += tl.sum(g, axis=1)
        if HAS_X:
            xv = tl.load(x_base + c[:, None] * sxc + l[None, :] * sxl, mask=m, other=0.0).to(tl.float32)
            acc_w += tl.sum(g * (xv - mean) * rstd, axis=1)
    if PER_POSITION:
        ch = c
    else:
        ch = ng * CG + c
    out = out_ptr + tl.load(target_ptr + r) * (2 * P) + ch
    if HAS_X:
        tl.atomic_add(out, scale * acc_w, mask=c_mask)
    tl.atomic_add(out + P, scale * acc_b, mask=c_mask)


def _view(kind, x, go, num_groups, norm_ndim):
    """(x, go) as (R, NG, CG, L) views (x may be None), and P (the parameter length)."""
    R = go.shape[0]
    if kind in (_BIAS_FIRST, _GROUP_NORM):
        C = go.shape[1]
        ng = num_groups if kind == _GROUP_NORM else 1
        L = math.prod(go.shape[2:])
        views = [None if t is None else t.reshape(R, ng, C // ng, L) for t in (x, go)]
        return views, C
    n = math.prod(go.shape[go.dim() - norm_ndim:])
    T = math.prod(go.shape[1:go.dim() - norm_ndim])
    views = [None if t is None else t.reshape(R, T, n, 1) for t in (x, go)]
    return views, n


def _launch(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps):
    (xv, gv), P = _view(kind, x, go, num_groups, norm_ndim)
    R, NG, CG, L = gv.shape
    out = torch.zeros(out_rows, 2, P, dtype=torch.float32, device=go.device)
    if R == 0 or out_rows == 0 or gv.numel() == 0:
        return out
    pad = cm.padding_flags(is_padding, R, go.device)
    block_c = triton.next_power_of_2(CG)
    block_l = min(triton.next_power_of_2(L), max(1, 4096 // block_c))
    has_x = xv is not None
    _norm_affine_kernel[(R, NG)](
        xv if has_x else gv, gv, target, scale.float(), pad, out, CG, L, P, float(eps),
        *(xv if has_x else gv).stride(), *gv.stride(),
        HAS_X=has_x, PER_POSITION=kind in (_BIAS_LAST, _LAYER_NORM), BLOCK_C=block_c, BLOCK_L=block_l)
    return out


def _per_row_ref(x, go, kind, num_groups, norm_ndim, eps):
    """(R, 2, P) per-row (weight, bias) gradients in plain torch: x̂ from torch's own norm functions."""
    dtype = cm.acc_dtype(go)
    go = go.to(dtype)
    R = go.shape[0]
    if kind in (_BIAS_FIRST, _GROUP_NORM):
        gb = go.flatten(2).sum(2)
        gw = (go * F.group_norm(x.to(dtype), num_groups, eps=eps)).flatten(2).sum(2) if x is not None else gb * 0
    else:
        shape = go.shape[go.dim() - norm_ndim:]
        gb = go.reshape(R, -1, math.prod(shape)).sum(1)
        if x is not None:
            xhat = F.layer_norm(x.to(dtype), shape, eps=eps)
            gw = (go * xhat).reshape(R, -1, math.prod(shape)).sum(1)
        else:
            gw = gb * 0
    return torch.stack([gw, gb], 1)


@torch.library.custom_op("privimage::norm_affine_grads", mutates_args=())
def _norm_affine_op(x: Optional[torch.Tensor], go: torch.Tensor, target: torch.Tensor, scale: torch.Tensor,
                    is_padding: Optional[torch.Tensor], out_rows: int, kind: int, num_groups: int,
                    norm_ndim: int, eps: float) -> torch.Tensor:
    tensors = (go,) if x is None else (x, go)
    if go.dtype != torch.float64 and use_triton(*tensors):
        return _launch(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps)
    from . import native  # the optional C++ build, for CPU tensors when it is built

    if kind == _GROUP_NORM and native.enabled(*tensors):  # the only layout where native measured faster
        return native._op().norm_affine_grads(x, go, target, scale, is_padding, out_rows, kind, num_groups,
                                              norm_ndim, eps)
    per_row = _per_row_ref(x, go, kind, num_groups, norm_ndim, eps)
    s = scale.to(per_row.dtype)
    if is_padding is not None:
        s = torch.where(is_padding, 0, s)
    keep = (s != 0).view(-1, 1, 1)  # zero-scale rows are not read, as in the kernel
    per_row = torch.where(keep, per_row * s.view(-1, 1, 1), 0)
    out = per_row.new_zeros((out_rows,) + tuple(per_row.shape[1:]))
    return out.index_add_(0, target, per_row)


@_norm_affine_op.register_fake
def _(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps):
    (_, gv), P = _view(kind, None, go, num_groups, norm_ndim)
    return go.new_empty((out_rows, 2, P), dtype=cm.acc_dtype(go))


# ---- host functions ---------------------------------------------------------------------------------------

def _per_sample(op, x, go, kind, num_groups, norm_ndim, eps, sample_index, is_padding, num_samples):
    R = go.shape[0]
    S = cm.check_rows(op, R, go.device, sample_index, is_padding, num_samples)
    target = sample_index if sample_index is not None else torch.arange(R, device=go.device)
    scale = torch.ones(R, dtype=torch.float32, device=go.device)
    return _norm_affine_op(x, go, target, scale, is_padding, S, kind, num_groups, norm_ndim, eps)


def _clipped(op, x, go, c, kind, num_groups, norm_ndim, eps, sample_index, is_padding):
    R = go.shape[0]
    S = cm.check_rows(op, R, go.device, sample_index, is_padding, c.shape[0] if sample_index is not None and c.dim() else None)
    if c.shape != (S,) or not c.is_floating_point() or c.device != go.device:
        raise ValueError(f"{op}: expected c to be a float tensor of shape ({S},) on {go.device} (one clip factor "
                         f"per sample), got {c.dtype} {tuple(c.shape)} on {c.device}.")
    scale = c if sample_index is None else c[sample_index]
    target = torch.zeros(R, dtype=torch.long, device=go.device)
    return _norm_affine_op(x, go, target, scale, is_padding, 1, kind, num_groups, norm_ndim, eps)[0]


def _bias_kind(op, grad_out, channel_dim):
    if grad_out.dim() < 2:
        raise ValueError(f"{op}: expected grad_out with a row dim and a channel dim, got {tuple(grad_out.shape)}.")
    cm.check_float(op, grad_out=grad_out)
    if channel_dim in (-1, grad_out.dim() - 1):
        return _BIAS_LAST
    if channel_dim == 1:
        return _BIAS_FIRST
    raise ValueError(f"{op}: channel_dim must be 1 (Conv2d) or -1 (Linear), got {channel_dim}.")


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


def bias_sq_norms(grad_out: torch.Tensor, *, channel_dim: int = -1, sample_index=None, is_padding=None,
                  num_samples=None) -> torch.Tensor:
    """Each sample's ‖∇b‖² = ‖Σ_{rows, positions} G‖²: Conv2d (channel_dim=1, G (R, C, *)) or Linear
    (channel_dim=-1, G (R, *, p)). Rows/padding arguments as :func:`privimage.kernels.per_sample_sq_norms`."""
    kind = _bias_kind("bias_sq_norms", grad_out, channel_dim)
    out = _per_sample("bias_sq_norms", None, grad_out, kind, 1, 1, 0.0, sample_index, is_padding, num_samples)
    return out[:, 1].square().sum(1)


def bias_clipped_grad(grad_out: torch.Tensor, c: torch.Tensor, *, channel_dim: int = -1, sample_index=None,
                      is_padding=None) -> torch.Tensor:
    """Σ_s c_s ∇b_s (C,) float32; ``c`` (S,) per sample (per row without ``sample_index``)."""
    kind = _bias_kind("bias_clipped_grad", grad_out, channel_dim)
    return _clipped("bias_clipped_grad", None, grad_out, c, kind, 1, 1, 0.0, sample_index, is_padding)[1]


def group_norm_grads(x: torch.Tensor, grad_out: torch.Tensor, num_groups: int, *, eps: float = 1e-5,
                     sample_index=None, is_padding=None, num_samples=None):
    """Each sample's GroupNorm affine gradients (∇γ, ∇β), each (S, C) float32; x (R, C, *) the layer's INPUT.

    The per-sample vectors themselves, for callers that keep them for the clipped sum (the engine's
    book-keeping: C numbers per sample, so keeping them is cheaper than a second pass over x and grad_out).
    """
    _check_group_norm("group_norm_grads", x, grad_out, num_groups)
    out = _per_sample("group_norm_grads", x, grad_out, _GROUP_NORM, num_groups, 1, eps, sample_index,
                      is_padding, num_samples)
    return out[:, 0], out[:, 1]


def group_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, num_groups: int, *, eps: float = 1e-5,
                        sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Each sample's ‖∇γ‖² + ‖∇β‖² for GroupNorm's affine parameters; x (R, C, *) the layer's INPUT."""
    _check_group_norm("group_norm_sq_norms", x, grad_out, num_groups)
    out = _per_sample("group_norm_sq_norms", x, grad_out, _GROUP_NORM, num_groups, 1, eps, sample_index,
                      is_padding, num_samples)
    return out.square().sum((1, 2))


def group_norm_clipped_grads(x: torch.Tensor, grad_out: torch.Tensor, c: torch.Tensor, num_groups: int, *,
                             eps: float = 1e-5, sample_index=None, is_padding=None):
    """(Σ_s c_s ∇γ_s, Σ_s c_s ∇β_s), each (C,) float32, for GroupNorm's affine parameters."""
    _check_group_norm("group_norm_clipped_grads", x, grad_out, num_groups)
    out = _clipped("group_norm_clipped_grads", x, grad_out, c, _GROUP_NORM, num_groups, 1, eps, sample_index,
                   is_padding)
    return out[0], out[1]


def layer_norm_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, normalized_shape, *, eps: float = 1e-5,
                        sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Each sample's ‖∇γ‖² + ‖∇β‖² for LayerNorm's affine parameters; x (R, *, *normalized_shape)."""
    shape = _check_layer_norm("layer_norm_sq_norms", x, grad_out, normalized_shape)
    out = _per_sample("layer_norm_sq_norms", x, grad_out, _LAYER_NORM, 1, len(shape), eps, sample_index,
                      is_padding, num_samples)
    return out.square().sum((1, 2))


def layer_norm_clipped_grads(x: torch.Tensor, grad_out: torch.Tensor, c: torch.Tensor, normalized_shape, *,
                             eps: float = 1e-5, sample_index=None, is_padding=None):
    """(Σ_s c_s ∇γ_s, Σ_s c_s ∇β_s), each of ``normalized_shape``, float32, for LayerNorm's affine parameters."""
    shape = _check_layer_norm("layer_norm_clipped_grads", x, grad_out, normalized_shape)
    out = _clipped("layer_norm_clipped_grads", x, grad_out, c, _LAYER_NORM, 1, len(shape), eps, sample_index,
                   is_padding)
    return out[0].view(shape), out[1].view(shape)


# ---- references: per-row gradients from torch's norm functions, then the same reductions ------------------

def _ref_rows(x, go, kind, num_groups, norm_ndim, eps, sample_index, is_padding, num_samples, op):
    S = cm.check_rows(op, go.shape[0], go.device, sample_index, is_padding, num_samples)
    return cm.to_samples_ref(_per_row_ref(x, go, kind, num_groups, norm_ndim, eps), sample_index, is_padding, S)


def _ref_clipped(x, go, c, kind, num_groups, norm_ndim, eps, sample_index, is_padding):
    per_row = _per_row_ref(x, go, kind, num_groups, norm_ndim, eps)
    scale = (c if sample_index is None else c[sample_index]).to(per_row.dtype)
    if is_padding is not None:
        scale = torch.where(is_padding, 0, scale)
    keep = (scale != 0).view(-1, 1, 1)
    return torch.where(keep, per_row * scale.view(-1, 1, 1), 0).sum(0)


def bias_sq_norms_ref(grad_out, *, channel_dim=-1, sample_index=None, is_padding=None, num_samples=None):
    """Plain-torch reference of :func:`bias_sq_norms`."""
    kind = _bias_kind("bias_sq_norms_ref", grad_out, channel_dim)
    out = _ref_rows(None, grad_out, kind, 1, 1, 0.0, sample_index, is_padding, num_samples, "bias_sq_norms_ref")
    return out[:, 1].square().sum(1)


def bias_clipped_grad_ref(grad_out, c, *, channel_dim=-1, sample_index=None, is_padding=None):
    """Plain-torch reference of :func:`bias_clipped_grad`."""
    kind = _bias_kind("bias_clipped_grad_ref", grad_out, channel_dim)
    return _ref_clipped(None, grad_out, c, kind, 1, 1, 0.0, sample_index, is_padding)[1]


def group_norm_grads_ref(x, grad_out, num_groups, *, eps=1e-5, sample_index=None, is_padding=None,
                         num_samples=None):
    """Plain-torch reference of :func:`group_norm_grads` (x̂ by ``F.group_norm``)."""
    _check_group_norm("group_norm_grads_ref", x, grad_out, num_groups)
    out = _ref_rows(x, grad_out, _GROUP_NORM, num_groups, 1, eps, sample_index, is_padding, num_samples,
                    "group_norm_grads_ref")
    return out[:, 0], out[:, 1]


def group_norm_sq_norms_ref(x, grad_out, num_groups, *, eps=1e-5, sample_index=None, is_padding=None,
                            num_samples=None):
    """Plain-torch reference of :func:`group_norm_sq_norms` (x̂ by ``F.group_norm``)."""
    _check_group_norm("group_norm_sq_norms_ref", x, grad_out, num_groups)
    out = _ref_rows(x, grad_out, _GROUP_NORM, num_groups, 1, eps, sample_index, is_padding, num_samples,
                    "group_norm_sq_norms_ref")
    return out.square().sum((1, 2))


def group_norm_clipped_grads_ref(x, grad_out, c, num_groups, *, eps=1e-5, sample_index=None, is_padding=None):
    """Plain-torch reference of :func:`group_norm_clipped_grads`."""
    _check_group_norm("group_norm_clipped_grads_ref", x, grad_out, num_groups)
    out = _ref_clipped(x, grad_out, c, _GROUP_NORM, num_groups, 1, eps, sample_index, is_padding)
    return out[0], out[1]


def layer_norm_sq_norms_ref(x, grad_out, normalized_shape, *, eps=1e-5, sample_index=None, is_padding=None,
                            num_samples=None):
    """Plain-torch reference of :func:`layer_norm_sq_norms` (x̂ by ``F.layer_norm``)."""
    shape = _check_layer_norm("layer_norm_sq_norms_ref", x, grad_out, normalized_shape)
    out = _ref_rows(x, grad_out, _LAYER_NORM, 1, len(shape), eps, sample_index, is_padding, num_samples,
                    "layer_norm_sq_norms_ref")
    return out.square().sum((1, 2))


def layer_norm_clipped_grads_ref(x, grad_out, c, normalized_shape, *, eps=1e-5, sample_index=None,
                                 is_padding=None):
    """Plain-torch reference of :func:`layer_norm_clipped_grads`."""
    shape = _check_layer_norm("layer_norm_clipped_grads_ref", x, grad_out, normalized_shape)
    out = _ref_clipped(x, grad_out, c, _LAYER_NORM, 1, len(shape), eps, sample_index, is_padding)
    return out[0].view(shape), out[1].view(shape)
