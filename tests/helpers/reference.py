"""The slow, obviously correct DP-SGD reference: one fresh forward and backward per sample.

Independent of ``privimage.engine`` on purpose (Opacus' ``compute_microbatch_grad_sample`` plays the same
role there): every engine method and norm strategy is tested against these loops. Imported by name
(``import reference as ref``: pyproject's pytest ``pythonpath`` puts tests/ on sys.path).
"""

from __future__ import annotations

import torch


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def per_sample_grads_loop(model, loss_fn, *, groups=None, is_padding=None):
    """Per-sample gradients: a list with, per sample id, a list of tensors (one per trainable parameter),
    or None for a sample whose rows are all padding (or that has no rows).

    Sample s's gradient is the gradient of the sum of its non-padding rows' losses, from its own forward pass.
    """
    params = trainable(model)
    with torch.no_grad():
        num_rows = loss_fn(model).shape[0]
    ids = torch.arange(num_rows) if groups is None else groups.cpu()
    pad = torch.zeros(num_rows, dtype=torch.bool) if is_padding is None else is_padding.cpu()
    out = []
    for s in range(int(ids.max()) + 1 if num_rows else 0):
        rows = (ids == s) & ~pad
        if not rows.any():
            out.append(None)
            continue
        losses = loss_fn(model)
        grads = torch.autograd.grad(losses[rows].sum(), params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return out


def per_sample_norms_loop(model, loss_fn, **kw):
    """Global L2 norm over all trainable parameters of each sample's gradient (0 for padding-only samples)."""
    norms = []
    for grads in per_sample_grads_loop(model, loss_fn, **kw):
        norms.append(0.0 if grads is None else float(torch.sqrt(sum(g.double().square().sum() for g in grads))))
    return torch.tensor(norms, dtype=torch.float64)


def clipped_sum_loop(model, loss_fn, max_grad_norm, **kw):
    """Σ_i min(1, C/(‖g_i‖+1e-6)) g_i per trainable parameter, skipping padding and non-finite samples."""
    params = trainable(model)
    sums = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    for grads in per_sample_grads_loop(model, loss_fn, **kw):
        if grads is None:
            continue
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
        if not torch.isfinite(norm):
            continue
        c = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for s, g in zip(sums, grads):
            s += c * g
    return sums


def dp_grads_loop(model, loss_fn, *, max_grad_norm, expected_batch_size, **kw):
    """The σ = 0 DP-SGD gradient: clipped sum divided by the expected batch size."""
    return [s / expected_batch_size for s in clipped_sum_loop(model, loss_fn, max_grad_norm, **kw)]
