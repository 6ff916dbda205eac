"""Triton, imported once: its language module, the kernel decorator, autotuning and launch settings.

No backend decision is made here (that is :mod:`.dispatch`): this module only builds kernels so that each
launch can run compiled or interpreted, as ``TRITON_INTERPRET`` says at that moment. Triton itself fixes
"compiled or interpreted" when a function is decorated (``triton.jit`` reads the variable at import);
:func:`jit` instead builds both forms of a kernel and picks one per launch (:class:`_DualKernel`). Triton is
optional at run time (it is not a dependency of the CPU install): without it the kernel modules still
import and no kernel is ever launched.
"""

from __future__ import annotations

import contextlib
import types

import torch

from .dispatch import HAVE_TRITON, interpreting

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
else:  # CPU-only install without triton: kernels are never launched
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # kernel signatures annotate with tl.constexpr


if HAVE_TRITON:

    class _DualKernel(JITFunction):
        """A ``@triton.jit`` function that is compiled or interpreted per launch, as ``TRITON_INTERPRET`` says.

        The compiled form is the JITFunction this class is; the interpreted form is kept beside it. While an
        interpreted kernel runs, every ``@triton.jit`` function it calls (ours, and triton.language's own
        ``cdiv``, ``sum``... which were compiled-mode objects since triton was imported without the variable)
        arrives as a plain Python call; :func:`_device_calls_interpreted` answers those with the interpreted
        form for the duration of the launch only, so compiled kernels in the same process are untouched.
        """

        def __init__(self, fn):
            super().__init__(fn)
            self._interpreted = InterpretedFunction(fn)

        def run(self, *args, grid, warmup, **kwargs):
            if interpreting():
                with _device_calls_interpreted():
                    return self._interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)

    _INTERPRETED: dict = {}

    def _call_interpreted(self, *args, **kwargs):
        fn = _INTERPRETED.get(self.fn)
        if fn is None:
            fn = _INTERPRETED[self.fn] = InterpretedFunction(self.fn)
        return fn.rewrite()(*args, **kwargs)

    @contextlib.contextmanager
    def _device_calls_interpreted():
        """For one interpreted launch: device calls go to the interpreted form, and triton.language (tl and
        tl.core, which the standard library's functions use) is patched to the interpreter's builder ONCE and
        restored afterwards. InterpretedFunction's own device-call path patches without restoring, which
        would leave a process that later compiles a kernel (a GPU machine running the whole suite) with a
        broken triton.language."""
        from triton.runtime.interpreter import _patch_lang

        original = JITFunction.__call__
        scope = _patch_lang(types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core}))
        JITFunction.__call__ = _call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original
            scope.restore()

    def jit(fn):
        return _DualKernel(fn)

    def autotune(configs, key, reset_to_zero=None):
        """``triton.autotune`` over ``configs``, reduced to the first config under the interpreter.

        Why one config is enough there: the interpreter runs every config through the same numpy code, so
        tuning would only time Python. The first config of each kernel uses the smallest tiles (16), so the
        small test shapes span several tiles and every boundary mask and multi-tile loop is exercised; the
        larger configs differ only in tile sizes and warps, which change no arithmetic path.
        """

        def prune(configs, named_args, **kwargs):
            return configs[:1] if interpreting() else configs

        return triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero,
                               prune_configs_by={"early_config_prune": prune})
else:

    def jit(fn):
        return fn

    def autotune(configs, key, reset_to_zero=None):
        return lambda fn: fn


def config(num_warps: int = 4, num_stages: int = 2, **blocks):
    """One ``triton.Config`` (None without triton, where no kernel is ever launched)."""
    if not HAVE_TRITON:
        return None
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def is_ieee(dtype: torch.dtype) -> bool:
    """Whether a kernel's dot products upcast their tiles to fp32 and run in IEEE fp32 (the ``IEEE`` constexpr).

    fp32 inputs: always, since TF32's 10-bit mantissa would make the clip factor (a privacy quantity) differ
    visibly from the float32 reference. bf16/fp16 inputs use tensor cores with fp32 accumulation on a GPU,
    but under the interpreter they are upcast too: it stores bf16 as raw uint16 and cannot multiply it. The
    two agree to accumulation order, as bf16×bf16 products are exact in fp32.
    """
    return dtype == torch.float32 or interpreting()
