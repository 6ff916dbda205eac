"""Per-sample squared weight-gradient norms ‖Σ_{r∈s} G_rᵀA_r‖²_F, the product never written to memory.

Materialised per-sample norms (Bu et al., arXiv 2205.10683 call them "instantiated"): cost R·T·K·P
multiply-adds, as much as the weight gradient itself, but in torch they also write R·P·K per-sample
gradients to memory and read them back. Here each program owns one (P, K) tile of one sample's gradient,
accumulates it in registers over the sample's rows and positions, squares and sums it, and adds the number
to the sample's norm: memory traffic is reading A and G once per tile. Conv2d is implicit im2col (the
columns are gathered inside the kernel, :mod:`.forms`); Linear is its 1×1 case.

Backends (:mod:`.dispatch`): the kernel; the native CPU build where a sample's gradient is large against its
positions (:func:`privimage.kernels.native.prefer_for_weight_norms`); else torch, which materialises the
per-row gradients (one batched GEMM, or one grouped convolution, :mod:`.forms`) and squares their per-sample
sums, folding a uniform grouping's rows into positions for a Linear (one GEMM per sample).
"""

from __future__ import annotations

import torch

from . import dispatch, native
from . import forms as cm
from ._triton import autotune, is_ieee, jit, tl, triton
from .grouping import Grouping

__all__ = ["conv_per_sample_sq_norms", "conv_per_sample_sq_norms_ref", "per_sample_sq_norms",
           "per_sample_sq_norms_ref"]


@autotune(configs=cm.GEMM_CONFIGS,
          key=["T", "K", "P"], reset_to_zero=["out_ptr"])
@jit
def _per_sample_sq_norms_kernel(
        x_ptr, g_ptr, order_ptr, offsets_ptr, pad_ptr, out_ptr,
        T, K, P, CG, Wo, H, W,                          # positions, columns/group, outputs/group, C_in/group
        sxr, sxc, sxh, sxw, sgr, sgc, sgh, sgw,          # strides of x and grad_out
        sh, sw, ph, pw, dh, dw,                          # convolution stride, padding, dilation
        KH: tl.constexpr, KW: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[s] += ‖M‖²_F for the (BLOCK_P, BLOCK_K) tile M of Σ_{r∈s, r not padding} G_rᵀ A_r (group grp).

    Grid: (samples, groups · ⌈P/BLOCK_P⌉ · ⌈K/BLOCK_K⌉). The tiles of one sample partition its gradient, so
    their squared norms add up to the sample's.
    """
    s = tl.program_id(0)
    grp, o, k = cm._weight_tile(tl.program_id(1), P, K, BLOCK_P, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    for j in range(start, end):
        r = tl.load(order_ptr + j)
        t_end = T * (1 - tl.load(pad_ptr + r).to(tl.int32))  # 0 for padding: its memory is never read
        acc = cm._add_row_grad(acc, x_ptr, g_ptr, r, t_end, T, K, P, CG, Wo, H, W, grp, o, k,
                               sxr, sxc, sxh, sxw, sgr, sgc, sgh, sgw, sh, sw, ph, pw, dh, dw, KH, KW, IEEE, BLOCK_T)
    tl.atomic_add(out_ptr + s, tl.sum(acc * acc))


def _launch(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    d, S = cm.dims(x, go, kernel_size, groups), rows.num_samples
    out = torch.zeros(S, dtype=torch.float32, device=x.device)
    if d.R == 0 or S == 0 or d.T == 0:
        return out
    order, offsets = rows.csr(x.device)

    def grid(meta):
        return (S, groups * triton.cdiv(d.P, meta["BLOCK_P"]) * triton.cdiv(d.K, meta["BLOCK_K"]))

    _per_sample_sq_norms_kernel[grid](
        x, go, order, offsets, rows.padding_flags(x.device), out, d.T, d.K, d.P, d.CG, d.Wo, d.H, d.W,
        *cm.launch_args(x, go, stride, padding, dilation), KH=kernel_size[0], KW=kernel_size[1], IEEE=is_ieee(x.dtype))
    return out


def _impl(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """The op on checked arguments: the backend :mod:`.dispatch` picks, then its code."""
    geometry = (kernel_size, stride, padding, dilation, groups)
    K = x.shape[1] // groups * kernel_size[0] * kernel_size[1]
    pays = native.prefer_for_weight_norms(go.shape[2] * go.shape[3], K, go.shape[1] // groups)
    which = dispatch.backend("per_sample_sq_norms", x, go, native_pays=pays)
    if which == dispatch.NATIVE:
        return native.per_sample_sq_norms(x, go, rows.sample_index, rows.is_padding, rows.num_samples, *geometry)
    if which == dispatch.TRITON:
        return _launch(x, go, rows, *geometry)
    return _torch(x, go, rows, *geometry)


_call = cm.norms_op("per_sample_sq_norms", _impl)


def _torch(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """The torch path: per-row gradients materialised, summed per sample, squared (padding rows zeroed)."""
    if x.shape[0] == 0:
        return torch.zeros(rows.num_samples, dtype=cm.acc_dtype(x), device=x.device)
    if cm.is_linear(kernel_size, stride, padding, dilation, groups):
        A, G = cm.as_linear(x), cm.as_linear(go)
        if not rows.trivial and rows.uniform:  # a sample's rows become positions: one GEMM per sample
            A, G = rows.fold(rows.drop_padding(A)), rows.fold(rows.drop_padding(G))
            return cm.sq_norms_of(cm.linear_per_row_grads(A, G))
        grads = cm.linear_per_row_grads(A, G)
    else:
        grads = cm.conv_per_row_grads(x, go, kernel_size, stride, padding, dilation, groups)
    return cm.sq_norms_of(rows.to_samples(rows.drop_padding(grads)))


def _ref(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """Per-row gradients in float32 or wider (a batched GEMM, or one grouped convolution), summed per
    sample over the non-padding rows, squared."""
    if x.shape[0] == 0:
        return torch.zeros(rows.num_samples, dtype=cm.acc_dtype(x), device=x.device)
    dtype = cm.acc_dtype(x)
    if cm.is_linear(kernel_size, stride, padding, dilation, groups):
        grads = cm.linear_per_row_grads(cm.as_linear(x), cm.as_linear(go), dtype)
    else:
        grads = cm.conv_per_row_grads(x, go, kernel_size, stride, padding, dilation, groups, dtype)
    return cm.sq_norms_of(rows.to_samples(rows.drop_padding(grads)))


def conv_per_sample_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, *, stride=1, padding=0,
                             dilation=1, groups: int = 1, sample_index: torch.Tensor | None = None,
                             is_padding: torch.Tensor | None = None, num_samples: int | None = None,
                             grouping: Grouping | None = None) -> torch.Tensor:
    """Each sample's ‖∇W‖²_F for a Conv2d (zero padding), from its input and output gradient.

    Args:
        x: (R, C_in, H, W) the layer's input, one row per loss row.
        grad_out: (R, C_out, Ho, Wo) gradient of the summed loss w.r.t. the layer's output.
        kernel_size, stride, padding, dilation, groups: the convolution's, as ``nn.Conv2d`` takes them.
        sample_index: (R,) long, the sample of each row (rows of one sample are summed before the norm);
            None: one sample per row.
        is_padding: (R,) bool; padding rows contribute nothing (their memory is never read).
        num_samples: S; needed under ``torch.compile`` when ``sample_index`` is given.
        grouping: instead of the three arguments above, a :class:`~privimage.kernels.Grouping` already checked
            (the engine makes one per step: no host sync per op call).

    Returns:
        (S,) float32 (float64 for float64 inputs) squared norms over the weight only.
    """
    geometry, rows = cm.conv_call("conv_per_sample_sq_norms", x, grad_out, kernel_size, stride, padding, dilation,
                                  groups, sample_index, is_padding, num_samples, grouping)
    return _call(x, grad_out, rows, geometry)


def per_sample_sq_norms(A: torch.Tensor, G: torch.Tensor, *, sample_index: torch.Tensor | None = None,
                        is_padding: torch.Tensor | None = None, num_samples: int | None = None,
                        grouping: Grouping | None = None) -> torch.Tensor:
    """Each sample's ‖Σ_{r∈s} G_rᵀA_r‖²_F for a Linear layer: A (R, *, d) inputs, G (R, *, p) output grads.

    The extra dims (tokens) are positions; without them (A (R, d)) each row has one position. Other arguments
    and the result as in :func:`conv_per_sample_sq_norms`.
    """
    x, go, geometry, rows = cm.linear_call("per_sample_sq_norms", A, G, sample_index, is_padding, num_samples,
                                           grouping)
    return _call(x, go, rows, geometry)


def conv_per_sample_sq_norms_ref(x, grad_out, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                                 sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_per_sample_sq_norms`: per-row gradients by one grouped
    convolution, summed per sample, squared."""
    geometry, rows = cm.conv_call("conv_per_sample_sq_norms_ref", x, grad_out, kernel_size, stride, padding, dilation,
                                  groups, sample_index, is_padding, num_samples)
    return _ref(x, grad_out, rows, *geometry)


def per_sample_sq_norms_ref(A, G, *, sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`per_sample_sq_norms` (a batched GEMM per row, then squares)."""
    x, go, geometry, rows = cm.linear_call("per_sample_sq_norms_ref", A, G, sample_index, is_padding, num_samples)
    return _ref(x, go, rows, *geometry)
