"""Exponential moving average of the weights (DPDM/PrivImage: decay 0.999), the model that is sampled."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """A frozen copy of ``model`` updated as ``θ_ema ← decay·θ_ema + (1 − decay)·θ`` after each step.

    Averaging the parameters of a DP-SGD run is post-processing of the released iterates: it costs no
    privacy and averages out part of the injected noise.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> ema = EMA(net, decay=0.5)
        >>> with torch.no_grad(): _ = net.weight.add_(2.0)
        >>> ema.update(net)
        >>> torch.allclose(ema.module.weight, net.weight - 1.0)
        True
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise ValueError(f"Expected decay={decay} in [0, 1).")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.module.load_state_dict(state["module"])
