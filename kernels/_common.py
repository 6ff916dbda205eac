"""What the GEMM-shaped ops share: argument checks, the rows→samples index, and the implicit-im2col loads.

Every GEMM-shaped op sees a layer in **convolution form**: input ``x`` (R, C_in, H, W) and output gradient
``go`` (R, C_out, Ho, Wo), any strides. A Linear layer on ``A`` (R, *, d) with output gradient ``G`` (R, *, p)
is the 1×1 convolution on the strided views ``A.transpose`` (R, d, T, 1) and (R, p, T, 1): no copy, and one
kernel serves both. Row r's weight gradient (per convolution group) is ``G_rᵀ A_r`` where ``A_r`` (T, K) is
the im2col matrix of ``x_r`` (T = Ho·Wo output positions, K = C_in/groups·kh·kw columns), never formed: each
tile of it is gathered straight from ``x`` by :func:`_load_cols`.

Rows and samples: ``sample_index`` (R,) long gives the sample each row belongs to (noise multiplicity: a
sample's gradient is the SUM of its rows' gradients, DPDM arXiv 2210.09929), ``is_padding`` (R,) bool marks
rows that count for nothing (fixed-shape Poisson batches). Kernels read rows through a CSR index (rows
sorted by sample, ``offsets`` (S+1,)) built here with torch ops only, so building it needs no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import jit, tl


# ---- host side ----------------------------------------------------------------------------------------------

def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(u) for u in v)
    if len(v) != 2:
        raise ValueError(f"Expected {name} to be an int or a pair of ints, got {v}.")
    return v


def check_float(op: str, **tensors: torch.Tensor) -> None:
    """Inputs must be floating point and on one device; fp32, bf16, fp16 and fp64 are accepted."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}.")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"{op}: expected {name} to be floating point, got {t.dtype}.")


def linear_as_conv(op: str, A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, *, d), (R, *, p) → the 1×1-convolution views (R, d, T, 1), (R, p, T, 1), sharing storage."""
    if A.dim() < 2 or G.dim() < 2:
        raise ValueError(f"{op}: expected A (R, *, d) and G (R, *, p), got shapes {tuple(A.shape)} and "
                         f"{tuple(G.shape)}.")
    if A.shape[:-1] != G.shape[:-1]:
        raise ValueError(f"{op}: A {tuple(A.shape)} and G {tuple(G.shape)} must agree on every dim but the last "
                         "(rows and positions).")
    check_float(op, A=A, G=G)
    R, T = A.shape[0], math.prod(A.shape[1:-1])
    A = A.reshape(R, T, A.shape[-1])
    G = G.reshape(R, T, G.shape[-1])
    return A.transpose(1, 2).unsqueeze(-1), G.transpose(1, 2).unsqueeze(-1)


def check_conv(op: str, x: torch.Tensor, go: torch.Tensor, kernel_size, stride, padding, dilation, groups: int):
    """Validate a convolution's (x, go) pair; returns (kernel_size, stride, padding, dilation) as int pairs."""
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    padding, dilation = _pair(padding, "padding"), _pair(dilation, "dilation")
    if x.dim() != 4 or go.dim() != 4:
        raise ValueError(f"{op}: expected x (R, C_in, H, W) and grad_out (R, C_out, Ho, Wo), got shapes "
                         f"{tuple(x.shape)} and {tuple(go.shape)}.")
    check_float(op, x=x, grad_out=go)
    if x.shape[0] != go.shape[0]:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but grad_out has {go.shape[0]}.")
    if groups < 1 or x.shape[1] % groups or go.shape[1] % groups:
        raise ValueError(f"{op}: groups={groups} must divide C_in={x.shape[1]} and C_out={go.shape[1]}.")
    expect = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                   for n, p, d, k, s in zip(x.shape[2:], padding, dilation, kernel_size, stride))
    if tuple(go.shape[2:]) != expect:
        raise ValueError(f"{op}: grad_out spatial size {tuple(go.shape[2:])} does not match the convolution of "
                         f"x {tuple(x.shape[2:])} with kernel_size={kernel_size}, stride={stride}, "
                         f"padding={padding}, dilation={dilation} (expected {expect}).")
    return kernel_size, stride, padding, dilation


def check_rows(op: str, R: int, device, sample_index, is_padding, num_samples) -> int:
    """Validate the row→sample index and padding mask; returns the number of samples S."""
    if is_padding is not None:
        if is_padding.shape != (R,) or is_padding.dtype != torch.bool:
            raise ValueError(f"{op}: expected is_padding to be a bool tensor of shape ({R},), got "
                             f"{is_padding.dtype} {tuple(is_padding.shape)}.")
        if is_padding.device != device:
            raise ValueError(f"{op}: is_padding is on {is_padding.device}, the data on {device}.")
    if sample_index is None:
        if num_samples is not None and num_samples != R:
            raise ValueError(f"{op}: num_samples={num_samples} given without sample_index (one row per sample "
                             f"means num_samples={R}).")
        return R
    if sample_index.shape != (R,) or sample_index.dtype != torch.long:
        raise ValueError(f"{op}: expected sample_index to be a LongTensor of shape ({R},) (the sample id of "
                         f"each row), got {sample_index.dtype} {tuple(sample_index.shape)}.")
    if sample_index.device != device:
        raise ValueError(f"{op}: sample_index is on {sample_index.device}, the data on {device}.")
    if num_samples is None:  # data-dependent: pass num_samples under torch.compile
        num_samples = int(sample_index.max()) + 1 if R else 0
    elif R and not torch.compiler.is_compiling():
        lo, hi = int(sample_index.min()), int(sample_index.max())
        if lo < 0 or hi >= num_samples:
            raise ValueError(f"{op}: sample_index values must lie in [0, num_samples={num_samples}), got "
                             f"[{lo}, {hi}].")
    return int(num_samples)


def sample_csr(sample_index, R: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by sample (``order`` (R,)) and each sample's slice of them (``offsets`` (S+1,)), int64."""
    if sample_index is None:
        idx = torch.arange(R + 1, device=device)
        return idx[:R], idx
    order = torch.argsort(sample_index, stable=True)
    counts = torch.bincount(sample_index, minlength=S)[:S]
    offsets = torch.zeros(S + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def padding_flags(is_padding, R: int, device) -> torch.Tensor:
    """is_padding as int8 (1 = padding) for the kernels; all zero when None."""
    if is_padding is None:
        return torch.zeros(R, dtype=torch.int8, device=device)
    return is_padding.to(torch.int8)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: norms are never accumulated below float32."""
    return torch.promote_types(t.dtype, torch.float32)


def per_row_conv_grads_ref(x, go, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """Per-row conv weight gradients (R, C_out, C_in/groups, kh, kw) in float32 or wider, plain torch.

    The batch is folded into the channel groups (input (1, R·C_in, H, W), output gradient (1, R·C_out, Ho, Wo),
    groups R·groups): the weight gradient of that one grouped convolution is the stack of per-row gradients
    (DESIGN.md, measured facts: about the cost of the plain weight gradient on CPU, no unfold). A 1×1 kernel
    with unit stride (every Linear) is a batched GEMM instead.
    """
    dtype = acc_dtype(x)
    x, go = x.to(dtype), go.to(dtype)
    R, c_in = x.shape[:2]
    c_out = go.shape[1]
    if kernel_size == (1, 1) and stride == (1, 1) and padding == (0, 0) and groups == 1:
        g = torch.bmm(go.flatten(2), x.flatten(2).transpose(1, 2))  # (R, C_out, C_in)
        return g.view(R, c_out, c_in, 1, 1)
    weight_shape = (R * c_out, c_in // groups) + tuple(kernel_size)
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(1, R * c_in, *x.shape[2:]), weight_shape, go.reshape(1, R * c_out, *go.shape[2:]),
        stride=stride, padding=padding, dilation=dilation, groups=R * groups)
    return grads.view(R, c_out, c_in // groups, *kernel_size)


def to_samples_ref(per_row: torch.Tensor, sample_index, is_padding, S: int) -> torch.Tensor:
    """Σ over each sample's non-padding rows of a per-row tensor (R, ...) → (S, ...); padded rows never read."""
    if is_padding is not None:
        per_row = torch.where(is_padding.view(-1, *[1] * (per_row.dim() - 1)), 0, per_row)
    if sample_index is None:
        return per_row
    out = per_row.new_zeros((S,) + tuple(per_row.shape[1:]))
    return out.index_add_(0, sample_index, per_row)


def unfold_ref(x, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """im2col of x as (R, groups, T, C_in/groups·kh·kw), materialised (references only)."""
    R = x.shape[0]
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (R, C_in·k², T)
    T = cols.shape[-1]
    return cols.view(R, groups, -1, T).transpose(2, 3)


# ---- device side --------------------------------------------------------------------------------------------

@jit
def _load_cols(x_ptr, row_off, t, k, t_mask, k_mask, c_base, Wo, H, W, sxc, sxh, sxw,
               sh, sw, ph, pw, dh, dw, KH: tl.constexpr, KW: tl.constexpr):
    """Tile A[t, k] of the implicit im2col matrix, gathered from x (zero outside the image, as padding is):

        A[t, k] = x[row, c_base + k // (KH·KW), oh·sh − ph + i·dh, ow·sw − pw + j·dw],
        t = oh·Wo + ow,  k % (KH·KW) = i·KW + j.

    ``row_off`` (len(t),) is each position's row offset into x (positions of one tile may span rows).
    """
    oh = t // Wo
    ow = t % Wo
    ci = k // (KH * KW)
    ij = k % (KH * KW)
    ih = oh[:, None] * sh - ph + (ij // KW)[None, :] * dh
    iw = ow[:, None] * sw - pw + (ij % KW)[None, :] * dw
    mask = t_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = x_ptr + row_off[:, None] + (c_base + ci)[None, :].to(tl.int64) * sxc + ih * sxh + iw * sxw
    return tl.load(ptrs, mask=mask, other=0.0)


@jit
def _load_grads(g_ptr, row_off, t, o, t_mask, o_mask, o_base, Wo, sgc, sgh, sgw):
    """Tile G[t, o] of the output gradient: go[row, o_base + o, t // Wo, t % Wo]."""
    pos = (t // Wo) * sgh + (t % Wo) * sgw
    ptrs = g_ptr + row_off[:, None] + (o_base + o)[None, :].to(tl.int64) * sgc + pos[:, None]
    return tl.load(ptrs, mask=t_mask[:, None] & o_mask[None, :], other=0.0)
