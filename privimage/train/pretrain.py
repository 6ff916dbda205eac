"""Non-private pre-training of the UNet on the public subset the DP query selected (PrivImage §4.2).

The subset's labels are already mapped to the SENSITIVE classes (each selected public class stands for the
sensitive class whose noisy histogram chose it, as the official code does), so the conditional model learns
"class c looks like these public images" and the DP fine-tune only has to adapt it.

The subset is streamed in epochs through the project's loaders (:mod:`privimage.query.loaders`: the uint8
subset resident on the device, or an FFCV file written once and prefetched), with random horizontal flips
and [-1, 1] normalisation on the batch. Step s is batch ``s % B`` of epoch ``s // B`` (B batches per epoch),
and a loader's batches depend only on (seed, epoch, batch index), so a resumed run streams exactly the
batches the interrupted one would have.

Under torchrun (:mod:`privimage.distributed`) every rank runs this loop: the model is wrapped in
``DistributedDataParallel`` (rank 0's initial weights on every rank, gradients all-reduced in buckets
during the backward), each rank streams its rows of every batch (``loader.epoch(e, start=b, rank=r,
world_size=W)``: the config's batch split across ranks, sizes differing by at most one), and draws the step's
randomness for the WHOLE batch, keeping its rows. The gradients are SUMMED (each rank's loss is its rows'
sum over the whole batch's size), so every step is the one-process step up to the order of additions, for any
W, uneven splits included. Rank 0 alone writes; the checkpoint is the one a single process writes, so a run
resumes under any world size.

The step is small and pure (inputs: images, labels, σ, noise), so ``torch.compile`` sees fixed shapes; the
step's randomness (σ, noise, label dropout) is drawn outside from a generator seeded by (seed, step), which
also keeps ``--resume`` exact. bf16 autocast is used on CUDA only (CPU bf16 matmuls are slower than fp32 on
most CPUs).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from privimage import distributed
from privimage.config import PretrainConfig
from privimage.data import ImageDataset
from privimage.diffusion import EDMDenoiser, EDMLoss, EMA
from privimage.errors import RunDirError
from privimage.models import UNet, UNetConfig
from privimage.progress import progress_bar
from privimage.rundir import RunDir
from privimage.engine import distributed as dp_distributed
from privimage.train.common import place, save_sample_grid, step_generator, unwrap
from privimage.train.subset import stream, subset_batches, subset_loader_kind

__all__ = ["pretrain"]


def pretrain(run_dir: RunDir | str | Path, config: PretrainConfig, *, images: torch.Tensor, labels: torch.Tensor,
             unet: UNetConfig, seed: int = 0, device: torch.device | str = "cpu", resume: bool = False,
             stop_at_step: int | None = None, run_config: dict | None = None, log=print) -> Path:
    """Train ``unet`` on uint8 ``images`` with ``labels`` (sensitive class ids) for ``config.steps`` Adam steps.

    Writes ``checkpoints/pretrain.pt`` (model, EMA, optimizer, step, log rows, run config), ``logs/pretrain.csv``
    and ``samples/pretrain*.png`` into ``run_dir``; returns the checkpoint's path.

    Args:
        config: the run config's ``pretrain`` section: steps, batch_size (images per step; a subset smaller
            than one batch is streamed whole each step), lr, ema_decay, label_dropout, checkpoint_every,
            log_every, sample_every, compile (torch.compile the loss step; ``None``: only on CUDA, where the
            compile pays), loader ("device", "ffcv" or "auto": :func:`privimage.query.loaders.loader_kind`;
            with "ffcv" a fresh run writes ``query/subset.ffcv`` from ``images``/``labels``, a resumed one
            streams the file the interrupted run wrote).
        resume: continue from ``checkpoints/pretrain.pt``; the result equals an uninterrupted run.
        stop_at_step: stop (after checkpointing) once this many steps are done, as if interrupted.
        run_config: stored in the checkpoint for provenance (the public run config as a dict).
    """
    run = RunDir.of(run_dir)
    p = config
    steps = p.steps
    here = place(device, log)
    group, rank, world, writer, device, log = here.group, here.rank, here.world_size, here.writer, here.device, here.log
    ckpt_path = run.checkpoint_path("pretrain")
    if len(images) == 0:
        raise RunDirError("The pre-training subset is empty.")
    torch.manual_seed(seed)
    net = UNet(unet).to(device)
    denoiser = EDMDenoiser(net)
    ema = EMA(denoiser, p.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    loss = EDMLoss(num_noise=1, label_dropout=p.label_dropout)
    start, rows = 0, []
    if resume:
        state = run.load_checkpoint("pretrain", map_location=device)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        start, rows = state["step"], state["log"]
        log(f"pretrain: resuming at step {start}/{steps} from {ckpt_path}")

    compile = device.type == "cuda" if p.compile is None else p.compile
    compute = torch.compile(loss.compute, fullgraph=True) if compile else loss.compute
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    num_classes = unet.num_classes
    shape = tuple(images.shape[1:])
    subset = ImageDataset(images, labels.long(), [str(c) for c in range(max(num_classes, int(labels.max()) + 1))])
    batch_size = p.batch_size
    kind = subset_loader_kind(run, subset, p.loader, device=device, resume=resume, writer=writer)
    if group is not None:  # every rank: rank 0's settings, data and step; the file written before it is read
        dp_distributed.refuse_mismatch({"pretrain": repr(p), "unet": unet.to_dict(), "num_examples": len(subset),
                                        "seed": seed, "start": start, "kind": kind}, group, "the pre-training")
        dp_distributed.check_replicas([images, labels], group, "pre-training subset")
        distributed.barrier()
    batches = subset_batches(run, subset, batch_size, device=device, kind=kind, seed=seed)
    if len(subset) < batch_size:
        log(f"pretrain: the subset has {len(subset)} images, fewer than batch_size={batch_size}; "
            "each step takes the whole subset")

    model = denoiser  # what the step calls: under torchrun, DDP around it
    if group is not None:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(denoiser, process_group=group, broadcast_buffers=False)
        model.register_comm_hook(group, _sum_gradients)
    full = min(batch_size, len(subset))  # every step's whole batch (drop_last, or the whole small subset)

    def checkpoint(step: int) -> None:
        if not writer:  # rank 0 alone writes; its checkpoint is the same as one process's
            return
        run.save_checkpoint("pretrain", {"kind": "pretrain", "step": step, "steps": steps,
                                         "model": unwrap(net).state_dict(), "ema": ema.state_dict(),
                                         "optimizer": opt.state_dict(), "unet": unet.to_dict(), "log": rows,
                                         "config": run_config})
        run.save_log("pretrain", rows)

    bar = progress_bar(steps, desc="pre-train (public subset)", unit="step", initial=start, enabled=writer)
    t_last, n_last = time.perf_counter(), 0
    done = start
    end = steps if stop_at_step is None else max(start, min(steps, stop_at_step))
    for step, (x, y) in zip(range(start, end), stream(batches, start, rank, world)):
        y = y if num_classes else None
        gen = step_generator(seed, 1, step, device=device)
        drawn = _draw_rows(loss, x, y, rank_rows=dp_distributed.rank_rows(full, rank=rank, world_size=world),
                           full=full, num_classes=num_classes, generator=gen)
        with torch.autocast(**amp):
            rows_loss = compute(model, x, *drawn)
        total = rows_loss.sum() / full  # this rank's share of the batch mean: the ranks' gradients are summed
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        ema.update(denoiser)
        n_last += full
        done = step + 1
        if done % p.log_every == 0 or done == steps:
            now = time.perf_counter()
            ips = n_last / max(now - t_last, 1e-9)
            value = float(_summed(total.detach(), group))
            rows.append({"step": done, "loss": round(value, 6), "epsilon": 0.0, "images_per_s": round(ips, 2),
                         "lr": p.lr})
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{ips:.0f}", refresh=False)
            t_last, n_last = now, 0
        bar.update()
        if p.sample_every and done % p.sample_every == 0 and writer:
            save_sample_grid(ema.module, run.training_grid_path("pretrain", done), shape=shape,
                             num_classes=num_classes, seed=seed, device=device)
        if done % p.checkpoint_every == 0 or done == steps:
            checkpoint(done)
    bar.close()
    checkpoint(done)
    if done == steps and steps > 0 and writer:
        save_sample_grid(ema.module, run.training_grid_path("pretrain"), shape=shape, num_classes=num_classes,
                         seed=seed, device=device)
    return ckpt_path


def _draw_rows(loss: EDMLoss, x: torch.Tensor, y: torch.Tensor | None, *, rank_rows: slice, full: int,
               num_classes: int, generator: torch.Generator):
    """The step's draws (dropped-out labels, σ, noise) for rows ``rank_rows`` of a batch of ``full`` images:
    drawn for the whole batch, as one process draws them, and these rows' kept (``x``, ``y``: those rows)."""
    if x.shape[0] == full:
        return loss.draw(x, y, num_classes=num_classes, generator=generator)
    whole = x.new_empty(()).expand(full, *x.shape[1:])  # the batch's shape, no memory
    labels = None
    if y is not None:
        labels = y.new_zeros(full)
        labels[rank_rows] = y
    labels, sigma, noise = loss.draw(whole, labels, num_classes=num_classes, generator=generator)
    k = loss.num_noise
    rows = slice(rank_rows.start * k, rank_rows.stop * k)
    return (None if labels is None else labels[rank_rows]), sigma[rows], noise[rows]


def _sum_gradients(group, bucket):
    """DDP communication hook: SUM the bucket over the ranks (DDP's default averages)."""
    import torch.distributed as dist

    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _summed(value: torch.Tensor, group) -> torch.Tensor:
    """``value`` summed over the ranks (itself in one process)."""
    if group is None:
        return value
    import torch.distributed as dist

    out = value.float().reshape(1).to(dp_distributed.collective_device(group))
    dist.all_reduce(out, group=group)
    return out[0]
