"""Per-layer norm and clipped-sum maths: the one switch between ``privimage.kernels`` and plain torch.

Every per-sample computation of the engine's layer rules goes through the functions here, so a fused kernel
can replace the torch code for all layers in one place. Shapes use the "linear form" of a layer: ``A``
(R, T, d) are a row's inputs at its T positions (tokens, or im2col columns of a convolution), ``G`` (R, T, p)
the gradients of the loss with respect to the layer's outputs there, so the row's weight gradient is
``G_rᵀ A_r`` (p, d).

Dispatch (for the kernels engineer): each function below first asks :func:`_kernel_op` for the op of the
same name in ``privimage.kernels``. The op is used when the kernels package exports it AND every tensor is
on CUDA (or ``TRITON_INTERPRET=1`` is set, which runs Triton on CPU for tests); otherwise the torch code
here runs. On CPU the optional native C++ build (:mod:`privimage.kernels.native`) is opt-in, with
``PRIVIMAGE_NATIVE=1``, and then used only for ``group_norm_grads``, the one op where it beat the torch code
here inside a DP step (see :func:`_kernel_op`). Kernel ops must take the same arguments and return the same
result as the torch function they replace (which is also a reference for them):

* ``per_sample_sq_norms(A, G) -> (R,) float32``: ‖G_rᵀA_r‖²_F without materialising G_rᵀA_r.
* ``ghost_sq_norms(A, G) -> (R,) float32``: the same value as ⟨A_rA_rᵀ, G_rG_rᵀ⟩_F (Goodfellow 2015,
  arXiv 1510.01799; Li et al. arXiv 2110.05679), for T small against d·p.
* ``clipped_weight_grad(A, G, c) -> (p, d) float32``: Σ_r c_r G_rᵀA_r, the book-keeping clipped sum
  (Bu et al. arXiv 2210.00038).
* Conv2d forms, with x (R, C_in, H, W), grad_out (R, C_out, Ho, Wo) and the convolution's geometry
  (``kernel_size, *, stride, padding, dilation, groups``; zero padding, other padding modes are applied to x
  first): ``conv_per_sample_sq_norms(x, grad_out, kernel_size, ...) -> (R,)``,
  ``conv_ghost_sq_norms(x, grad_out, kernel_size, ...) -> (R,)`` and
  ``conv_clipped_weight_grad(x, grad_out, c, kernel_size, ...) -> (C_out, C_in/groups, kh, kw)``.
* ``group_norm_grads(x, grad_out, num_groups, *, eps) -> ((R, C), (R, C))``: each row's GroupNorm affine
  gradients (∇γ, ∇β), with x the layer's input (x̂ formed on the fly, not stored).

The engine handles rows→samples (``groups``) and padding itself (clip factor 0), so it calls the kernels
without their optional ``sample_index`` / ``is_padding`` arguments.

Norms are accumulated in float32 whatever the input precision (bf16 autocast on GPU): the clip factor is a
privacy-critical quantity and bf16's 8-bit mantissa would make it visibly wrong.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

__all__ = [
    "clipped_weight_grad",
    "conv_clipped_weight_grad",
    "conv_ghost_sq_norms",
    "conv_per_sample_grads",
    "conv_per_sample_sq_norms",
    "ghost_sq_norms",
    "group_norm_grads",
    "per_sample_sq_norms",
    "sq_norms_of",
]


@functools.lru_cache(maxsize=1)
def _kernels_module():
    try:
        from privimage import kernels
    except ImportError:  # the kernels package is optional for the engine (it has a torch path for all)
        return None
    return kernels


def _kernel_op(name: str, *tensors: torch.Tensor, native: bool = False):
    """The ``privimage.kernels`` op called ``name`` if it exists and applies to ``tensors``, else None.

    ``native``: CPU tensors go to the op too when ``PRIVIMAGE_NATIVE=1`` and the native build is loaded (the
    kernels op then runs the C++: a registered custom op, so a compiled step keeps it in its graph). Opt-in,
    because end to end it did not measurably help: in bench/dp_step.py's bk-mixed step (stand-in UNet, batch
    64, one thread of a shared 2-core CPU) it cut GroupNorm's share from ~80-100 to ~60 ms of a ~4 s step, below
    the run-to-run noise (bench/results/dp_step_native.json). The native per-sample conv norms were no faster
    than :func:`conv_per_sample_grads` in the same step (per 64→64 8×8 layer 7.0 ms torch, 8.2 ms native;
    128→64: 16.5 vs 16.2 ms), so the engine does not use them.
    """
    kernels = _kernels_module()
    op = getattr(kernels, name, None) if kernels is not None else None
    if op is None:
        return None
    if all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1":
        return op
    if native and os.environ.get("PRIVIMAGE_NATIVE") == "1" and kernels.native.enabled(*tensors):
        return op
    return None


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype fit to accumulate squared norms: float32 or wider (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _common(A: torch.Tensor, G: torch.Tensor):
    """A and G in one dtype for a GEMM: the output's (what autocast computed the layer in), except that on CPU
    half precisions go to float32 (oneDNN lacks some grouped bf16 convolutions, and CPU gains nothing)."""
    dtype = G.dtype
    if not G.is_cuda and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    return A.to(dtype), G.to(dtype)


def sq_norms_of(per_sample: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a materialised per-sample tensor (R, ...), in float32 or wider."""
    return _acc(per_sample).flatten(1).square().sum(1)


def per_sample_sq_norms(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """‖G_rᵀ A_r‖²_F per row; A (R, T, d), G (R, T, p). Cost R·T·d·p, memory R·d·p in torch."""
    op = _kernel_op("per_sample_sq_norms", A, G)
    if op is not None:
        return op(A, G)
    A, G = _common(A, G)
    return sq_norms_of(torch.bmm(G.transpose(1, 2), A))


def ghost_sq_norms(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """‖G_rᵀ A_r‖²_F = ⟨A_rA_rᵀ, G_rG_rᵀ⟩_F per row without the (p, d) product. Cost R·T²·(d+p)."""
    op = _kernel_op("ghost_sq_norms", A, G)
    if op is not None:
        return op(A, G)
    A, G = _acc(A), _acc(G)
    if A.shape[1] == 1:  # one position: ‖a‖²‖g‖², no T×T Gram needed
        return A.square().sum((1, 2)) * G.square().sum((1, 2))
    aat = torch.bmm(A, A.transpose(1, 2))
    ggt = torch.bmm(G, G.transpose(1, 2))
    return (aat * ggt).sum((1, 2))


def clipped_weight_grad(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_r c_r G_rᵀ A_r (p, d): one GEMM over all R·T positions with the clip factors folded into G."""
    op = _kernel_op("clipped_weight_grad", A, G, c)
    if op is not None:
        return op(A, G, c)
    A, G = _common(A, G)
    R, T, p = G.shape
    scaled = G * c.to(G.dtype).view(R, 1, 1)
    return _acc(scaled.reshape(R * T, p).t() @ A.reshape(R * T, A.shape[-1]))


# ---- Conv2d: per-sample weight gradients without a materialised unfold -------------------------------------

_CONV_CHUNK = 64

def conv_per_sample_grads(A: torch.Tensor, G: torch.Tensor, weight_shape, *, stride, padding, dilation,
                          groups: int) -> torch.Tensor:
    """Per-row conv weight gradients (R, C_out, C_in/groups, kh, kw) from ONE grouped-convolution backward.

    The batch is folded into the channel groups: input (1, R·C_in, H, W), output gradient (1, R·C_out, Ho, Wo),
    groups R·groups. Row r's channels form their own groups, so the weight gradient of that single grouped
    convolution is exactly the stack of per-row weight gradients. On a 2-core CPU this costs about what the
    plain weight gradient costs (29 ms vs 27 ms, 64→64 channels at 32×32, batch 64), where unfold + bmm
    costs 107 ms (DESIGN.md, measured facts).
    """
    A, G = _common(A, G)
    R, c_in = A.shape[:2]
    c_out = G.shape[1]
    if groups == 1 and c_in > _CONV_CHUNK and not A.is_cuda:
        # oneDNN's grouped weight gradient slows down 2-6× past 64 input channels per group (measured, 2-core
        # CPU, batch 64: 128→64 at 8×8: 36 ms whole, 17 ms in two chunks; plain weight grad 6 ms).
        return torch.cat([conv_per_sample_grads(A[:, i:i + _CONV_CHUNK], G, (c_out, min(_CONV_CHUNK, c_in - i),
                                                                           *weight_shape[2:]),
                                                stride=stride, padding=padding, dilation=dilation, groups=1)
                          for i in range(0, c_in, _CONV_CHUNK)], 2)
    folded_shape = (R * c_out,) + tuple(weight_shape[1:])
    grads = torch.nn.grad.conv2d_weight(
        A.reshape(1, R * c_in, *A.shape[2:]), folded_shape, G.reshape(1, R * c_out, *G.shape[2:]),
        stride=stride, padding=padding, dilation=dilation, groups=R * groups)
    return grads.view(R, *weight_shape)


def conv_per_sample_sq_norms(A: torch.Tensor, G: torch.Tensor, weight_shape, *, stride, padding, dilation,
                             groups: int) -> torch.Tensor:
    """Per-row ‖∇W_r‖² of a convolution (R,); the kernel never writes the per-row gradients to memory."""
    op = _kernel_op("conv_per_sample_sq_norms", A, G)
    if op is not None:
        return op(A, G, tuple(weight_shape[2:]), stride=stride, padding=padding, dilation=dilation, groups=groups)
    return sq_norms_of(conv_per_sample_grads(A, G, weight_shape, stride=stride, padding=padding,
                                             dilation=dilation, groups=groups))


def conv_clipped_weight_grad(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, weight_shape, *, stride,
                             padding, dilation, groups: int) -> torch.Tensor:
    """Σ_r c_r ∇W_r for a convolution: the plain weight-gradient convolution with c folded into G."""
    op = _kernel_op("conv_clipped_weight_grad", A, G, c)
    if op is not None:
        return op(A, G, c, tuple(weight_shape[2:]), stride=stride, padding=padding, dilation=dilation,
                  groups=groups)
    A, G = _common(A, G)
    scaled = G * c.to(G.dtype).view(-1, 1, 1, 1)
    return _acc(torch.nn.grad.conv2d_weight(A, weight_shape, scaled, stride=stride, padding=padding,
                                            dilation=dilation, groups=groups))


def conv_ghost_sq_norms(A: torch.Tensor, G: torch.Tensor, kernel_size, *, stride, padding, dilation,
                        groups: int) -> torch.Tensor:
    """Per-row ‖∇W_r‖² of a convolution by ghost norms on the im2col form (one (T, T) Gram per group).

    Worth it only where T = Ho·Wo is small against C_in·k²·C_out (the 8×8 and 4×4 levels of a UNet): the
    unfold it materialises is R·T·C_in·k² elements (the kernel's implicit im2col does not).
    """
    op = _kernel_op("conv_ghost_sq_norms", A, G)
    if op is not None:
        return op(A, G, tuple(kernel_size), stride=stride, padding=padding, dilation=dilation, groups=groups)
    A, G = _common(A, G)
    R = A.shape[0]
    cols = F.unfold(A, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (R, C_in·k², T)
    T = cols.shape[-1]
    cols = cols.view(R, groups, -1, T).transpose(2, 3).reshape(R * groups, T, -1)
    go = G.reshape(R, groups, -1, T).transpose(2, 3).reshape(R * groups, T, -1)
    return ghost_sq_norms(cols, go).view(R, groups).sum(1)


# ---- GroupNorm affine parameters ----------------------------------------------------------------------------

def group_norm_grads(x: torch.Tensor, G: torch.Tensor, num_groups: int, *, eps: float):
    """Each row's GroupNorm affine gradients (∇γ_r, ∇β_r), each (R, C): Σ_positions G_r ∘ x̂_r and Σ G_r.

    x (R, C, *) is the layer's input; torch forms x̂ (a full copy of the activations) and then reduces, the
    kernels (and the opt-in native CPU build, 1.5-3× faster at the UNet's shapes) reduce while normalising.
    """
    op = _kernel_op("group_norm_grads", x, G, native=True)
    if op is not None:
        return op(x, G, num_groups, eps=eps)
    prod = G * F.group_norm(x, num_groups, eps=eps).to(G.dtype)
    if G.dim() == 2:  # (R, C): one position, nothing to reduce
        return prod, G
    dims = tuple(range(2, G.dim()))
    return prod.sum(dims), G.sum(dims)
