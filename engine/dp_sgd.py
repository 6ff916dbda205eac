"""DP-SGD gradients for any nn.Module: per-sample clipping at about the cost of non-private training.

After :meth:`DPEngine.finalize`, every trainable parameter's ``.grad`` holds

    ( Σ_i c_i g_i + N(0, σ² C² I) ) / L,    c_i = min(1, C / (‖g_i‖₂ + 1e-6)),

with g_i the gradient of sample i's loss over ALL trainable parameters together (one global norm per sample),
C = ``max_grad_norm``, σ = ``noise_multiplier`` and L = ``expected_batch_size``: Algorithm 1 of Abadi et al.
(arXiv 1607.00133) with the batch drawn by Poisson sampling (:class:`privimage.engine.PoissonSampler`). Any
torch optimizer then steps. The algorithm, stage by stage, and where each stage lives:

==========================================  ======================================================
Abadi et al., Algorithm 1                   here
==========================================  ======================================================
compute gradient g_t(x_i)                   :mod:`~privimage.engine.capture` (A, G per layer; one backward)
clip: ḡ_t(x_i) = g_t(x_i) / max(1, ‖g‖/C)   :mod:`~privimage.engine.clipping` (norms, c_i), layer rules
Σ_i ḡ_t(x_i)                                :mod:`~privimage.engine.clipping` (clipped sums), layer rules
add noise, divide by L                      :meth:`DPEngine.finalize` with :mod:`~privimage.engine.noise`
descend                                     the user's optimizer (:mod:`~privimage.engine.optimizer`)
==========================================  ======================================================

Methods (``method=``), one interface:

* ``"bk-mixed"`` (default): book-keeping (Bu et al. arXiv 2210.00038) with mixed ghost norms (Bu et al.
  arXiv 2205.10683): one forward and ONE backward, per-sample norms and clipped sums from each layer's
  (A, G) by its rule (:mod:`privimage.engine.layers`), per-layer plans by a cost model
  (:mod:`privimage.engine.plan`).
* ``"ghost"``: Opacus-style ghost clipping: norms as above, then a second, reweighted backward Σ c_i loss_i
  through autograd (Li et al. arXiv 2110.05679).
* ``"vmap"``: materialised per-sample gradients of every parameter by torch.func (each layer alone, vmap over
  rows of a vjp with its recorded input and output gradient); memory O(B · params). Also the fallback, per
  layer, for modules without a rule.
* ``"loop"``: one backward per sample (:mod:`privimage.engine.loop`); slow and obviously right.

Rows and samples: ``loss_fn`` returns one loss per row; a sample may span several rows (``groups``: K noise
draws of one image, whose gradient is the sum of its rows'), and padding rows (``is_padding``) count for
nothing (:class:`privimage.kernels.Grouping`).

Public vs private: ``max_grad_norm``, ``noise_multiplier`` and ``expected_batch_size`` are public mechanism
parameters; the drawn batch size is private and is never used as the divisor (a Poisson batch's size leaks
membership). ``StepStats`` counts are private too: log them only in aggregate.

Many processes (``process_group=``): the ranks of a torch.distributed group compute one logical batch
together (each its slice), one all-reduce sums their clipped sums and the noise is drawn once, by rank 0:
:mod:`privimage.engine.distributed` (contract, maths, a 20-line example).

Compile (``compile=True``, bk-mixed only; opt-in): the forward and stages 2 and 3 run as compiled graphs;
what stays eager and why: :mod:`privimage.engine.compiled`. Precision: under bf16 autocast the layers run in
bf16; norms and sums run with autocast off and accumulate in float32 (:mod:`privimage.engine.clipping`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from privimage.engine import loop
from privimage.engine.capture import LayerCalls, Probes, find_layers, run_loss
from privimage.engine.clipping import Layer, clip_factors, clipped_sums, norms_and_clip
from privimage.engine.compiled import CompiledRegions
from privimage.engine.layers import VMAP_RULE, Factors
from privimage.engine.noise import ClippedSum, add_gaussian_noise
from privimage.engine.plan import DEFAULT_COSTS, NORM_STRATEGIES, CostModel, Planner
from privimage.kernels import Grouping
from privimage.kernels.forms import as_acc

__all__ = ["DPEngine", "METHODS", "StepStats"]

logger = logging.getLogger(__name__)

METHODS = ("bk-mixed", "ghost", "vmap", "loop")


@dataclass
class StepStats:
    """What one :meth:`DPEngine.accumulate` (or, summed, one :meth:`DPEngine.finalize`) saw.

    ``losses``, ``norms`` and ``clip_factors`` are per-row / per-sample tensors (accumulate only; None in
    finalize). ``num_samples`` counts non-padding samples, ``num_nonfinite`` the samples whose gradient held
    NaN/inf and were dropped (they contribute zero), ``loss_sum`` (finalize) the sum of the non-padding rows'
    losses. All are private data: log them only in aggregate. Under a process group, finalize's counts are
    the whole logical batch's (summed over the ranks).
    """

    num_samples: int | torch.Tensor
    num_nonfinite: int | torch.Tensor
    losses: torch.Tensor | None = None
    loss_sum: float | None = None  # finalize only: the logical batch's summed non-padding row losses
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
        expected_batch_size: L, the public expected logical batch size (e.g. sample_rate · N), the divisor.
        method: "bk-mixed" (default), "ghost", "vmap" or "loop" (module docstring).
        generator: source of the noise (pass :func:`privimage.engine.secure_generator` for secure mode).
        compile: compile the forward and the post-backward work (:mod:`privimage.engine.compiled`); bk-mixed
            only, off by default. The first step compiles (slow for a UNet); keep the physical batch size
            fixed (pad Poisson batches) or every new size recompiles.
        compile_backend: the ``torch.compile`` backend ("inductor"; tests use "aot_eager").
        norm_strategy: how Linear and Conv2d weights get their per-sample norms (bk-mixed and ghost):
            "auto" (default: the per-layer cost model), or forced for every layer that can take it:
            "materialise" (per-row, or for a convolution whose samples all have k > 1 rows per-sample,
            gradients formed by torch; kept for the clipped sum when small enough),
            "fused" (the fused norm kernel; its torch path where Triton does not run) or "ghost" (ghost
            norms). A convolution called more than once per step takes only "materialise". Every strategy
            computes the same clipped sums; forcing one is for benchmarks (:mod:`privimage.engine.plan`).
        cost_model: the cost model's coefficients: a :class:`~privimage.engine.plan.CostModel`, or the path
            of a JSON file of measured coefficients per device (:meth:`CostModel.load`); default: the
            built-in coefficients for the model's device.
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``) whose ranks
            compute one logical batch together: each rank accumulates its slice, :meth:`finalize` all-reduces
            the clipped sums once and the noise is drawn once, on the group's rank 0 from ITS ``generator``
            (std σC for any world size). Construction refuses ranks whose settings or parameters differ.
            Contract, maths and an example: :mod:`privimage.engine.distributed`. ``None``: one process.
        check_every: with a process group, assert every this many finalize calls that the parameters are
            bit-identical on every rank (a 64-bit fingerprint, one tiny all-gather); ``None`` or 0: never.

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
                 compile_backend: str = "inductor", norm_strategy: str = "auto",
                 cost_model: CostModel | str | os.PathLike | None = None, process_group=None,
                 check_every: int | None = 100):
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
        if norm_strategy not in NORM_STRATEGIES:
            raise ValueError(f"Expected norm_strategy={norm_strategy!r} to be one of {NORM_STRATEGIES}.")
        if norm_strategy != "auto" and method not in ("bk-mixed", "ghost"):
            raise ValueError(f"norm_strategy={norm_strategy!r} needs method='bk-mixed' or 'ghost' (got {method!r}, "
                             f"which takes every layer's per-sample gradients its own way).")
        _refuse_batchnorm(model)
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.method = method
        self.generator = generator
        self.compile = bool(compile)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("The model has no trainable parameters (all have requires_grad=False).")
        device = self.params[0].device
        if cost_model is None:
            cost_model = DEFAULT_COSTS.get(device.type, CostModel())
        elif not isinstance(cost_model, CostModel):
            cost_model = CostModel.load(cost_model, device)
        self.planner = Planner(norm_strategy, cost_model, clip_by_backward=method == "ghost")
        layers = find_layers(model, every_layer_by_vmap=method == "vmap")
        self._probes = Probes(model, layers, compile_backend=compile_backend if self.compile else None,
                              on_grad=self._reduce_early)
        self._regions = CompiledRegions(compile_backend) if self.compile else None
        self._grouping = None  # the step's Grouping while its backward runs
        self.check_every = int(check_every or 0)
        self._reducer = self._join(process_group) if process_group is not None else None
        self._finalized = 0
        self._reset()

    def _join(self, group):
        """The one all-reduce per step over ``group``, after refusing ranks that disagree (settings, weights)."""
        from privimage.engine import distributed

        reducer = distributed.GradientReducer(group)
        distributed.check_backend_device(self.params, group)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        distributed.refuse_mismatch(distributed.engine_settings(self, named), group, "the DP engine's settings")
        distributed.check_replicas(self.params, group, "initial parameters")
        return reducer

    # ---- the mechanism ------------------------------------------------------------------------------------

    def accumulate(self, loss_fn: Callable[[nn.Module], torch.Tensor], *, is_padding: torch.Tensor | None = None,
                   groups: torch.Tensor | None = None) -> StepStats:
        """Add one physical batch's clipped sum Σ_i c_i g_i to the logical batch's.

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
        # g_i, factored: every layer's inputs A and output gradients G, from one forward and one backward
        losses, grouping, records = self._capture(loss_fn, is_padding, groups)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        with torch.autocast(losses.device.type, enabled=False):
            layers = self._layers(records, grouping)
            # ‖g_i‖ over all parameters, and c_i = min(1, C / (‖g_i‖ + 1e-6)); 0 for padding and NaN/inf
            norms, c, finite, num_real, num_nonfinite = self._norms_and_clip(layers, grouping, dtype, losses.device)
            self._num_samples = self._num_samples + num_real
            self._num_nonfinite = self._num_nonfinite + num_nonfinite
            self._loss_sum = self._loss_sum + self._masked_total(losses.detach().to(dtype), grouping)
            # Σ_i c_i g_i, added to the logical batch's sums
            for clipped in self._clipped_sums(layers, losses, grouping, c, finite):
                for p, g in clipped.items():
                    if g is not None:
                        self._add(p, g)
        return StepStats(num_samples=self._num_samples, num_nonfinite=self._num_nonfinite,
                         losses=losses.detach(), norms=norms, clip_factors=c)

    def finalize(self) -> StepStats:
        """Noise once for the logical batch: ``p.grad = (Σ_i c_i g_i + N(0, σ²C²I)) / L``; reset the sums.

        Without any ``accumulate`` since the last finalize (an empty Poisson batch), ``.grad`` is noise alone.
        """
        tensors = tuple(self._sums[p] if p in self._sums else
                        torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                        for p in self.params)
        counts = (self._num_samples, self._num_nonfinite, self._loss_sum)
        reducer = self._reducer
        if reducer is not None and self.check_every and self._finalized and self._finalized % self.check_every == 0:
            from privimage.engine.distributed import check_replicas
            check_replicas(self.params, reducer.group)
        if reducer is None or reducer.is_noise_rank:  # the noise is drawn once, by one rank
            tensors = add_gaussian_noise(ClippedSum(tensors, l2_sensitivity=self.max_grad_norm),
                                         noise_multiplier=self.noise_multiplier, generator=self.generator)
        if reducer is not None:  # Σ_ranks (every rank's clipped sum; rank 0's with the noise)
            tensors, counts = reducer.all_reduce(tensors, counts)
        for p, t in zip(self.params, tensors):
            p.grad = (t / self.expected_batch_size).to(p.dtype)
        self._finalized += 1
        stats = StepStats(num_samples=int(counts[0]), num_nonfinite=int(counts[1]), loss_sum=float(counts[2]))
        if stats.num_nonfinite:
            logger.warning("DP step dropped %d sample(s) whose gradient was NaN/inf (they contribute zero).",
                           stats.num_nonfinite)
        self._reset()
        return stats

    def step(self, loss_fn, *, is_padding=None, groups=None) -> StepStats:
        """``accumulate`` then ``finalize``: one logical batch in one physical batch."""
        stats = self.accumulate(loss_fn, is_padding=is_padding, groups=groups)
        final = self.finalize()
        stats.num_samples, stats.num_nonfinite, stats.loss_sum = final.num_samples, final.num_nonfinite, final.loss_sum
        return stats

    def close(self) -> None:
        """Remove the engine's forward hooks from the model (after which the engine cannot be used)."""
        self._probes.close()

    # ---- the stages ---------------------------------------------------------------------------------------

    def _capture(self, loss_fn, is_padding, groups):
        """Stage 1 (:mod:`privimage.engine.capture`): losses (R,), the rows' Grouping, {module: LayerCalls}."""
        losses, records = self._probes.forward(loss_fn, self.params)
        grouping = self._rows(losses, is_padding, groups)
        for rec in records.values():
            for a, _ in rec.calls:
                if rec.rule is not VMAP_RULE and a.shape[0] != grouping.num_rows:
                    raise ValueError(f"Module '{rec.name}' saw a batch of {a.shape[0]} rows but loss_fn returned "
                                     f"{grouping.num_rows} losses: per-sample rules need row r of every layer to be "
                                     f"sample r's.")
        total = self._masked_total(losses, grouping)
        if not total.requires_grad:
            raise ValueError("The loss does not depend on any trainable parameter.")
        self._grouping = grouping
        try:
            self._probes.backward(total, retain_graph=self.method == "ghost")
        finally:
            self._grouping = None
        return losses, grouping, records

    def _reduce_early(self, rec: LayerCalls) -> None:
        """During the backward: a single-call layer whose plan keeps its gradients is reduced at once, so
        its G is freed during the backward pass instead of living until the clip factors are known."""
        if len(rec.calls) == 1 and self.method in ("bk-mixed", "vmap"):
            calls = [tuple(rec.calls[0])]
            with torch.autocast(calls[0][1].device.type, enabled=False):
                rec.plan = self._plan(rec, calls, self._grouping)
                if rec.plan.keep:
                    rec.sq = rec.rule.sq_norms(rec.module, calls, self._grouping, rec.plan, rec.kept)
                    rec.calls = None  # everything the clipped sum needs is in rec.kept

    def _plan(self, rec: LayerCalls, calls, grouping):
        plan = rec.rule.plan(rec.module, calls, grouping, self.planner)
        self.planner.log(rec.name, rec.module, plan)
        return plan

    def _layers(self, records, grouping) -> list[Layer]:
        """Every layer whose output reached the loss, with its plan (made eagerly: a cost model on shapes)."""
        layers = []
        for rec in records.values():
            if rec.sq is None:
                rec.calls = [(a, g) for a, g in rec.calls if g is not None]
                if not rec.calls:
                    continue  # the layer's output did not reach the loss: no gradient
                if rec.plan is None:
                    rec.plan = self._plan(rec, rec.calls, grouping)
                if self._regions is not None and rec.rule is VMAP_RULE:
                    # torch.func inside a compiled region is not worth its trace: fallback layers (no rule of
                    # their own) stay eager and enter the region as finished norms.
                    rec.sq = rec.rule.sq_norms(rec.module, rec.calls, grouping, rec.plan, rec.kept)
                    rec.calls = None
            layers.append(Layer(rec.module, rec.rule, rec.plan, rec.calls or [], rec.sq, rec.kept))
        return layers

    def _norms_and_clip(self, layers, grouping, dtype, device):
        """Stage 2 (:mod:`privimage.engine.clipping`), eager or as a compiled region."""
        if self._regions is None:
            return norms_and_clip(layers, grouping, self.max_grad_norm, dtype, device)
        return self._regions.norms_and_clip(layers, grouping, self.max_grad_norm, dtype, device)

    def _clipped_sums(self, layers, losses, grouping, c, finite):
        """Stage 3: [{param: Σ_i c_i g_i}] by the layer rules, or for ``method="ghost"`` by a second backward.

        A NaN/inf sample needs its rows zeroed first (0·NaN = NaN): a data-dependent branch, one host sync."""
        factors = Factors(c, grouping.to_rows(c), grouping)
        sanitize = not bool(finite.all())
        row_ok = grouping.to_rows(finite) if sanitize else None
        if self.method == "ghost" and not sanitize:
            weighted = self._masked_total(losses * factors.c_row.to(losses.dtype), grouping)
            return [dict(zip(self.params, torch.autograd.grad(weighted, self.params, allow_unused=True)))]
        if self._regions is None:
            return clipped_sums(layers, factors, row_ok)
        return self._regions.clipped_sums(layers, factors, row_ok)

    def _accumulate_loop(self, loss_fn, is_padding, groups):
        """``method="loop"`` (:mod:`privimage.engine.loop`): each sample by its own backward pass."""
        losses = run_loss(loss_fn, self.model)
        grouping = self._rows(losses, is_padding, groups)
        grads = loop.per_sample_grads(self.model, loss_fn, losses, grouping, self.params)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        norms, c, finite, real = clip_factors(loop.sq_norms(grads, grouping, dtype, losses.device), grouping,
                                              self.max_grad_norm)
        self._num_samples = self._num_samples + real.sum()
        self._num_nonfinite = self._num_nonfinite + (~finite & real).sum()
        self._loss_sum = self._loss_sum + self._masked_total(losses.detach().to(dtype), grouping)
        for p, g in loop.clipped_sum(grads, c, finite, self.params).items():
            self._add(p, g)
        return StepStats(num_samples=self._num_samples, num_nonfinite=self._num_nonfinite,
                         losses=losses.detach(), norms=norms, clip_factors=c)

    # ---- small pieces -------------------------------------------------------------------------------------

    @staticmethod
    def _rows(losses, is_padding, groups) -> Grouping:
        """The step's rows → samples map, checked, with every derived index computed now (host syncs), so
        that the plans and the compiled regions only read them."""
        R, device = losses.shape[0], losses.device
        grouping = Grouping(groups.to(device) if groups is not None else None, R,
                            is_padding=is_padding.to(device) if is_padding is not None else None, name="groups")
        grouping.resolve()
        return grouping

    @staticmethod
    def _masked_total(losses, grouping):
        pad = grouping.is_padding
        if pad is None:
            return losses.sum()
        return torch.where(pad, torch.zeros_like(losses), losses).sum()

    def _add(self, param, tensor):
        tensor = as_acc(tensor)
        self._sums[param] = self._sums[param] + tensor if param in self._sums else tensor

    def _reset(self):
        self._sums: dict[nn.Parameter, torch.Tensor] = {}
        self._num_samples = 0
        self._num_nonfinite = 0
        self._loss_sum = 0.0
