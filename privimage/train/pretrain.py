"""Non-private pre-training of the UNet on the public subset the DP query selected (PrivImage §4.2).

The subset's labels are already mapped to the SENSITIVE classes (each selected public class stands for the
sensitive class whose noisy histogram chose it, as the official code does), so the conditional model learns
"class c looks like these public images" and the DP fine-tune only has to adapt it.

The subset is streamed in epochs through the project's loaders (:mod:`privimage.query.loaders`: the uint8
subset resident on the device, or an FFCV file written once and prefetched), with random horizontal flips
and [-1, 1] normalisation on the batch. Step s is batch ``s % B`` of epoch ``s // B`` (B batches per epoch),
and a loader's batches depend only on (seed, epoch, batch index), so a resumed run streams exactly the
batches the interrupted one would have.

The step is small and pure (inputs: images, labels, σ, noise), so ``torch.compile`` sees fixed shapes; the
step's randomness (σ, noise, label dropout) is drawn outside from a generator seeded by (seed, step), which
also keeps ``--resume`` exact. bf16 autocast is used on CUDA only (CPU bf16 matmuls are slower than fp32 on
most CPUs).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from privimage.config import PretrainConfig
from privimage.data import ImageDataset
from privimage.diffusion import EDMDenoiser, EDMLoss, EMA
from privimage.errors import RunDirError
from privimage.models import UNet, UNetConfig
from privimage.progress import progress_bar
from privimage.query.loaders import loader_kind, make_loader, write_ffcv
from privimage.rundir import RunDir
from privimage.train.common import save_sample_grid, step_generator, unwrap

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
    device = torch.device(device)
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
    ffcv_path, batch_size = run.subset_ffcv_path, p.batch_size
    kind = loader_kind(subset, device=device, kind=p.loader)
    if kind == "ffcv" and not (resume and ffcv_path.is_file()):
        write_ffcv(subset, ffcv_path)  # this subset's bytes, whatever an earlier run left at the path
    # drop_last keeps every step's batch the same size (one compiled shape, the same loss scale); a subset
    # smaller than one batch is one short batch per epoch instead.
    batches = make_loader(subset, batch_size=batch_size, device=device, kind=kind, ffcv_path=ffcv_path, seed=seed,
                          shuffle=True, flip=True, normalize=True, drop_last=len(subset) >= batch_size)
    if batches.num_examples != len(subset):
        raise RunDirError(f"{ffcv_path} holds {batches.num_examples} images but the subset has {len(subset)}: "
                         "it is not this run's subset (delete it, or pre-train without --resume).")
    if len(subset) < batch_size:
        log(f"pretrain: the subset has {len(subset)} images, fewer than batch_size={batch_size}; "
            "each step takes the whole subset")

    def checkpoint(step: int) -> None:
        run.save_checkpoint("pretrain", {"kind": "pretrain", "step": step, "steps": steps,
                                         "model": unwrap(net).state_dict(), "ema": ema.state_dict(),
                                         "optimizer": opt.state_dict(), "unet": unet.to_dict(), "log": rows,
                                         "config": run_config})
        run.save_log("pretrain", rows)

    bar = progress_bar(steps, desc="pre-train (public subset)", unit="step", initial=start)
    t_last, n_last = time.perf_counter(), 0
    done = start
    end = steps if stop_at_step is None else max(start, min(steps, stop_at_step))
    for step, (x, y) in zip(range(start, end), _stream(batches, start)):
        y = y if num_classes else None
        gen = step_generator(seed, 1, step, device=device)
        drawn = loss.draw(x, y, num_classes=num_classes, generator=gen)
        with torch.autocast(**amp):
            rows_loss = compute(denoiser, x, *drawn)
        total = rows_loss.sum() / x.shape[0]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        ema.update(denoiser)
        n_last += x.shape[0]
        done = step + 1
        if done % p.log_every == 0 or done == steps:
            now = time.perf_counter()
            ips = n_last / max(now - t_last, 1e-9)
            value = float(total.detach())
            rows.append({"step": done, "loss": round(value, 6), "epsilon": 0.0, "images_per_s": round(ips, 2),
                         "lr": p.lr})
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{ips:.0f}", refresh=False)
            t_last, n_last = now, 0
        bar.update()
        if p.sample_every and done % p.sample_every == 0:
            save_sample_grid(ema.module, run.training_grid_path("pretrain", done), shape=shape,
                             num_classes=num_classes, seed=seed, device=device)
        if done % p.checkpoint_every == 0 or done == steps:
            checkpoint(done)
    bar.close()
    checkpoint(done)
    if done == steps and steps > 0:
        save_sample_grid(ema.module, run.training_grid_path("pretrain"), shape=shape, num_classes=num_classes,
                         seed=seed, device=device)
    return ckpt_path


def _stream(batches, step: int):
    """Batches from step ``step`` on: batch ``step % B`` of epoch ``step // B``, then on, epoch after epoch."""
    epoch, start = divmod(step, len(batches))
    while True:
        yield from batches.epoch(epoch, start=start)
        epoch, start = epoch + 1, 0
