"""Per-layer rules: per-sample gradient norms and clipped gradient sums from a layer's inputs and output grads.

A rule sees, for one module, every call of the forward pass as ``(A, G)``: ``A`` the input the module got,
``G`` the gradient of the summed loss with respect to its output (caught by the engine's output probes).
From these, never running a second backward pass (book-keeping, Bu et al. arXiv 2210.00038), it gives

* ``plan(module, calls, grouping, planner) -> Plan``: how (:mod:`privimage.engine.plan`);
* ``sq_norms(module, calls, grouping, plan, kept) -> (S,)``: each sample's squared gradient norm over the
  module's trainable parameters, storing any gradients it keeps in ``kept`` {param: (R, *shape)}, or
  (S, *shape) per sample when ``plan.per_sample``;
* ``clipped(module, calls, factors, plan, kept) -> {param: Σ_s c_s g_s}``: the clipped sum.

Rows and samples: ``A`` and ``G`` have one leading row per loss row (R); a sample may span several rows and
:class:`privimage.kernels.Grouping` maps rows to samples (and marks padding). Per-row factors suffice for a
clipped sum (Σ_s c_s Σ_{r∈s} g_r = Σ_r c_{s(r)} g_r); the norms need the grouping. Every per-sample op is a
:mod:`privimage.kernels` op, handed the step's grouping (checked once per step); the kernels' dispatch picks its
backend.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage import kernels
from privimage.engine.plan import Plan, Planner
from privimage.kernels import Grouping
from privimage.kernels.dispatch import TRITON, backend
from privimage.kernels.forms import as_acc, linear_per_row_grads, sq_norms_of

__all__ = ["RULES", "VMAP_RULE", "Factors", "rule_for"]


class Factors(NamedTuple):
    """The clip factors of one step: ``c`` (S,) per sample, ``c_row`` (R,) per row, and the grouping."""

    c: torch.Tensor
    c_row: torch.Tensor
    grouping: Grouping


def _trainable(module: nn.Module, name: str):
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


def _held(calls) -> int:
    """Numbers of inputs and output gradients the layer holds (what keeping gradients is weighed against)."""
    return sum(a.numel() + g.numel() for a, g in calls if isinstance(a, torch.Tensor))


def _weighted_sum(c_row: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """Σ_r c_r x_r for x (R, ...), accumulated in float32 or wider."""
    x = as_acc(per_row)
    return torch.tensordot(c_row.to(x.dtype), x, dims=1)


def _kept_sums(factors: Factors, kept: dict, plan: Plan) -> dict:
    """Σ c x over the kept gradients: per-sample factors for a per-sample plan's (S, ...), else per-row."""
    c = factors.c if plan.per_sample else factors.c_row
    return {p: _weighted_sum(c, g) for p, g in kept.items()}


# ---- Linear ------------------------------------------------------------------------------------------------

class LinearRule:
    """nn.Linear on inputs (R, *, d): T = product of the extra dims (tokens), all calls concatenated on T."""

    @staticmethod
    def _forms(calls, R):
        A = torch.cat([a.reshape(R, -1, a.shape[-1]) for a, _ in calls], 1)
        G = torch.cat([g.reshape(R, -1, g.shape[-1]) for _, g in calls], 1)
        return A, G

    def plan(self, module, calls, grouping: Grouping, planner: Planner) -> Plan:
        R = calls[0][0].shape[0]
        T = sum(a[0].numel() // a.shape[-1] for a, _ in calls)
        d, p = module.in_features, module.out_features
        detail = f"T={T * max(grouping.k, 1)} d={d} p={p}"
        if _trainable(module, "weight") is None:
            return Plan("bias", True, detail)
        # The keep rule weighs a sample's positions as its ghost norms see them: its rows folded (k·T).
        return planner.weight(rows=R, positions=T, K=d, P=p, groups=1, sum_sq_rows=grouping.sum_sq_rows,
                              uniform=grouping.uniform, held=_held(calls), keep_positions=T * max(grouping.k, 1),
                              fused_runs=backend("per_sample_sq_norms", calls[0][1]) == TRITON, single_call=True,
                              detail=detail)

    def sq_norms(self, module, calls, grouping, plan: Plan, kept: dict):
        R = calls[0][0].shape[0]
        A, G = self._forms(calls, R)
        total = 0
        w, b = _trainable(module, "weight"), _trainable(module, "bias")
        if b is not None:
            gb = G.sum(1)
            kept[b] = gb
            total = total + sq_norms_of(grouping.to_samples(gb))
        if w is None:
            return total
        if plan.norm == "ghost":
            return total + kernels.ghost_sq_norms(A, G, grouping=grouping)
        if plan.norm == "fused":
            return total + kernels.per_sample_sq_norms(A, G, grouping=grouping)
        if plan.keep:
            gw = linear_per_row_grads(A, G)
            kept[w] = gw
            return total + sq_norms_of(grouping.to_samples(gw))
        if grouping.uniform:  # a sample's rows become positions: one GEMM per sample, nothing per row
            return total + sq_norms_of(linear_per_row_grads(grouping.fold(A), grouping.fold(G)))
        return total + sq_norms_of(grouping.to_samples(linear_per_row_grads(A, G)))

    def clipped(self, module, calls, factors: Factors, plan: Plan, kept: dict):
        out = _kept_sums(factors, kept, plan)
        w = _trainable(module, "weight")
        if w is not None and w not in out:
            A, G = self._forms(calls, factors.c_row.shape[0])
            out[w] = kernels.clipped_weight_grad(A, G, factors.c, grouping=factors.grouping).view(w.shape)
        return out


# ---- Conv2d ------------------------------------------------------------------------------------------------

class Conv2dRule:
    """nn.Conv2d, any stride/padding/dilation/groups/padding_mode."""

    @staticmethod
    def _geometry(module: nn.Conv2d, a: torch.Tensor):
        """(input as the convolution sees it, int padding): applies padding_mode / string padding to A."""
        if module.padding_mode != "zeros":
            return F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
        if isinstance(module.padding, str):
            if module.padding == "valid":
                return a, (0, 0)
            return F.pad(a, module._reversed_padding_repeated_twice), (0, 0)
        return a, module.padding

    def _kw(self, module, padding):
        return dict(stride=module.stride, padding=padding, dilation=module.dilation, groups=module.groups)

    def plan(self, module, calls, grouping: Grouping, planner: Planner) -> Plan:
        R = calls[0][0].shape[0]
        g = module.groups
        K = module.in_channels // g * module.kernel_size[0] * module.kernel_size[1]
        P = module.out_channels // g
        T = calls[0][1][0, 0].numel()
        detail = f"T={T} d={K} p={P} groups={g}"
        if _trainable(module, "weight") is None:
            return Plan("bias", True, detail)
        # k > 1 rows per sample, as many for every sample: materialise per sample (rows summed in the GEMM)
        per_sample = grouping.num_samples if grouping.k > 1 else None
        return planner.weight(rows=R, positions=T, K=K, P=P, groups=g, sum_sq_rows=grouping.sum_sq_rows,
                              uniform=grouping.uniform, held=_held(calls), keep_positions=T,
                              fused_runs=backend("per_sample_sq_norms", calls[0][1]) == TRITON,
                              single_call=len(calls) == 1, detail=detail, per_sample_rows=per_sample)

    def sq_norms(self, module, calls, grouping, plan: Plan, kept: dict):
        w, b = _trainable(module, "weight"), _trainable(module, "bias")
        total = 0
        if b is not None:
            gb = sum(g.sum((2, 3)) for _, g in calls)
            gb_samples = grouping.to_samples(gb)
            kept[b] = gb_samples if plan.per_sample else gb  # a per-sample plan keeps everything per sample
            total = total + sq_norms_of(gb_samples)
        if w is None:
            return total
        if plan.norm in ("ghost", "fused"):
            (a, g), = calls
            a, padding = self._geometry(module, a)
            op = kernels.conv_ghost_sq_norms if plan.norm == "ghost" else kernels.conv_per_sample_sq_norms
            return total + op(a, g, module.kernel_size, **self._kw(module, padding), grouping=grouping)
        gw = None
        for a, g in calls:
            a, padding = self._geometry(module, a)
            if plan.per_sample:  # rows as k blocks of S: the GEMM sums each sample's rows
                a, g = grouping.blocks(a), grouping.blocks(g)
            part = kernels.conv_per_row_grads(a, g, module.kernel_size, **self._kw(module, padding),
                                              blocks=grouping.k if plan.per_sample else 1)
            gw = part if gw is None else gw + part
        if plan.keep:
            kept[w] = gw
        return total + sq_norms_of(gw if plan.per_sample else grouping.to_samples(gw))

    def clipped(self, module, calls, factors: Factors, plan: Plan, kept: dict):
        out = _kept_sums(factors, kept, plan)
        w = _trainable(module, "weight")
        if w is not None and w not in out:
            gw = 0
            for a, g in calls:
                a, padding = self._geometry(module, a)
                gw = gw + kernels.conv_clipped_weight_grad(a, g, factors.c, module.kernel_size,
                                                           **self._kw(module, padding), grouping=factors.grouping)
            out[w] = gw
        return out


# ---- GroupNorm / LayerNorm affine ---------------------------------------------------------------------------

class _NormRule:
    """Affine parameters of a normalisation layer: per-row grads (R, C) are tiny, always kept."""

    def plan(self, module, calls, grouping, planner):
        return Plan("affine", True, "affine")

    def affine_grads(self, module, a, g, grouping):
        """One call's per-row (∇γ, ∇β) (Σ g ∘ x̂ and Σ g over the positions), padding rows zero."""
        raise NotImplementedError

    def sq_norms(self, module, calls, grouping, plan: Plan, kept: dict):
        w, b = _trainable(module, "weight"), _trainable(module, "bias")
        per_call = [self.affine_grads(module, a, g, grouping) for a, g in calls]
        total = 0
        for i, param in enumerate((w, b)):
            if param is None:
                continue
            grad = sum(grads[i] for grads in per_call)
            kept[param] = grad
            total = total + sq_norms_of(grouping.to_samples(grad))
        return total

    def clipped(self, module, calls, factors: Factors, plan: Plan, kept: dict):
        return _kept_sums(factors, kept, plan)


class GroupNormRule(_NormRule):
    def affine_grads(self, module, a, g, grouping):
        return kernels.group_norm_grads(a, g, module.num_groups, eps=module.eps, is_padding=grouping.is_padding)


class LayerNormRule(_NormRule):
    def affine_grads(self, module, a, g, grouping):
        return kernels.layer_norm_grads(a, g, module.normalized_shape, eps=module.eps, is_padding=grouping.is_padding)


# ---- Embedding ---------------------------------------------------------------------------------------------

class EmbeddingRule:
    """nn.Embedding: ghost norm with AAᵀ the index-equality matrix (cost T²·D); clipped sum by index_add."""

    def plan(self, module, calls, grouping, planner):
        if not grouping.uniform:
            return Plan("embedding", True, f"V={module.num_embeddings} D={module.embedding_dim}")
        return Plan("ghost", False, f"V={module.num_embeddings} D={module.embedding_dim}")

    @staticmethod
    def _forms(module, calls, R):
        idx = torch.cat([a.reshape(R, -1) for a, _ in calls], 1)
        G = torch.cat([g.reshape(R, -1, module.embedding_dim) for _, g in calls], 1)
        if module.padding_idx is not None:  # the padding row's gradient is zero by definition
            G = G * (idx != module.padding_idx).unsqueeze(-1).to(G.dtype)
        return idx, G

    def sq_norms(self, module, calls, grouping, plan: Plan, kept: dict):
        w = module.weight
        R = calls[0][0].shape[0]
        idx, G = self._forms(module, calls, R)
        if plan.keep:
            per_row = G.new_zeros(R, *w.shape)
            per_row.scatter_add_(1, idx.unsqueeze(-1).expand_as(G), G)
            kept[w] = per_row
            return sq_norms_of(grouping.to_samples(per_row))
        idx, G = grouping.fold(idx), as_acc(grouping.fold(G))
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(G.dtype)
        return (same * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))

    def clipped(self, module, calls, factors: Factors, plan: Plan, kept: dict):
        w = module.weight
        if kept:
            return _kept_sums(factors, kept, plan)
        idx, G = self._forms(module, calls, factors.c_row.shape[0])
        scaled = as_acc(G * factors.c_row.to(G.dtype).view(-1, 1, 1))
        out = scaled.new_zeros(w.shape)
        return {w: out.index_add_(0, idx.reshape(-1), scaled.reshape(-1, w.shape[1]))}


# ---- Fallback: torch.func per-sample gradients for one module ----------------------------------------------

def autocast_state() -> tuple:
    """The autocast settings in force now, per device type: ((device_type, enabled, dtype), ...)."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


@contextlib.contextmanager
def replay_autocast(state: tuple):
    """Run a block under the autocast settings ``state`` (:func:`autocast_state`) recorded at forward time."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


class VmapRule:
    """Any other module with parameters: per-row grads of its own parameters by vmap over a vjp.

    Row r's gradient is the vjp of ``module(args_r)`` with its output gradient G_r; exact for any module
    that treats rows independently (no BatchNorm-like mixing, which the engine refuses up front). Each call
    is replayed under the autocast state of its forward (recorded by the capture): under bf16 autocast its
    inputs are bf16 and the replay must cast as the forward did.
    """

    def plan(self, module, calls, grouping, planner):
        return Plan("vmap", True, type(module).__name__)

    def sq_norms(self, module, calls, grouping, plan: Plan, kept: dict):
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        names = list(params)
        R = calls[0][1].shape[0]
        grads = {n: 0 for n in names}
        for (autocast, args), g in calls:
            dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == R else None
                         for a in args)

            def row_grad(g_r, *args_r):
                batched = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args_r, dims))
                detached = {n: p.detach() for n, p in params.items()}
                _, vjp_fn = torch.func.vjp(
                    lambda ps: torch.func.functional_call(module, ps, batched), detached)
                return vjp_fn(g_r.unsqueeze(0))[0]

            with replay_autocast(autocast):  # the inputs may be autocast's bf16: replay the forward as it ran
                per_row = torch.vmap(row_grad, in_dims=(0,) + dims)(g, *args)
            for n in names:
                grads[n] = grads[n] + per_row[n]
        total = 0
        for n in names:
            kept[params[n]] = grads[n]
            total = total + sq_norms_of(grouping.to_samples(grads[n]))
        return total

    def clipped(self, module, calls, factors: Factors, plan: Plan, kept: dict):
        return _kept_sums(factors, kept, plan)


RULES = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.Embedding: EmbeddingRule(),
}
VMAP_RULE = VmapRule()


def rule_for(module: nn.Module):
    """The rule for ``module``'s own parameters: exact type match only (a subclass may change forward)."""
    rule = RULES.get(type(module))
    if rule is None:
        return None
    if isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse or module.max_norm):
        return None  # batch-dependent gradient scaling or in-place renorm: let the vmap rule handle (or fail)
    if {n for n, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}:
        return None
    return rule
