"""Ghost per-sample norms: ‖G_sᵀA_s‖²_F = ⟨A_sA_sᵀ, G_sG_sᵀ⟩_F in T×T tiles, no Gram matrix ever stored.

Goodfellow (arXiv 1510.01799) for T=1; Li et al. (arXiv 2110.05679) for sequences; Bu et al. (arXiv
2205.10683) pick it per layer when 2T² < K·P ("mixed ghost norms"): the 8×8 and 4×4 levels of a UNet. A_s
(U, K) stacks the im2col rows of all positions of all rows of sample s (U = rows·T), G_s (U, P) their output
gradients. A program owns one (i, j) tile pair of positions, forms the two (BLOCK_T, BLOCK_T) Gram tiles in
registers over K and P, and adds their inner product to the sample's norm; by symmetry only j ≥ i is
computed (off-diagonal tiles count twice). Conv2d columns are gathered from x (implicit im2col, no unfold).

Backends (:mod:`.dispatch`): the kernel, or torch, which forms each sample's two Gram matrices with batched
GEMMs (a convolution's im2col materialised by ``unfold``), a uniform grouping's rows folded into positions;
ragged groupings are taken one sample at a time (correct, slow: the engine's cost model avoids it).
"""

from __future__ import annotations

import torch

from . import dispatch
from . import forms as cm
from ._triton import autotune, config, is_ieee, jit, tl, triton
from .grouping import Grouping

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


def _launch(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    d, S = cm.dims(x, go, kernel_size, groups), rows.num_samples
    out = torch.zeros(S, dtype=torch.float32, device=x.device)
    if d.R == 0 or S == 0 or d.T == 0:
        return out
    order, offsets = rows.csr(x.device)
    U = d.T * (1 if rows.trivial else int((offsets[1:] - offsets[:-1]).max()))  # one host sync

    def grid(meta):
        return (S, triton.cdiv(U, meta["BLOCK_T"]) ** 2, groups)

    _ghost_sq_norms_kernel[grid](
        x, go, order, offsets, rows.padding_flags(x.device), out, U, d.T, d.K, d.P, d.CG, d.Wo, d.H, d.W,
        *cm.launch_args(x, go, stride, padding, dilation), KH=kernel_size[0], KW=kernel_size[1], IEEE=is_ieee(x.dtype))
    return out


def _impl(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """The op on checked arguments: the backend :mod:`.dispatch` picks, then its code."""
    if dispatch.backend("ghost_sq_norms", x, go) == dispatch.TRITON:
        return _launch(x, go, rows, kernel_size, stride, padding, dilation, groups)
    return _torch(x, go, rows, kernel_size, stride, padding, dilation, groups)


_call = cm.norms_op("ghost_sq_norms", _impl)


def _gram_norms(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """⟨A_bA_bᵀ, G_bG_bᵀ⟩_F for each b of A (B, U, K), G (B, U, P), accumulated in float32 or wider."""
    A, G = cm.as_acc(A), cm.as_acc(G)
    if A.shape[1] == 1:  # one position: ‖a‖²‖g‖², no U×U Gram needed
        return A.square().sum((1, 2)) * G.square().sum((1, 2))
    return (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))


def _per_sample(rows: Grouping, A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """:func:`_gram_norms` per sample of A (R, T, ...), G (R, T, ...): a sample's rows stacked as positions."""
    if rows.trivial:
        return _gram_norms(A.flatten(2), G.flatten(2))
    A, G = rows.drop_padding(A), rows.drop_padding(G)
    if rows.uniform:
        return _gram_norms(rows.fold(A).flatten(2), rows.fold(G).flatten(2))
    out = []
    for s in range(rows.num_samples):  # ragged: one sample at a time
        own = (rows.sample_index == s).nonzero().flatten()
        a, g = A[own].flatten(0, 1).unsqueeze(0), G[own].flatten(0, 1).unsqueeze(0)
        out.append(_gram_norms(a.flatten(2), g.flatten(2)) if own.numel() else a.new_zeros(1, dtype=cm.acc_dtype(a)))
    return torch.cat(out) if out else A.new_zeros(0, dtype=cm.acc_dtype(A))


def _torch(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """The torch path: Gram matrices by batched GEMMs (a convolution's im2col by ``unfold``)."""
    if x.shape[0] == 0:
        return torch.zeros(rows.num_samples, dtype=cm.acc_dtype(x), device=x.device)
    if cm.is_linear(kernel_size, stride, padding, dilation, groups):
        norms = _per_sample(rows, cm.as_linear(x), cm.as_linear(go))
        return rows.drop_padding(norms) if rows.trivial else norms
    dtype = cm.gemm_dtype(go)
    R = x.shape[0]
    cols = cm.unfold_ref(x.to(dtype), kernel_size, stride, padding, dilation, groups)  # (R, groups, T, K)
    T = cols.shape[2]
    grads = go.to(dtype).reshape(R, groups, -1, T).transpose(2, 3)                  # (R, groups, T, P)
    if rows.trivial:  # each (row, group) on its own, then the groups summed
        norms = _gram_norms(cols.reshape(R * groups, T, -1), grads.reshape(R * groups, T, -1))
        return rows.drop_padding(norms.view(R, groups).sum(1))
    return sum(_per_sample(rows, cols[:, j], grads[:, j]) for j in range(groups))


def _ref(x, go, rows: Grouping, kernel_size, stride, padding, dilation, groups):
    """Gram matrices of the materialised im2col, per sample (rows of a sample stacked as positions)."""
    dtype = cm.acc_dtype(x)
    S = rows.num_samples
    out = torch.zeros(S, dtype=dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    R = x.shape[0]
    cols = cm.unfold_ref(x.to(dtype), kernel_size, stride, padding, dilation, groups)  # (R, groups, T, K)
    grads = go.to(dtype).reshape(R, groups, go.shape[1] // groups, -1).transpose(2, 3)  # (R, groups, T, P)
    cols, grads = rows.drop_padding(cols), rows.drop_padding(grads)
    if rows.trivial:
        aat = cols @ cols.transpose(2, 3)
        ggt = grads @ grads.transpose(2, 3)
        return (aat * ggt).sum((1, 2, 3))
    for s in range(S):  # stack each sample's rows as positions
        own = (rows.sample_index == s).nonzero().flatten()
        a = cols[own].transpose(0, 1).flatten(1, 2)  # (groups, rows·T, K)
        g = grads[own].transpose(0, 1).flatten(1, 2)
        out[s] = ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum()
    return out


def conv_ghost_sq_norms(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, *, stride=1, padding=0,
                        dilation=1, groups: int = 1, sample_index: torch.Tensor | None = None,
                        is_padding: torch.Tensor | None = None, num_samples: int | None = None,
                        grouping: Grouping | None = None) -> torch.Tensor:
    """Each sample's ‖∇W‖²_F for a Conv2d by ghost norms; arguments and result as
    :func:`privimage.kernels.conv_per_sample_sq_norms`, cost ~U²·(K+P) per sample instead of U·K·P."""
    geometry, rows = cm.conv_call("conv_ghost_sq_norms", x, grad_out, kernel_size, stride, padding, dilation, groups,
                                  sample_index, is_padding, num_samples, grouping)
    return _call(x, grad_out, rows, geometry)


def ghost_sq_norms(A: torch.Tensor, G: torch.Tensor, *, sample_index: torch.Tensor | None = None,
                   is_padding: torch.Tensor | None = None, num_samples: int | None = None,
                   grouping: Grouping | None = None) -> torch.Tensor:
    """⟨A_sA_sᵀ, G_sG_sᵀ⟩_F per sample for a Linear layer, A (R, *, d), G (R, *, p): equal to
    :func:`privimage.kernels.per_sample_sq_norms` and cheaper when T is small."""
    x, go, geometry, rows = cm.linear_call("ghost_sq_norms", A, G, sample_index, is_padding, num_samples, grouping)
    return _call(x, go, rows, geometry)


def conv_ghost_sq_norms_ref(x, grad_out, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                            sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`conv_ghost_sq_norms` (unfold, then Gram matrices)."""
    geometry, rows = cm.conv_call("conv_ghost_sq_norms_ref", x, grad_out, kernel_size, stride, padding, dilation,
                                  groups, sample_index, is_padding, num_samples)
    return _ref(x, grad_out, rows, *geometry)


def ghost_sq_norms_ref(A, G, *, sample_index=None, is_padding=None, num_samples=None) -> torch.Tensor:
    """Plain-torch reference of :func:`ghost_sq_norms`."""
    x, go, geometry, rows = cm.linear_call("ghost_sq_norms_ref", A, G, sample_index, is_padding, num_samples)
    return _ref(x, go, rows, *geometry)
