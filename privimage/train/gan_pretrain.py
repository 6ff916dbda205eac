"""Non-private pre-training of the GAN on the public subset the DP query selected (PRIVIMAGE+G).

The same protocol as DPImageBench's DP-GAN pre-training: hinge losses, Adam (β1 = 0) for both networks,
one generator step after every ``d_steps_per_g_step`` discriminator steps against the current
discriminator, an EMA of the generator after each generator step. Subset labels are already the
sensitive class ids (:mod:`privimage.train.pretrain`), so the conditional generator learns "class c looks
like these public images" and the DP fine-tune adapts it.

Streaming and exact resume as for the diffusion pre-training: discriminator step s reads batch ``s % B`` of
epoch ``s // B`` of the loader (random flips, [-1, 1]), its fakes come from a generator seeded by (seed, s),
a generator step after discriminator step s from one seeded by (seed, s) on another stream. A resumed run
therefore repeats the uninterrupted run bit for bit. Everything here is public data: nothing is secret.

Under torchrun (:mod:`privimage.distributed`) every rank runs this loop: each discriminator step's batch (the
config's batch) is split across the ranks (``loader.epoch(e, start=b, rank=r, world_size=W)``, sizes
differing by at most one, as the diffusion pre-training splits it), each rank draws the fakes of the WHOLE
batch from the step's seeded generator and keeps its rows, its loss is its rows' sum over the whole batch's
size, and one all-reduce sums the gradients (and the loss) before every rank's identical Adam step: the
one-process step up to the order of additions, for any W. Each generator step runs on rank 0 alone and the
result is broadcast (:mod:`privimage.train.gan_ranks`, which says why). Rank 0 alone writes; the checkpoint
is the one a single process writes, so a run resumes under any world size.

A batch with fewer rows than ranks (``batch_size`` or the subset smaller than W) leaves some rank with no
rows of it: that rank skips the discriminator's forward and backward and adds zeros to the all-reduce (its
loss too), so the step is still the one-process step. Skipping a forward changes nothing else because no
forward here has state: the discriminator has no spectral norm and no running statistics
(:mod:`privimage.models.gan`), and the fakes come from the generator in eval mode. (A discriminator with
spectral norm would need every rank's forward, to keep the power iterations in step.)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from privimage import distributed
from privimage.config import GANPretrainConfig
from privimage.data import ImageDataset
from privimage.engine import distributed as dp_distributed
from privimage.gan.losses import paired_rows
from privimage.gan.sampling import save_gan_grid
from privimage.gan.steps import GANTrainState, check_training_data, generate, generator_update
from privimage.models.gan import GANConfig
from privimage.progress import progress_bar
from privimage.rundir import RunDir
from privimage.train.common import place, step_generator
from privimage.train.gan_ranks import check_same_start, generator_step_on_rank0, module_tensors, sum_gradients
from privimage.train.subset import stream, subset_batches, subset_loader_kind

__all__ = ["GAN_PRETRAIN_STREAMS", "pretrain_gan", "pretrained_init"]

# step_generator streams (second seed part): fakes of D step s, latents of the G step after D step s.
# Distinct from the diffusion loops' (1, 2) and the loaders' (3, 4).
GAN_PRETRAIN_STREAMS = {"fakes": 11, "generator": 12}


def pretrain_gan(run_dir: RunDir | str | Path, config: GANPretrainConfig, *,
                 images: torch.Tensor,              # uint8 (N, C, H, W): the public subset
                 labels: torch.Tensor,              # (N,) sensitive class ids
                 gan: GANConfig,                    # architecture (its num_classes: the sensitive classes)
                 seed: int = 0,                     # public: data order, flips, latents
                 device: torch.device | str = "cpu",
                 resume: bool = False,              # continue from checkpoints/pretrain.pt (exact)
                 stop_at_step: int | None = None,   # stop (after checkpointing) here, as if interrupted
                 run_config: dict | None = None,    # the public run config, stored for provenance
                 log=print) -> Path:
    """Pre-train a generator/discriminator pair on uint8 ``images`` with ``labels``; returns the checkpoint.

    ``config`` is the run config's ``pretrain`` section (:class:`~privimage.config.GANPretrainConfig`): steps
    (discriminator steps), batch_size (real images per discriminator step = fakes = generator batch), d_lr,
    g_lr, betas, d_steps_per_g_step (n_D), ema_decay, checkpoint/log/sample intervals, compile (both
    networks' forwards; None: on CUDA only), loader ("device", "ffcv" or "auto").

    Writes, through :class:`~privimage.rundir.RunDir`, ``checkpoints/pretrain.pt`` ({"kind": "gan-pretrain",
    "step", "steps", "generator", "discriminator", "ema", "optimizer_g", "optimizer_d", "gan", "log",
    "config"}), ``logs/pretrain.csv`` and ``samples/pretrain*.png`` (EMA generator).

    Raises:
        DataError: images/labels that do not fit ``gan``.
        RunDirError: a subset FFCV file of another subset, or a checkpoint of another kind on resume.
    """
    run = RunDir.of(run_dir)
    p = config
    steps = p.steps
    here = place(device, log)
    group, rank, world, writer, device, log = here.group, here.rank, here.world_size, here.writer, here.device, here.log
    ckpt_path = run.checkpoint_path("pretrain")
    check_training_data(images, labels, gan, "pre-training subset")
    torch.manual_seed(seed)
    nets = GANTrainState(gan, init=None, d_lr=p.d_lr, g_lr=p.g_lr, betas=tuple(p.betas), ema_decay=p.ema_decay,
                         device=device)
    G, D, ema, opt_g, opt_d = nets.G, nets.D, nets.ema, nets.opt_g, nets.opt_d
    start, rows, g_loss = 0, [], None  # g_loss: the latest generator step's (None before the first)
    if resume:
        state = run.load_checkpoint("pretrain", map_location=device, model_kind="gan")
        nets.load_state_dict(state)
        start, rows, g_loss = state["step"], state["log"], state["g_loss"]
        log(f"pretrain (GAN): resuming at step {start}/{steps} from {ckpt_path}")

    compile = device.type == "cuda" if p.compile is None else p.compile
    d_forward = torch.compile(D) if compile else D
    g_forward = torch.compile(G) if compile else G
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    num_classes = gan.num_classes
    subset = ImageDataset(images, labels.long(), [str(c) for c in range(max(num_classes, 1))])
    batch_size = p.batch_size
    kind = subset_loader_kind(run, subset, p.loader, device=device, resume=resume, writer=writer)
    reducer = None
    if group is not None:  # every rank: rank 0's settings, data, start and weights; the file written before it is read
        check_same_start({"pretrain": repr(p), "gan": gan.to_dict(), "num_examples": len(subset), "seed": seed,
                          "start": start, "kind": kind},
                         [images, labels, *module_tensors(G, D, ema.module)], group, "the GAN pre-training")
        distributed.barrier()
        reducer = dp_distributed.GradientReducer(group)
    batches = subset_batches(run, subset, batch_size, device=device, kind=kind, seed=seed)

    full = min(batch_size, len(subset))  # every step's whole batch (drop_last, or the whole small subset)
    mine = dp_distributed.rank_rows(full, rank=rank, world_size=world)  # this rank's rows of it

    def checkpoint(step: int) -> None:
        if not writer:  # rank 0 alone writes; its checkpoint is the same as one process's
            return
        run.save_checkpoint("pretrain", {"kind": "gan-pretrain", "step": step, "steps": steps, **nets.state_dict(),
                                         "gan": gan.to_dict(), "log": rows, "g_loss": g_loss, "config": run_config})
        run.save_log("pretrain", rows)

    bar = progress_bar(steps, desc="pre-train GAN (public subset)", unit="step", initial=start, enabled=writer)
    t_last, n_last, done = time.perf_counter(), 0, start
    end = steps if stop_at_step is None else max(start, min(steps, stop_at_step))
    for step, (x, y) in zip(range(start, end), stream(batches, start, rank, world)):
        y = y if num_classes else None
        # the whole batch's fakes, as one process draws them; this rank's rows kept
        rng = step_generator(seed, GAN_PRETRAIN_STREAMS["fakes"], step, device=device)
        z = torch.randn(full, gan.z_dim, generator=rng, device=device)[mine]
        y_fake = torch.randint(num_classes, (full,), generator=rng, device=device)[mine] if num_classes else None
        opt_d.zero_grad(set_to_none=True)
        if len(x):
            fake = generate(g_forward, z, y_fake)
            with torch.autocast(**amp):
                d_loss = paired_rows(d_forward, x, y, fake, y_fake).float().sum() / full
            d_loss.backward()
        else:  # no rows of this batch here (fewer rows than ranks): nothing to add (module docstring)
            d_loss = torch.zeros((), device=device)
        d_total = d_loss.detach() if reducer is None else sum_gradients(D, d_loss, reducer)  # the ranks' sum
        opt_d.step()
        done = step + 1
        if done % p.d_steps_per_g_step == 0:
            g_rng = step_generator(seed, GAN_PRETRAIN_STREAMS["generator"], step, device=device)
            g_loss = round(generator_step_on_rank0(G, lambda: generator_update(
                g_forward, d_forward, opt_g, batch_size=full, chunk=full, rng=g_rng, amp=amp), group), 6)
            ema.update(G)
        n_last += full
        if done % p.log_every == 0 or done == steps:
            now = time.perf_counter()
            ips = n_last / max(now - t_last, 1e-9)
            value = round(float(d_total), 6)
            rows.append({"step": done, "d_loss": value, "g_loss": g_loss, "epsilon": 0.0, "images_per_s": round(ips, 2),
                         "d_lr": p.d_lr, "g_lr": p.g_lr})
            bar.set_postfix(d_loss=value, g_loss=g_loss, img_s=f"{ips:.0f}", refresh=False)
            t_last, n_last = now, 0
        bar.update()
        if p.sample_every and done % p.sample_every == 0 and writer:
            save_gan_grid(ema.module, run.training_grid_path("pretrain", done), seed=seed, device=device)
        if done % p.checkpoint_every == 0 or done == steps:
            checkpoint(done)
    bar.close()
    checkpoint(done)
    if done == steps and steps > 0 and writer:
        save_gan_grid(ema.module, run.training_grid_path("pretrain"), seed=seed, device=device)
    return ckpt_path


def pretrained_init(run_dir: RunDir | str | Path, *, map_location="cpu") -> dict:
    """The fine-tune's starting point from the run's GAN pre-training checkpoint: the EMA generator (as
    DPImageBench's DP-GAN starts its fine-tune) and the discriminator. {"generator", "discriminator", "gan"}."""
    state = RunDir.of(run_dir).load_checkpoint("pretrain", map_location=map_location, model_kind="gan")
    return {"generator": state["ema"]["module"], "discriminator": state["discriminator"], "gan": state["gan"]}
