"""The book-keeping clipped sum Σ_r c_{s(r)} G_rᵀA_r = Gᵀ·diag(c)·A as one GEMM, the clip factor in the kernel.

Book-keeping (Bu et al., arXiv 2210.00038): after the per-sample norms give clip factors c_s, each weight's
clipped gradient sum is a single weight-gradient GEMM with every row's output gradient scaled by its
sample's factor. Here the factor is looked up per row inside the kernel (``c[sample_index[r]]``, zero for
padding), so no scaled copy of G is written, and rows whose factor is zero are never read (a padding row's
garbage, or a non-finite sample the engine zeroed, cannot reach the sum). Each program owns one (P, K) tile
of the result over a slice of the rows (split-K over rows, added atomically), so a big batch fills the GPU.

Backends (:mod:`.dispatch`): the kernel, or torch: one GEMM over all rows and positions (a Linear) or one
weight-gradient convolution, with the factors folded into G; rows with a zero factor or padding are zeroed
first when there are any, so that they are not read there either.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from . import forms as cm
from ._triton import autotune, is_ieee, jit, tl, triton
from .dispatch import interpreting
from .grouping import Grouping

__all__ = ["clipped_weight_grad", "clipped_weight_grad_ref", "conv_clipped_weight_grad",
           "conv_clipped_weight_grad_ref"]


@autotune(configs=cm.GEMM_CONFIGS,
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
    grp, o, k = cm._weight_tile(tl.program_id(0), P, K, BLOCK_P, BLOCK_K)
    acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    r0 = tl.program_id(1) * ROWS
    for r in range(r0, tl.minimum(r0 + ROWS, R)):
        pad = tl.load(pad_ptr + r)
        scale = tl.load(c_ptr + tl.load(sid_ptr + r)).to(tl.float32)
        scale = tl.where(pad == 0, scale, 0.0)
        t_end = tl.where(scale != 0.0, T, 0)  # zero factor: the row is not read at all
        row = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        row = cm._add_row_grad(row, x_ptr, g_ptr, r, t_end, T, K, P, CG, Wo, H, W, grp, o, k,
                               sxr, sxc, sxh, sxw, sgr, sgc, sgh, sgw, sh, sw, ph, pw, dh, dw, KH, KW, IEEE, BLOCK_T)
        acc += scale * row
    ptrs = out_ptr + (grp * P + o)[:, None].to(tl.int64) * K + k[None, :]
    tl.atomic_add(ptrs, acc, mask=(o < P)[:, None] & (k < K)[None, :])


def _rows_per_program(R: int, tiles_hint: int) -> int:
    """Rows per program: the split over rows that gives ~4 programs per SM (all rows in one program under the
    interpreter, where programs run one after another, each with a fixed Python overhead)."""
    if interpreting() or not torch.cuda.is_available():
        return max(R, 1)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    splits = max(1, min(R, (4 * sms + tiles_hint - 1) // tiles_hint))
    return triton.cdiv(R, splits)


def _launch(x, go, c, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    d = cm.dims(x, go, kernel_size, groups)
    out = torch.zeros(go.shape[1], d.K, dtype=torch.float32, device=x.device)
    weight_shape = (go.shape[1], d.CG, *kernel_size)
    if d.R == 0 or d.T == 0:
        return out.view(weight_shape)
    per_program = _rows_per_program(d.R, groups * triton.cdiv(d.P, 64) * triton.cdiv(d.K, 64))

    def grid(meta):
        return (groups * triton.cdiv(d.P, meta["BLOCK_P"]) * triton.cdiv(d.K, meta["BLOCK_K"]),
                triton.cdiv(d.R, per_program))

    _clipped_weight_grad_kernel[grid](
        x, go, c, rows.row_index(x.device), rows.padding_flags(x.device), out, d.R, per_program, d.T, d.K, d.P, d.CG,
        d.Wo, d.H, d.W, *cm.launch_args(x, go, stride, padding, dilation), KH=kernel_size[0], KW=kernel_size[1],
        IEEE=is_ieee(x.dtype))
    return out.view(weight_shape)


def _impl(x, go, c, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """The op on checked arguments: the backend :mod:`.dispatch` picks, then its code."""
    if dispatch.backend("clipped_weight_grad", x, go, c) == dispatch.TRITON:
        return _launch(x, go, c, rows, kernel_size, stride, padding, dilation, groups)
    return _torch(x, go, c, rows, kernel_size, stride, padding, dilation, groups)


@torch.library.custom_op("privimage::clipped_weight_grad", mutates_args=())
def _clipped_weight_grad_op(x: torch.Tensor, go: torch.Tensor, c: torch.Tensor, sample_index: Optional[torch.Tensor],
                            is_padding: Optional[torch.Tensor], kernel_size: list[int], stride: list[int],
                            padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    return _impl(x, go, c, Grouping.trusted(sample_index, x.shape[0], is_padding, c.shape[0]), tuple(kernel_size),
                 tuple(stride), tuple(padding), tuple(dilation), groups)


def _call(x, go, c, rows: Grouping, geometry):
    if torch.compiler.is_compiling():
        return _clipped_weight_grad_op(x, go, c, rows.sample_index, rows.is_padding, *cm.op_geometry(geometry))
    return _impl(x, go, c, rows, *geometry)


@_clipped_weight_grad_op.register_fake
def _(x, go, c, sample_index, is_padding, kernel_size, stride, padding, dilation, groups):
    return x.new_empty((go.shape[1], x.shape[1] // groups, *kernel_size), dtype=cm.acc_dtype(x))


def _row_factors(c, rows: Grouping, dtype):
    """(R,) each row's factor c_{s(r)}, 0 for padding; and whether any row's is 0 (rows not to be read)."""
    scale = rows.to_rows(c).to(dtype)
    if rows.is_padding is not None:
        scale = torch.where(rows.is_padding, 0, scale)
    return scale, bool((scale == 0).any())


def _torch(x, go, c, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """The torch path: one GEMM (a Linear) or one weight-gradient convolution, the factors folded into G."""
    dtype = cm.gemm_dtype(go)
    R = x.shape[0]
    weight_shape = (go.shape[1], x.shape[1] // groups, *kernel_size)
    if R == 0:
        return torch.zeros(weight_shape, dtype=cm.acc_dtype(x), device=x.device)
    scale, skip = _row_factors(c, rows, dtype)
    x, go = x.to(dtype), go.to(dtype)
    if skip:  # rows with factor 0 are not read (a NaN there stays out of the sum, as in the kernel)
        keep = (scale != 0).view(R, 1, 1, 1)
        x, go = torch.where(keep, x, 0), torch.where(keep, go, 0)
    if cm.is_linear(kernel_size, stride, padding, dilation, groups):
        A, G = cm.as_linear(x), cm.as_linear(go)
        T, p = G.shape[1], G.shape[2]
        scaled = G * scale.view(R, 1, 1)
        return cm.as_acc(scaled.reshape(R * T, p).t() @ A.reshape(R * T, A.shape[-1])).view(weight_shape)
    scaled = go * scale.view(R, 1, 1, 1)
    return cm.as_acc(torch.nn.grad.conv2d_weight(x, weight_shape, scaled, stride=stride, padding=padding,
                                                 dilation=dilation, groups=groups))


def _ref(x, go, c, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """One weight-gradient convolution (or GEMM) in float32 or wider, each row's output gradient scaled by its
    factor, rows with factor 0 not read."""
    dtype = cm.acc_dtype(x)
    R = x.shape[0]
    weight_shape = (go.shape[1], x.shape[1] // groups, *kernel_size)
    if R == 0:
        return torch.zeros(weight_shape, dtype=dtype, device=x.device)
    scale, _ = _row_factors(c, rows, dtype)
    keep = (scale != 0).view(R, 1, 1, 1)
    x = torch.where(keep, x.to(dtype), 0)
    scaled = torch.where(keep, go.to(dtype) * scale.view(R, 1, 1, 1), 0)
    if cm.is_linear(kernel_size, stride, padding, dilation, groups):
        g2 = scaled.transpose(0, 1).reshape(go.shape[1], -1)   # (p, R·T)
        a2 = x.transpose(0, 1).reshape(x.shape[1], -1)          # (d, R·T)
        return (g2 @ a2.t()).view(weight_shape)
    return torch.nn.grad.conv2d_weight(x, weight_shape, scaled, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups)


def _check_c(op, c, rows: Grouping, device) -> None:
    """``c`` must be (S,) floats: one clip factor per sample (per row without sample_index)."""
    if c.shape != (rows.num_samples,) or not c.is_floating_point():
        raise ValueError(f"{op}: expected c to be a float tensor of shape ({rows.num_samples},) (one clip factor per "
                         f"sample), got {c.dtype} {tuple(c.shape)}.")
    if c.device != device:
        raise ValueError(f"{op}: c is on {c.device}, the data on {device}.")


def _samples(c, sample_index, grouping):
    """S for a call with clip factors ``c``: their number when rows are grouped by ``sample_index``, else left to
    the grouping (one per row without one)."""
    return c.shape[0] if sample_index is not None and c.dim() and grouping is None else None


def conv_clipped_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, c: torch.Tensor, kernel_size, *,
                             stride=1, padding=0, dilation=1, groups: int = 1,
                             sample_index: torch.Tensor | None = None, is_padding: torch.Tensor | None = None,
                             grouping: Grouping | None = None) -> torch.Tensor:
    """Σ_s c_s ∇W_s for a Conv2d: (C_out, C_in/groups, kh, kw) float32 (float64 for float64 inputs).

    Args:
        x, grad_out, kernel_size, stride, padding, dilation, groups: as
            :func:`privimage.kernels.conv_per_sample_sq_norms`.
        c: (S,) clip factors, one per sample (per row when ``sample_index`` is None).
        sample_index: (R,) long sample id of each row; None: one sample per row.
        is_padding: (R,) bool; padding rows contribute nothing.
        grouping: instead of ``sample_index`` and ``is_padding``, a checked :class:`~privimage.kernels.Grouping`.
    """
    op = "conv_clipped_weight_grad"
    geometry, rows = cm.conv_call(op, x, grad_out, kernel_size, stride, padding, dilation, groups, sample_index,
                                  is_padding, _samples(c, sample_index, grouping), grouping)
    _check_c(op, c, rows, x.device)
    return _call(x, grad_out, c, rows, geometry)


def clipped_weight_grad(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, *,
                        sample_index: torch.Tensor | None = None, is_padding: torch.Tensor | None = None,
                        grouping: Grouping | None = None) -> torch.Tensor:
    """Σ_r c_{s(r)} G_rᵀA_r (p, d) float32 for a Linear layer, A (R, *, d), G (R, *, p); c (S,) per sample
    (per row without ``sample_index``)."""
    op = "clipped_weight_grad"
    x, go, geometry, rows = cm.linear_call(op, A, G, sample_index, is_padding, _samples(c, sample_index, grouping),
                                           grouping)
    _check_c(op, c, rows, A.device)
    return _call(x, go, c, rows, geometry).view(G.shape[-1], A.shape[-1])


def conv_clipped_weight_grad_ref(x, grad_out, c, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                                 sample_index=None, is_padding=None) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_clipped_weight_grad` (one ``conv2d_weight`` on scaled G)."""
    op = "conv_clipped_weight_grad_ref"
    geometry, rows = cm.conv_call(op, x, grad_out, kernel_size, stride, padding, dilation, groups, sample_index,
                                  is_padding, _samples(c, sample_index, None))
    _check_c(op, c, rows, x.device)
    return _ref(x, grad_out, c, rows, *geometry)


def clipped_weight_grad_ref(A, G, c, *, sample_index=None, is_padding=None) -> torch.Tensor:
    """Plain-torch reference of :func:`clipped_weight_grad` (one GEMM over all rows and positions)."""
    op = "clipped_weight_grad_ref"
    x, go, geometry, rows = cm.linear_call(op, A, G, sample_index, is_padding, _samples(c, sample_index, None))
    _check_c(op, c, rows, A.device)
    return _ref(x, go, c, rows, *geometry).view(G.shape[-1], A.shape[-1])
