"""What the two DP fine-tune loops share (:mod:`privimage.train.finetune`, :mod:`privimage.train.gan_finetune`).

Their maths differ (a diffusion loss with K noise draws per record; a discriminator's paired hinge loss and a
generator stepped from it); what they do around one DP step is the same and lives here, once:

* :class:`DPSecrets`: the three secret sources that touch the sensitive records — the Poisson sampler (its
  seed), the DP noise generator and the per-record draws' key — made fresh (from the OS, or from the public
  seed in test mode), restored from a checkpoint, handed from rank 0 to every rank in memory under torchrun,
  and saved into the (private) checkpoint;
* :func:`restore_ledger` / :func:`check_ledger`: the ledger a resumed loop continues, and the refusal to run
  a step the ledger does not count (privacy would be miscounted);
* :class:`FinetuneTail`: the end of every step — the private log row (throughput from the PUBLIC expected batch
  size, never the drawn one), the progress bar (steps, ε, throughput only), and at a checkpoint step the
  writes in the order the privacy needs: ``budget.json`` (the ledger, counting the step) first, then the
  checkpoint, the log and any sample grid due (at the first checkpoint at or after each multiple of
  ``sample_every``). Only the writer (rank 0, or the only process) writes; nothing is written between
  checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from privimage.engine import PoissonSampler, PrivacyBudget, secure_generator
from privimage.engine import distributed as dp_distributed
from privimage.errors import RunDirError
from privimage.privacy import FINETUNE
from privimage.progress import progress_bar
from privimage.randomness import RecordRandomness
from privimage.rundir import RunDir

__all__ = ["DPSecrets", "FinetuneTail", "check_ledger", "restore_ledger"]


@dataclass(frozen=True)
class DPSecrets:
    """The Poisson ``sampler``, the DP ``noise`` generator and the per-record ``draws`` of a DP fine-tune."""

    sampler: PoissonSampler
    noise: torch.Generator
    draws: RecordRandomness

    @classmethod
    def fresh(cls, *, sample_rate: float, steps: int, physical_batch_size: int, secure: bool, seed: int,
              device: torch.device, insecure_noise: Callable[[], torch.Generator]) -> "DPSecrets":
        """New secrets from the OS; with ``secure=False`` derived from the public ``seed`` (the noise generator
        from ``insecure_noise()``): reproducible for tests, NOT private."""
        sampler = PoissonSampler(sample_rate=sample_rate, steps=steps, physical_batch_size=physical_batch_size,
                                 seed=None if secure else seed, secure=secure)
        noise = secure_generator(device) if secure else insecure_noise()
        draws = RecordRandomness.secret() if secure else RecordRandomness.from_public_seed(seed)
        return cls(sampler, noise, draws)

    @classmethod
    def from_checkpoint(cls, state: dict, *, draws_key: str, device: torch.device) -> "DPSecrets":
        """The secrets a checkpoint holds (:meth:`state_dict`; the draws under ``draws_key``)."""
        noise = torch.Generator(device)
        noise.set_state(state["noise_generator"].cpu())
        return cls(PoissonSampler.from_state_dict(state["sampler"]), noise,
                   RecordRandomness.from_state_dict(state[draws_key]))

    def shared(self, group) -> "DPSecrets":
        """Rank 0's sampler (its seed) and draws' key on every rank of ``group``, in memory; each rank keeps its
        own noise generator (only rank 0's draws noise). Itself without a group."""
        if group is None:
            return self
        sampler = dp_distributed.share_sampler(self.sampler, group)
        draws = RecordRandomness.from_state_dict(dp_distributed.broadcast_from_rank0(self.draws.state_dict(), group))
        return DPSecrets(sampler, self.noise, draws)

    def batches(self, n: int, *, start: int, stop_at_step: int | None, physical_batch_size: int, here):
        """(logical batch, this rank's part of it) for steps ``start``, ``start + 1``, ... of the sampler over ``n``
        records, up to ``stop_at_step`` (exclusive; None: the plan's end). Under torchrun (``here``:
        :class:`~privimage.train.common.Place`) every rank draws the same batch and takes its slice as physical
        micro-batches (:func:`privimage.engine.distributed.shard`); in one process the part is the batch."""
        for batch in self.sampler.logical_batches(n, start_step=start):
            if stop_at_step is not None and batch.step >= stop_at_step:
                return
            yield batch, (batch if here.group is None else dp_distributed.shard(
                batch, physical_batch_size, rank=here.rank, world_size=here.world_size))

    def state_dict(self, *, draws_key: str) -> dict:
        """The checkpoint's entries for these secrets (private: never published)."""
        return {"sampler": self.sampler.state_dict(), "noise_generator": self.noise.get_state(),
                draws_key: self.draws.state_dict()}


def restore_ledger(budget: PrivacyBudget, state: dict) -> None:
    """Replace ``budget``'s ledger by the one a checkpoint holds (what was spent up to its step)."""
    budget.spent.clear()
    budget.spent.update(PrivacyBudget.from_state_dict(state["budget"]).spent)


def check_ledger(budget: PrivacyBudget, start: int) -> None:
    """Refuse to continue a fine-tune at step ``start`` unless the ledger counts exactly ``start`` steps."""
    counted = budget.spent.get(FINETUNE, 0)
    if counted != start:
        raise RunDirError(f"The budget ledger records {counted} fine-tuning steps but the fine-tune is at step "
                          f"{start}; refusing to continue (privacy would be miscounted).")


class FinetuneTail:
    """The end of every DP fine-tune step: log row, progress bar, and the ledger-first checkpoint (module
    docstring).

    ``state(step)`` is the checkpoint to write at ``step``; ``grid(step)`` writes the sample grid of ``step``.
    ``rows`` (the log so far, the checkpoint's on resume) grows in place; ``config`` is the loop's config
    section (its ``log_every``, ``checkpoint_every`` and ``sample_every`` are read).
    """

    def __init__(self, run: RunDir, config, *, budget: PrivacyBudget, steps: int, start: int, rows: list[dict],
                 expected: float, sigma: float, desc: str, writer: bool, state: Callable[[int], dict],
                 grid: Callable[[int], None]):
        self.run, self.config, self.budget, self.steps, self.rows = run, config, budget, steps, rows
        self.expected, self.sigma, self.writer, self.state, self.grid = expected, sigma, writer, state, grid
        self.bar = progress_bar(steps, desc=desc, unit="step", initial=start, enabled=writer)
        self.t_last, self.steps_since_log, self.done, self.last_saved = time.perf_counter(), 0, start, start

    def end_step(self, done: int, losses: dict, settings: dict) -> None:
        """Step ``done - 1`` is made: log it when due (``{"step", **losses, "epsilon", "images_per_s", "sigma",
        **settings}``; ``losses`` are PRIVATE: computed on the drawn sensitive batch without noise), then
        checkpoint when due."""
        c = self.config
        self.done, self.steps_since_log = done, self.steps_since_log + 1
        if done % c.log_every == 0 or done == self.steps:
            now = time.perf_counter()
            ips = self.steps_since_log * self.expected / max(now - self.t_last, 1e-9)  # public: expected size
            eps = self.budget.epsilon_spent().upper
            self.rows.append({"step": done, **losses, "epsilon": round(eps, 4), "images_per_s": round(ips, 2),
                              "sigma": self.sigma, **settings})
            self.bar.set_postfix(eps=f"{eps:.2f}", img_s=f"{ips:.0f}", refresh=False)
            self.t_last, self.steps_since_log = now, 0
        self.bar.update()
        if done % c.checkpoint_every == 0 or done == self.steps:
            self._save()

    def finish(self) -> None:
        """Close the bar; checkpoint the last step if it was not (a loop stopped between checkpoints)."""
        self.bar.close()
        if self.done > self.last_saved:
            self._save()

    def _save(self) -> None:
        step, last_saved, every = self.done, self.last_saved, self.config.sample_every
        self.last_saved = step
        if not self.writer:  # rank 0 alone writes; its checkpoint is the same as one process's
            return
        # The ledger first: once the checkpoint (or anything after it) exists, budget.json already counts it.
        self.run.save_budget(self.budget)
        self.run.save_checkpoint("finetune", self.state(step))
        self.run.save_log("finetune", self.rows)
        if every and step // every > last_saved // every:
            self.grid(step)
