"""Per-layer rules: per-sample gradient norms and clipped gradient sums from a layer's inputs and output grads.

A rule sees, for one module, every call of the forward pass as ``(A, G)``: ``A`` the input the module got,
``G`` the gradient of the summed loss with respect to its output (caught by the engine's output probes).
From these it gives

* ``sq_norms(...) -> (S,)``: each sample's squared gradient norm over the module's trainable parameters, and
* ``clipped(...) -> {param: Σ_r c_r g_r}``: the clipped sum, with per-row clip factors ``c``,

never running a second backward pass (book-keeping, Bu et al. arXiv 2210.00038). Each rule picks, per layer,
ghost norms (cost ~T²(d+p)) or materialised per-sample gradients (cost ~T·d·p) by whichever is cheaper
(mixed ghost norms, Bu et al. arXiv 2205.10683); the "ghost" method makes the same choice but keeps nothing,
since its second backward pass forms the clipped sum. Materialised per-sample gradients are kept for the clipped
sum (one weighted reduction instead of a second weight-gradient GEMM) when they are no larger than the
activations and output gradients the layer already holds, so keeping them at most doubles that layer's
footprint. The maths lives in :mod:`privimage.engine.ops`, the switch to fused kernels.

Rows and samples: ``A`` and ``G`` have one leading row per loss row (R). A sample may span several rows
(``groups``); :class:`Grouping` maps rows to samples. The clipped sum needs only per-row factors
(Σ_s c_s Σ_{r∈s} g_r = Σ_r c_{s(r)} g_r), so only the norms need the grouping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage.engine import ops


class Grouping:
    """Rows (R) to samples (S). ``groups`` (R,) long gives each row's sample id in [0, S); None: one row each."""

    def __init__(self, groups: torch.Tensor | None, num_rows: int):
        self.groups = groups
        self.num_rows = num_rows
        self.perm = None
        self.k = 1
        if groups is None:
            self.num_samples = num_rows
            return
        if groups.dim() != 1 or groups.shape[0] != num_rows or groups.dtype != torch.long:
            raise ValueError(f"Expected groups to be a LongTensor of shape ({num_rows},) (one sample id per "
                             f"loss row), got dtype {groups.dtype} and shape {tuple(groups.shape)}.")
        if num_rows and int(groups.min()) < 0:
            raise ValueError(f"Expected groups >= 0 (sample ids), got min {int(groups.min())}.")
        self.num_samples = int(groups.max()) + 1 if num_rows else 0
        counts = torch.bincount(groups, minlength=self.num_samples)
        if self.num_samples and bool((counts == counts[0]).all()):
            self.k = int(counts[0])  # every sample has k rows: ghost norms can fold rows into positions
            self.perm = torch.argsort(groups, stable=True)
        else:
            self.k = 0  # ragged: only materialised norms

    @property
    def trivial(self) -> bool:
        return self.groups is None

    @property
    def foldable(self) -> bool:
        return self.groups is None or self.k > 0

    def to_samples(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum a per-row tensor (R, ...) into per-sample values (S, ...)."""
        if self.groups is None:
            return per_row
        out = per_row.new_zeros((self.num_samples,) + tuple(per_row.shape[1:]))
        return out.index_add_(0, self.groups, per_row)

    def to_rows(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sample tensor (S, ...) back to the rows (R, ...)."""
        return per_sample if self.groups is None else per_sample[self.groups]

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(R, T, ...) to (S, k·T, ...): a sample's rows become extra positions (its gradient is their sum)."""
        if self.groups is None:
            return x
        x = x[self.perm]
        return x.reshape(self.num_samples, self.k * x.shape[1], *x.shape[2:])


@dataclass
class Plan:
    """What a rule decided for one module (logged once): norm method and whether per-row grads are kept."""

    norm: str  # "ghost" | "materialized" | "vmap"
    keep: bool
    detail: str = ""
    kept: dict = field(default_factory=dict)  # param -> per-row grads (R, *shape), when keep


def _trainable(module: nn.Module, name: str):
    p = getattr(module, name, None)
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


# Keeping a layer's per-sample gradients (R·P numbers) saves recomputing its clipped sum as a second
# weight-gradient GEMM (R·T·P multiply-adds), so the saving per byte kept grows with the positions T. Rule:
# keep when they are no larger than the activations and output gradients the layer holds anyway (A + G; G is
# then freed during the backward pass), or, up to KEEP_FACTOR times that, when T >= KEEP_MIN_POSITIONS
# (KEEP_FACTOR = 0 keeps nothing: every layer then uses the kernels' norm and clipped-sum ops).
# Otherwise the clipped sum is one GEMM with the clip factors folded into G, and the norm comes from ghost
# norms where those are cheaper. Measured on the stand-in UNet at batch 64 (bench/dp_step.py, 1 thread of
# the 2-core CPU): keeping every layer: 1.19x non-private time, 1.31x memory; not keeping the 8×8 layers
# (T=64): 1.20x time, 1.08x memory.
KEEP_FACTOR = 8.0
KEEP_MIN_POSITIONS = 256


def _small_enough(per_row_numel: int, calls, positions: int) -> bool:
    held = sum(a.numel() + g.numel() for a, g in calls if isinstance(a, torch.Tensor))
    limit = KEEP_FACTOR if positions >= KEEP_MIN_POSITIONS else min(KEEP_FACTOR, 1.0)  # 0: never keep
    return per_row_numel <= limit * held


# ---- Linear ------------------------------------------------------------------------------------------------

class LinearRule:
    """nn.Linear on inputs (R, *, d): T = product of the extra dims (tokens), all calls concatenated on T."""

    @staticmethod
    def _forms(calls, R):
        A = torch.cat([a.reshape(R, -1, a.shape[-1]) for a, _ in calls], 1)
        G = torch.cat([g.reshape(R, -1, g.shape[-1]) for _, g in calls], 1)
        return A, G

    def plan(self, module, calls, grouping: Grouping, mode: str) -> Plan:
        R = calls[0][0].shape[0]
        T = sum(a[0].numel() // a.shape[-1] for a, _ in calls) * max(grouping.k, 1)
        d, p = module.in_features, module.out_features
        w = _trainable(module, "weight")
        ghost_cost, mat_cost = T * T * (d + p), T * d * p
        if w is not None and grouping.foldable and ghost_cost < mat_cost:
            return Plan("ghost", False, f"T={T} d={d} p={p}")
        keep = w is None or not grouping.foldable or (mode != "ghost" and _small_enough(R * d * p, calls, T))
        return Plan("materialized", keep, f"T={T} d={d} p={p}")

    def sq_norms(self, module, calls, grouping, plan: Plan):
        R = calls[0][0].shape[0]
        A, G = self._forms(calls, R)
        total = 0
        w, b = _trainable(module, "weight"), _trainable(module, "bias")
        if b is not None:
            gb = G.sum(1)
            plan.kept[b] = gb
            total = total + ops.sq_norms_of(grouping.to_samples(gb))
        if w is not None:
            if plan.norm == "ghost":
                total = total + ops.ghost_sq_norms(grouping.fold(A), grouping.fold(G))
            elif plan.keep:
                A, G = ops._common(A, G)
                gw = torch.bmm(G.transpose(1, 2), A)
                plan.kept[w] = gw
                total = total + ops.sq_norms_of(grouping.to_samples(gw))
            else:
                total = total + ops.per_sample_sq_norms(grouping.fold(A), grouping.fold(G))
        return total

    def clipped(self, module, calls, c, plan: Plan):
        out = {p: _weighted_sum(c, g) for p, g in plan.kept.items()}
        w = _trainable(module, "weight")
        if w is not None and w not in out:
            A, G = self._forms(calls, c.shape[0])
            out[w] = ops.clipped_weight_grad(A, G, c).view(w.shape)
        return out


def _weighted_sum(c: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """Σ_r c_r x_r for x (R, ...), accumulated in float32 or wider."""
    x = ops._acc(per_row)
    return torch.tensordot(c.to(x.dtype), x, dims=1)


# ---- Conv2d ------------------------------------------------------------------------------------------------

class Conv2dRule:
    """nn.Conv2d, any stride/padding/dilation/groups/padding_mode; per-sample grads by one grouped conv."""

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

    def plan(self, module, calls, grouping: Grouping, mode: str) -> Plan:
        R = calls[0][0].shape[0]
        g = module.groups
        d = module.in_channels // g * module.kernel_size[0] * module.kernel_size[1]
        p = module.out_channels // g
        T = calls[0][1][0, 0].numel()
        detail = f"T={T} d={d} p={p} groups={g}"
        w = _trainable(module, "weight")
        if w is not None and len(calls) == 1 and grouping.trivial:
            if T * T * (d + p) < T * d * p:
                return Plan("ghost", False, detail)
        keep = w is None or _small_enough(R * w.numel(), calls, T)
        return Plan("materialized", keep and mode != "ghost", detail)

    def sq_norms(self, module, calls, grouping, plan: Plan):
        w, b = _trainable(module, "weight"), _trainable(module, "bias")
        total = 0
        if b is not None:
            gb = sum(g.sum((2, 3)) for _, g in calls)
            plan.kept[b] = gb
            total = total + ops.sq_norms_of(grouping.to_samples(gb))
        if w is None:
            return total
        if plan.norm == "ghost":
            (a, g), = calls
            a, padding = self._geometry(module, a)
            return total + ops.conv_ghost_sq_norms(a, g, module.kernel_size, **self._kw(module, padding))
        if not plan.keep and len(calls) == 1 and grouping.trivial:
            (a, g), = calls
            a, padding = self._geometry(module, a)
            return total + ops.conv_per_sample_sq_norms(a, g, w.shape, **self._kw(module, padding))
        gw = 0
        for a, g in calls:
            a, padding = self._geometry(module, a)
            gw = gw + ops.conv_per_sample_grads(a, g, w.shape, **self._kw(module, padding))
        if plan.keep:
            plan.kept[w] = gw
        return total + ops.sq_norms_of(grouping.to_samples(gw))

    def clipped(self, module, calls, c, plan: Plan):
        out = {p: _weighted_sum(c, g) for p, g in plan.kept.items()}
        w = _trainable(module, "weight")
        if w is not None and w not in out:
            gw = 0
            for a, g in calls:
                a, padding = self._geometry(module, a)
                gw = gw + ops.conv_clipped_weight_grad(a, g, c, w.shape, **self._kw(module, padding))
            out[w] = gw
        return out


# ---- GroupNorm / LayerNorm affine ---------------------------------------------------------------------------

class _NormRule:
    """Affine parameters of a normalisation layer: per-row grads (R, C) are tiny, always materialised."""

    def normalized(self, module, a):
        raise NotImplementedError

    def plan(self, module, calls, grouping, mode):
        return Plan("materialized", True, "affine")

    def affine_grads(self, module, a, g):
        """One call's per-row (∇γ, ∇β): Σ g ∘ x̂ and Σ g over the positions."""
        return self.reduce(module, g * self.normalized(module, a).to(g.dtype)), self.reduce(module, g)

    def sq_norms(self, module, calls, grouping, plan: Plan):
        w, b = _trainable(module, "weight"), _trainable(module, "bias")
        per_call = [self.affine_grads(module, a, g) for a, g in calls]
        total = 0
        for i, param in enumerate((w, b)):
            if param is None:
                continue
            grad = sum(grads[i] for grads in per_call)
            plan.kept[param] = grad
            total = total + ops.sq_norms_of(grouping.to_samples(grad))
        return total

    def clipped(self, module, calls, c, plan: Plan):
        return {p: _weighted_sum(c, g) for p, g in plan.kept.items()}


class GroupNormRule(_NormRule):
    def affine_grads(self, module, a, g):  # through the ops switch: fused kernels / native CPU build
        return ops.group_norm_grads(a, g, module.num_groups, eps=module.eps)


class LayerNormRule(_NormRule):
    def normalized(self, module, a):
        return F.layer_norm(a, module.normalized_shape, eps=module.eps)

    def reduce(self, module, prod):
        extra = prod.dim() - 1 - len(module.normalized_shape)
        return prod.sum(tuple(range(1, 1 + extra))) if extra > 0 else prod


# ---- Embedding ---------------------------------------------------------------------------------------------

class EmbeddingRule:
    """nn.Embedding: ghost norm with AAᵀ the index-equality matrix (cost T²·D); clipped sum by index_add."""

    def plan(self, module, calls, grouping, mode):
        if not grouping.foldable:
            return Plan("materialized", True, f"V={module.num_embeddings} D={module.embedding_dim}")
        return Plan("ghost", False, f"V={module.num_embeddings} D={module.embedding_dim}")

    @staticmethod
    def _forms(module, calls, R):
        idx = torch.cat([a.reshape(R, -1) for a, _ in calls], 1)
        G = torch.cat([g.reshape(R, -1, module.embedding_dim) for _, g in calls], 1)
        if module.padding_idx is not None:  # the padding row's gradient is zero by definition
            G = G * (idx != module.padding_idx).unsqueeze(-1).to(G.dtype)
        return idx, G

    def sq_norms(self, module, calls, grouping, plan: Plan):
        w = module.weight
        R = calls[0][0].shape[0]
        idx, G = self._forms(module, calls, R)
        if plan.norm == "materialized":
            per_row = G.new_zeros(R, *w.shape)
            per_row.scatter_add_(1, idx.unsqueeze(-1).expand_as(G), G)
            plan.kept[w] = per_row
            return ops.sq_norms_of(grouping.to_samples(per_row))
        idx, G = grouping.fold(idx), ops._acc(grouping.fold(G))
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(G.dtype)
        return (same * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))

    def clipped(self, module, calls, c, plan: Plan):
        w = module.weight
        if plan.kept:
            return {w: _weighted_sum(c, plan.kept[w])}
        idx, G = self._forms(module, calls, c.shape[0])
        scaled = ops._acc(G * c.to(G.dtype).view(-1, 1, 1))
        out = scaled.new_zeros(w.shape)
        return {w: out.index_add_(0, idx.reshape(-1), scaled.reshape(-1, w.shape[1]))}


# ---- Fallback: torch.func per-sample gradients for one module ----------------------------------------------

class VmapRule:
    """Any other module with parameters: per-row grads of its own parameters by vmap over a vjp.

    Row r's gradient is the vjp of ``module(args_r)`` with its output gradient G_r; exact for any module
    that treats rows independently (no BatchNorm-like mixing, which the engine refuses up front).
    """

    def plan(self, module, calls, grouping, mode):
        return Plan("vmap", True, type(module).__name__)

    def sq_norms(self, module, calls, grouping, plan: Plan):
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        names = list(params)
        R = calls[0][1].shape[0]
        grads = {n: 0 for n in names}
        for args, g in calls:
            dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == R else None
                         for a in args)

            def row_grad(g_r, *args_r):
                batched = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args_r, dims))
                detached = {n: p.detach() for n, p in params.items()}
                _, vjp_fn = torch.func.vjp(
                    lambda ps: torch.func.functional_call(module, ps, batched), detached)
                return vjp_fn(g_r.unsqueeze(0))[0]

            per_row = torch.vmap(row_grad, in_dims=(0,) + dims)(g, *args)
            for n in names:
                grads[n] = grads[n] + per_row[n]
        total = 0
        for n in names:
            plan.kept[params[n]] = grads[n]
            total = total + ops.sq_norms_of(grouping.to_samples(grads[n]))
        return total

    def clipped(self, module, calls, c, plan: Plan):
        return {p: _weighted_sum(c, g) for p, g in plan.kept.items()}


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
