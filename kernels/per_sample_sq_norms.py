"""Per-sample squared weight-gradient norms ‖Σ_{r∈s} G_rᵀA_r‖²_F, the product never written to memory.

Materialised per-sample norms (Bu et al., arXiv 2205.10683 call them "instantiated"): cost R·T·K·P
multiply-adds, as much as the weight gradient itself, but in torch they also write R·P·K per-sample
gradients to memory and read them back. Here each program owns one (P, K) tile of one sample's gradient,
accumulates it in registers over the sample's rows and positions, squares and sums it, and adds the number
to the sample's norm: memory traffic is reading A and G once per tile. Conv2d is implicit im2col (the
columns are gathered inside the kernel, :mod:`._common`); Linear is its 1×1 case.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common as cm
from ._triton import autotune, config, is_ieee, jit, tl, triton, use_triton

__all__ = ["conv_per_sample_sq_norms", "conv_per_sample_sq_norms_ref", "per_sample_sq_norms",
           "per_sample_sq_norms_ref"]


@autotune(configs=[config(BLOCK_T=16, BLOCK_P=16, BLOCK_K=16),
                   config(BLOCK_T=32, BLOCK_P=64, BLOCK_K=64),
                   config(BLOCK_T=64, BLOCK_P=64, BLOCK_K=64),
                   config(BLOCK_T=32, BLOCK_P=128, BLOCK_K=64, num_warps=8),
                   config(BLOCK_T=32, BLOCK_P=64, BLOCK_K=128, num_warps=8)],
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
    tile = tl.program_id(1)
    n_p = tl.cdiv(P, BLOCK_P)
    n_k = tl.cdiv(K, BLOCK_K)
    grp = tile // (n_p * n_k)
    o = ((tile // n_k) % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = (tile % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_mask = o < P
    k_mask = k < K
    tt = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=tl.int64)
    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    start = tl.load(offsets_ptr + s)
    end = tl.load(offsets_ptr + s + 1)
    for j in range(start, end):
        r = tl.load(order_ptr + j)
        t_end = T * (1 - tl.load(pad_ptr + r).to(tl.int32))  # 0 for padding: its memory is never read
        x_off = zero + r * sxr
        g_off = zero + r * sgr
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tt
            t_mask = t < t_end
            a = cm._load_cols(x_ptr, x_off, t, k, t_mask, k_mask, grp * CG, Wo, H, W, sxc, sxh, sxw,
                              sh, sw, ph, pw, dh, dw, KH, KW)
            g = cm._load_grads(g_ptr, g_off, t, o, t_mask, o_mask, grp * P, Wo, sgc, sgh, sgw)
            if IEEE:
                acc = tl.dot(tl.trans(g).to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(g), a, acc)
    tl.atomic_add(out_ptr + s, tl.sum(acc * acc))


def _launch(x, go, sample_index, is_padding, S, kernel_size, stride, padding, dilation, groups):
    R, c_in, H, W = x.shape
    c_out, Ho, Wo = go.shape[1:]
    K, P, T = c_in // groups * kernel_size[0] * kernel_size[1], c_out // groups, Ho * Wo
    out = torch.zeros(S, dtype=torch.float32, device=x.device)
    if R == 0 or S == 0 or T == 0:
        return out
    order, offsets = cm.sample_csr(sample_index, R, S, x.device)
    pad = cm.padding_flags(is_padding, R, x.device)

    def grid(meta):
        return (S, groups * triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(K, meta["BLOCK_K"]))

    _per_sample_sq_norms_kernel[grid](
        x, go, order, offsets, pad, out, T, K, P, c_in // groups, Wo, H, W,
        *x.stride(), *go.stride(), *stride, *padding, *dilation,
        KH=kernel_size[0], KW=kernel_size[1], IEEE=is_ieee(x.dtype))
    return out


@torch.library.custom_op("privimage::per_sample_sq_norms", mutates_args=())
def _per_sample_sq_norms_op(x: torch.Tensor, go: torch.Tensor, sample_index: Optional[torch.Tensor],
                            is_padding: Optional[torch.Tensor], num_samples: int, kernel_size: list[int],
                            stride: list[int], padding: list[int], dilation: list[int],
                            groups: int) -> torch.Tensor:
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups)
    if x.dtype != torch.float64 and use_triton(x, go):
        return _launch(x, go, sample_index, is_padding, num_samples, *geometry)
    from . import native  # the optional C++ build, for CPU tensors when it is built

    c_out, Ho, Wo = go.shape[1:]
    K, P = x.shape[1] // groups * kernel_size[0] * kernel_size[1], c_out // groups
    if native.enabled(x, go) and native.prefer_for_weight_norms(Ho * Wo, K, P):
        return native.conv_per_sample_sq_norms_raw(x, go, sample_index, is_padding, num_samples, *geometry)
    return _conv_ref(x, go, sample_index, is_padding, num_samples, *geometry)


@_per_sample_sq_norms_op.register_fake
def _(x, go, sample_index, is_padding, num_samples, kernel_size, stride, padding, dilation, groups):
    return x.new_empty(num_samples, dtype=cm.acc_dtype(x))


def _conv_ref(x, go, sample_index, is_padding, S, kernel_size, stride, padding, dilation, groups):
    if x.shape[0] == 0:
        return torch.zeros(S, dtype=cm.acc_dtype(x), device=x.device)
    grads = cm.per_row_conv_grads_ref(x, go, kernel_size, stride, padding, dilation, groups)
    return cm.to_samples_ref(grads, sample_index, is_padding, S).flatten(1).square().sum(1)


def conv_per_sample_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, *, stride=1, padding=0,
                             dilation=1, groups: int = 1, sample_index: torch.Tensor | None = None,
                             is_padding: torch.Tensor | None = None,
                             num_samples: int | None = None) -> torch.Tensor:
    """Each sample's ‖∇W‖²_F for a Conv2d (zero padding), from its input and output gradient.

    Args:
        x: (R, C_in, H, W) the layer's input, one row per loss row.
        grad_out: (R, C_out, Ho, Wo) gradient of the summed loss w.r.t. the layer's output.
        kernel_size, stride, padding, dilation, groups: the convolution's, as ``nn.Conv2d`` takes them.
        sample_index: (R,) long, the sample of each row (rows of one sample are summed before the norm);
            None: one sample per row.
        is_padding: (R,) bool; padding rows contribute nothing (their memory is never read).
        num_samples: S; needed under ``torch.compile`` when ``sample_index`` is given.

    Returns:
        (S,) float32 (float64 for float64 inputs) squared norms over the weight only (bias: see
        :func:`privimage.kernels.bias_sq_norms`).
    """
    op = "conv_per_sample_sq_norms"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, num_samples)
    return _per_sample_sq_norms_op(x, grad_out, sample_index, is_padding, S, *map(list, geometry), groups)


def per_sample_sq_norms(A: torch.Tensor, G: torch.Tensor, *, sample_index: torch.Tensor | None = None,
                        is_padding: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
    """Each sample's ‖Σ_{r∈s} G_rᵀA_r‖²_F for a Linear layer: A (R, *, d) inputs, G (R, *, p) output grads.

    The extra dims (tokens) are positions; without them (A (R, d)) each row has one position. Other arguments
    and the result as in :func:`conv_per_sample_sq_norms`. Signature and result match
    ``privimage.engine.ops.per_sample_sq_norms``, which calls this on CUDA.
    """
    x, go = cm.linear_as_conv("per_sample_sq_norms", A, G)
    S = cm.check_rows("per_sample_sq_norms", A.shape[0], A.device, sample_index, is_padding, num_samples)
    return _per_sample_sq_norms_op(x, go, sample_index, is_padding, S, [1, 1], [1, 1], [0, 0], [1, 1], 1)


def conv_per_sample_sq_norms_ref(x, grad_out, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                                 sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_per_sample_sq_norms`: per-row gradients by one grouped
    convolution, summed per sample, squared."""
    op = "conv_per_sample_sq_norms_ref"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, num_samples)
    return _conv_ref(x, grad_out, sample_index, is_padding, S, *geometry, groups)


def per_sample_sq_norms_ref(A, G, *, sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`per_sample_sq_norms` (a batched GEMM per row, then squares)."""
    x, go = cm.linear_as_conv("per_sample_sq_norms_ref", A, G)
    S = cm.check_rows("per_sample_sq_norms_ref", A.shape[0], A.device, sample_index, is_padding, num_samples)
    return _conv_ref(x, go, sample_index, is_padding, S, (1, 1), (1, 1), (0, 0), (1, 1), 1)
