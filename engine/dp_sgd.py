"""DP-SGD gradients for any nn.Module: per-sample clipping at about the cost of non-private training.

After :meth:`DPEngine.finalize`, every trainable parameter's ``.grad`` holds

    ( Σ_i c_i g_i + N(0, σ² C² I) ) / expected_batch_size,    c_i = min(1, C / (‖g_i‖₂ + 1e-6)),

with g_i the gradient of sample i's loss over ALL trainable parameters together (one global norm per sample),
C = ``max_grad_norm`` and σ = ``noise_multiplier`` (Abadi et al. arXiv 1607.00133). Any torch optimizer then
steps.

Methods (one interface, ``method=``):

* ``"bk-mixed"`` (default): book-keeping (Bu et al. arXiv 2210.00038) with mixed ghost norms (Bu et al.
  arXiv 2205.10683). One forward and ONE backward: a zero "probe" is added to every parameterised layer's
  output (y = layer(x) + probe); the gradient with respect to the probes is each layer's output gradient G,
  and autograd, asked for probes only, skips every weight-gradient GEMM. Per-layer rules
  (:mod:`privimage.engine.layers`) take norms from (A, G) and form the clipped weight gradients directly.
* ``"ghost"``: Opacus-style ghost clipping: norms as above (ghost where a rule has one), then a second,
  reweighted backward Σ c_i loss_i through autograd (Li et al. arXiv 2110.05679).
* ``"vmap"``: materialised per-sample gradients of every parameter by torch.func: each layer alone, vmap
  over rows of a vjp of the layer with its recorded input and output gradient (the same probes, one
  backward); memory O(B · params). Also the fallback, per layer, for modules without a rule.
* ``"loop"``: one backward per sample; slow and obviously right. A sample whose gradient comes out
  non-finite is recomputed with the other rows kept out of its graph, so one NaN image drops only itself.

Compile (``compile=True``, bk-mixed only; opt-in on every device): the step becomes three
``torch.compile(fullgraph=True, dynamic=False)`` graphs joined by short eager code. Opt-in because it is not
yet trusted and, where measured, does not pay: on the 2-core CPU (torch 2.13, batch 64,
bench/dp_step.py) the compiled step took 1.22x the eager non-private step against eager bk-mixed's
1.20x, after a ~35 s to 2 min build, and Inductor's CPU code gave wrong parameter gradients for the stand-in UNet even without DP (the benchmark's
compiled-vs-eager check; in float64 too, and exact with ``torch._inductor.config.max_fusion_size = 1``, so
a fusion bug, not rounding). A compiled backward that mixed rows would break per-sample isolation, so it
stays off by default until compiled and eager agree at σ = 0 on the GPU (``bench/dp_step.py`` checks this);
check again on each new torch version and device before relying on it.

1. The forward: ``loss_fn`` receives the compiled model, with the engine's hooks traced into the graph (the
   probes are graph inputs; AOTAutograd compiles the matching backward, which ``torch.autograd.grad`` runs).
2. Norms and clip factors: every layer's per-sample squared norms from (A, G), their sum, c_i.
3. Clipped sums: every layer's Σ_i c_i g_i (the book-keeping weight gradients).

Precision: under bf16 autocast the layers run in bf16 and A, G arrive in bf16; regions 2 and 3 run with
autocast off and accumulate norms and sums in float32 (:func:`privimage.engine.ops._acc`).

What stays eager, i.e. the graph breaks a whole-step ``torch._dynamo.explain`` finds, and why:

* the probes' leaf scalars: a graph cannot create tensors that require grad;
* ``torch.autograd.grad`` over the probes (Dynamo does not trace it unless ``trace_autograd_ops``); the
  backward it runs is the compiled one;
* the per-layer plans (a cost model on shapes, logged once: ``logging`` breaks a graph) and
  :class:`Grouping` (``int(groups.max())``, ``bincount``: data-dependent sizes);
* between regions 2 and 3, ``bool(finite.all())``: a sample with a NaN/inf gradient needs its rows zeroed
  before the clipped sums (0·NaN = NaN), a data-dependent branch and one host sync per step;
* the noise, drawn in :meth:`DPEngine.finalize` from the engine's generator: a compiler backend may replace
  a ``generator=`` draw by its own RNG stream, and the guarantee (and secure mode, and an exact resume from
  the saved generator state) must not depend on that;
* the per-parameter accumulation over micro-batches and writing ``.grad``.

Each region is a closure over the step's static structure (per layer: rule, plan, number of calls), taking
only tensors, so nothing per-step is guarded on: steps with the same physical batch size (Poisson batches
are padded to it) reuse the compiled code whatever their drawn size (tested with ``error_on_recompile``).
Fallback layers (no rule of their own: torch.func per-sample gradients) stay eager and enter region 2 as
finished norms.

Public vs private: ``max_grad_norm``, ``noise_multiplier`` and ``expected_batch_size`` are public mechanism
parameters; the drawn batch size is private and is never used as the divisor (a Poisson batch's size leaks
membership).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from privimage.engine.layers import VMAP_RULE, Grouping, Plan, rule_for
from privimage.engine.noise import ClippedSum, add_gaussian_noise
from privimage.engine import ops

__all__ = ["DPEngine", "DPOptimizer", "NormCheck", "StepStats", "check_per_sample_norms", "make_private"]

logger = logging.getLogger(__name__)

METHODS = ("bk-mixed", "ghost", "vmap", "loop")
_CLIP_EPS = 1e-6  # the 1e-6 of c_i = min(1, C / (‖g_i‖ + 1e-6)) (Opacus' convention)


@dataclass
class StepStats:
    """What one :meth:`DPEngine.accumulate` (or, summed, one :meth:`DPEngine.finalize`) saw.

    ``losses``, ``norms`` and ``clip_factors`` are per-row / per-sample tensors (accumulate only; None in
    finalize). ``num_samples`` counts non-padding samples, ``num_nonfinite`` the samples whose gradient held
    NaN/inf and were dropped (they contribute zero). Both are private data: log them only in aggregate.
    """

    num_samples: int | torch.Tensor
    num_nonfinite: int | torch.Tensor
    losses: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    clip_factors: torch.Tensor | None = None


def _refuse_batchnorm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"Module '{name or type(model).__name__}' is {type(module).__name__}: BatchNorm mixes the samples "
                f"of a batch, so per-sample gradients (and DP-SGD's guarantee) are undefined. Replace it with "
                f"nn.GroupNorm (e.g. nn.GroupNorm(min(32, C), C)), which normalises each sample on its own.")


class DPEngine:
    """Per-sample clipped, noised gradients for ``model``'s trainable parameters.

    Args:
        model: any nn.Module without BatchNorm. Parameters with ``requires_grad=False`` are skipped.
        max_grad_norm: C, the per-sample clipping norm (> 0).
        noise_multiplier: σ (>= 0); the noise std is σ·C, drawn by :func:`privimage.engine.add_gaussian_noise`.
        expected_batch_size: the public expected logical batch size (e.g. sample_rate · N), the divisor.
        method: "bk-mixed" (default), "ghost", "vmap" or "loop" (module docstring).
        generator: source of the noise (pass :func:`privimage.engine.secure_generator` for secure mode).
        compile: compile the forward and the post-backward work (module docstring); bk-mixed only.
            Off by default (module docstring: not yet verified on a GPU). The first step compiles (minutes
            for a UNet); keep the physical batch size fixed (pad Poisson batches) or every new size recompiles.
        compile_backend: the ``torch.compile`` backend ("inductor"; tests use "aot_eager").

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.randn(4, 2)
        >>> engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
        >>> stats = engine.step(lambda m: ((m(x) - y) ** 2).sum(1))
        >>> model.weight.grad.shape
        torch.Size([2, 3])
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, noise_multiplier: float,
                 expected_batch_size: float, method: str = "bk-mixed",
                 generator: torch.Generator | None = None, compile: bool = False,
                 compile_backend: str = "inductor"):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"Expected max_grad_norm={max_grad_norm} finite and > 0.")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"Expected noise_multiplier={noise_multiplier} finite and >= 0.")
        if not expected_batch_size > 0:
            raise ValueError(f"Expected expected_batch_size={expected_batch_size} > 0.")
        if method not in METHODS:
            raise ValueError(f"Expected method={method!r} to be one of {METHODS}.")
        if compile and method != "bk-mixed":
            raise ValueError(f"compile=True needs method='bk-mixed' (got {method!r}): the other methods run "
                             f"torch.func or a second backward pass, which the compiled regions do not cover.")
        _refuse_batchnorm(model)
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.method = method
        self.generator = generator
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
        self._layers = self._find_layers(model, every_layer_by_vmap=method == "vmap")
        self._rules = {m: (name, rule) for name, m, rule in self._layers}
        self._logged: set = set()
        self._grouping = None
        self._records = None
        self._unhooked: list = []
        self._bases: dict = {}
        self._prebuilt: list = []
        self._probe_shapes: list = []  # (dtype, shape) of each hooked call, in order, at the last step
        self._seen: list = []
        self._probe_pos = 0
        self._stale = False
        self._handles = [m.register_forward_hook(self._forward_hook) for _, m, _ in self._layers]
        self.compile = bool(compile)
        # The model loss_fn receives: compiled (with the engine's hooks traced into its graph) or the model.
        self._forward_model = (torch.compile(model, backend=compile_backend, fullgraph=True, dynamic=False)
                               if self.compile else model)
        self._regions = _CompiledRegions(compile_backend) if self.compile else None
        self._reset()

    # ---- set-up --------------------------------------------------------------------------------------------

    @staticmethod
    def _find_layers(model: nn.Module, every_layer_by_vmap: bool):
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

    def _reset(self):
        self._sums: dict[nn.Parameter, torch.Tensor] = {}
        self._num_samples = 0
        self._num_nonfinite = 0

    # ---- public API ----------------------------------------------------------------------------------------

    def accumulate(self, loss_fn: Callable[[nn.Module], torch.Tensor], *, is_padding: torch.Tensor | None = None,
                   groups: torch.Tensor | None = None) -> StepStats:
        """Run ``loss_fn(model)`` forward and backward and add this physical batch's clipped sum.

        Args:
            loss_fn: ``loss_fn(model) -> Tensor (R,)``, one unreduced loss per row. The engine reduces it.
            is_padding: (R,) bool, True for rows that are padding (they count for nothing).
            groups: (R,) long, the sample id of each row; a sample's gradient is that of the SUM of its rows'
                losses (several noise draws of one image: divide by their number inside loss_fn to average).

        Returns:
            :class:`StepStats` for this physical batch (tensors; nothing is synchronised to the host).

        With ``compile=True``, the trainable parameters have ``requires_grad=False`` while ``loss_fn`` runs:
        their gradients come from the layers' inputs and output gradients, never from autograd. (Compile
        through ``compile=True`` rather than handing loss_fn a model compiled by hand, whose backward graph
        would compute every weight gradient and throw it away.)
        """
        if self.method == "loop":
            return self._accumulate_loop(loss_fn, is_padding, groups)
        return self._accumulate_bk(loss_fn, is_padding, groups)

    def finalize(self) -> StepStats:
        """Add the noise once for the logical batch and write every trainable ``p.grad``; reset the sums.

        Without any ``accumulate`` since the last finalize (an empty Poisson batch), ``.grad`` is noise alone.
        """
        tensors = tuple(self._sums[p] if p in self._sums else
                        torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                        for p in self.params)
        noisy = add_gaussian_noise(ClippedSum(tensors, l2_sensitivity=self.max_grad_norm),
                                   noise_multiplier=self.noise_multiplier, generator=self.generator)
        for p, t in zip(self.params, noisy):
            p.grad = (t / self.expected_batch_size).to(p.dtype)
        stats = StepStats(num_samples=int(self._num_samples), num_nonfinite=int(self._num_nonfinite))
        if stats.num_nonfinite:
            logger.warning("DP step dropped %d sample(s) whose gradient was NaN/inf (they contribute zero).",
                           stats.num_nonfinite)
        self._reset()
        return stats

    def step(self, loss_fn, *, is_padding=None, groups=None) -> StepStats:
        """``accumulate`` then ``finalize``: one logical batch in one physical batch."""
        stats = self.accumulate(loss_fn, is_padding=is_padding, groups=groups)
        final = self.finalize()
        stats.num_samples, stats.num_nonfinite = final.num_samples, final.num_nonfinite
        return stats

    # ---- shared pieces -------------------------------------------------------------------------------------

    def _run_loss(self, loss_fn, model=None):
        losses = loss_fn(self.model if model is None else model)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError(f"loss_fn must return per-row losses of shape (R,), got "
                             f"{type(losses).__name__} of shape {tuple(getattr(losses, 'shape', ()))}; do not "
                             f"reduce (.mean()/.sum()) the batch: the engine owns the reduction.")
        return losses

    @staticmethod
    def _row_mask(is_padding, R, device):
        if is_padding is None:
            return None
        if is_padding.shape != (R,) or is_padding.dtype != torch.bool:
            raise ValueError(f"Expected is_padding to be a BoolTensor of shape ({R},), got dtype "
                             f"{is_padding.dtype} and shape {tuple(is_padding.shape)}.")
        return is_padding.to(device)

    def _clip(self, sq_norms, grouping: Grouping, pad):
        """Norms (S,) -> per-sample clip factors (padding and non-finite samples: 0); counts the samples."""
        norms, c, finite, real = _clip_factors(sq_norms, grouping, pad, self.max_grad_norm)
        self._num_samples = self._num_samples + real.sum()
        self._num_nonfinite = self._num_nonfinite + (~finite & real).sum()
        return norms, c, finite

    def _add(self, param, tensor):
        tensor = ops._acc(tensor)
        self._sums[param] = self._sums[param] + tensor if param in self._sums else tensor

    @staticmethod
    def _masked_total(losses, pad):
        if pad is None:
            return losses.sum()
        return torch.where(pad, torch.zeros_like(losses), losses).sum()

    # ---- bk-mixed and ghost --------------------------------------------------------------------------------

    def _forward_hook(self, module, args, output):
        """Installed once per parameterised module; active only while :meth:`_capture` runs ``loss_fn``.

        Adds the probe (a zero scalar expanded to the output's shape: it allocates nothing) and records the
        input. Permanent hooks, rather than hooks added per step, keep a ``torch.compile``'d model's guards
        stable, so its forward does not recompile every step.
        """
        records = self._records
        if records is None:
            return None
        name, rule = self._rules[module]
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Module '{name}' ({type(module).__name__}) returned {type(output).__name__}; the "
                            f"engine's per-sample rules need a single tensor output.")
        if not args:
            raise TypeError(f"Module '{name}' was called without positional inputs; pass them positionally.")
        if rule is VMAP_RULE:
            a = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
        else:
            a = args[0].detach()
        # Probes built before the forward from the previous step's shapes enter a compiled graph as inputs,
        # so autograd.grad can reach them; one made here would be a graph-internal tensor with no gradient.
        pos = self._probe_pos
        self._probe_pos = pos + 1
        self._seen.append((output.dtype, output.shape))
        pre = self._prebuilt
        if pos < len(pre) and pre[pos].shape == output.shape and pre[pos].dtype == output.dtype:
            probe = pre[pos]
        else:
            probe = self._bases[output.dtype].expand(output.shape)
            if torch.compiler.is_compiling():
                self._stale = True  # _capture runs the forward again with probes of the right shapes
        rec = records.get(module)
        if rec is None:
            rec = records[module] = _Record(name, module, rule)
        index = len(rec.calls)
        rec.calls.append([a, None])
        if torch.compiler.is_compiling():
            # A tensor hook with side effects breaks the graph: in a compiled forward the probe's G comes
            # out of autograd.grad instead (held until the clip factors are known).
            self._unhooked.append((rec, index, probe))
        else:
            probe.register_hook(functools.partial(self._on_grad, rec, index))
        return output + probe

    def _capture(self, loss_fn, records):
        """Run ``loss_fn`` with the probes active; fills ``records`` {module: _Record}; returns losses, bases.

        The probes' bases are leaf scalars, one per floating dtype (a probe of another dtype than the output
        would promote it), created here because a compiled region cannot create tensors requiring grad.
        """
        device = self.params[0].device
        # bk-mixed forms the parameters' gradients from A and G, never by autograd. Eager autograd, asked for
        # the probes only, skips the weight-gradient GEMMs by itself; a compiled forward's backward graph
        # (AOTAutograd) computes a gradient for every input that requires one, asked for or not: a whole
        # non-private backward, thrown away. So the compiled forward runs with the parameters frozen. (Eager
        # forwards do not: measured, freezing there raised bk-mixed's peak memory by ~50 MB at batch 64.)
        frozen = [p for p in self.params if p.requires_grad] if self.compile else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            return self._capture_probes(loss_fn, records, device)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _capture_probes(self, loss_fn, records, device):
        for _attempt in range(2):
            self._bases = {dt: torch.zeros((), dtype=dt, device=device, requires_grad=True)
                           for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
            self._prebuilt = [self._bases[dt].expand(shape) for dt, shape in self._probe_shapes]
            records.clear()
            self._records, self._unhooked, self._seen, self._probe_pos, self._stale = records, [], [], 0, False
            try:
                losses = self._run_loss(loss_fn, self._forward_model)
            finally:
                self._records = None
            self._probe_shapes = self._seen
            if not self._stale:
                return losses, list(self._bases.values())
        raise RuntimeError("The layers' output shapes changed between two forward passes of one step under "
                           "torch.compile; the engine needs a deterministic forward.")

    def close(self) -> None:
        """Remove the engine's forward hooks from the model (after which the engine cannot be used)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_grad(self, rec, index, g):
        """Backward hook: store G; a single-call layer whose plan keeps per-sample grads is reduced at once,
        so its G is freed during the backward pass instead of living until the clip factors are known."""
        rec.calls[index][1] = g
        if len(rec.calls) == 1 and self.method in ("bk-mixed", "vmap"):
            calls = [(rec.calls[0][0], g)]
            with torch.autocast(g.device.type, enabled=False):
                rec.plan = self._plan(rec.name, rec.module, rec.rule, calls, self._grouping)
                if rec.plan.keep:
                    rec.sq = rec.rule.sq_norms(rec.module, calls, self._grouping, rec.plan)
                    rec.calls = None  # everything the clipped sum needs is in plan.kept

    def _plan(self, name, module, rule, calls, grouping):
        plan = rule.plan(module, calls, grouping, "ghost" if self.method == "ghost" else "mixed")
        key = (name, plan.norm, plan.keep, plan.detail)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("DP layer %s (%s): %s norms%s [%s]", name, type(module).__name__, plan.norm,
                        ", per-sample grads kept" if plan.keep else "", plan.detail)
        return plan

    def _accumulate_bk(self, loss_fn, is_padding, groups):
        records: dict[nn.Module, _Record] = {}
        losses, bases = self._capture(loss_fn, records)
        R = losses.shape[0]
        pad = self._row_mask(is_padding, R, losses.device)
        grouping = Grouping(groups.to(losses.device) if groups is not None else None, R)
        for rec in records.values():
            for a, _ in rec.calls:
                if rec.rule is not VMAP_RULE and a.shape[0] != R:
                    raise ValueError(f"Module '{rec.name}' saw a batch of {a.shape[0]} rows but loss_fn returned "
                                     f"{R} losses: per-sample rules need row r of every layer to be sample r's.")
        total = self._masked_total(losses, pad)
        if not total.requires_grad:
            raise ValueError("The loss does not depend on any trainable parameter.")
        self._grouping = grouping
        try:
            # Asking for probes (and their bases) only: autograd skips every weight-gradient GEMM. The bases
            # are upstream of every probe, so every probe's hook fires.
            unhooked, self._unhooked = self._unhooked, []
            grads = torch.autograd.grad(total, [probe for _, _, probe in unhooked] + bases, allow_unused=True,
                                        retain_graph=self.method == "ghost")
            for (rec, index, _), g in zip(unhooked, grads):
                rec.calls[index][1] = g
        finally:
            self._grouping = None
        dtype = torch.promote_types(losses.dtype, torch.float32)
        with torch.autocast(losses.device.type, enabled=False):
            layers = []
            for rec in records.values():
                if rec.sq is None:
                    rec.calls = [(a, g) for a, g in rec.calls if g is not None]
                    if not rec.calls:
                        continue  # the layer's output did not reach the loss: no gradient
                    if rec.plan is None:
                        rec.plan = self._plan(rec.name, rec.module, rec.rule, rec.calls, grouping)
                    if self._regions is not None and rec.rule is VMAP_RULE:
                        # torch.func inside a compiled region is not worth its trace: fallback layers
                        # (no rule of their own) stay eager and enter the region as finished norms.
                        rec.sq = rec.rule.sq_norms(rec.module, rec.calls, grouping, rec.plan)
                        rec.calls = None
                layers.append(_Layer(rec.module, rec.rule, rec.plan, rec.calls or [], rec.sq))
            if self._regions is None:
                norms, c, finite, num_real, num_nonfinite = _norms_and_clip(
                    layers, grouping, pad, self.max_grad_norm, dtype, losses.device)
            else:
                norms, c, finite, num_real, num_nonfinite = self._regions.norms_and_clip(
                    layers, grouping, pad, self.max_grad_norm, dtype, losses.device)
            self._num_samples = self._num_samples + num_real
            self._num_nonfinite = self._num_nonfinite + num_nonfinite
            c_row = grouping.to_rows(c)
            # A NaN/inf row times a zero clip factor is still NaN: zero such rows' A, G and kept grads first.
            # (A data-dependent branch: one host sync per step, and the break between the compiled regions.)
            sanitize = not bool(finite.all())
            row_ok = grouping.to_rows(finite) if sanitize else None
            if self.method == "ghost" and not sanitize:
                weighted = self._masked_total(losses * c_row.to(losses.dtype), pad)
                sums = [dict(zip(self.params, torch.autograd.grad(weighted, self.params, allow_unused=True)))]
            elif self._regions is None:
                sums = _clipped_sums(layers, c_row, row_ok)
            else:
                sums = self._regions.clipped_sums(layers, c_row, row_ok)
            for clipped in sums:
                for p, g in clipped.items():
                    if g is not None:
                        self._add(p, g)
        return StepStats(num_samples=self._num_samples, num_nonfinite=self._num_nonfinite,
                         losses=losses.detach(), norms=norms, clip_factors=c)

    # ---- vmap and loop -------------------------------------------------------------------------------------

    def _accumulate_loop(self, loss_fn, is_padding, groups):
        losses = self._run_loss(loss_fn)
        R = losses.shape[0]
        pad = self._row_mask(is_padding, R, losses.device)
        grouping = Grouping(groups.to(losses.device) if groups is not None else None, R)
        ids = groups if groups is not None else torch.arange(R, device=losses.device)
        per_sample = []
        for s in range(grouping.num_samples):
            rows = ids == s
            if pad is not None:
                rows = rows & ~pad
            if not bool(rows.any()):
                per_sample.append(None)
                continue
            g = torch.autograd.grad(losses[rows].sum(), self.params, retain_graph=True, allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x for p, x in zip(self.params, g)]
            if not all(bool(torch.isfinite(x).all()) for x in g):
                # The batch's shared graph turns another row's NaN into this sample's (0·NaN in a weight
                # gradient): recompute the sample in isolation before deciding that it is itself non-finite.
                g = _isolated_sample_grad(self.model, loss_fn, rows, self.params)
            per_sample.append(g)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        sq = torch.stack([torch.zeros((), dtype=dtype) if g is None else
                          sum(ops._acc(x).square().sum() for x in g) for g in per_sample]) \
            if per_sample else torch.zeros(0, dtype=dtype)
        if pad is not None:  # padding-only samples: norm 0 (never counted or used)
            sq = torch.where(grouping.to_samples((~pad).to(dtype)) > 0, sq, torch.zeros_like(sq))
        norms, c, finite = self._clip(sq, grouping, pad)
        for s, g in enumerate(per_sample):
            if g is None or not bool(finite[s]):
                continue
            for p, x in zip(self.params, g):
                self._add(p, c[s] * ops._acc(x))
        return StepStats(num_samples=self._num_samples, num_nonfinite=self._num_nonfinite,
                         losses=losses.detach(), norms=norms, clip_factors=c)


def _isolated_sample_grad(model: nn.Module, loss_fn, rows: torch.Tensor, params) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(model)[rows].sum()`` with no other row's values able to reach it.

    One backward through a whole batch computes each weight gradient as a sum over every row, with zero
    output gradients for the rows outside the sample, and 0·NaN = NaN: one NaN row would make every sample
    non-finite. Here the model's batched inputs (tensors with R leading rows) have every other row replaced
    by a copy of one of the sample's rows, and its batched outputs pass no gradient to the other rows
    (``torch.where``, not a product, so a NaN loss elsewhere stays out). For a model that treats rows
    independently (which per-sample gradients assume), the sample's gradient is unchanged.
    """
    R = rows.shape[0]
    source = torch.where(rows, torch.arange(R, device=rows.device), rows.nonzero()[0, 0])

    def take(x):
        return x[source] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == R else x

    def isolate(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == R and x.requires_grad:
            return torch.where(rows.view((R,) + (1,) * (x.dim() - 1)), x, x.detach())
        return x

    def inputs(module, args, kwargs):
        return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}

    def outputs(module, args, kwargs, out):
        if isinstance(out, (tuple, list)):
            return type(out)(isolate(o) for o in out)
        return isolate(out)

    handles = [model.register_forward_pre_hook(inputs, with_kwargs=True),
               model.register_forward_hook(outputs, with_kwargs=True)]
    try:
        losses = loss_fn(model)
        g = torch.autograd.grad(losses[rows].sum(), params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]


@dataclass(eq=False)
class _Record:
    """One parameterised module during one accumulate: its calls [(A, G)], plan and squared norms."""

    name: str
    module: nn.Module
    rule: object
    calls: list | None = None
    plan: object = None
    sq: torch.Tensor | None = None

    def __post_init__(self):
        self.calls = []


def _zero_rows(x, row_ok):
    """Rows of ``x`` (R, ...) where ``row_ok`` is False set to exactly 0 (not 0·NaN); non-floats pass."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return torch.where(row_ok.view((-1,) + (1,) * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype,
                                                                                 device=x.device))


# ---- the post-backward work: norms, clip factors, clipped sums (eager, or as compiled regions) --------------

class _Layer(NamedTuple):
    """One parameterised module's share of a step: its rule's plan, calls [(A, G)] and finished norms if any."""

    module: nn.Module
    rule: object
    plan: Plan
    calls: list
    sq: torch.Tensor | None  # squared norms already taken (during the backward pass, or eagerly), else None


def _clip_factors(sq_norms, grouping: Grouping, pad, max_grad_norm: float):
    """Squared norms (S,) -> norms, clip factors c (0 for padding and non-finite samples), finite, real."""
    norms = sq_norms.sqrt()
    c = (max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)
    finite = torch.isfinite(norms)
    if pad is not None:
        real = grouping.to_samples((~pad).to(norms.dtype)) > 0
    elif grouping.trivial:
        real = torch.ones_like(finite)
    else:
        real = grouping.to_samples(torch.ones(grouping.num_rows, device=norms.device)) > 0
    c = torch.where(finite & real, c, torch.zeros_like(c))
    return norms, c, finite, real


def _norms_and_clip(layers, grouping, pad, max_grad_norm, dtype, device):
    """Every layer's per-sample squared norms, summed over layers; then the clip factors.

    Returns norms (S,), c (S,), finite (S,) and the counts of real and of dropped (non-finite) samples.
    """
    sq = torch.zeros(grouping.num_samples, dtype=dtype, device=device)
    for layer in layers:
        sq = sq + (layer.sq if layer.sq is not None else
                   layer.rule.sq_norms(layer.module, layer.calls, grouping, layer.plan))
    norms, c, finite, real = _clip_factors(sq, grouping, pad, max_grad_norm)
    return norms, c, finite, real.sum(), (~finite & real).sum()


def _clipped_sums(layers, c_row, row_ok):
    """Each layer's {param: Σ_r c_r g_r}; ``row_ok`` (R,) bool, if given, zeroes the other rows first."""
    sums = []
    for layer in layers:
        calls, plan = layer.calls, layer.plan
        if row_ok is not None:
            calls = [(_zero_rows(a, row_ok), _zero_rows(g, row_ok)) for a, g in calls]
            plan = Plan(plan.norm, plan.keep, plan.detail, {p: _zero_rows(g, row_ok) for p, g in plan.kept.items()})
        sums.append(layer.rule.clipped(layer.module, calls, c_row, plan))
    return sums


class _CompiledRegions:
    """:func:`_norms_and_clip` and :func:`_clipped_sums` as two ``torch.compile(fullgraph=True)`` regions.

    Each region is a closure over the step's static structure (per layer: module, rule, the plan's choices,
    the number of calls, the kept parameters) that takes only tensors and the :class:`Grouping`. Plans are
    rebuilt inside from that structure, so no per-step Python object is guarded on: a new step with the same
    structure and shapes reuses the compiled code (``dynamic=False``: Poisson batches are padded to a fixed
    physical size, so shapes do not change, and a changed shape is a recompile, never a silent fallback).
    The regions are split at the one data-dependent branch (non-finite samples, see ``_accumulate_bk``).
    """

    def __init__(self, backend: str):
        self.backend = backend
        self._cache: dict = {}

    def _run(self, key, make, *args):
        """Run the compiled region for ``key`` on ``args``. Before its first compilation the region runs once
        eagerly (result discarded), so one-time set-up in the code it reaches (the kernels' dispatch loads
        the native library, reads the file system) is done before Dynamo traces it: the trace sees only the
        settled state."""
        fn = self._cache.get(key)
        if fn is None:
            make()(*args)
            fn = self._cache[key] = torch.compile(make(), backend=self.backend, fullgraph=True, dynamic=False)
        return fn(*args)

    @staticmethod
    def _structure(layers):
        return tuple((layer.module, layer.rule, layer.plan.norm, layer.plan.keep, layer.plan.detail,
                      len(layer.calls), tuple(layer.plan.kept), layer.sq is not None) for layer in layers)

    @staticmethod
    def _tensors(layers):
        return [([t for call in layer.calls for t in call], list(layer.plan.kept.values()), layer.sq)
                for layer in layers]

    @staticmethod
    def _rebuild(structure, tensors):
        layers = []
        for (module, rule, norm, keep, detail, n, kept_keys, _), (flat, kept, sq) in zip(structure, tensors):
            plan = Plan(norm, keep, detail, dict(zip(kept_keys, kept)))
            layers.append(_Layer(module, rule, plan, [(flat[2 * i], flat[2 * i + 1]) for i in range(n)], sq))
        return layers

    def norms_and_clip(self, layers, grouping, pad, max_grad_norm, dtype, device):
        structure = self._structure(layers)

        def make():
            def region(tensors, grouping, pad):
                inner = self._rebuild(structure, tensors)
                out = _norms_and_clip(inner, grouping, pad, max_grad_norm, dtype, device)
                return out, [dict(layer.plan.kept) for layer in inner]
            return region

        with torch.no_grad():
            out, kept = self._run(("norms", structure, max_grad_norm, dtype, device), make,
                                  self._tensors(layers), grouping, pad)
        for layer, k in zip(layers, kept):  # the per-row grads the norms materialised, for the clipped sums
            layer.plan.kept.update(k)
        return out

    def clipped_sums(self, layers, c_row, row_ok):
        structure = self._structure(layers)

        def make():
            def region(tensors, c_row, row_ok):
                return _clipped_sums(self._rebuild(structure, tensors), c_row, row_ok)
            return region

        with torch.no_grad():
            return self._run(("sums", structure, row_ok is None), make, self._tensors(layers), c_row, row_ok)


# ---- make_private -------------------------------------------------------------------------------------------

class DPOptimizer:
    """A torch optimizer driven by a :class:`DPEngine`: ``step(loss_fn)`` = clip, noise, optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine: DPEngine):
        self.optimizer = optimizer
        self.engine = engine

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def accumulate(self, loss_fn, *, is_padding=None, groups=None) -> StepStats:
        """Add one physical batch of a logical batch (see :meth:`DPEngine.accumulate`)."""
        return self.engine.accumulate(loss_fn, is_padding=is_padding, groups=groups)

    def step(self, loss_fn=None, *, is_padding=None, groups=None) -> StepStats:
        """Optionally accumulate ``loss_fn``'s batch, then add noise once and step the optimizer."""
        if loss_fn is not None:
            self.accumulate(loss_fn, is_padding=is_padding, groups=groups)
        stats = self.engine.finalize()
        self.optimizer.step()
        return stats

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: float,
                 noise_multiplier: float, expected_batch_size: float, method: str = "bk-mixed",
                 generator: torch.Generator | None = None) -> DPOptimizer:
    """Wrap ``optimizer`` so that each ``step(loss_fn)`` is one DP-SGD step on ``model`` (Opacus-style).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Linear(3, 1)
        >>> opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=1.0,
        ...                    noise_multiplier=1.0, expected_batch_size=8)
        >>> x = torch.randn(8, 3)
        >>> stats = opt.step(lambda m: m(x).square().sum(1))
    """
    engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                      expected_batch_size=expected_batch_size, method=method, generator=generator)
    return DPOptimizer(optimizer, engine)


# ---- check_per_sample_norms ---------------------------------------------------------------------------------

class NormCheck(NamedTuple):
    """Per-sample gradient norms from the engine and from the loop reference, and whether they agree."""

    engine_norms: torch.Tensor
    reference_norms: torch.Tensor
    max_abs_error: float
    ok: bool


def check_per_sample_norms(model: nn.Module, loss_fn: Callable, batch, *, method: str = "bk-mixed",
                           groups: torch.Tensor | None = None, rtol: float = 1e-4,
                           atol: float = 1e-6) -> NormCheck:
    """Compare the engine's per-sample gradient norms on ``batch`` with one backward per sample.

    For users' own layers: a module without a rule goes to the vmap fallback, and this tells whether the
    result is right (e.g. the layer mixes rows of the batch, which no per-sample method can handle).

    Args:
        model: the model; its ``.grad`` fields are not touched.
        loss_fn: ``loss_fn(model, batch) -> Tensor (R,)`` per-row losses.
        batch: whatever ``loss_fn`` takes.
        method: the engine method to check.
    """
    def closure(m):
        return loss_fn(m, batch)

    def norms(m):
        engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0, method=m)
        try:
            return engine.accumulate(closure, groups=groups).norms.detach()
        finally:
            engine.close()

    ours, ref = norms(method), norms("loop")
    err = float((ours - ref).abs().max()) if ours.numel() else 0.0
    ok = bool(torch.allclose(ours, ref, rtol=rtol, atol=atol))
    return NormCheck(ours, ref, err, ok)
