"""Stage 1 of the DP step, capture: every parameterised layer's inputs A and output gradients G, one backward.

Contract: :meth:`Probes.forward` runs ``loss_fn(model)`` recording each parameterised module's input A;
:meth:`Probes.backward` differentiates the summed loss with respect to the modules' outputs only (their
gradients G arrive by tensor hooks), so autograd, asked for outputs and not parameters, skips every
weight-gradient GEMM: per-sample gradients are then formed (or never formed) by the layer rules from (A, G)
(book-keeping, Bu et al. arXiv 2210.00038). Eager forwards ask for the outputs themselves; compiled ones,
and eager ones once an output was seen modified in place, replace each output by ``output + probe`` (a zero
scalar expanded to the output's shape) and ask for the probes, whose gradient is the same G.

Traps:

* An output modified in place after its module returned (``h = conv(x); h.relu_()``) no longer is the
  tensor whose gradient is G: the forward checks every output's version counter and, if one changed, runs
  again with probes (which the in-place op cannot touch) and keeps them from then on. ``loss_fn`` is then
  called twice in that step.
* A probe costs a copy of the output (the addition) and a reduction of G (its gradient), per layer and
  step: eager forwards avoid both unless they need them.

* Permanent forward hooks (installed once, active only while :meth:`Probes.forward` runs) rather than hooks
  added per step keep a ``torch.compile``'d model's guards stable, so its forward does not recompile.
* In a compiled forward a probe must be a graph INPUT for ``autograd.grad`` to reach it: probes are built
  before the forward from the previous step's output shapes; if a shape changed, the forward runs again.
* The compiled forward's backward (AOTAutograd) computes a gradient for every input that requires one,
  asked for or not, so the parameters are frozen while it runs; an eager forward leaves them alone (eager
  autograd skips the unused weight gradients by itself, and freezing costs memory: bench/results/compile.md).
* A tensor hook with side effects breaks a compiled graph: there each probe's G comes from
  ``autograd.grad``'s result instead of the probe's hook.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from privimage.engine.layers import VMAP_RULE, autocast_state, rule_for

__all__ = ["LayerCalls", "Probes", "find_layers", "run_loss"]

logger = logging.getLogger(__name__)

_PROBE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(eq=False)
class LayerCalls:
    """One parameterised module during one step: its calls [[A, G]], its plan, its squared norms once taken
    (then ``calls`` is None) and the per-row gradients its rule kept."""

    name: str
    module: nn.Module
    rule: object
    calls: list | None = field(default_factory=list)
    plan: object = None
    sq: torch.Tensor | None = None
    kept: dict = field(default_factory=dict)


def find_layers(model: nn.Module, every_layer_by_vmap: bool):
    """(name, module, rule) for every module owning trainable parameters; shared parameters refused."""
    owner: dict[int, str] = {}
    layers = []
    for name, module in model.named_modules(remove_duplicate=False):
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        for p in own:
            if id(p) in owner and owner[id(p)] != name:
                raise ValueError(
                    f"Parameter shared between modules '{owner[id(p)]}' and '{name}' (weight tying): "
                    f"per-sample rules need each trainable parameter to belong to one module.")
            owner[id(p)] = name
        if any(m is module for _, m, _ in layers):
            continue  # the same module reached twice (registered under two names): hook it once
        rule = VMAP_RULE if every_layer_by_vmap else rule_for(module) or VMAP_RULE
        layers.append((name or type(model).__name__, module, rule))
    return layers


def run_loss(loss_fn: Callable, model: nn.Module) -> torch.Tensor:
    """``loss_fn(model)``, checked to be one unreduced loss per row (R,)."""
    losses = loss_fn(model)
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-row losses of shape (R,), got "
                         f"{type(losses).__name__} of shape {tuple(getattr(losses, 'shape', ()))}; do not "
                         f"reduce (.mean()/.sum()) the batch: the engine owns the reduction.")
    return losses


class Probes:
    """The engine's forward hooks on ``layers`` [(name, module, rule)] and the probes they add.

    Args:
        model: the model ``loss_fn`` receives (compiled here when ``compile_backend`` is given, with the
            hooks traced into its graph).
        on_grad: called as ``on_grad(record)`` when a probe's G arrives during an eager backward (the engine
            reduces a single-call layer at once there, freeing G early).
    """

    def __init__(self, model: nn.Module, layers, *, compile_backend: str | None = None,
                 on_grad: Callable[[LayerCalls], None] | None = None):
        self._rules = {m: (name, rule) for name, m, rule in layers}
        self._on_grad_cb = on_grad
        self._records = None
        self._unhooked: list = []
        self._bases: dict = {}
        self._prebuilt: list = []
        self._probe_shapes: list = []  # (dtype, shape) of each hooked call, in order, at the last step
        self._seen: list = []
        self._probe_pos = 0
        self._stale = False
        self._handles = [m.register_forward_hook(self._forward_hook) for _, m, _ in layers]
        self.compiled = compile_backend is not None
        self.direct = not self.compiled  # ask autograd for the outputs themselves (no probes; module docstring)
        self._versions: list = []  # (output, its version when its module returned), direct mode
        self._collecting = False  # True while backward() runs
        self.model = (torch.compile(model, backend=compile_backend, fullgraph=True, dynamic=False)
                      if self.compiled else model)

    def forward(self, loss_fn: Callable, params) -> tuple[torch.Tensor, dict]:
        """Run ``loss_fn`` with the probes active: the losses (R,) and {module: LayerCalls} with every A."""
        frozen = [p for p in params if p.requires_grad] if self.compiled else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            device = params[0].device
            for _attempt in range(2):
                # The probes' bases are leaf scalars, one per floating dtype (a probe of another dtype than the
                # output would promote it), made here because a compiled region cannot create tensors that
                # require grad.
                self._bases = {dt: torch.zeros((), dtype=dt, device=device, requires_grad=True)
                               for dt in _PROBE_DTYPES}
                self._prebuilt = [self._bases[dt].expand(shape) for dt, shape in self._probe_shapes]
                records: dict = {}
                self._records, self._unhooked, self._seen, self._probe_pos, self._stale = records, [], [], 0, False
                self._versions = []
                try:
                    losses = run_loss(loss_fn, self.model)
                finally:
                    self._records = None
                    versions, self._versions = self._versions, []
                self._probe_shapes = self._seen
                if any(out._version != version for out, version in versions):
                    logger.info("A layer's output was modified in place: the DP engine uses probes from now on.")
                    self.direct = False  # its gradient is no longer G: probes, and the forward again
                    continue
                if not self._stale:
                    return losses, records
            raise RuntimeError("The layers' output shapes changed between two forward passes of one step under "
                               "torch.compile; the engine needs a deterministic forward.")
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def backward(self, total: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Differentiate ``total`` with respect to the outputs and probes alone, filling every record's G.

        The bases are upstream of every probe, so every eager probe's hook fires even if only they are asked
        for; an output's hook fires as it is asked for; a compiled probe's G is autograd's result.
        """
        unhooked, self._unhooked = self._unhooked, []
        self._collecting = True  # hooks act only now: a later backward (method="ghost") passes them too
        try:
            grads = torch.autograd.grad(total, [t for _, _, t, _ in unhooked] + list(self._bases.values()),
                                        allow_unused=True, retain_graph=retain_graph)
        finally:
            self._collecting = False
        for (rec, index, _, from_result), g in zip(unhooked, grads):
            if from_result:
                rec.calls[index][1] = g

    def close(self) -> None:
        """Remove the forward hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward_hook(self, module, args, output):
        """Records ``module``'s input and hooks its output (or adds the probe to it), while :meth:`forward` runs."""
        records = self._records
        if records is None:
            return None
        name, rule = self._rules[module]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Module '{name}' ({type(module).__name__}) returned {type(output).__name__}; the "
                            f"engine's per-sample rules need a single tensor output.")
        if not args:
            raise TypeError(f"Module '{name}' was called without positional inputs; pass them positionally.")
        if rule is VMAP_RULE:  # the inputs, and the autocast state the rule must replay the forward under
            a = (autocast_state(), tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args))
        else:
            a = args[0].detach()
        rec = records.get(module)
        if rec is None:
            rec = records[module] = LayerCalls(name, module, rule)
        index = len(rec.calls)
        rec.calls.append([a, None])
        if self.direct and not torch.compiler.is_compiling():
            if output.requires_grad:  # else no gradient reaches this call (G stays None)
                self._versions.append((output, output._version))
                self._unhooked.append((rec, index, output, False))
                output.register_hook(functools.partial(self._on_grad, rec, index))
            return None
        pos = self._probe_pos
        self._probe_pos = pos + 1
        self._seen.append((output.dtype, output.shape))
        pre = self._prebuilt
        if pos < len(pre) and pre[pos].shape == output.shape and pre[pos].dtype == output.dtype:
            probe = pre[pos]
        else:
            probe = self._bases[output.dtype].expand(output.shape)
            if torch.compiler.is_compiling():
                self._stale = True  # forward() runs the forward again with probes of the right shapes
        if torch.compiler.is_compiling():
            self._unhooked.append((rec, index, probe, True))
        else:
            probe.register_hook(functools.partial(self._on_grad, rec, index))
        return output + probe

    def _on_grad(self, rec: LayerCalls, index: int, g: torch.Tensor) -> None:
        if not self._collecting:
            return
        rec.calls[index][1] = g
        if self._on_grad_cb is not None:
            self._on_grad_cb(rec)
