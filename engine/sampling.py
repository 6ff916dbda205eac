"""Poisson sampling with fixed physical shapes, the batch selection DP-SGD's accounting assumes.

Each step, every example joins the logical batch independently with probability ``sample_rate`` (q), so the
logical batch size varies (Binomial(n, q)); that randomness is part of the privacy amplification the
accountant credits (Abadi et al., arXiv 1607.00133; the PRV/RDP analyses of the subsampled Gaussian).
Fixed-size or shuffled batches would not match the accountant.

Compiled training graphs want fixed shapes, so each logical batch is cut into physical micro-batches of
exactly ``physical_batch_size`` rows, the last one padded and flagged with ``is_padding`` (padding rows must
contribute nothing: the engine gives them clip factor 0). A logical batch larger than memory is thereby split,
never truncated; an empty one still yields one all-padding micro-batch, so the step (and its noise) happens.

Public vs. sensitive (the jax_privacy design note): the sampler's fields are public settings; the number of
examples is an argument of :meth:`PoissonSampler.logical_batch` because it may be sensitive.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class PhysicalBatch:
    """``indices`` (long, ``physical_batch_size`` rows) into the data set; padded rows are flagged."""

    indices: torch.Tensor
    is_padding: torch.Tensor


@dataclass(frozen=True)
class LogicalBatch:
    """One DP-SGD step's Poisson sample, as fixed-size physical micro-batches."""

    step: int
    size: int  # the number of examples drawn: sensitive, for logs only, never a divisor
    physical: tuple[PhysicalBatch, ...]

    def indices(self) -> torch.Tensor:
        """The drawn examples' indices, in order (the non-padding rows of every micro-batch)."""
        if not self.physical:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([b.indices[~b.is_padding] for b in self.physical])


@dataclass(frozen=True)
class PoissonSampler:
    """Public settings of Poisson sampling for ``steps`` DP-SGD steps.

    Args:
        sample_rate: q, the probability that each example joins a step's batch, in (0, 1].
        steps: number of steps the sampler will produce.
        physical_batch_size: rows per micro-batch (memory limit); logical batches are split into these.
        seed: seed of the sampling stream (step t uses a stream derived from (seed, t), so a resumed run
            redraws exactly the batches it would have drawn). ``None`` draws one from the OS's entropy.
        secure: draw the seed from the OS's cryptographic source (``secrets``); ``seed`` must be ``None``.
            The seed is kept in :meth:`state_dict` for exact resume, so treat checkpoints as secret.

    Example:
        >>> sampler = PoissonSampler(sample_rate=0.1, steps=3, physical_batch_size=4, seed=0)
        >>> [b.step for b in sampler.logical_batches(num_examples=20)]
        [0, 1, 2]
    """

    sample_rate: float
    steps: int
    physical_batch_size: int
    seed: int | None = None
    secure: bool = False
    _seed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1):
            raise ValueError(f"Expected sample_rate={self.sample_rate} in (0, 1].")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"Expected steps={self.steps} to be an integer >= 1.")
        if not (isinstance(self.physical_batch_size, int) and self.physical_batch_size >= 1):
            raise ValueError(f"Expected physical_batch_size={self.physical_batch_size} to be an integer >= 1.")
        if self.secure and self.seed is not None:
            raise ValueError("secure=True draws its seed from the OS; do not also pass seed.")
        seed = self.seed if self.seed is not None else secrets.randbits(128)
        object.__setattr__(self, "_seed", int(seed))

    def expected_batch_size(self, num_examples: int) -> float:
        """q·n, the public divisor of the noisy gradient sum (never the drawn size)."""
        return self.sample_rate * num_examples

    def logical_batch(self, num_examples: int, step: int) -> LogicalBatch:
        """The Poisson sample of step ``step`` over examples ``0 .. num_examples-1``."""
        if not (isinstance(num_examples, int) and num_examples >= 1):
            raise ValueError(f"Expected num_examples={num_examples} to be an integer >= 1.")
        if not 0 <= step < self.steps:
            raise ValueError(f"Expected step={step} in [0, {self.steps}).")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed, step])))
        chosen = np.flatnonzero(rng.random(num_examples) < self.sample_rate)
        return LogicalBatch(step=step, size=len(chosen), physical=self._split(torch.from_numpy(chosen)))

    def logical_batches(self, num_examples: int, start_step: int = 0) -> Iterator[LogicalBatch]:
        """Steps ``start_step .. steps-1`` in order (``start_step`` > 0 resumes a run)."""
        for step in range(start_step, self.steps):
            yield self.logical_batch(num_examples, step)

    def state_dict(self) -> dict:
        """Everything needed to rebuild this sampler, seed included (see ``secure``)."""
        return {"sample_rate": self.sample_rate, "steps": self.steps,
                "physical_batch_size": self.physical_batch_size, "seed": self._seed, "secure": self.secure}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PoissonSampler":
        sampler = cls(sample_rate=state["sample_rate"], steps=state["steps"],
                      physical_batch_size=state["physical_batch_size"], seed=state["seed"])
        object.__setattr__(sampler, "secure", state["secure"])
        return sampler

    def _split(self, chosen: torch.Tensor) -> tuple[PhysicalBatch, ...]:
        return split_physical(chosen, self.physical_batch_size)


def split_physical(chosen: torch.Tensor, physical_batch_size: int, *,
                   min_batches: int = 1) -> tuple[PhysicalBatch, ...]:
    """``chosen`` indices cut into micro-batches of ``physical_batch_size`` rows, the last padded (flagged).

    At least ``min_batches`` micro-batches (all padding when ``chosen`` is empty): the sampler keeps one, so a
    step with an empty Poisson batch still runs; a rank's share of a distributed batch
    (:mod:`privimage.engine.distributed`) may be none at all.
    """
    size = physical_batch_size
    n_batches = max(min_batches, -(-len(chosen) // size))
    padded = torch.zeros(n_batches * size, dtype=torch.long)
    padded[: len(chosen)] = chosen
    is_padding = torch.arange(n_batches * size) >= len(chosen)
    return tuple(PhysicalBatch(padded[i * size:(i + 1) * size], is_padding[i * size:(i + 1) * size])
                 for i in range(n_batches))
