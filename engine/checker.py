"""The checker for users' own layers: the engine's per-sample norms against one backward per sample."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from privimage.engine.dp_sgd import DPEngine

__all__ = ["NormCheck", "check_per_sample_norms"]


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
