"""The book-keeping clipped sum Σ_r c_{s(r)} G_rᵀA_r = Gᵀ·diag(c)·A as one GEMM, the clip factor in the kernel.

Book-keeping (Bu et al., arXiv 2210.00038): after the per-sample norms give clip factors c_s, each weight's
clipped gradient sum is a single weight-gradient GEMM with every row's output gradient scaled by its
sample's factor. Here the factor is looked up per row inside the kernel (``c[sample_index[r]]``, zero for
padding), so no scaled copy of G is written, and rows whose factor is zero are never read (a padding row's
garbage, or a non-finite sample the engine zeroed, cannot reach the sum). Each program owns one (P, K) tile
of the result over a slice of the rows (split-K over rows, added atomically), so a big batch fills the GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common as cm
from ._triton import autotune, config, interpreting, is_ieee, jit, tl, triton, use_triton

__all__ = ["clipped_weight_grad", "clipped_weight_grad_ref", "conv_clipped_weight_grad",
           "conv_clipped_weight_grad_ref"]


@autotune(configs=[config(BLOCK_T=16, BLOCK_P=16, BLOCK_K=16),
                   config(BLOCK_T=32, BLOCK_P=64, BLOCK_K=64),
                   config(BLOCK_T=64, BLOCK_P=64, BLOCK_K=64),
                   config(BLOCK_T=32, BLOCK_P=128, BLOCK_K=64, num_warps=8),
                   config(BLOCK_T=32, BLOCK_P=64, BLOCK_K=128, num_warps=8)],
          key=["T", "K", "P", "ROWS"], reset_to_zero=["out_ptr"])
@jit
def _clipped_weight_grad_kernel(
        x_ptr, g_ptr, c_ptr, sid_ptr, pad_ptr, out_ptr,
        R, ROWS, T, K, P, CG, Wo, H, W,                 # ROWS: rows per program (split over rows)
        sxr, sxc, sxh, sxw, sgr, sgc, sgh, sgw,
        sh, sw, ph, pw, dh, dw,
        KH: tl.constexpr, KW: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[grp·P + o, k] += Σ_{r in this program's rows} c_{s(r)} Σ_t G_r[t, o] A_r[t, k].

    Grid: (groups · ⌈P/BLOCK_P⌉ · ⌈K/BLOCK_K⌉, ⌈R/ROWS⌉). The factor multiplies each row's fp32 partial
    product rather than its bf16 tile: scaling G in bf16 would round c·G to 8 bits for one FMA per tile saved.
    """
    tile = tl.program_id(0)
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
    r0 = tl.program_id(1) * ROWS
    for r in range(r0, tl.minimum(r0 + ROWS, R)):
        pad = tl.load(pad_ptr + r)
        scale = tl.load(c_ptr + tl.load(sid_ptr + r)).to(tl.float32)
        scale = tl.where(pad == 0, scale, 0.0)
        t_end = tl.where(scale != 0.0, T, 0)  # zero factor: the row is not read at all
        x_off = zero + r * sxr
        g_off = zero + r * sgr
        row = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tt
            t_mask = t < t_end
            a = cm._load_cols(x_ptr, x_off, t, k, t_mask, k_mask, grp * CG, Wo, H, W, sxc, sxh, sxw,
                              sh, sw, ph, pw, dh, dw, KH, KW)
            g = cm._load_grads(g_ptr, g_off, t, o, t_mask, o_mask, grp * P, Wo, sgc, sgh, sgw)
            if IEEE:
                row = tl.dot(tl.trans(g).to(tl.float32), a.to(tl.float32), row, input_precision="ieee")
            else:
                row = tl.dot(tl.trans(g), a, row)
        acc += scale * row
    ptrs = out_ptr + (grp * P + o)[:, None].to(tl.int64) * K + k[None, :]
    tl.atomic_add(ptrs, acc, mask=o_mask[:, None] & k_mask[None, :])


def _rows_per_program(R: int, tiles_hint: int) -> int:
    """Rows per program: the split over rows that gives ~4 programs per SM (one under the interpreter,
    where programs run one after another and each costs ~0.6 ms of overhead)."""
    if interpreting() or not torch.cuda.is_available():
        return max(R, 1)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    splits = max(1, min(R, (4 * sms + tiles_hint - 1) // tiles_hint))
    return triton.cdiv(R, splits)


def _launch(x, go, c, sample_index, is_padding, kernel_size, stride, padding, dilation, groups):
    R, c_in, H, W = x.shape
    c_out, Ho, Wo = go.shape[1:]
    K, P, T = c_in // groups * kernel_size[0] * kernel_size[1], c_out // groups, Ho * Wo
    out = torch.zeros(c_out, K, dtype=torch.float32, device=x.device)
    if R == 0 or T == 0:
        return out.view(c_out, c_in // groups, *kernel_size)
    sid = sample_index if sample_index is not None else torch.arange(R, device=x.device)
    pad = cm.padding_flags(is_padding, R, x.device)
    rows = _rows_per_program(R, groups * triton.cdiv(P, 64) * triton.cdiv(K, 64))

    def grid(meta):
        return (groups * triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, rows))

    _clipped_weight_grad_kernel[grid](
        x, go, c, sid, pad, out, R, rows, T, K, P, c_in // groups, Wo, H, W,
        *x.stride(), *go.stride(), *stride, *padding, *dilation,
        KH=kernel_size[0], KW=kernel_size[1], IEEE=is_ieee(x.dtype))
    return out.view(c_out, c_in // groups, *kernel_size)


@torch.library.custom_op("privimage::clipped_weight_grad", mutates_args=())
def _clipped_weight_grad_op(x: torch.Tensor, go: torch.Tensor, c: torch.Tensor, sample_index: Optional[torch.Tensor],
                            is_padding: Optional[torch.Tensor], kernel_size: list[int], stride: list[int],
                            padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups)
    if x.dtype != torch.float64 and use_triton(x, go, c):
        return _launch(x, go, c, sample_index, is_padding, *geometry)
    return _conv_ref(x, go, c, sample_index, is_padding, *geometry)


@_clipped_weight_grad_op.register_fake
def _(x, go, c, sample_index, is_padding, kernel_size, stride, padding, dilation, groups):
    return x.new_empty((go.shape[1], x.shape[1] // groups, *kernel_size), dtype=cm.acc_dtype(x))


def _conv_ref(x, go, c, sample_index, is_padding, kernel_size, stride, padding, dilation, groups):
    """One weight-gradient convolution (or GEMM) with each row's output gradient scaled by its factor."""
    dtype = cm.acc_dtype(x)
    R = x.shape[0]
    weight_shape = (go.shape[1], x.shape[1] // groups, *kernel_size)
    if R == 0:
        return torch.zeros(weight_shape, dtype=dtype, device=x.device)
    scale = (c if sample_index is None else c[sample_index]).to(dtype)
    if is_padding is not None:
        scale = torch.where(is_padding, 0, scale)
    keep = (scale != 0).view(R, 1, 1, 1)  # rows with factor 0 are not read (as in the kernel)
    x = torch.where(keep, x.to(dtype), 0)
    scaled = torch.where(keep, go.to(dtype) * scale.view(R, 1, 1, 1), 0)
    if kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0) and groups == 1:
        g2 = scaled.transpose(0, 1).reshape(go.shape[1], -1)   # (p, R·T)
        a2 = x.transpose(0, 1).reshape(x.shape[1], -1)          # (d, R·T)
        return (g2 @ a2.t()).view(weight_shape)
    return torch.nn.grad.conv2d_weight(x, weight_shape, scaled, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups)


def _check_c(op, c, R, S, device):
    if c.shape != (S,) or not c.is_floating_point():
        raise ValueError(f"{op}: expected c to be a float tensor of shape ({S},) (one clip factor per sample), "
                         f"got {c.dtype} {tuple(c.shape)}.")
    if c.device != device:
        raise ValueError(f"{op}: c is on {c.device}, the data on {device}.")


def conv_clipped_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, c: torch.Tensor, kernel_size, *,
                             stride=1, padding=0, dilation=1, groups: int = 1,
                             sample_index: torch.Tensor | None = None,
                             is_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_s c_s ∇W_s for a Conv2d: (C_out, C_in/groups, kh, kw) float32 (float64 for float64 inputs).

    Args:
        x, grad_out, kernel_size, stride, padding, dilation, groups: as
            :func:`privimage.kernels.conv_per_sample_sq_norms`.
        c: (S,) clip factors, one per sample (per row when ``sample_index`` is None).
        sample_index: (R,) long sample id of each row; None: one sample per row.
        is_padding: (R,) bool; padding rows contribute nothing.
    """
    op = "conv_clipped_weight_grad"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, c.shape[0] if sample_index is not None and c.dim() else None)
    _check_c(op, c, x.shape[0], S, x.device)
    return _clipped_weight_grad_op(x, grad_out, c, sample_index, is_padding, *map(list, geometry), groups)


def clipped_weight_grad(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, *,
                        sample_index: torch.Tensor | None = None,
                        is_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_r c_{s(r)} G_rᵀA_r (p, d) float32 for a Linear layer, A (R, *, d), G (R, *, p); c (S,) per sample
    (per row without ``sample_index``). Matches ``privimage.engine.ops.clipped_weight_grad(A, G, c)``."""
    op = "clipped_weight_grad"
    x, go = cm.linear_as_conv(op, A, G)
    S = cm.check_rows(op, A.shape[0], A.device, sample_index, is_padding, c.shape[0] if sample_index is not None and c.dim() else None)
    _check_c(op, c, A.shape[0], S, A.device)
    out = _clipped_weight_grad_op(x, go, c, sample_index, is_padding, [1, 1], [1, 1], [0, 0], [1, 1], 1)
    return out.view(G.shape[-1], A.shape[-1])


def conv_clipped_weight_grad_ref(x, grad_out, c, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                                 sample_index=None, is_padding=None) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_clipped_weight_grad` (one ``conv2d_weight`` on scaled G)."""
    op = "conv_clipped_weight_grad_ref"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, c.shape[0] if sample_index is not None and c.dim() else None)
    _check_c(op, c, x.shape[0], S, x.device)
    return _conv_ref(x, grad_out, c, sample_index, is_padding, *geometry, groups)


def clipped_weight_grad_ref(A, G, c, *, sample_index=None, is_padding=None) -> torch.Tensor:
    """Plain-torch reference of :func:`clipped_weight_grad` (one GEMM over all rows and positions)."""
    op = "clipped_weight_grad_ref"
    x, go = cm.linear_as_conv(op, A, G)
    S = cm.check_rows(op, A.shape[0], A.device, sample_index, is_padding, c.shape[0] if sample_index is not None and c.dim() else None)
    _check_c(op, c, A.shape[0], S, A.device)
    out = _conv_ref(x, go, c, sample_index, is_padding, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    return out.view(G.shape[-1], A.shape[-1])
