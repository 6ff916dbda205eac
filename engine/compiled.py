"""Stages 2 and 3 of the DP step as two ``torch.compile(fullgraph=True, dynamic=False)`` regions.

``DPEngine(compile=True)`` runs the step as three compiled graphs joined by short eager code: the forward
(:mod:`privimage.engine.capture`, the model compiled with the engine's hooks traced in), and here
:func:`~privimage.engine.clipping.norms_and_clip` and :func:`~privimage.engine.clipping.clipped_sums`.

Contract: each region is a closure over the step's static structure (per layer: module, rule, plan, number of
calls, the kept parameters) taking only tensors and the :class:`~privimage.kernels.Grouping`, so nothing
per-step is guarded on: a step with the same structure and shapes reuses the compiled code (Poisson batches
are padded to a fixed physical size; a changed shape is a recompile, never a silent fallback). The kernels
ops inside are registered custom ops, opaque to the compiler.

What stays eager, i.e. the graph breaks a whole-step ``torch._dynamo.explain`` finds, and why:

* the probes' leaf scalars: a graph cannot create tensors that require grad;
* ``torch.autograd.grad`` over the probes (Dynamo does not trace it unless ``trace_autograd_ops``); the
  backward it runs is the compiled one;
* the per-layer plans (a cost model on shapes, logged once: ``logging`` breaks a graph) and the
  :class:`~privimage.kernels.Grouping` (``int(groups.max())``, ``bincount``: data-dependent sizes);
* between the regions, ``bool(finite.all())``: the non-finite branch of :mod:`privimage.engine.clipping`;
* the noise, drawn in ``DPEngine.finalize`` from the engine's generator: a compiler backend may replace a
  ``generator=`` draw by its own RNG stream, and the guarantee (and secure mode, and an exact resume from the
  saved generator state) must not depend on that;
* the per-parameter accumulation over micro-batches and writing ``.grad``;
* fallback layers (no rule of their own: torch.func per-sample gradients), which enter the norms region as
  finished norms.

Trap: compiled code is not trusted by default (``compile`` is opt-in): an Inductor CPU fusion bug once gave wrong
gradients even without DP (bench/results/compile.md). A compiled backward that mixed rows would break
per-sample isolation, so compiled and eager steps must agree at σ = 0 on a device before it is relied on.
"""

from __future__ import annotations

import torch

from privimage.engine.clipping import Layer, clipped_sums, norms_and_clip
from privimage.engine.layers import Factors

__all__ = ["CompiledRegions"]


class CompiledRegions:
    """:func:`norms_and_clip` and :func:`clipped_sums` as two compiled regions, cached by structure."""

    def __init__(self, backend: str):
        self.backend = backend
        self._cache: dict = {}

    def _run(self, key, make, *args):
        """Run the compiled region for ``key`` on ``args``. Before its first compilation the region runs once
        eagerly (result discarded), so one-time set-up in the code it reaches (the kernels load the native
        library, read the file system) is done before Dynamo traces it: the trace sees only the settled state."""
        fn = self._cache.get(key)
        if fn is None:
            make()(*args)
            fn = self._cache[key] = torch.compile(make(), backend=self.backend, fullgraph=True, dynamic=False)
        return fn(*args)

    @staticmethod
    def _structure(layers):
        return tuple((layer.module, layer.rule, layer.plan, len(layer.calls), tuple(layer.kept), layer.sq is not None)
                     for layer in layers)

    @staticmethod
    def _tensors(layers):
        return [([t for call in layer.calls for t in call], list(layer.kept.values()), layer.sq) for layer in layers]

    @staticmethod
    def _rebuild(structure, tensors):
        layers = []
        for (module, rule, plan, n, kept_keys, _), (flat, kept, sq) in zip(structure, tensors):
            calls = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
            layers.append(Layer(module, rule, plan, calls, sq, dict(zip(kept_keys, kept))))
        return layers

    def norms_and_clip(self, layers, grouping, max_grad_norm, dtype, device):
        structure = self._structure(layers)

        def make():
            def region(tensors, grouping):
                inner = self._rebuild(structure, tensors)
                out = norms_and_clip(inner, grouping, max_grad_norm, dtype, device)
                return out, [dict(layer.kept) for layer in inner]
            return region

        with torch.no_grad():
            out, kept = self._run(("norms", structure, max_grad_norm, dtype, device), make,
                                  self._tensors(layers), grouping)
        for layer, k in zip(layers, kept):  # the per-row grads the norms materialised, for the clipped sums
            layer.kept.update(k)
        return out

    def clipped_sums(self, layers, factors: Factors, row_ok):
        structure = self._structure(layers)

        def make():
            def region(tensors, c, c_row, grouping, row_ok):
                return clipped_sums(self._rebuild(structure, tensors), Factors(c, c_row, grouping), row_ok)
            return region

        with torch.no_grad():
            return self._run(("sums", structure, row_ok is None), make, self._tensors(layers), factors.c,
                             factors.c_row, factors.grouping, row_ok)
