"""DP fine-tuning of the pre-trained GAN on the sensitive images (PRIVIMAGE+G; DPImageBench's DP-GAN).

Discriminator step t (the DP mechanism, one release per step):

1. a Poisson sample of the sensitive set (rate q, the sampling the accountant assumes), cut into fixed-size
   physical micro-batches with a padding mask (:class:`~privimage.engine.PoissonSampler`);
2. for each drawn record i, a fake image G(z_i, y'_i) with z_i, y'_i keyed by (secret key, t, i)
   (:mod:`privimage.randomness`; generator in eval mode, no gradient);
3. the engine clips the gradient of each PAIR's hinge loss (record i and its fake, :mod:`privimage.gan.losses`)
   to C, sums, and — after the ledger has recorded the release (``budget.spend`` raises rather than
   overspend) — adds N(0, σ²C²) once and divides by the public expected batch size q·N; Adam steps.

Generator step, after every ``d_steps_per_g_step`` discriminator steps: Adam on the mean hinge loss
−D(G(z, y), y) over latents from a PUBLIC stream seeded by (seed, t), with the discriminator frozen; then
the EMA follows. This is post-processing and costs no privacy: the generator's loss reads only the
discriminator's parameters — each a function of the DP releases so far — and data-independent latents;
no sensitive record, secret draw or un-noised gradient enters the generator's update, so the generator
(and its EMA, and every sample from it) is a function of the DP releases. The ledger therefore counts
discriminator steps only: σ, q and the number of steps come from the run's budget plan (FINETUNE), which
the pipeline calibrates together with the semantic query.

What is secret (checkpoint only, never in the release): the Poisson sampler's seed, the DP noise
generator's state and the per-record draws' key. ``secure=False`` derives all three from the public
``seed``: reproducible for tests, and NOT private.

Order on disk (as the diffusion fine-tune, :mod:`privimage.train.finetune`): at a checkpoint step s,
``budget.json`` (the ledger, counting s steps), then ``checkpoints/finetune.pt``, ``logs/finetune.csv`` and
any sample grid due, so no file derived from a release exists that the ledger on disk does not count. A
fresh start refuses a run directory that already holds fine-tune outputs or a ledger counting fine-tune
steps.

Exact resume: the checkpoint holds both networks, the EMA, both optimizers, the sampler (its seed: step t's
batch is a function of (seed, t)), the noise generator's state, the draws' key, the ledger and the log; the
per-record draws and the generator steps' latents are functions of the step. A resumed run repeats the
uninterrupted run bit for bit; steps computed after the last checkpoint but never saved are recomputed
with the same randomness, so they are the same release, not a second one.

Under torchrun (:mod:`privimage.distributed`) every rank runs this loop on the same data. Discriminator
step t: every rank makes the same Poisson draw (rank 0's secret sampler seed, handed over in memory), takes
its contiguous slice of the drawn records as physical micro-batches, pairs each record with the fake of its
OWN secret stream (keyed by the record's global index and rank 0's draws key, handed over in memory, so a
record's fake is the same for any world size), and the engine (``process_group``) all-reduces the clipped
sums once and adds the noise once, on rank 0 (:mod:`privimage.engine.distributed`); every rank applies the
same Adam step. Each generator step runs on rank 0 alone and its result is broadcast to every rank
(:mod:`privimage.train.gan_ranks` says why: spectral norm's power iteration would make a split step depend
on the world size; the broadcast keeps the replicas bit-identical). The ledger counts discriminator steps as
in one process; rank 0 alone writes; the checkpoint is the one a single process writes (rank 0's noise
generator and generator optimizer), so a run resumes under any world size. Ranks whose settings, data or
starting weights differ are refused before the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from privimage import distributed
from privimage.config import GANFinetuneConfig
from privimage.diffusion import to_model_range
from privimage.engine import DPEngine, PrivacyBudget
from privimage.engine import distributed as dp_distributed
from privimage.errors import RunDirError
from privimage.gan.losses import pair_groups, paired_rows
from privimage.gan.sampling import save_gan_grid
from privimage.gan.steps import GANTrainState, check_training_data, generator_update, record_fakes
from privimage.models.gan import GANConfig
from privimage.privacy import FINETUNE
from privimage.rundir import RunDir
from privimage.train.common import place, step_generator
from privimage.train.dp_loop import DPSecrets, FinetuneTail, check_ledger, restore_ledger
from privimage.train.finetune import refuse_fresh_start
from privimage.train.gan_ranks import check_same_start, generator_step_on_rank0, module_tensors

__all__ = ["GAN_FINETUNE_STREAMS", "finetune_gan"]

# step_generator streams (second seed part) of the public generator steps and, with secure_noise=False only,
# of the test-mode noise; distinct from every other loop's.
GAN_FINETUNE_STREAMS = {"generator": 21, "insecure_noise": 22}

#: The checkpoint's key of the per-record draws (:class:`~privimage.train.dp_loop.DPSecrets`).
DRAWS_KEY = "record_randomness"

INSECURE_WARNING = ("finetune (GAN): secure_noise=False: the Poisson sampling, the DP noise and the fakes paired "
                    "with each record are derived from the PUBLIC seed. This run is reproducible and NOT private; "
                    "use it for tests only.")


def finetune_gan(run_dir: RunDir | str | Path, config: GANFinetuneConfig, *,
                 images: torch.Tensor,              # uint8 (N, C, H, W): the sensitive training set
                 labels: torch.Tensor,              # (N,) class ids
                 gan: GANConfig,
                 budget: PrivacyBudget,             # its FINETUNE plan: σ, q, number of discriminator steps
                 init_state: dict | None,           # pretrained_init(...) or None (no pre-training)
                 seed: int = 0,                     # public; with secure_noise=False also every secret (tests)
                 device: torch.device | str = "cpu",
                 resume: bool = False,              # continue from checkpoints/finetune.pt
                 stop_at_step: int | None = None,   # stop (after checkpointing) here, as if interrupted
                 run_config: dict | None = None,    # the public run config, stored for provenance
                 on_release: Callable[[int, torch.nn.Module], None] | None = None,  # audits: each D release
                 log=print) -> Path:
    """DP fine-tune on the sensitive ``images``/``labels``; returns ``checkpoints/finetune.pt``.

    ``on_release(step, discriminator)`` is called right after each discriminator step's noisy gradient is
    made (``p.grad`` of the discriminator's parameters holds it) and before the optimizer uses it: a
    white-box view of every release, for audits (:mod:`privimage.audit`). It must not change the parameters
    or their gradients.

    ``config`` is the run config's ``finetune`` section (:class:`~privimage.config.GANFinetuneConfig`):
    physical_batch_size (records per micro-batch: memory, NOT the logical batch), max_grad_norm (C), d_lr,
    g_lr, betas, d_steps_per_g_step (n_D), g_batch_size (fakes per generator step; None: round(q·N), public),
    ema_decay, method and compile (the DPEngine's), secure_noise, checkpoint/log/sample intervals. Its
    epochs and batch_size are read by the budget plan, whose FINETUNE entry gives σ, q and the steps here.

    The checkpoint (private) holds {"kind": "gan-finetune", "step", "steps", "generator", "discriminator",
    "ema", "optimizer_g", "optimizer_d", "sampler", "noise_generator", "record_randomness", "budget", "gan",
    "mechanism", "log", "config"}; ``budget.json`` the ledger; ``logs/finetune.csv`` the log (its ``d_loss`` is
    computed from sensitive data without noise: a diagnostic, not for publication).

    Raises:
        DataError: images/labels that do not fit ``gan``.
        RunDirError: an ``init_state`` of another architecture, a ledger that disagrees with the checkpoint's
            step (privacy would be miscounted), or a fresh start over fine-tune outputs that exist.
    """
    run = RunDir.of(run_dir)
    f = config
    here = place(device, log)
    group, writer, device, log = here.group, here.writer, here.device, here.log
    ckpt_path = run.checkpoint_path("finetune")
    check_training_data(images, labels, gan, "sensitive training set")
    plan = budget.plan[FINETUNE]
    n = len(images)
    sample_rate, steps, sigma = plan.sample_rate, plan.count, plan.noise_multiplier
    expected = sample_rate * n
    g_batch = f.g_batch_size if f.g_batch_size is not None else max(1, round(expected))
    torch.manual_seed(seed)
    if init_state is not None and init_state.get("gan", gan.to_dict()) != gan.to_dict():
        raise RunDirError(f"The pre-trained GAN's architecture {init_state['gan']} differs from the fine-tune's "
                          f"{gan.to_dict()}: pre-train again with this config, or fine-tune without pre-training.")
    nets = GANTrainState(gan, init=init_state, d_lr=f.d_lr, g_lr=f.g_lr, betas=tuple(f.betas), ema_decay=f.ema_decay,
                         device=device)
    G, D, ema, opt_g, opt_d = nets.G, nets.D, nets.ema, nets.opt_g, nets.opt_d
    if not f.secure_noise:
        log(INSECURE_WARNING)
    start, rows, g_loss = 0, [], None  # g_loss: the latest generator step's (None before the first)
    if resume:
        state = run.load_checkpoint("finetune", map_location=device, model_kind="gan")
        nets.load_state_dict(state)
        secrets = DPSecrets.from_checkpoint(state, draws_key=DRAWS_KEY, device=device)
        restore_ledger(budget, state)
        start, rows, g_loss = state["step"], state["log"], state["g_loss"]
        log(f"finetune (GAN): resuming at step {start}/{steps} from {ckpt_path}; ledger {dict(budget.spent)}")
        run.save_log("finetune", rows)  # the checkpoint's log (a write that failed after it is redone)
    else:
        refuse_fresh_start(run, budget)
        secrets = DPSecrets.fresh(
            sample_rate=sample_rate, steps=steps, physical_batch_size=f.physical_batch_size, secure=f.secure_noise,
            seed=seed, device=device,
            insecure_noise=lambda: step_generator(seed, GAN_FINETUNE_STREAMS["insecure_noise"], device=device))
    check_ledger(budget, start)
    if group is not None:  # every rank: rank 0's settings, data, weights and secrets (module docstring)
        check_same_start({"run_config": run_config, "finetune": repr(f), "gan": gan.to_dict(), "num_examples": n,
                          "seed": seed, "start": start, "ledger": dict(budget.spent)},
                         [images, labels, *module_tensors(G, D, ema.module)], group, "the GAN fine-tune")
    secrets = secrets.shared(group)
    draws = secrets.draws
    engine = DPEngine(D, max_grad_norm=f.max_grad_norm, noise_multiplier=sigma, expected_batch_size=expected,
                      method=f.method, generator=secrets.noise, compile=f.compile, process_group=group,
                      check_every=distributed.check_every())
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    images_dev, labels_dev = images.to(device), labels.to(device).long()
    groups = pair_groups(f.physical_batch_size, device)
    # Public description of the mechanism, for the release's privacy statement (privimage.release).
    mechanism = {"model": "gan", "max_grad_norm": f.max_grad_norm, "noise_multiplier": sigma,
                 "sample_rate": sample_rate, "steps": steps, "expected_batch_size": expected, "num_examples": n,
                 "method": f.method, "secure": f.secure_noise, "d_steps_per_g_step": f.d_steps_per_g_step}

    def checkpoint(step: int) -> dict:
        return {"kind": "gan-finetune", "step": step, "steps": steps, **nets.state_dict(),
                **secrets.state_dict(draws_key=DRAWS_KEY), "budget": budget.state_dict(), "gan": gan.to_dict(),
                "mechanism": mechanism, "log": rows, "g_loss": g_loss, "config": run_config}

    def grid(step: int) -> None:
        save_gan_grid(ema.module, run.training_grid_path("finetune", step), seed=seed, device=device)

    tail = FinetuneTail(run, f, budget=budget, steps=steps, start=start, rows=rows, expected=expected, sigma=sigma,
                        desc=f"DP fine-tune GAN (sigma={sigma:.3g}, q={sample_rate:.3g})", writer=writer,
                        state=checkpoint, grid=grid)
    for batch, mine in secrets.batches(n, start=start, stop_at_step=stop_at_step,
                                       physical_batch_size=f.physical_batch_size, here=here):
        for phys in mine.physical:
            real = to_model_range(images_dev[phys.indices.to(device)])
            y = labels_dev[phys.indices.to(device)] if gan.num_classes else None
            fake, y_fake = record_fakes(G, draws, step=batch.step, indices=phys.indices, device=device)
            pad = phys.is_padding.to(device).repeat(2)

            def loss_fn(model, real=real, y=y, fake=fake, y_fake=y_fake):
                with torch.autocast(**amp):
                    return paired_rows(model, real, y, fake, y_fake)

            engine.accumulate(loss_fn, is_padding=pad, groups=groups)
        budget.spend(FINETUNE)          # recorded (and checked) before the noisy gradient exists
        final = engine.finalize()       # under torchrun: the one all-reduce; the loss sum is the whole batch's
        if on_release is not None:
            on_release(batch.step, D)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        done = batch.step + 1
        if done % f.d_steps_per_g_step == 0:
            g_rng = step_generator(seed, GAN_FINETUNE_STREAMS["generator"], batch.step, device=device)
            g_loss = round(generator_step_on_rank0(G, lambda: generator_update(
                G, D, opt_g, batch_size=g_batch, chunk=f.physical_batch_size, rng=g_rng, amp=amp), group), 6)
            ema.update(G)
        # PRIVATE: the noiseless mean loss over the drawn sensitive batch, for logs/finetune.csv only.
        tail.end_step(done, {"d_loss": round(final.loss_sum / max(batch.size, 1), 6), "g_loss": g_loss},
                      {"d_lr": f.d_lr, "g_lr": f.g_lr})
    engine.close()
    tail.finish()
    return ckpt_path
