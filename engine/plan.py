"""The per-layer plan: how each layer's per-sample norms and clipped sum are computed, by a small cost model.

A Linear or Conv2d weight gradient of row r is G_rᵀA_r (inputs A, output gradients G; a convolution's A is
its im2col matrix). Three ways to get each sample's ‖Σ_{r∈s} G_rᵀA_r‖ (``Plan.norm``):

* ``"materialise"``: form the per-row gradients in torch (one batched GEMM, or one grouped convolution,
  :func:`privimage.kernels.conv_per_row_grads`) and square their per-sample sums; a convolution whose
  samples all have k > 1 rows forms the per-SAMPLE gradients instead (the k rows summed inside the grouped
  convolution: same work, k times less to hold; ``Plan.per_sample``). When they are small enough
  (:func:`keep_allowed`) they are KEPT, and the clipped sum is one weighted reduction of them;
* ``"fused"``: the fused kernel :func:`privimage.kernels.per_sample_sq_norms` (tile by tile in registers,
  never written; Triton, so it pays only where :mod:`privimage.kernels.dispatch` runs Triton);
* ``"ghost"``: ghost norms ⟨A_sA_sᵀ, G_sG_sᵀ⟩ (Goodfellow arXiv 1510.01799; Li et al. arXiv 2110.05679),
  cheaper when a sample's positions are few against K·P (mixed ghost norms, Bu et al. arXiv 2205.10683).

Every way but a kept materialisation then forms the clipped sum as one GEMM with the clip factors folded
into G (book-keeping, Bu et al. arXiv 2210.00038; :func:`privimage.kernels.clipped_weight_grad`).

Cost model (:class:`CostModel`): estimated time = coefficient × work, for a layer of R rows of T positions,
n_s rows in sample s, K inputs and P outputs per group, g groups:

=================================  =========================  ======================
way                                work                       coefficient
=================================  =========================  ======================
materialised norms                 F = g·R·T·K·P              ``materialise``
fused norms                        F                          ``fused``
ghost norms                        g·T²·Σ_s n_s²·(K+P)        ``ghost``
clipped-sum GEMM (not kept)        F                          ``clipped_sum``
weighted sum of kept gradients     g·R·K·P                    ``kept_sum``
=================================  =========================  ======================

The plan is the cheapest candidate, ties going to the first of: materialise and keep, fused, materialise,
ghost. The defaults (:data:`DEFAULT_COSTS`, the same for every device until a device is measured) compare
the norms' work alone (norm coefficients 1, sum coefficients 0): that is Bu et al.'s mixed ghost-norm rule
(ghost iff g·T²·Σn_s²·(K+P) < F), then keep-if-allowed, then fused where Triton runs. Measured coefficients
for a device are loaded from a JSON file (:meth:`CostModel.load`; the GPU suite writes one).

``DPEngine(..., norm_strategy=...)`` forces one way for every layer that can take it (``"auto"``: the cost
model). Forcing ``"fused"`` where Triton does not run calls the same op, which then runs its torch path.

Keeping per-row gradients (R·K·P numbers; S·K·P per sample) saves the clipped sum's GEMM (R·T·K·P multiply-adds), so the saving
per byte kept grows with the positions T. :func:`keep_allowed`: keep when they are no larger than the inputs
and output gradients the layer holds anyway (A + G; G is then freed during the backward pass), or, up to
``KEEP_FACTOR`` times that, when T >= ``KEEP_MIN_POSITIONS`` (``KEEP_FACTOR = 0`` keeps nothing). The
measurements behind these numbers: bench/results/plan.md.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields

import torch

__all__ = ["DEFAULT_COSTS", "KEEP_FACTOR", "KEEP_MIN_POSITIONS", "NORM_STRATEGIES", "CostModel", "Plan", "Planner",
           "keep_allowed"]

logger = logging.getLogger(__name__)

NORM_STRATEGIES = ("auto", "ghost", "fused", "materialise")

KEEP_FACTOR = 8.0
KEEP_MIN_POSITIONS = 256


@dataclass(frozen=True)
class Plan:
    """What the rule of one module does this step (logged once per distinct plan).

    ``norm``: "materialise", "fused" or "ghost" for a Linear/Conv2d weight; "affine" (normalisation layers),
    "embedding", "vmap" (the torch.func fallback) or "bias" (a layer whose only trainable parameter is its
    bias) otherwise. ``keep``: the materialised gradients are kept for the clipped sum. ``per_sample``: the
    rule materialises each sample's gradient (its rows summed inside the GEMM) rather than each row's, so
    what it keeps is per sample, (S, ...), and weighed by the per-sample clip factors.
    """

    norm: str
    keep: bool
    detail: str = ""
    per_sample: bool = False


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the per-layer cost model (module docstring): relative time per unit of work."""

    materialise: float = 1.0
    fused: float = 1.0
    ghost: float = 1.0
    clipped_sum: float = 0.0
    kept_sum: float = 0.0

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str) -> "CostModel":
        """The coefficients for ``device`` from a JSON file ``{"devices": {KEY: {coefficient: value}}}``.

        KEY is looked up as the CUDA device's name (``torch.cuda.get_device_name``), then the device type
        ("cuda", "cpu"); a device the file does not name gets :data:`DEFAULT_COSTS`. Unknown coefficient
        names are refused (a typo would silently keep a default).
        """
        try:
            table = json.loads(open(path).read())["devices"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected a JSON object with a 'devices' table of cost-model coefficients "
                             f"({e}).") from None
        device = torch.device(device)
        keys = [device.type]
        if device.type == "cuda" and torch.cuda.is_available():
            keys.insert(0, torch.cuda.get_device_name(device))
        for key in keys:
            if key in table:
                known = {f.name for f in fields(cls)}
                unknown = set(table[key]) - known
                if unknown:
                    raise ValueError(f"{path}: unknown cost-model coefficients {sorted(unknown)} for '{key}' "
                                     f"(known: {sorted(known)}).")
                return cls(**{k: float(v) for k, v in table[key].items()})
        return DEFAULT_COSTS.get(device.type, CostModel())

    def to_dict(self) -> dict:
        return asdict(self)


# The built-in coefficients per device type (module docstring); measured ones come from CostModel.load.
DEFAULT_COSTS = {"cpu": CostModel(), "cuda": CostModel()}


def keep_allowed(per_row_numel: int, held: int, positions: int) -> bool:
    """Whether materialised gradients of ``per_row_numel`` numbers in all may be kept, next to ``held`` numbers of
    inputs and output gradients, for a layer of ``positions`` positions (module docstring)."""
    limit = KEEP_FACTOR if positions >= KEEP_MIN_POSITIONS else min(KEEP_FACTOR, 1.0)  # 0: never keep
    return per_row_numel <= limit * held


class Planner:
    """Chooses each layer's :class:`Plan`: the forced strategy where the layer can take it, else the cheapest.

    Args:
        strategy: one of :data:`NORM_STRATEGIES`.
        costs: the cost model's coefficients for the device the step runs on.
        clip_by_backward: the clipped sum comes from a second backward pass (``method="ghost"``): nothing
            is kept, and the sums' costs do not count.
    """

    def __init__(self, strategy: str = "auto", costs: CostModel = CostModel(), clip_by_backward: bool = False):
        if strategy not in NORM_STRATEGIES:
            raise ValueError(f"Expected norm_strategy={strategy!r} to be one of {NORM_STRATEGIES}.")
        self.strategy = strategy
        self.costs = costs
        self.clip_by_backward = clip_by_backward
        self._logged: set = set()

    def weight(self, *, rows: int, positions: int, K: int, P: int, groups: int, sum_sq_rows: int, uniform: bool,
               held: int, keep_positions: int, fused_runs: bool, single_call: bool, detail: str,
               per_sample_rows: int | None = None) -> Plan:
        """The plan for a weight of ``groups`` groups of (P, K) over ``rows`` rows of ``positions`` positions.

        ``sum_sq_rows``: Σ_s n_s² (rows per sample, squared); ``uniform``: every sample has the same number
        of rows; ``held``: numbers of inputs and output gradients the layer holds; ``keep_positions``: the
        positions the keep rule weighs; ``fused_runs``: the fused kernels run here (Triton);
        ``single_call``: the module ran once (fused and ghost norms of a convolution need one call);
        ``per_sample_rows``: S when the rule materialises per-sample gradients (S of them to keep, same work),
        None when it materialises per row.
        """
        c = self.costs
        work = groups * rows * positions * K * P
        kept = groups * (per_sample_rows or rows) * K * P
        ghost = groups * positions * positions * sum_sq_rows * (K + P)
        sums = 0.0 if self.clip_by_backward else c.clipped_sum * work
        forced = self.strategy != "auto"
        candidates = []  # (norm, keep, estimated time), in tie-break order
        if not self.clip_by_backward and keep_allowed(kept, held, keep_positions):
            candidates.append(("materialise", True, c.materialise * work + c.kept_sum * kept))
        if single_call and (fused_runs or forced):
            candidates.append(("fused", False, c.fused * work + sums))
        candidates.append(("materialise", False, c.materialise * work + sums))
        if single_call and (uniform or fused_runs or forced):  # ragged groupings: a slow torch loop
            candidates.append(("ghost", False, c.ghost * ghost + sums))
        if forced and any(norm == self.strategy for norm, _, _ in candidates):
            candidates = [cand for cand in candidates if cand[0] == self.strategy]
        norm, keep, _ = min(candidates, key=lambda cand: cand[2])  # min keeps the first of equal costs
        return Plan(norm, keep, detail, per_sample=norm == "materialise" and per_sample_rows is not None)

    def log(self, name: str, module, plan: Plan) -> None:
        """Log ``plan`` once per (module name, plan)."""
        key = (name, plan)
        if key not in self._logged:
            self._logged.add(key)
            logger.info("DP layer %s (%s): %s norms%s [%s]", name, type(module).__name__, plan.norm,
                        (", per-sample grads kept" if plan.per_sample else ", per-row grads kept") if plan.keep else "",
                        plan.detail)
