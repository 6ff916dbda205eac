"""The optional native CPU build (``CMakeLists.txt``, ``csrc/``): loaded when built, skipped cleanly when not.

Build it with ``csrc/build.sh`` (CMake against the installed torch); the library is looked for at
``$PRIVIMAGE_NATIVE_LIB`` or ``<repository>/build/native/libprivimage_native.so``. It registers two CPU ops
(``torch.ops.privimage_native``), called here on arguments the ``privimage.kernels`` ops already checked:

* :func:`per_sample_sq_norms`: each thread takes whole samples, forms one row's im2col block in a thread-local
  buffer and accumulates G_rᵀA_r in a (P, K) buffer; no per-sample gradient tensor of the batch is written.
* :func:`norm_affine_grads`: a normalisation layer's statistics, x̂ and affine-gradient reductions in one
  vectorised pass per (row, group) block (the layouts of :mod:`.norm_affine`).

Whether an op runs here is decided by :mod:`.dispatch` alone (``PRIVIMAGE_NATIVE=1``, CPU, not float64), with
the op's own rule of where the native code pays (:func:`prefer_for_weight_norms`; GroupNorm only for the
affine layouts). Measurements behind those rules: ``bench/results/native.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["GRAD_PER_POSITION", "available", "library_path", "norm_affine_grads", "per_sample_sq_norms",
           "prefer_for_weight_norms", "why_unavailable"]

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


def _ops():
    error = _load()
    if error is not None:
        raise RuntimeError(f"privimage native ops unavailable: {error}")
    return torch.ops.privimage_native


def per_sample_sq_norms(x, go, sample_index, is_padding, num_samples, kernel_size, stride, padding, dilation,
                        groups) -> torch.Tensor:
    """Each sample's ‖Σ_{r∈s} ∇W_r‖² of a convolution (a Linear is its 1×1 case), (S,) float32."""
    return _ops().per_sample_sq_norms(x, go, sample_index, is_padding, num_samples, list(kernel_size),
                                      list(stride), list(padding), list(dilation), groups)


def norm_affine_grads(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps):
    """out[target[r]] += scale[r] · (Σ g ∘ x̂, Σ g) of row r, (out_rows, 2, C) float32 (layout ``kind``)."""
    return _ops().norm_affine_grads(x, go, target, scale, is_padding, out_rows, kind, num_groups, norm_ndim, eps)


# Per-sample weight norms pay natively when each sample's gradient (P·K per group) is at least this many
# times its positions T: the torch code writes R·P·K per-sample gradients, which loses where they are large
# against the im2col block each native thread forms per row (bench/results/native.md).
GRAD_PER_POSITION = 256


def prefer_for_weight_norms(T: int, K: int, P: int) -> bool:
    """Whether the native per-sample norm beats the grouped-convolution torch code at this shape."""
    return P * K >= GRAD_PER_POSITION * T
