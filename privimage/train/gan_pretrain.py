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
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from privimage.data import ImageDataset
from privimage.gan.losses import d_hinge, paired_rows
from privimage.gan.sampling import save_gan_grid
from privimage.gan.steps import GANTrainState, check_training_data, generate, generator_update
from privimage.models.gan import GANConfig
from privimage.progress import progress_bar
from privimage.query.loaders import loader_kind, make_loader, write_ffcv
from privimage.train.common import load_checkpoint, save_checkpoint, step_generator, write_csv
from privimage.train.pretrain import _stream

__all__ = ["GAN_PRETRAIN_STREAMS", "expect_kind", "pretrain_gan", "pretrained_init"]

# step_generator streams (second seed part): fakes of D step s, latents of the G step after D step s.
# Distinct from the diffusion loops' (1, 2) and the loaders' (3, 4).
GAN_PRETRAIN_STREAMS = {"fakes": 11, "generator": 12}


def pretrain_gan(run_dir: str | Path, *,
                 images: torch.Tensor,              # uint8 (N, C, H, W): the public subset
                 labels: torch.Tensor,              # (N,) sensitive class ids
                 gan: GANConfig,                    # architecture (its num_classes: the sensitive classes)
                 steps: int,                        # discriminator steps
                 batch_size: int = 64,              # real images per discriminator step (= fakes, = G batch)
                 d_lr: float = 5e-4,                # DPImageBench DP-GAN: D 5e-4, G 2e-4, Adam betas (0, 0.999)
                 g_lr: float = 2e-4,
                 betas: tuple[float, float] = (0.0, 0.999),
                 d_steps_per_g_step: int = 5,       # one generator step after every n_D discriminator steps
                 ema_decay: float = 0.999,          # EMA of the generator, updated after each generator step
                 seed: int = 0,                     # public: data order, flips, latents
                 device: torch.device | str = "cpu",
                 compile: bool | None = None,       # torch.compile both networks' forwards; None: on CUDA only
                 checkpoint_every: int = 500,
                 log_every: int = 50,
                 sample_every: int = 0,
                 resume: bool = False,              # continue from checkpoints/pretrain.pt (exact)
                 stop_at_step: int | None = None,   # stop (after checkpointing) here, as if interrupted
                 loader: str = "auto",              # "device", "ffcv" or "auto" (privimage.query.loaders)
                 ffcv_path: str | Path | None = None,
                 config: dict | None = None,
                 log=print) -> Path:
    """Pre-train a generator/discriminator pair on uint8 ``images`` with ``labels``; returns the checkpoint.

    Writes ``checkpoints/pretrain.pt`` ({"kind": "gan-pretrain", "step", "steps", "generator",
    "discriminator", "ema", "optimizer_g", "optimizer_d", "gan", "log", "config"}), ``logs/pretrain.csv``
    and ``samples/pretrain*.png`` (EMA generator) into ``run_dir``.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    ckpt_path = run_dir / "checkpoints" / "pretrain.pt"
    check_training_data(images, labels, gan, "pre-training subset")
    if not (isinstance(d_steps_per_g_step, int) and d_steps_per_g_step >= 1):
        raise ValueError(f"Expected d_steps_per_g_step={d_steps_per_g_step} to be an integer >= 1.")
    torch.manual_seed(seed)
    nets = GANTrainState(gan, init=None, d_lr=d_lr, g_lr=g_lr, betas=betas, ema_decay=ema_decay, device=device)
    G, D, ema, opt_g, opt_d = nets.G, nets.D, nets.ema, nets.opt_g, nets.opt_d
    start, rows, g_loss = 0, [], None  # g_loss: the latest generator step's (None before the first)
    if resume:
        state = load_checkpoint(ckpt_path, map_location=device)
        expect_kind(state, "gan-pretrain", ckpt_path)
        nets.load_state_dict(state)
        start, rows, g_loss = state["step"], state["log"], state["g_loss"]
        log(f"pretrain (GAN): resuming at step {start}/{steps} from {ckpt_path}")

    compile = device.type == "cuda" if compile is None else compile
    d_forward = torch.compile(D) if compile else D
    g_forward = torch.compile(G) if compile else G
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    num_classes = gan.num_classes
    subset = ImageDataset(images, labels.long(), [str(c) for c in range(max(num_classes, 1))])
    ffcv_path = Path(ffcv_path) if ffcv_path is not None else run_dir / "query" / "subset.ffcv"
    kind = loader_kind(subset, device=device, kind=loader)
    if kind == "ffcv" and not (resume and ffcv_path.is_file()):
        write_ffcv(subset, ffcv_path)
    batches = make_loader(subset, batch_size=batch_size, device=device, kind=kind, ffcv_path=ffcv_path, seed=seed,
                          shuffle=True, flip=True, normalize=True, drop_last=len(subset) >= batch_size)
    if batches.num_examples != len(subset):
        raise ValueError(f"{ffcv_path} holds {batches.num_examples} images but the subset has {len(subset)}: "
                         "it is not this run's subset (delete it, or pre-train without --resume).")

    def checkpoint(step: int) -> None:
        save_checkpoint({"kind": "gan-pretrain", "step": step, "steps": steps, **nets.state_dict(),
                         "gan": gan.to_dict(), "log": rows, "g_loss": g_loss, "config": config}, ckpt_path)
        write_csv(rows, run_dir / "logs" / "pretrain.csv")

    bar = progress_bar(steps, desc="pre-train GAN (public subset)", unit="step",
                       initial=start)
    t_last, n_last, done = time.perf_counter(), 0, start
    end = steps if stop_at_step is None else max(start, min(steps, stop_at_step))
    for step, (x, y) in zip(range(start, end), _stream(batches, start)):
        y = y if num_classes else None
        n = x.shape[0]
        rng = step_generator(seed, GAN_PRETRAIN_STREAMS["fakes"], step, device=device)
        z = torch.randn(n, gan.z_dim, generator=rng, device=device)
        y_fake = torch.randint(num_classes, (n,), generator=rng, device=device) if num_classes else None
        fake = generate(g_forward, z, y_fake)
        with torch.autocast(**amp):
            d_loss = paired_rows(d_forward, x, y, fake, y_fake).float().sum() / n
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        done = step + 1
        if done % d_steps_per_g_step == 0:
            g_rng = step_generator(seed, GAN_PRETRAIN_STREAMS["generator"], step, device=device)
            g_loss = round(generator_update(g_forward, d_forward, opt_g, batch_size=n, chunk=n, rng=g_rng, amp=amp), 6)
            ema.update(G)
        n_last += n
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            ips = n_last / max(now - t_last, 1e-9)
            value = round(float(d_loss.detach()), 6)
            rows.append({"step": done, "d_loss": value, "g_loss": g_loss, "epsilon": 0.0, "images_per_s": round(ips, 2),
                         "d_lr": d_lr, "g_lr": g_lr})
            bar.set_postfix(d_loss=value, g_loss=g_loss, img_s=f"{ips:.0f}", refresh=False)
            t_last, n_last = now, 0
        bar.update()
        if sample_every and done % sample_every == 0:
            save_gan_grid(ema.module, run_dir / "samples" / f"pretrain-{done:06d}.png", seed=seed, device=device)
        if done % checkpoint_every == 0 or done == steps:
            checkpoint(done)
    bar.close()
    checkpoint(done)
    if done == steps and steps > 0:
        save_gan_grid(ema.module, run_dir / "samples" / "pretrain.png", seed=seed, device=device)
    return ckpt_path


def pretrained_init(path: str | Path, *, map_location="cpu") -> dict:
    """The fine-tune's starting point from a GAN pre-training checkpoint: the EMA generator (as
    DPImageBench's DP-GAN starts its fine-tune) and the discriminator. {"generator", "discriminator", "gan"}."""
    state = load_checkpoint(path, map_location=map_location)
    expect_kind(state, "gan-pretrain", Path(path))
    return {"generator": state["ema"]["module"], "discriminator": state["discriminator"], "gan": state["gan"]}


def expect_kind(state: dict, kind: str, path: Path) -> None:
    """Refuse a checkpoint of another kind (a diffusion checkpoint where a GAN one is expected), naming it."""
    if state.get("kind") != kind:
        raise ValueError(f"Checkpoint {path} is a {state.get('kind', 'unknown')!r} checkpoint, not {kind!r} "
                         f"(a diffusion run directory? check model.kind, or start without --resume).")
