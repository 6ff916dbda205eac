"""The optimizer wrapper: ``step(loss_fn)`` = clip and sum (``DPEngine.accumulate``), noise once
(``DPEngine.finalize``), then the wrapped torch optimizer's step (Opacus' ``make_private`` style)."""

from __future__ import annotations

import torch
import torch.nn as nn

from privimage.engine.dp_sgd import DPEngine, StepStats

__all__ = ["DPOptimizer", "make_private"]


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
                 generator: torch.Generator | None = None, **engine_options) -> DPOptimizer:
    """Wrap ``optimizer`` so that each ``step(loss_fn)`` is one DP-SGD step on ``model`` (Opacus-style).

    ``engine_options`` go to :class:`DPEngine` (``compile``, ``norm_strategy``, ``cost_model``, ...).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Linear(3, 1)
        >>> opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=1.0,
        ...                    noise_multiplier=1.0, expected_batch_size=8)
        >>> x = torch.randn(8, 3)
        >>> stats = opt.step(lambda m: m(x).square().sum(1))
    """
    engine = DPEngine(model, max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                      expected_batch_size=expected_batch_size, method=method, generator=generator, **engine_options)
    return DPOptimizer(optimizer, engine)
