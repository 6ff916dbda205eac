"""DP-SGD fine-tuning of the pre-trained UNet on the sensitive images (PrivImage §4.3, DPDM).

Each step: a Poisson sample of the sensitive set (rate q = batch_size / N, the sampling the accountant
assumes), split into fixed-size physical micro-batches with a padding mask; every image gets K noise draws
(rows), the rows of one image form one sample (``groups``), the engine clips each sample's gradient to C,
sums, adds N(0, σ²C²) once per logical batch and divides by the PUBLIC expected batch size q·N. Adam steps,
the EMA follows, and the :class:`~privimage.engine.PrivacyBudget` ledger records the release BEFORE it is made
(``spend`` raises rather than overspend).

σ is not chosen here: the run's budget (``budget.json``, planned by :func:`privimage.pipeline.plan_budget`)
holds the fine-tune's planned (σ, q, steps), calibrated so that the query and the fine-tune together meet
the total (ε, δ).

Secret randomness (DESIGN.md "Privacy boundaries"). Three sources touch the sensitive records, all secret at
a fresh start and all kept in the private checkpoint: the Poisson sampler's seed, the DP noise generator, and
the loss's diffusion randomness (σ, noise images, label dropout), which
:class:`~privimage.randomness.RecordRandomness` keys by (secret key, stream, step, record index), so adding or
removing a record never changes another record's draws.
``secure_noise=False`` derives all three from the public ``seed``: reproducible, for tests only, NOT private
(the loop says so in its log, and the release's privacy statement says so).

Order of writes (a spend is durable before anything derived from it exists). At a checkpoint step s, in
order: ``budget.json`` (the ledger, counting s steps), ``checkpoints/finetune.pt``, ``logs/finetune.csv``,
then any sample grid due (``samples/finetune-<s>.png``: at the first checkpoint at or after each multiple of
``sample_every``). Nothing is written between checkpoints. A fresh start refuses a run directory that already
holds fine-tune outputs or a ledger that counts fine-tune steps: those releases happened and must stay counted
(resume instead, or use a new run directory).

Exact resume: the checkpoint holds the model, EMA, optimizer, the sampler (its seed), the noise generator's
state, the loss randomness key, the ledger and the log. A resumed run repeats bit for bit what the
uninterrupted run does; steps computed after the last checkpoint but never saved are recomputed with the SAME
randomness, so their output is the same release, not a second one.

Under torchrun (:mod:`privimage.distributed`), every rank runs this loop on the same data: the engine takes the
process group (one Poisson draw from rank 0's secret sampler seed, each rank its slice, one all-reduce, the
noise once on rank 0; :mod:`privimage.engine.distributed`), the diffusion randomness key is rank 0's, and rank
0 alone writes. Ranks whose settings, data or starting weights differ are refused before the first step. The
checkpoint is the one a single process writes, so a run resumes under any world size.

What is logged is private: ``logs/finetune.csv`` holds the mean loss over each drawn sensitive batch (no
noise) and the running count of samples dropped for a NaN/inf gradient, diagnostics for the operator, never
published. Throughput is computed from the public expected
batch size q·N (the drawn size is sensitive), and the progress bar shows only steps, ε and that throughput.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from privimage.config import FinetuneConfig
from privimage.diffusion import EDMDenoiser, EDMLoss, EMA, to_model_range
from privimage import distributed
from privimage.engine import DPEngine, PrivacyBudget
from privimage.engine import distributed as dp_distributed
from privimage.engine.sampling import PhysicalBatch
from privimage.errors import RunDirError
from privimage.models import UNet, UNetConfig
from privimage.privacy import FINETUNE
from privimage.randomness import RecordRandomness
from privimage.rundir import RunDir
from privimage.train.common import place, save_sample_grid
from privimage.train.dp_loop import DPSecrets, FinetuneTail, check_ledger, restore_ledger

__all__ = ["FINETUNE_OUTPUTS", "accumulate_micro_batch", "finetune", "finetune_outputs", "refuse_fresh_start"]

#: Files a fine-tune derives from the sensitive data (:attr:`RunDir.FINETUNE_OUTPUTS`).
FINETUNE_OUTPUTS = RunDir.FINETUNE_OUTPUTS

#: The checkpoint's key of the per-record diffusion randomness (:class:`DPSecrets`).
DRAWS_KEY = "loss_randomness"

INSECURE_WARNING = ("finetune: secure_noise=False: the Poisson sampling, the DP noise and the diffusion "
                    "randomness are derived from the PUBLIC seed. This run is reproducible and NOT private; "
                    "use it for tests only.")


def finetune_outputs(run_dir: str | Path) -> list[Path]:
    """The :data:`FINETUNE_OUTPUTS` that exist in ``run_dir``."""
    return RunDir.of(run_dir).finetune_outputs()


def accumulate_micro_batch(engine: DPEngine, loss: EDMLoss, randomness: RecordRandomness, *,
                           images: torch.Tensor, labels: torch.Tensor | None, batch: PhysicalBatch, step: int,
                           num_classes: int, autocast: dict | None = None):
    """Add one physical micro-batch's clipped per-image gradients to ``engine`` (one ``engine.accumulate``).

    ``images`` (uint8, the whole sensitive set, on the engine's device) and ``labels`` are indexed by
    ``batch.indices``; image ``batch.indices[j]``'s diffusion randomness comes from ``randomness`` keyed by
    (``step``, that index), never by ``j`` (:meth:`EDMLoss.draw_per_record`). Returns the engine's
    :class:`~privimage.engine.StepStats` and the (B·K,) row padding mask.
    """
    device = images.device
    idx = batch.indices.to(device)
    x = to_model_range(images[idx])
    y = labels[idx] if labels is not None and num_classes else None
    is_padding = batch.is_padding.to(device)
    drawn = loss.draw_per_record(x, y, num_classes=num_classes, randomness=randomness, step=step, indices=idx,
                                 is_padding=is_padding)
    pad_rows = loss.rows(is_padding)
    autocast = autocast or {"device_type": device.type, "enabled": False}

    def loss_fn(model):
        with torch.autocast(**autocast):
            return loss.compute(model, x, *drawn)

    stats = engine.accumulate(loss_fn, is_padding=pad_rows, groups=loss.groups(len(idx), device))
    return stats, pad_rows


def finetune(run_dir: RunDir | str | Path, config: FinetuneConfig, *, images: torch.Tensor, labels: torch.Tensor,
             unet: UNetConfig, budget: PrivacyBudget, init_state: dict | None, seed: int = 0,
             device: torch.device | str = "cpu", resume: bool = False, stop_at_step: int | None = None,
             run_config: dict | None = None, on_release: Callable[[int, torch.nn.Module], None] | None = None,
             log=print) -> Path:
    """DP fine-tune on the sensitive uint8 ``images``/``labels``; returns the path of checkpoints/finetune.pt.

    Writes (module docstring for the order) ``budget.json``, ``checkpoints/finetune.pt`` (private: it holds the
    secret randomness), ``logs/finetune.csv`` (private) and, with ``sample_every``, ``samples/finetune-*.png``.
    The published model is made from the checkpoint by :func:`privimage.release.export_release`.

    Args:
        config: the run config's ``finetune`` section: physical_batch_size, num_noise (K), max_grad_norm (C),
            lr, ema_decay, label_dropout, method, compile (the DP step's public settings; see
            :class:`~privimage.engine.DPEngine` and :class:`EDMLoss`), secure_noise (secret sampler seed, DP
            noise and diffusion randomness from the OS; ``False`` derives them from ``seed``: reproducible for
            tests, NO privacy, logged loudly), checkpoint_every, log_every, sample_every (in steps; the last
            step is always checkpointed and logged). Its ``epochs``/``batch_size`` are not read here: σ, q and
            the number of steps come from ``budget``.
        images, labels: the sensitive set, uint8 (N, C, H, W) and long (N,). Record i is ``images[i]``: its
            diffusion randomness is keyed by i, so keep the order fixed across a resume.
        unet: the UNet's shape; ``init_state``: the pre-trained UNet state dict (``None``: from scratch).
        budget: the run's budget; its FINETUNE plan gives σ, q and the number of steps. Updated in place;
            written to ``run_dir/budget.json`` at every checkpoint, before the checkpoint.
        seed: the PUBLIC seed (model initialisation, sample grids); secret randomness never comes from it
            unless ``config.secure_noise`` is false.
        resume: continue from ``checkpoints/finetune.pt`` (its ledger replaces ``budget``'s).
        stop_at_step: stop (after checkpointing) once this many steps are done, as if interrupted.
        run_config: stored in the checkpoint for provenance (the public run config as a dict).
        on_release: called as ``on_release(step, denoiser)`` right after each step's noisy gradient is made
            (``p.grad`` of the denoiser's parameters holds it) and before the optimizer uses it: a white-box
            view of every release, for audits. It must not change the parameters or their gradients.
        log: one-line messages (default ``print``).
    """
    run = RunDir.of(run_dir)
    f = config
    here = place(device, log)
    group, writer, device, log = here.group, here.writer, here.device, here.log
    if unet.dropout:
        raise ValueError(f"The UNet has dropout={unet.dropout}: its masks would be drawn by torch's global generator "
                         f"(seeded by the public seed, by position in the batch), outside the secret per-record "
                         f"randomness. Set the model's dropout to 0 for the DP fine-tune.")
    ckpt_path = run.checkpoint_path("finetune")
    plan = budget.plan[FINETUNE]
    n = len(images)
    sample_rate, steps, sigma = plan.sample_rate, plan.count, plan.noise_multiplier
    expected = sample_rate * n
    torch.manual_seed(seed)
    net = UNet(unet).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    denoiser = EDMDenoiser(net)
    ema = EMA(denoiser, f.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=f.lr)
    if not f.secure_noise:
        log(INSECURE_WARNING)
    start, rows, nonfinite = 0, [], 0
    if resume:
        state = run.load_checkpoint("finetune", map_location=device)
        if DRAWS_KEY not in state:
            raise RunDirError(f"{ckpt_path} was written by an older privimage whose fine-tune drew its diffusion "
                             f"randomness from the public seed; it cannot be resumed privately. Start a new run.")
        if not isinstance(state[DRAWS_KEY].get("key"), int):
            raise RunDirError(f"{ckpt_path} was written by an older privimage whose per-record diffusion randomness "
                             f"(one seeded generator per record) this version cannot replay, so the resumed steps "
                             f"would be a second, uncounted release. Start a new run directory.")
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        secrets = DPSecrets.from_checkpoint(state, draws_key=DRAWS_KEY, device=device)
        restore_ledger(budget, state)
        start, rows, nonfinite = state["step"], state["log"], state.get("num_nonfinite", 0)
        log(f"finetune: resuming at step {start}/{steps} from {ckpt_path}; ledger {dict(budget.spent)}")
        run.save_log("finetune", rows)  # the checkpoint's log (a write that failed after it is redone)
    else:
        refuse_fresh_start(run, budget)
        secrets = DPSecrets.fresh(sample_rate=sample_rate, steps=steps, physical_batch_size=f.physical_batch_size,
                                  secure=f.secure_noise, seed=seed, device=device,
                                  insecure_noise=lambda: torch.Generator(device).manual_seed(seed + 7))
    check_ledger(budget, start)
    if group is not None:  # every rank: the same settings, data and secrets as rank 0 (module docstring)
        dp_distributed.refuse_mismatch({"run_config": run_config, "finetune": repr(f), "num_examples": n,
                                        "seed": seed, "start": start, "ledger": dict(budget.spent)}, group,
                                       "the fine-tune")
        dp_distributed.check_replicas([images, labels], group, "sensitive data")
    secrets = secrets.shared(group)
    randomness = secrets.draws
    engine = DPEngine(denoiser, max_grad_norm=f.max_grad_norm, noise_multiplier=sigma, expected_batch_size=expected,
                      method=f.method, generator=secrets.noise, compile=f.compile, process_group=group,
                      check_every=distributed.check_every())
    loss = EDMLoss(num_noise=f.num_noise, label_dropout=f.label_dropout)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    num_classes = unet.num_classes
    shape = tuple(images.shape[1:])
    images_dev, labels_dev = images.to(device), labels.to(device)
    # Public description of the mechanism, for the release's privacy statement (privimage.release).
    mechanism = {"max_grad_norm": f.max_grad_norm, "noise_multiplier": sigma, "sample_rate": sample_rate,
                 "steps": steps, "num_noise": f.num_noise, "expected_batch_size": expected, "num_examples": n,
                 "method": f.method, "secure": f.secure_noise, "label_dropout": f.label_dropout}

    def checkpoint(step: int) -> dict:
        return {"kind": "finetune", "step": step, "steps": steps, "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), **secrets.state_dict(draws_key=DRAWS_KEY), "budget": budget.state_dict(),
                "unet": unet.to_dict(), "mechanism": mechanism, "num_nonfinite": nonfinite, "log": rows,
                "config": run_config}

    def grid(step: int) -> None:
        save_sample_grid(ema.module, run.training_grid_path("finetune", step), shape=shape, num_classes=num_classes,
                         seed=seed, device=device)

    tail = FinetuneTail(run, f, budget=budget, steps=steps, start=start, rows=rows, expected=expected, sigma=sigma,
                        desc=f"DP fine-tune (sigma={sigma:.3g}, q={sample_rate:.3g})", writer=writer,
                        state=checkpoint, grid=grid)
    net.train()
    for batch, mine in secrets.batches(n, start=start, stop_at_step=stop_at_step,
                                       physical_batch_size=f.physical_batch_size, here=here):
        for phys in mine.physical:
            accumulate_micro_batch(engine, loss, randomness, images=images_dev, labels=labels_dev, batch=phys,
                                   step=batch.step, num_classes=num_classes, autocast=amp)
        budget.spend(FINETUNE)          # recorded (and checked) before the noisy gradient exists
        final = engine.finalize()       # under torchrun: the one all-reduce; counts are the whole batch's
        nonfinite += final.num_nonfinite
        if on_release is not None:
            on_release(batch.step, denoiser)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(denoiser)
        # PRIVATE: the noiseless mean loss over the drawn sensitive batch, for logs/finetune.csv only.
        tail.end_step(batch.step + 1, {"loss": round(final.loss_sum / max(batch.size, 1), 6)},
                      {"lr": f.lr, "dropped_nonfinite": nonfinite})
    engine.close()
    tail.finish()
    if nonfinite:
        log(f"finetune: {nonfinite} sample gradient(s) with NaN/inf were dropped over the run (a count on the "
            f"sensitive data: keep it private).")
    return ckpt_path


def refuse_fresh_start(run: RunDir, budget: PrivacyBudget) -> None:
    """A fresh fine-tune must not overwrite releases that were made (they stay counted, so resume instead)."""
    counted = budget.spent.get(FINETUNE, 0)
    if counted:
        how = ("Resume with --resume, or start a new run directory" if run.checkpoint_path("finetune").is_file()
               else "No checkpoint is left to resume from: start a new run directory")
        raise RunDirError(f"The budget ledger records {counted} fine-tuning steps but the fine-tune is at step 0; "
                         f"refusing to start afresh (those steps stay spent). {how}.")
    found = run.finetune_outputs()
    if found:
        names = ", ".join(str(p.relative_to(run.path)) for p in found)
        raise RunDirError(f"{run.path} already holds fine-tune outputs ({names}) that its ledger budget.json does "
                         f"not count; a fresh fine-tune would make new releases beside them. Resume with --resume, "
                         f"or start a new run directory.")
