"""The one backend switch of ``privimage.kernels``: which implementation runs an op on given tensors.

Every op asks :func:`backend` once per call, and nothing else in the package (or in the engine) reads the
environment or the device to choose an implementation:

* ``"triton"``: the op's Triton kernel, on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
  (Triton's interpreter: the CPU tests, not a speed measurement). float64 never goes here: the kernels
  accumulate in float32, and float64 inputs are how the tests ask for an exact answer.
* ``"native"``: the optional C++/OpenMP CPU build (:mod:`.native`), only with ``PRIVIMAGE_NATIVE=1``, for CPU
  tensors that are not float64, for the ops it implements and where the op says it pays (``native_pays``:
  per-sample weight norms at large per-sample gradients per position, GroupNorm's affine gradients).
* ``"torch"``: the op's torch code, everywhere else.

Both variables are read at call time, not import time, so a test can switch the interpreter on for itself
alone (``monkeypatch.setenv``) without routing other tests in the same process through it. :func:`forced`
pins one backend for a block of code: the benchmarks and tests compare backends through the same public op.

Trap: Triton fixes "compiled or interpreted" when a function is decorated (``triton.jit`` reads
``TRITON_INTERPRET`` at import); :mod:`._triton` builds both forms of each kernel and asks
:func:`interpreting` per launch.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from . import native

try:
    import triton  # noqa: F401  (optional at run time: without it every op runs torch or native code)

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

__all__ = ["BACKENDS", "HAVE_TRITON", "NATIVE", "TORCH", "TRITON", "TRITON_AVAILABLE", "backend", "forced",
           "interpreting", "native_requested", "triton_runs"]

TRITON, NATIVE, TORCH = "triton", "native", "torch"
BACKENDS = (TRITON, NATIVE, TORCH)

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("privimage_kernels_backend", default=None)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run in Triton's CPU interpreter (tests, not speed)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def native_requested() -> bool:
    """True when ``PRIVIMAGE_NATIVE=1``: CPU tensors may go to the native build (opt-in)."""
    return os.environ.get("PRIVIMAGE_NATIVE") == "1"


# As the environment stood at import; ops ask backend(), which re-reads it.
TRITON_AVAILABLE = HAVE_TRITON and (torch.cuda.is_available() or interpreting())


def triton_runs(*tensors: torch.Tensor) -> bool:
    """Whether Triton kernels can run on ``tensors`` here: all on CUDA, or any device under the interpreter."""
    return HAVE_TRITON and (interpreting() or all(t.is_cuda for t in tensors))


def _native_runs(tensors) -> bool:
    return all(t.device.type == "cpu" and t.dtype != torch.float64 for t in tensors) and native.available()


def backend(op: str, *tensors: torch.Tensor, native_pays: bool | None = None) -> str:
    """The backend that runs ``op`` on ``tensors``: ``"triton"``, ``"native"`` or ``"torch"`` (module docstring).

    ``native_pays``: None when the native build does not implement ``op``, else whether it pays at these
    shapes (the op decides). Native also needs ``PRIVIMAGE_NATIVE=1``, CPU tensors that are not float64,
    and the library loaded; :func:`forced` ("native") needs only an implementation.
    """
    pinned = _FORCED.get()
    if pinned is not None:
        return _check_forced(pinned, op, tensors, native_pays is not None)
    if any(t.dtype == torch.float64 for t in tensors):
        return TORCH
    if triton_runs(*tensors):
        return TRITON
    if native_pays and native_requested() and _native_runs(tensors):
        return NATIVE
    return TORCH


def _check_forced(pinned: str, op: str, tensors, has_native: bool) -> str:
    if pinned == TRITON and not (triton_runs(*tensors) and all(t.dtype != torch.float64 for t in tensors)):
        raise RuntimeError(f"{op}: backend forced to 'triton', but Triton cannot run on these tensors here "
                           f"(needs triton and CUDA tensors, or TRITON_INTERPRET=1; never float64).")
    if pinned == NATIVE and not (has_native and _native_runs(tensors)):
        raise RuntimeError(f"{op}: backend forced to 'native', but the native build does not run it here "
                           f"(needs the library ({native.why_unavailable()}), CPU tensors that are not float64, "
                           f"and an op the build implements).")
    return pinned


@contextlib.contextmanager
def forced(name: str):
    """Run every op in the block on backend ``name``; an op that cannot run there raises ``RuntimeError``.

    Example:
        >>> import torch
        >>> from privimage import kernels
        >>> A, G = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
        >>> with kernels.dispatch.forced("torch"):
        ...     norms = kernels.per_sample_sq_norms(A, G)
        >>> norms.shape
        torch.Size([4])
    """
    if name not in BACKENDS:
        raise ValueError(f"Expected a backend in {BACKENDS}, got {name!r}.")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)
