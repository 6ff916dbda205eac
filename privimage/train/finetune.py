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

Exact resume: the checkpoint holds the model, EMA, optimizer, the sampler's state (its seed: step t's batch
is a function of (seed, t)), the DP noise generator's state, the ledger and the log. The loss's σ/noise draws
come from a generator seeded by (seed, step, micro-batch). A resumed run therefore repeats bit for bit what
the uninterrupted run does; steps that were computed after the last checkpoint but never saved are recomputed
with the SAME randomness, so their output is the same release, not a second one (and the ledger in the
checkpoint never counted them twice). Checkpoints hold the sampler seed and noise state: keep them secret.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from privimage.diffusion import EDMDenoiser, EDMLoss, EMA, to_model_range
from privimage.engine import DPEngine, PoissonSampler, PrivacyBudget, secure_generator
from privimage.engine.budget import FINETUNE
from privimage.io import save_json
from privimage.models import UNet, UNetConfig
from privimage.progress import Progress
from privimage.train.common import (load_checkpoint, save_checkpoint, save_sample_grid, step_generator, write_csv)

__all__ = ["finetune"]


def finetune(run_dir: str | Path, *, images: torch.Tensor, labels: torch.Tensor, unet: UNetConfig,
             budget: PrivacyBudget, init_state: dict | None, physical_batch_size: int = 64, num_noise: int = 8,
             max_grad_norm: float = 1e-3, lr: float = 3e-4, ema_decay: float = 0.999, label_dropout: float = 0.1,
             method: str = "bk-mixed", seed: int = 0, device: torch.device | str = "cpu",
             compile: bool = False, secure_noise: bool = True, checkpoint_every: int = 10,
             log_every: int = 1, sample_every: int = 0, resume: bool = False, stop_at_step: int | None = None,
             config: dict | None = None, log=print) -> Path:
    """DP fine-tune on the sensitive uint8 ``images``/``labels``; writes checkpoints/finetune.pt and logs.

    Args:
        budget: the run's budget; its FINETUNE plan gives σ, q and the number of steps. Updated in place
            and written to ``run_dir/budget.json`` after every checkpoint.
        init_state: the pre-trained UNet state dict (``None``: train from scratch, DPDM-style).
        compile: run the DP step compiled (the UNet's forward, the per-sample norms, clip factors and clipped
            sums; :class:`~privimage.engine.DPEngine` ``compile``); off by default until compiled and eager
            steps are verified equal on a GPU. Needs ``method="bk-mixed"``. The noise is drawn eagerly either way.
        secure_noise: the Poisson sampler's seed and the DP noise come from the OS's cryptographic source
            (default). ``False`` derives both from ``seed``: reproducible for tests, but anyone who knows the
            seed knows the noise and the batches, so there is NO privacy.
        resume: continue from ``checkpoints/finetune.pt`` (its ledger replaces ``budget``'s).
        stop_at_step: stop (after checkpointing) once this many steps are done, as if interrupted.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    ckpt_path = run_dir / "checkpoints" / "finetune.pt"
    plan = budget.plan[FINETUNE]
    n = len(images)
    sample_rate, steps, sigma = plan.sample_rate, plan.count, plan.noise_multiplier
    expected = sample_rate * n
    torch.manual_seed(seed)
    net = UNet(unet).to(device)
    if init_state is not None:
        net.load_state_dict(init_state)
    denoiser = EDMDenoiser(net)
    ema = EMA(denoiser, ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sampler = PoissonSampler(sample_rate=sample_rate, steps=steps, physical_batch_size=physical_batch_size,
                             seed=None if secure_noise else seed, secure=secure_noise)
    noise_gen = secure_generator(device) if secure_noise else torch.Generator(device).manual_seed(seed + 7)
    start, rows = 0, []
    if resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sampler = PoissonSampler.from_state_dict(state["sampler"])
        noise_gen.set_state(state["noise_generator"].cpu())
        budget.spent.clear()
        budget.spent.update(PrivacyBudget.from_state_dict(state["budget"]).spent)
        start, rows = state["step"], state["log"]
        log(f"finetune: resuming at step {start}/{steps} from {ckpt_path}; ledger {dict(budget.spent)}")
    if budget.spent.get(FINETUNE, 0) != start:
        raise ValueError(f"The budget ledger records {budget.spent.get(FINETUNE, 0)} fine-tuning steps but the "
                         f"fine-tune is at step {start}; refusing to continue (privacy would be miscounted).")
    engine = DPEngine(denoiser, max_grad_norm=max_grad_norm, noise_multiplier=sigma, expected_batch_size=expected,
                      method=method, generator=noise_gen, compile=compile)
    loss = EDMLoss(num_noise=num_noise, label_dropout=label_dropout)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    num_classes = unet.num_classes
    shape = tuple(images.shape[1:])
    images_dev, labels_dev = images.to(device), labels.to(device)

    def checkpoint(step: int) -> None:
        save_checkpoint({"kind": "finetune", "step": step, "steps": steps, "model": net.state_dict(),
                         "ema": ema.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.state_dict(),
                         "noise_generator": noise_gen.get_state(), "budget": budget.state_dict(),
                         "unet": unet.to_dict(), "log": rows, "config": config}, ckpt_path)
        save_json(budget.state_dict(), run_dir / "budget.json")
        write_csv(rows, run_dir / "logs" / "finetune.csv")

    bar = Progress(total=steps, desc=f"DP fine-tune (sigma={sigma:.3g}, q={sample_rate:.3g})", unit="step")
    bar.count = start
    t_last, n_last, done = time.perf_counter(), 0, start
    net.train()
    for batch in sampler.logical_batches(n, start_step=start):
        if stop_at_step is not None and batch.step >= stop_at_step:
            break
        loss_sum = torch.zeros((), device=device)
        for micro, phys in enumerate(batch.physical):
            gen = step_generator(seed, 2, batch.step, micro, device=device)
            idx = phys.indices.to(device)
            x = to_model_range(images_dev[idx])
            y = labels_dev[idx] if num_classes else None
            drawn = loss.draw(x, y, num_classes=num_classes, generator=gen)
            pad_rows = loss.rows(phys.is_padding.to(device))

            def loss_fn(model, x=x, drawn=drawn):
                with torch.autocast(**amp):
                    return loss.compute(model, x, *drawn)

            stats = engine.accumulate(loss_fn, is_padding=pad_rows, groups=loss.groups(len(idx), device))
            if stats.losses is not None:
                loss_sum = loss_sum + torch.where(pad_rows, 0.0, stats.losses.detach().float()).sum()
        budget.spend(FINETUNE)          # recorded (and checked) before the noisy gradient exists
        engine.finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(denoiser)
        done = batch.step + 1
        n_last += batch.size
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            ips = n_last / max(now - t_last, 1e-9)
            eps = budget.epsilon_spent().upper
            # The mean loss over the drawn batch is computed from sensitive data: a training diagnostic, like
            # DPDM's and Opacus' logs; it is not part of the DP release and is not published by the pipeline.
            value = float(loss_sum) / max(batch.size, 1)
            rows.append({"step": done, "loss": round(value, 6), "epsilon": round(eps, 4),
                         "images_per_s": round(ips, 2), "sigma": sigma, "lr": lr})
            bar.set(loss=f"{value:.4f}", eps=f"{eps:.2f}", img_s=f"{ips:.0f}")
            t_last, n_last = now, 0
        bar.update()
        if sample_every and done % sample_every == 0:
            save_sample_grid(ema.module, run_dir / "samples" / f"finetune-{done:06d}.png", shape=shape,
                             num_classes=num_classes, seed=seed, device=device)
        if done % checkpoint_every == 0 or done == steps:
            checkpoint(done)
    bar.close()
    engine.close()
    checkpoint(done)
    return ckpt_path
