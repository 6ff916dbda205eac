"""A layer's two forms, what the ops share about them: argument checks, views, dtypes, per-row weight gradients
(materialised: the one home of that code), and the kernels' implicit-im2col loads.

Every GEMM-shaped op sees a layer in **convolution form**: input ``x`` (R, C_in, H, W) and output gradient
``go`` (R, C_out, Ho, Wo), any strides. A Linear layer on ``A`` (R, *, d) with output gradient ``G`` (R, *, p)
is the 1×1 convolution on the strided views ``A.transpose`` (R, d, T, 1) and (R, p, T, 1): no copy, and one
kernel serves both. Row r's weight gradient (per convolution group) is ``G_rᵀ A_r`` where ``A_r`` (T, K) is
the im2col matrix of ``x_r`` (T = Ho·Wo output positions, K = C_in/groups·kh·kw columns), never formed: each
tile of it is gathered straight from ``x`` by :func:`_load_cols`.

Rows and samples (``sample_index``, ``is_padding``): :class:`privimage.kernels.grouping.Grouping`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._triton import config, jit, tl
from .grouping import Grouping


# ---- host side ----------------------------------------------------------------------------------------------

def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    v = tuple(int(u) for u in v)
    if len(v) != 2:
        raise ValueError(f"Expected {name} to be an int or a pair of ints, got {v}.")
    return v


def check_float(op: str, **tensors: torch.Tensor) -> None:
    """Inputs must be floating point and on one device; fp32, bf16, fp16 and fp64 are accepted."""
    device = None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"{op}: expected {name} to be floating point, got {t.dtype}.")
        if device is None:
            device = t.device
        elif t.device != device:
            where = ", ".join(f"{n} on {u.device}" for n, u in tensors.items())
            raise ValueError(f"{op}: all tensors must be on one device, got {where}.")


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


LINEAR = ((1, 1), (1, 1), (0, 0), (1, 1), 1)  # a Linear's geometry as a 1×1 convolution (see is_linear)


def rows_of(op: str, x: torch.Tensor, sample_index, is_padding, num_samples, grouping) -> Grouping:
    """The rows' :class:`Grouping`: ``grouping`` itself (already checked by its maker, e.g. the engine once per
    step; no host sync here) or one made from the three row arguments, checked."""
    if grouping is None:
        return Grouping(sample_index, x.shape[0], is_padding=is_padding, num_samples=num_samples, device=x.device,
                        where=op)
    if sample_index is not None or is_padding is not None or num_samples is not None:
        raise ValueError(f"{op}: pass either grouping or sample_index/is_padding/num_samples, not both.")
    if grouping.num_rows != x.shape[0]:
        raise ValueError(f"{op}: grouping has {grouping.num_rows} rows, the data {x.shape[0]}.")
    return grouping


def conv_call(op: str, x, go, kernel_size, stride, padding, dilation, groups: int, sample_index, is_padding,
              num_samples, grouping=None):
    """A Conv2d op's arguments, checked: ((kernel_size, stride, padding, dilation, groups), rows)."""
    geometry = (*check_conv(op, x, go, kernel_size, stride, padding, dilation, groups), groups)
    return geometry, rows_of(op, x, sample_index, is_padding, num_samples, grouping)


def linear_call(op: str, A, G, sample_index, is_padding, num_samples, grouping=None):
    """A Linear op's arguments, checked and in convolution form: (x, go, geometry, rows)."""
    x, go = linear_as_conv(op, A, G)
    return x, go, LINEAR, rows_of(op, A, sample_index, is_padding, num_samples, grouping)


_NORMS_SCHEMA = ("(Tensor x, Tensor go, Tensor? sample_index, Tensor? is_padding, int num_samples, int[] kernel_size, "
                 "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor")


def norms_op(name: str, impl):
    """Register ``privimage::<name>``, a per-sample norm op of the convolution form over ``impl(x, go, rows,
    kernel_size, stride, padding, dilation, groups) -> (S,)``, and return ``call(x, go, rows, geometry)``: the
    registered op while ``torch.compile`` traces (the graph keeps it opaque: its torch path may sync with the
    host), ``impl`` itself in eager code (the dispatcher's round trip costs more than some ops' work)."""

    def registered(x, go, sample_index, is_padding, num_samples, kernel_size, stride, padding, dilation, groups):
        return impl(x, go, Grouping.trusted(sample_index, x.shape[0], is_padding, num_samples), tuple(kernel_size),
                    tuple(stride), tuple(padding), tuple(dilation), groups)

    op = torch.library.custom_op(f"privimage::{name}", registered, mutates_args=(), schema=_NORMS_SCHEMA)
    op.register_fake(lambda x, go, sample_index, is_padding, num_samples, *geometry:
                     x.new_empty(num_samples, dtype=acc_dtype(x)))

    def call(x, go, rows: Grouping, geometry):
        if torch.compiler.is_compiling():
            return op(x, go, rows.sample_index, rows.is_padding, rows.num_samples, *op_geometry(geometry))
        return impl(x, go, rows, *geometry)

    return call


def op_geometry(geometry) -> list:
    """The geometry as a custom op takes it: four lists of two ints, then groups."""
    return [*map(list, geometry[:4]), geometry[4]]


class Dims(NamedTuple):
    """A convolution's sizes as the kernels see them: R rows, T = Ho·Wo positions, K = C_in/groups·kh·kw
    columns and P = C_out/groups outputs per group, CG = C_in/groups, and H, W, Wo for the index maths."""

    R: int
    T: int
    K: int
    P: int
    CG: int
    H: int
    W: int
    Wo: int


def dims(x: torch.Tensor, go: torch.Tensor, kernel_size, groups: int) -> Dims:
    R, c_in, H, W = x.shape
    c_out, Ho, Wo = go.shape[1:]
    return Dims(R, Ho * Wo, c_in // groups * kernel_size[0] * kernel_size[1], c_out // groups, c_in // groups, H, W,
                Wo)


def launch_args(x, go, stride, padding, dilation) -> tuple:
    """The kernels' trailing launch arguments: the strides of x and go, then the convolution's geometry."""
    return (*x.stride(), *go.stride(), *stride, *padding, *dilation)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: norms and sums are never accumulated below float32."""
    return torch.promote_types(t.dtype, torch.float32)


def as_acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`acc_dtype` (float32 or wider), e.g. before squaring it into a norm."""
    return t.to(acc_dtype(t))


def gemm_dtype(G: torch.Tensor) -> torch.dtype:
    """The dtype a per-sample GEMM runs in: the output gradient's (what autocast computed the layer in), but
    float32 for half precisions on CPU (oneDNN lacks some grouped bf16 convolutions; a CPU gains nothing)."""
    if not G.is_cuda and G.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return G.dtype


def sq_norms_of(per_row: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a materialised tensor (R, ...), accumulated in float32 or wider."""
    return as_acc(per_row).flatten(1).square().sum(1)


def is_linear(kernel_size, stride, padding, dilation, groups) -> bool:
    """A convolution that is a Linear on its positions (1×1, unit stride, no padding, one group)."""
    return (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups) == LINEAR


def as_linear(x: torch.Tensor) -> torch.Tensor:
    """(R, C, Ho, Wo) → (R, T, C), T = Ho·Wo: a view, and for a tensor from :func:`linear_as_conv` the
    original (R, T, d) strides again."""
    return x.flatten(2).transpose(1, 2)


# ---- per-row weight gradients, materialised (the one home of this code) ---------------------------------

def linear_per_row_grads(A: torch.Tensor, G: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each row's Linear weight gradient G_rᵀA_r, (R, p, d), for A (R, T, d), G (R, T, p): one batched GEMM
    in ``dtype`` (default :func:`gemm_dtype`)."""
    dtype = dtype or gemm_dtype(G)
    return torch.bmm(G.to(dtype).transpose(1, 2), A.to(dtype))


_CONV_CHUNK, _SAMPLE_CHUNK = 64, 32


def conv_per_row_grads(x: torch.Tensor, go: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
                       dtype: torch.dtype | None = None, blocks: int = 1) -> torch.Tensor:
    """Each row's conv weight gradient, (R, C_out, C_in/groups, kh, kw), from ONE grouped-convolution backward.

    The batch is folded into the channel groups: input (1, R·C_in, H, W), output gradient (1, R·C_out, Ho, Wo),
    groups R·groups. Row r's channels form their own groups, so the weight gradient of that single grouped
    convolution is exactly the stack of per-row weight gradients, at about the cost of the plain weight
    gradient and without a materialised unfold (bench/results/materialise.md). In ``dtype`` (default
    :func:`gemm_dtype`).

    ``blocks`` = k > 1: the rows are k blocks of S = R/k rows, row j·S + s being sample s's j-th row
    (:meth:`Grouping.blocks` puts a uniform grouping's rows so); returns each SAMPLE's weight gradient, the sum
    of its k rows', (S, C_out, C_in/groups, kh, kw): the same grouped convolution with the k blocks as its
    batch (input (k, S·C_in, H, W)), whose weight gradient sums over the batch. Same multiply-adds, k times
    fewer (and larger) per-group GEMMs and a k times smaller result.

    A 1×1 convolution without padding is a Linear over its positions: each sample's gradient is then one
    batched GEMM, Σ_j G_{j,s} A_{j,s}ᵀ over (C_out/groups × positions)·(positions × C_in/groups), A taken at
    the stride's positions.

    Traps (CPU): oneDNN's grouped weight gradient slows down several-fold past 64 input channels per group,
    so wide layers go in chunks of 64 input channels; with hundreds of groups it slows down again (a third
    at 256 samples of 160 channels, 16×16), so samples go in chunks of 32; and a grouped 1×1 weight gradient
    leaves oneDNN for a loop over the groups (a copy of each group's input), hence the GEMM above.
    """
    dtype = dtype or gemm_dtype(go)
    x, go = x.to(dtype), go.to(dtype)
    R = x.shape[0]
    if blocks < 1 or R % blocks:
        raise ValueError(f"conv_per_row_grads: blocks={blocks} must divide the {R} rows.")
    S = R // blocks
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    padding = _pair(padding, "padding")
    xb, gb = x.reshape(blocks, S, *x.shape[1:]), go.reshape(blocks, S, *go.shape[1:])
    if kernel_size == (1, 1) and padding == (0, 0):
        return _pointwise_grads(xb, gb, stride, groups)
    if S > _SAMPLE_CHUNK and not x.is_cuda:
        return torch.cat([_grouped_grads(xb[:, i:i + _SAMPLE_CHUNK], gb[:, i:i + _SAMPLE_CHUNK], kernel_size, stride,
                                         padding, dilation, groups)
                          for i in range(0, S, _SAMPLE_CHUNK)])
    return _grouped_grads(xb, gb, kernel_size, stride, padding, dilation, groups)


def _grouped_grads(xb, gb, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """:func:`conv_per_row_grads` on rows as (k, S, C, H, W) blocks: one grouped convolution, (S, ...)."""
    k, S, c_in = xb.shape[:3]
    c_out = gb.shape[2]
    if groups == 1 and c_in > _CONV_CHUNK and not xb.is_cuda:
        return torch.cat([_grouped_grads(xb[:, :, i:i + _CONV_CHUNK], gb, kernel_size, stride, padding, dilation, 1)
                          for i in range(0, c_in, _CONV_CHUNK)], 2)
    grads = torch.nn.grad.conv2d_weight(
        xb.reshape(k, S * c_in, *xb.shape[3:]), (S * c_out, c_in // groups) + kernel_size,
        gb.reshape(k, S * c_out, *gb.shape[3:]), stride=stride, padding=padding, dilation=dilation, groups=S * groups)
    return grads.view(S, c_out, c_in // groups, *kernel_size)


def _pointwise_grads(xb, gb, stride, groups: int) -> torch.Tensor:
    """A 1×1 convolution's per-sample gradients, rows as (k, S, C, H, W) blocks: batched GEMMs, (S, ...)."""
    k, S, c_in = xb.shape[:3]
    c_out, Ho, Wo = gb.shape[2:]
    xb = xb[..., :(Ho - 1) * stride[0] + 1:stride[0], :(Wo - 1) * stride[1] + 1:stride[1]]  # the positions read
    A = xb.reshape(k, S * groups, c_in // groups, Ho * Wo)
    G = gb.reshape(k, S * groups, c_out // groups, Ho * Wo)
    grads = torch.bmm(G[0], A[0].transpose(1, 2))
    for j in range(1, k):
        grads.baddbmm_(G[j], A[j].transpose(1, 2))
    return grads.view(S, c_out, c_in // groups, 1, 1)


def unfold_ref(x, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """im2col of x as (R, groups, T, C_in/groups·kh·kw), materialised (torch paths and references)."""
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


# Tile sizes of the two weight-gradient-shaped kernels (per-sample norms, clipped sums). The first config has
# the smallest tiles, so the tests' small shapes under the interpreter span several tiles.
GEMM_CONFIGS = [config(BLOCK_T=16, BLOCK_P=16, BLOCK_K=16),
                config(BLOCK_T=32, BLOCK_P=64, BLOCK_K=64),
                config(BLOCK_T=64, BLOCK_P=64, BLOCK_K=64),
                config(BLOCK_T=32, BLOCK_P=128, BLOCK_K=64, num_warps=8),
                config(BLOCK_T=32, BLOCK_P=64, BLOCK_K=128, num_warps=8)]


@jit
def _weight_tile(tile, P, K, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile number ``tile`` of a weight gradient (groups·P, K): its group, output rows o and columns k."""
    n_p = tl.cdiv(P, BLOCK_P)
    n_k = tl.cdiv(K, BLOCK_K)
    grp = tile // (n_p * n_k)
    o = ((tile // n_k) % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = (tile % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    return grp, o, k


@jit
def _add_row_grad(acc, x_ptr, g_ptr, r, t_end, T, K, P, CG, Wo, H, W, grp, o, k,
                  sxr, sxc, sxh, sxw, sgr, sgc, sgh, sgw, sh, sw, ph, pw, dh, dw,
                  KH: tl.constexpr, KW: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr):
    """``acc`` + the (o, k) tile of row r's weight gradient G_rᵀA_r (group grp) over its positions t < t_end
    (``t_end = 0``: the row is not read at all). IEEE: fp32 tiles and IEEE fp32 dots (:func:`._triton.is_ieee`)."""
    o_mask = o < P
    k_mask = k < K
    tt = tl.arange(0, BLOCK_T)
    zero = tl.zeros([BLOCK_T], dtype=tl.int64)
    x_off = zero + r * sxr
    g_off = zero + r * sgr
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        t_mask = t < t_end
        a = _load_cols(x_ptr, x_off, t, k, t_mask, k_mask, grp * CG, Wo, H, W, sxc, sxh, sxw,
                       sh, sw, ph, pw, dh, dw, KH, KW)
        g = _load_grads(g_ptr, g_off, t, o, t_mask, o_mask, grp * P, Wo, sgc, sgh, sgw)
        if IEEE:
            acc = tl.dot(tl.trans(g).to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g), a, acc)
    return acc
