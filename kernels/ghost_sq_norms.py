"""Ghost per-sample norms: ‖G_sᵀA_s‖²_F = ⟨A_sA_sᵀ, G_sG_sᵀ⟩_F in T×T tiles, no Gram matrix ever stored.

Goodfellow (arXiv 1510.01799) for T=1; Li et al. (arXiv 2110.05679) for sequences; Bu et al. (arXiv
2205.10683) pick it per layer when 2T² < K·P ("mixed ghost norms"): the 8×8 and 4×4 levels of a UNet. A_s
(U, K) stacks the im2col rows of all positions of all rows of sample s (U = rows·T), G_s (U, P) their output
gradients. A program owns one (i, j) tile pair of positions, forms the two (BLOCK_T, BLOCK_T) Gram tiles in
registers over K and P, and adds their inner product to the sample's norm; by symmetry only j ≥ i is
computed (off-diagonal tiles count twice). Conv2d columns are gathered from x (implicit im2col, no unfold).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common as cm
from ._triton import autotune, config, is_ieee, jit, tl, triton, use_triton

__all__ = ["conv_ghost_sq_norms", "conv_ghost_sq_norms_ref", "ghost_sq_norms", "ghost_sq_norms_ref"]


@jit
def _gram_tile(x_ptr, off_i, off_j, t_i, t_j, m_i, m_j, C, c_base, Wo, H, W, sxc, sxh, sxw,
               sh, sw, ph, pw, dh, dw, KH: tl.constexpr, KW: tl.constexpr, IS_COLS: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_T, BLOCK_T) tile of X Xᵀ, X the im2col matrix of x (IS_COLS) or the output gradient rows."""
    gram = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        if IS_COLS:
            xi = cm._load_cols(x_ptr, off_i, t_i, c, m_i, c_mask, c_base, Wo, H, W, sxc, sxh, sxw,
                               sh, sw, ph, pw, dh, dw, KH, KW)
            xj = cm._load_cols(x_ptr, off_j, t_j, c, m_j, c_mask, c_base, Wo, H, W, sxc, sxh, sxw,
                               sh, sw, ph, pw, dh, dw, KH, KW)
        else:
            xi = cm._load_grads(x_ptr, off_i, t_i, c, m_i, c_mask, c_base, Wo, sxc, sxh, sxw)
            xj = cm._load_grads(x_ptr, off_j, t_j, c, m_j, c_mask, c_base, Wo, sxc, sxh, sxw)
        if IEEE:
            gram = tl.dot(xi.to(tl.float32), tl.trans(xj).to(tl.float32), gram, input_precision="ieee")
        else:
            gram = tl.dot(xi, tl.trans(xj), gram)
    return gram


@jit
def _positions(order_ptr, pad_ptr, start, n_pos, u, T, sxr, sgr):
    """Rows, row offsets into x and go, in-row positions and validity of stacked sample positions u."""
    valid = u < n_pos
    row = tl.load(order_ptr + start + u // T, mask=valid, other=0)
    live = valid & (tl.load(pad_ptr + row, mask=valid, other=1) == 0)
    return row * sxr, row * sgr, u % T, live


@autotune(configs=[config(BLOCK_T=16, BLOCK_K=16, BLOCK_P=16),
                   config(BLOCK_T=64, BLOCK_K=32, BLOCK_P=32),
                   config(BLOCK_T=64, BLOCK_K=64, BLOCK_P=64),
                   config(BLOCK_T=128, BLOCK_K=32, BLOCK_P=32, num_warps=8)],
          key=["U", "K", "P"], reset_to_zero=["out_ptr"])
@jit
def _ghost_sq_norms_kernel(
        x_ptr, g_ptr, order_ptr, offsets_ptr, pad_ptr, out_ptr,
        U, T, K, P, CG, Wo, H, W,                       # U: the most positions any sample has (rows·T)
        sxr, sxc, sxh, sxw, sgr, sgc, sgh, sgw,
        sh, sw, ph, pw, dh, dw,
        KH: tl.constexpr, KW: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[s] += w · Σ (A_iA_jᵀ ∘ G_iG_jᵀ) for position tiles i ≤ j of sample s, w = 2 if i < j else 1.

    Grid: (samples, ⌈U/BLOCK_T⌉², groups). Position u of a sample is position u % T of its (u // T)-th row.
    """
    s = tl.program_id(0)
    n_u = tl.cdiv(U, BLOCK_T)
    i = tl.program_id(1) // n_u
    j = tl.program_id(1) % n_u
    grp = tl.program_id(2)
    start = tl.load(offsets_ptr + s)
    n_pos = (tl.load(offsets_ptr + s + 1) - start) * T
    if (j >= i) & (j * BLOCK_T < n_pos):
        ar = tl.arange(0, BLOCK_T)
        xi, gi, ti, mi = _positions(order_ptr, pad_ptr, start, n_pos, i * BLOCK_T + ar, T, sxr, sgr)
        xj, gj, tj, mj = _positions(order_ptr, pad_ptr, start, n_pos, j * BLOCK_T + ar, T, sxr, sgr)
        aat = _gram_tile(x_ptr, xi, xj, ti, tj, mi, mj, K, grp * CG, Wo, H, W, sxc, sxh, sxw,
                         sh, sw, ph, pw, dh, dw, KH, KW, True, IEEE, BLOCK_T, BLOCK_K)
        ggt = _gram_tile(g_ptr, gi, gj, ti, tj, mi, mj, P, grp * P, Wo, H, W, sgc, sgh, sgw,
                         sh, sw, ph, pw, dh, dw, KH, KW, False, IEEE, BLOCK_T, BLOCK_P)
        weight = tl.where(j > i, 2.0, 1.0)
        tl.atomic_add(out_ptr + s, weight * tl.sum(aat * ggt))


def _launch(x, go, sample_index, is_padding, S, kernel_size, stride, padding, dilation, groups):
    R, c_in, H, W = x.shape
    c_out, Ho, Wo = go.shape[1:]
    K, P, T = c_in // groups * kernel_size[0] * kernel_size[1], c_out // groups, Ho * Wo
    out = torch.zeros(S, dtype=torch.float32, device=x.device)
    if R == 0 or S == 0 or T == 0:
        return out
    order, offsets = cm.sample_csr(sample_index, R, S, x.device)
    pad = cm.padding_flags(is_padding, R, x.device)
    rows = 1 if sample_index is None else int((offsets[1:] - offsets[:-1]).max())  # one host sync
    U = rows * T

    def grid(meta):
        return (S, triton.cdiv(U, meta["BLOCK_T"]) ** 2, groups)

    _ghost_sq_norms_kernel[grid](
        x, go, order, offsets, pad, out, U, T, K, P, c_in // groups, Wo, H, W,
        *x.stride(), *go.stride(), *stride, *padding, *dilation,
        KH=kernel_size[0], KW=kernel_size[1], IEEE=is_ieee(x.dtype))
    return out


@torch.library.custom_op("privimage::ghost_sq_norms", mutates_args=())
def _ghost_sq_norms_op(x: torch.Tensor, go: torch.Tensor, sample_index: Optional[torch.Tensor],
                       is_padding: Optional[torch.Tensor], num_samples: int, kernel_size: list[int],
                       stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups)
    if x.dtype != torch.float64 and use_triton(x, go):
        return _launch(x, go, sample_index, is_padding, num_samples, *geometry)
    return _conv_ref(x, go, sample_index, is_padding, num_samples, *geometry)


@_ghost_sq_norms_op.register_fake
def _(x, go, sample_index, is_padding, num_samples, kernel_size, stride, padding, dilation, groups):
    return x.new_empty(num_samples, dtype=cm.acc_dtype(x))


def _conv_ref(x, go, sample_index, is_padding, S, kernel_size, stride, padding, dilation, groups):
    """Gram matrices of the materialised im2col, per sample (rows of a sample stacked as positions)."""
    dtype = cm.acc_dtype(x)
    out = torch.zeros(S, dtype=dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    R = x.shape[0]
    cols = cm.unfold_ref(x.to(dtype), kernel_size, stride, padding, dilation, groups)  # (R, groups, T, K)
    grads = go.to(dtype).reshape(R, groups, go.shape[1] // groups, -1).transpose(2, 3)  # (R, groups, T, P)
    if is_padding is not None:
        keep = ~is_padding.view(R, 1, 1, 1)
        cols, grads = torch.where(keep, cols, 0), torch.where(keep, grads, 0)
    if sample_index is None:
        aat = cols @ cols.transpose(2, 3)
        ggt = grads @ grads.transpose(2, 3)
        return (aat * ggt).sum((1, 2, 3))
    for s in range(S):  # ragged samples: stack each sample's rows as positions (reference only)
        rows = (sample_index == s).nonzero().flatten()
        a = cols[rows].transpose(0, 1).flatten(1, 2)  # (groups, rows·T, K)
        g = grads[rows].transpose(0, 1).flatten(1, 2)
        out[s] = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum()
    return out


def conv_ghost_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, *, stride=1, padding=0,
                        dilation=1, groups: int = 1, sample_index: torch.Tensor | None = None,
                        is_padding: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
    """Each sample's ‖∇W‖²_F for a Conv2d by ghost norms; arguments and result as
    :func:`privimage.kernels.conv_per_sample_sq_norms`, cost ~U²·(K+P) per sample instead of U·K·P."""
    op = "conv_ghost_sq_norms"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, num_samples)
    return _ghost_sq_norms_op(x, grad_out, sample_index, is_padding, S, *map(list, geometry), groups)


def ghost_sq_norms(A: torch.Tensor, G: torch.Tensor, *, sample_index: torch.Tensor | None = None,
                   is_padding: torch.Tensor | None = None, num_samples: int | None = None) -> torch.Tensor:
    """⟨A_sA_sᵀ, G_sG_sᵀ⟩_F per sample for a Linear layer, A (R, *, d), G (R, *, p): equal to
    :func:`privimage.kernels.per_sample_sq_norms` and cheaper when T is small. Matches
    ``privimage.engine.ops.ghost_sq_norms``."""
    x, go = cm.linear_as_conv("ghost_sq_norms", A, G)
    S = cm.check_rows("ghost_sq_norms", A.shape[0], A.device, sample_index, is_padding, num_samples)
    return _ghost_sq_norms_op(x, go, sample_index, is_padding, S, [1, 1], [1, 1], [0, 0], [1, 1], 1)


def conv_ghost_sq_norms_ref(x, grad_out, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                            sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_ghost_sq_norms` (unfold, then Gram matrices)."""
    op = "conv_ghost_sq_norms_ref"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, num_samples)
    return _conv_ref(x, grad_out, sample_index, is_padding, S, *geometry, groups)


def ghost_sq_norms_ref(A, G, *, sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`ghost_sq_norms`."""
    x, go = cm.linear_as_conv("ghost_sq_norms_ref", A, G)
    S = cm.check_rows("ghost_sq_norms_ref", A.shape[0], A.device, sample_index, is_padding, num_samples)
    return _conv_ref(x, go, sample_index, is_padding, S, (1, 1), (1, 1), (0, 0), (1, 1), 1)
