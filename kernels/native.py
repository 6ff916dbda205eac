"""The optional native CPU build (``CMakeLists.txt``, ``csrc/``): loaded when built, skipped cleanly when not.

Build it with ``csrc/build.sh`` (CMake against the installed torch); the library is looked for at
``$PRIVIMAGE_NATIVE_LIB`` or ``<repository>/build/native/libprivimage_native.so``. Only ops whose benchmark
beats the torch reference on CPU are built (bench/results/kernels-cpu.csv):

* :func:`conv_per_sample_sq_norms` / :func:`per_sample_sq_norms`: each thread takes whole samples, forms one
  row's im2col block in a thread-local buffer and accumulates G_rᵀA_r in a (P, K) buffer; no per-sample
  gradient tensor of the batch is written.
* :func:`group_norm_sq_norms`, :func:`group_norm_clipped_grads`: statistics, x̂ and reductions in one
  vectorised pass per (row, group) block (one thread, batch 64, ms reference → native: 32×32×32 2.2 → 0.6,
  16×16×64 0.9 → 0.35, 8×8×128 0.41 → 0.27; clipped sums 0.68 → 0.29 at 16×16×64).

Measured and dropped: the same C++ routine for LayerNorm and bias gradients (its per-position layout leaves
an unvectorised inner loop: LayerNorm (64, 64, 128) 2.6 → 9.4 ms, Linear bias 0.15 → 2.7 ms; Conv2d bias a
tie), so those stay on the torch reference. Not attempted: ghost norms and the clipped weight gradient, whose
torch references are already batched GEMMs / one weight-gradient convolution on CPU.

When the library is loaded, the ``privimage.kernels`` ops use it for CPU tensors of float32/bf16 (float64 still
goes to the torch reference, the tests' upcast); :func:`enabled` says whether that happens. Per-sample
weight norms go native only where it measured faster (:func:`prefer_for_weight_norms`).

The DP engine (``privimage.engine.ops``) uses it only with ``PRIVIMAGE_NATIVE=1``, and then only for GroupNorm:
inside a bk-mixed step of the stand-in UNet (bench/dp_step.py, one thread) GroupNorm went from ~80-100 to ~60 ms
per step, but the per-sample conv norms were no faster than the engine's grouped-convolution path there
(64→64 at 8×8, tensors captured from the step: 6.5 ms torch, 8.0 ms native), and the whole step did not
measurably change (bench/results/dp_step_native.json). The same torch path timed alone in a fresh process
took 18 ms: the rule above was measured that way and may favour native more than a running loop does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import _common as cm
from . import norm_affine as na

__all__ = ["available", "conv_per_sample_sq_norms", "enabled", "group_norm_clipped_grads", "group_norm_sq_norms",
           "library_path", "per_sample_sq_norms", "prefer_for_weight_norms", "why_unavailable"]

_STATE: dict = {}


def library_path() -> Path:
    env = os.environ.get("PRIVIMAGE_NATIVE_LIB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "build" / "native" / "libprivimage_native.so"


def _load() -> str | None:
    """Load the library once; the reason it is unavailable, or None when loaded."""
    if "error" not in _STATE:
        path = library_path()
        if not path.exists():
            _STATE["error"] = f"{path} does not exist (build it with csrc/build.sh)"
        else:
            try:
                torch.ops.load_library(str(path))
                _STATE["error"] = None
            except (OSError, RuntimeError) as e:  # built against another torch, or a broken file
                _STATE["error"] = f"could not load {path}: {e}"
    return _STATE["error"]


def available() -> bool:
    """Whether the native library is built and loaded."""
    return _load() is None


def why_unavailable() -> str:
    return _load() or "available"


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the ``privimage.kernels`` ops hand these tensors to the native library: all on CPU, none
    float64, the library loaded, and ``PRIVIMAGE_NATIVE`` not set to 0."""
    if os.environ.get("PRIVIMAGE_NATIVE", "1") == "0":
        return False
    if not all(t.device.type == "cpu" and t.dtype != torch.float64 for t in tensors):
        return False
    return available()


def _op():
    error = _load()
    if error is not None:
        raise RuntimeError(f"privimage native ops unavailable: {error}")
    return torch.ops.privimage_native


def conv_per_sample_sq_norms_raw(x, go, sample_index, is_padding, num_samples, kernel_size, stride, padding,
                                 dilation, groups):
    """The C++ op on already-checked arguments (the dispatch target of privimage.kernels' custom op)."""
    return _op().per_sample_sq_norms(x, go, sample_index, is_padding, num_samples, list(kernel_size),
                                     list(stride), list(padding), list(dilation), groups)


def conv_per_sample_sq_norms(x, grad_out, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
                             sample_index=None, is_padding=None, num_samples=None):
    """Native :func:`privimage.kernels.conv_per_sample_sq_norms` (CPU tensors)."""
    op = "native.conv_per_sample_sq_norms"
    geometry = cm.check_conv(op, x, grad_out, kernel_size, stride, padding, dilation, groups)
    S = cm.check_rows(op, x.shape[0], x.device, sample_index, is_padding, num_samples)
    if x.device.type != "cpu":
        raise ValueError(f"{op} runs on CPU tensors; got {x.device} (use privimage.kernels).")
    return conv_per_sample_sq_norms_raw(x, grad_out, sample_index, is_padding, S, *geometry, groups)


def per_sample_sq_norms(A, G, *, sample_index=None, is_padding=None, num_samples=None):
    """Native :func:`privimage.kernels.per_sample_sq_norms` (CPU tensors)."""
    x, go = cm.linear_as_conv("native.per_sample_sq_norms", A, G)
    S = cm.check_rows("native.per_sample_sq_norms", A.shape[0], A.device, sample_index, is_padding, num_samples)
    return conv_per_sample_sq_norms_raw(x, go, sample_index, is_padding, S, (1, 1), (1, 1), (0, 0), (1, 1), 1)


# Per-sample weight norms go native when each sample's gradient (P·K per group) is at least this many
# times its positions T. Measured on the 2-core CPU, one thread, batch 64 (ms, reference → native): 3×3 conv
# 8×8×64 39.6 → 15.9, 16×16×128 271 → 168, 4×4×128 177 → 17, Linear T=1 512×512 165 → 11, T=16 256×256
# 9.7 → 7.5, T=64 128→384 15.9 → 16.2 (tie); but 32×32×32 32 → 100, 16×16×64 33 → 74, Linear T=256 64×64
# 6.3 → 12.7. The reference writes R·P·K per-sample gradients: it loses where they are large against the
# im2col block each native thread forms per row.
GRAD_PER_POSITION = 256


def prefer_for_weight_norms(T: int, K: int, P: int) -> bool:
    """Whether the native per-sample norm beats the grouped-convolution reference at this shape."""
    return P * K >= GRAD_PER_POSITION * T


def _norm_affine(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps):
    if go.device.type != "cpu":
        raise ValueError(f"privimage.kernels.native runs on CPU tensors; got {go.device} (use privimage.kernels).")
    return _op().norm_affine_grads(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps)


def _per_sample(op, x, go, kind, num_groups, norm_ndim, eps, sample_index, is_padding, num_samples):
    R = go.shape[0]
    S = cm.check_rows(op, R, go.device, sample_index, is_padding, num_samples)
    target = sample_index if sample_index is not None else torch.arange(R)
    return _norm_affine(x, go, target, torch.ones(R), is_padding, S, kind, num_groups, norm_ndim, eps)


def _clipped(op, x, go, c, kind, num_groups, norm_ndim, eps, sample_index, is_padding):
    R = go.shape[0]
    S = cm.check_rows(op, R, go.device, sample_index, is_padding,
                      c.shape[0] if sample_index is not None and c.dim() else None)
    if c.shape != (S,) or not c.is_floating_point():
        raise ValueError(f"{op}: expected c to be a float tensor of shape ({S},) (one clip factor per sample), "
                         f"got {c.dtype} {tuple(c.shape)}.")
    scale = c if sample_index is None else c[sample_index]
    target = torch.zeros(R, dtype=torch.long)
    return _norm_affine(x, go, target, scale, is_padding, 1, kind, num_groups, norm_ndim, eps)[0]


def group_norm_sq_norms(x, grad_out, num_groups, *, eps=1e-5, sample_index=None, is_padding=None,
                        num_samples=None):
    """Native :func:`privimage.kernels.group_norm_sq_norms`."""
    na._check_group_norm("native.group_norm_sq_norms", x, grad_out, num_groups)
    out = _per_sample("native.group_norm_sq_norms", x, grad_out, na._GROUP_NORM, num_groups, 1, eps,
                      sample_index, is_padding, num_samples)
    return out.square().sum((1, 2))


def group_norm_clipped_grads(x, grad_out, c, num_groups, *, eps=1e-5, sample_index=None, is_padding=None):
    """Native :func:`privimage.kernels.group_norm_clipped_grads`."""
    na._check_group_norm("native.group_norm_clipped_grads", x, grad_out, num_groups)
    out = _clipped("native.group_norm_clipped_grads", x, grad_out, c, na._GROUP_NORM, num_groups, 1, eps,
                   sample_index, is_padding)
    return out[0], out[1]

