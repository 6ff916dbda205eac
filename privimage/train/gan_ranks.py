"""The GAN loops under torchrun (:mod:`privimage.distributed`): what the ranks share and how they stay equal.

Both GAN loops (:mod:`privimage.train.gan_pretrain`, :mod:`privimage.train.gan_finetune`) split every
DISCRIMINATOR step across the ranks (each rank its rows of the step's batch, the gradients summed once) and
run every GENERATOR step on rank 0 alone, whose result — the generator's parameters and buffers, and the
step's loss — every rank then receives (:func:`generator_step_on_rank0`).

Why the generator step is not split. It is cheap next to the discriminator steps (one per ``n_D`` of them)
and, in the fine-tune, post-processing of the DP discriminator (no sensitive record enters it), so privacy
does not care who computes it; exactness does. The generator's spectral norm runs one power iteration per
forward in train mode: a step split into each rank's chunks would iterate a world-size-dependent number of
times and end at another generator than one process's. Computed on rank 0 it IS one process's step, bit for
bit, and the broadcast hands every rank the same bytes, so the replicas are bit-identical even where the
kernels are not deterministic (GPU backward atomics), which "every rank computes it again" could not
promise. Only rank 0's generator optimizer steps; its state is the one a checkpoint keeps (rank 0 writes),
so a checkpoint is a one-process checkpoint and resumes under any world size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from privimage.engine import distributed as dp_distributed

__all__ = ["check_same_start", "generator_step_on_rank0", "module_tensors", "sum_gradients"]


def check_same_start(settings: dict, tensors: list[torch.Tensor], group, what: str) -> None:
    """Refuse ranks whose ``settings`` (public: config, data size, seed, start step) or ``tensors`` (data,
    starting weights) differ from rank 0's, before the first step (a clear error, not a silent divergence)."""
    dp_distributed.refuse_mismatch(settings, group, what)
    dp_distributed.check_replicas(tensors, group, f"{what}: data and starting weights")


def module_tensors(*modules: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules`` (what must be equal on every rank)."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def generator_step_on_rank0(generator: nn.Module, step: Callable[[], float], group) -> float:
    """``step()`` (one generator update; returns its loss) on rank 0 alone, then rank 0's ``generator``
    (parameters and buffers: spectral norm's power-iteration vectors) and loss on every rank (module docstring).
    Without a group: ``step()``."""
    if group is None:
        return step()
    import torch.distributed as dist

    loss = step() if dist.get_rank(group) == 0 else None
    dp_distributed.broadcast_parameters(generator, group)
    return dp_distributed.broadcast_from_rank0(loss, group)


def sum_gradients(module: nn.Module, loss: torch.Tensor, reducer: dp_distributed.GradientReducer) -> float:
    """Sum every trainable parameter's ``.grad`` (a parameter without one counts as zeros) and ``loss`` over the
    ranks, in one all-reduce; the grads are replaced by the sums. Returns the summed loss."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    summed, (total,) = reducer.all_reduce(grads, [loss.detach().float()])
    for p, g in zip(params, summed):
        p.grad = g
    return total
