"""``method="loop"``: each sample's gradient by its own backward pass; slow and obviously right.

Contract: :func:`per_sample_grads` returns, per sample, the gradient of the sum of its non-padding rows'
losses with respect to every trainable parameter (None for a sample with no real row), from one forward of
the whole batch and one backward per sample. A sample whose gradient comes out non-finite is recomputed in
isolation (:func:`isolated_sample_grad`) before it is declared non-finite, so one NaN image drops only itself,
as with the other methods.

Trap: one backward through a whole batch computes each weight gradient as a sum over every row, with zero
output gradients for the rows outside the sample, and 0·NaN = NaN: one NaN row makes every sample's gradient
non-finite unless the other rows are kept out of the graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from privimage.kernels import Grouping
from privimage.kernels.forms import as_acc

__all__ = ["clipped_sum", "isolated_sample_grad", "per_sample_grads", "sq_norms"]


def per_sample_grads(model: nn.Module, loss_fn, losses: torch.Tensor, grouping: Grouping, params) -> list:
    """[S] lists of per-parameter gradients (None for a sample with no real row); see the module docstring."""
    ids = grouping.row_index(losses.device)
    pad = grouping.is_padding
    out = []
    for s in range(grouping.num_samples):
        rows = ids == s
        if pad is not None:
            rows = rows & ~pad
        if not bool(rows.any()):
            out.append(None)
            continue
        g = torch.autograd.grad(losses[rows].sum(), params, retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]
        if not all(bool(torch.isfinite(x).all()) for x in g):
            g = isolated_sample_grad(model, loss_fn, rows, params)
        out.append(g)
    return out


def isolated_sample_grad(model: nn.Module, loss_fn, rows: torch.Tensor, params) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(model)[rows].sum()`` with no other row's values able to reach it.

    The model's batched inputs (tensors with R leading rows) have every other row replaced by a copy of one of
    the sample's rows, and its batched outputs pass no gradient to the other rows (``torch.where``, not a
    product, so a NaN loss elsewhere stays out). For a model that treats rows independently (which per-sample
    gradients assume), the sample's gradient is unchanged. A ``loss_fn`` that calls submodules directly
    rather than ``model`` is not isolated: its non-finite samples are dropped as before.
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


def sq_norms(grads: list, grouping: Grouping, dtype: torch.dtype, device) -> torch.Tensor:
    """(S,) squared norms over all parameters, 0 for samples with no real row."""
    if not grads:
        return torch.zeros(0, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    sq = torch.stack([zero if g is None else sum(as_acc(x).square().sum() for x in g) for g in grads])
    pad = grouping.is_padding
    if pad is not None:  # padding-only samples: norm 0 (never counted or used)
        sq = torch.where(grouping.to_samples((~pad).to(dtype)) > 0, sq, torch.zeros_like(sq))
    return sq


def clipped_sum(grads: list, c: torch.Tensor, finite: torch.Tensor, params) -> dict:
    """{param: Σ_s c_s g_s} over the samples with a finite gradient."""
    out: dict = {}
    for s, g in enumerate(grads):
        if g is None or not bool(finite[s]):
            continue
        for p, x in zip(params, g):
            term = c[s] * as_acc(x)
            out[p] = out[p] + term if p in out else term
    return out
