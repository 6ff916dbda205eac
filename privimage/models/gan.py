"""The GAN of PRIVIMAGE+G: a class-conditional BigGAN-style generator and a projection discriminator.

Architecture facts carried over from the references: StudioGAN's ``big_resnet`` as DPImageBench's DP-GAN
configures it for CIFAR-10 (z_dim 60, g_conv_dim 60, g_shared_dim 128, d_conv_dim 80, self-attention in the
generator at 16×16, GroupNorm and no spectral norm in the discriminator), BigGAN (Brock et al.,
arXiv 1809.11096) and the projection discriminator (Miyato & Koyama, arXiv 1802.05637).

Generator ``G(z, y)``:

* hierarchical latent: ``z`` is split into ``len(g_ch_mult)`` equal chunks; the first goes through a Linear
  to a 4×4 map, each other chunk is concatenated with a shared class embedding (``shared_dim``) and
  conditions one up-block;
* up-block: cnorm(·|c) → ReLU → nearest ×2 → conv3×3 → cnorm(·|c) → ReLU → conv3×3, plus the skip
  nearest ×2 → conv1×1; a conditional norm has gain ``1 + Linear(c)`` and bias ``Linear(c)`` (no bias terms);
* SAGAN self-attention (Zhang et al., arXiv 1805.08318) after the blocks whose output side is listed in
  ``g_attention``: θ, φ, g 1×1 convs (C/8, C/8, C/2 channels), φ and g max-pooled 2×2, softmax over the
  pooled positions, output 1×1 conv scaled by a learned γ that starts at 0;
* norm → ReLU → conv3×3 → tanh; spectral norm (Miyato et al., arXiv 1802.05957) on every conv and linear
  layer; orthogonal initialisation everywhere (BigGAN's "ortho").

Discriminator ``D(x, y) -> (B,)``:

* first block: conv3×3 → GN → ReLU → conv3×3 → avg-pool, skip avg-pool → GN → conv1×1;
* later blocks (pre-activation): GN → ReLU → conv3×3 → GN → ReLU → conv3×3 (→ avg-pool), skip GN → conv1×1
  (→ avg-pool) when the width changes or the block down-samples;
* ReLU, sum over positions → h; output ``Linear(h) + ⟨embed(y), h⟩`` (projection conditioning).

What differs from the references, and why:

* The generator's class-conditional **BatchNorm is a conditional GroupNorm**. BatchNorm normalises over the
  batch, so a generated image would depend on the other latents of its batch, and in a DP discriminator step
  the number of fake images IS the private Poisson batch size. With GroupNorm each fake depends on its own
  (z, y) only: adding a sensitive record adds one fake and changes no other, which the per-record bound on
  the discriminator's gradient needs, and a sample depends on its seed only, whatever the batch.
* The discriminator holds only Conv2d, Linear, GroupNorm and Embedding, the layers the DP engine has exact
  per-sample rules for (no spectral norm there: DPImageBench's DP-GAN also trains D without it). ReLUs are
  not in place (the engine keeps each layer's input).
* A GroupNorm has the largest number of groups ≤ 32 that divides its width (240 = 4 × 60 is no multiple
  of 32).
* At 64×64 DPImageBench reuses its three-block 32×32 generator; the ``64`` preset here has four up-blocks
  with BigGAN's halving widths and StudioGAN's five-block 64×64 discriminator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["GAN_PRESETS", "Discriminator", "GANConfig", "Generator", "build_gan", "parameter_counts"]


@dataclass(frozen=True)
class GANConfig:
    """Public architecture settings of a generator/discriminator pair (config.json and every checkpoint)."""

    resolution: int = 32                              # image side; 4 · 2**(len(g_ch_mult) - 1)
    in_channels: int = 3                              # 3 for RGB, 1 for grayscale
    num_classes: int = 10                             # 0: unconditional (no class embeddings)
    z_dim: int = 60                                   # latent size; split into len(g_ch_mult) equal chunks
    shared_dim: int = 128                             # the generator's shared class embedding
    g_width: int = 60                                 # StudioGAN's g_conv_dim
    g_ch_mult: tuple[int, ...] = (4, 4, 4, 4)         # generator widths (× g_width) at sides 4, 8, ..., resolution
    g_attention: tuple[int, ...] = (16,)              # sides after which the generator has self-attention
    g_spectral_norm: bool = True                      # spectral norm on the generator's convs and linears
    d_width: int = 80                                 # StudioGAN's d_conv_dim
    d_ch_mult: tuple[int, ...] = (2, 2, 2, 2)         # discriminator block widths (× d_width)
    d_downsample: tuple[bool, ...] = (True, True, False, False)  # which discriminator blocks halve the side

    def __post_init__(self) -> None:
        blocks = len(self.g_ch_mult) - 1
        if blocks < 1 or self.resolution != 4 * 2 ** blocks:
            raise ValueError(f"GAN resolution={self.resolution} needs g_ch_mult with log2(resolution/4) + 1 "
                             f"entries (one width per side 4, 8, ..., resolution); got g_ch_mult={self.g_ch_mult}.")
        if self.z_dim % len(self.g_ch_mult):
            raise ValueError(f"GAN z_dim={self.z_dim} must split into {len(self.g_ch_mult)} equal chunks (one "
                             f"for the 4x4 map, one per up-block): use a multiple of {len(self.g_ch_mult)}.")
        if self.in_channels not in (1, 3) or self.num_classes < 0:
            raise ValueError(f"Expected in_channels={self.in_channels} in (1, 3) and num_classes="
                             f"{self.num_classes} >= 0.")
        sides = {4 * 2 ** (i + 1) for i in range(blocks)}
        if not set(self.g_attention) <= sides:
            raise ValueError(f"GAN g_attention={self.g_attention}: attention follows an up-block, so each side "
                             f"must be one of {sorted(sides)}.")
        if any(self.g_width * self.g_ch_mult[i + 1] < 8 for i in range(blocks) if 4 * 2 ** (i + 1) in self.g_attention):
            raise ValueError(f"GAN g_attention={self.g_attention} needs >= 8 channels there (it projects to C/8).")
        if min(self.g_ch_mult) < 1 or min(self.d_ch_mult, default=0) < 1 or self.g_width < 1 or self.d_width < 1:
            raise ValueError(f"Expected positive widths, got g_width={self.g_width} x {self.g_ch_mult}, "
                             f"d_width={self.d_width} x {self.d_ch_mult}.")
        if len(self.d_ch_mult) != len(self.d_downsample):
            raise ValueError(f"GAN d_ch_mult={self.d_ch_mult} and d_downsample={self.d_downsample} need one entry "
                             f"per discriminator block each.")
        if self.resolution % 2 ** sum(self.d_downsample):
            raise ValueError(f"GAN resolution={self.resolution} cannot be halved {sum(self.d_downsample)} times "
                             f"(d_downsample={self.d_downsample}).")
        if self.z_dim < 1 or (self.num_classes and self.shared_dim < 1):
            raise ValueError(f"Expected z_dim={self.z_dim} >= 1 and shared_dim={self.shared_dim} >= 1.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GANConfig":
        d = dict(d)
        for key in ("g_ch_mult", "g_attention", "d_ch_mult", "d_downsample"):
            d[key] = tuple(d[key])
        return cls(**d)


# Reference sizes; parameter counts are pinned by tests/privimage/models/test_gan.py.
GAN_PRESETS: dict[str, GANConfig] = {
    # DPImageBench's DP-GAN / PRIVIMAGE+G for CIFAR-10 (configs/DPGAN/cifar10_32_eps*.yaml)
    "32": GANConfig(),
    # 64×64 (CelebA): four up-blocks with BigGAN's halving widths, StudioGAN's 64×64 discriminator
    "64": GANConfig(resolution=64, z_dim=80, g_width=32, g_ch_mult=(16, 8, 4, 2, 1), g_attention=(32,),
                    d_width=32, d_ch_mult=(1, 2, 4, 8, 16), d_downsample=(True, True, True, True, False)),
    # the CPU demo: 16×16, same block types, 32 channels throughout
    "demo": GANConfig(resolution=16, z_dim=48, shared_dim=32, g_width=8, g_ch_mult=(4, 4, 4), g_attention=(8,),
                      d_width=16, d_ch_mult=(2, 2, 2), d_downsample=(True, True, False), num_classes=10),
    # tests: 8×8, every block type
    "tiny": GANConfig(resolution=8, z_dim=8, shared_dim=8, g_width=4, g_ch_mult=(2, 2), g_attention=(8,),
                      d_width=4, d_ch_mult=(2, 3), d_downsample=(True, False), num_classes=3),
}


def build_gan(preset: str | GANConfig = "32", **overrides) -> tuple["Generator", "Discriminator"]:
    """A generator and a discriminator from a preset name (see :data:`GAN_PRESETS`) or a config.

    Example:
        >>> g, d = build_gan("tiny", num_classes=2)
        >>> x = g(torch.randn(4, 8), torch.tensor([0, 1, 1, 0]))
        >>> x.shape, d(x, torch.tensor([0, 1, 1, 0])).shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4]))
    """
    if isinstance(preset, str):
        if preset not in GAN_PRESETS:
            raise ValueError(f"Unknown GAN preset {preset!r}; choose one of {sorted(GAN_PRESETS)}.")
        preset = GAN_PRESETS[preset]
    config = replace(preset, **overrides)
    return Generator(config), Discriminator(config)


def _groups(channels: int) -> int:
    """The largest number of GroupNorm groups <= 32 that divides ``channels``."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def _init(module: nn.Module) -> None:
    """BigGAN's orthogonal initialisation of every conv, linear and embedding weight; zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.orthogonal_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _check_labels(labels: torch.Tensor | None, num_classes: int, rows: int, who: str) -> None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError(f"The {who} is unconditional (num_classes=0) but got labels; pass labels=None.")
        return
    if labels is None or labels.shape != (rows,) or labels.dtype != torch.long:
        got = None if labels is None else f"{labels.dtype} {tuple(labels.shape)}"
        raise ValueError(f"The {who} needs class labels of shape ({rows},), dtype long; got {got}.")
    if not torch.compiler.is_compiling() and rows and not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(f"The {who}'s labels must lie in [0, {num_classes}); got min {int(labels.min())}, "
                         f"max {int(labels.max())}.")


# ---- generator ---------------------------------------------------------------------------------------------

class ConditionalGroupNorm(nn.Module):
    """GroupNorm without affine terms, then a per-sample gain ``1 + Linear(c)`` and bias ``Linear(c)``."""

    def __init__(self, cond_dim: int, channels: int, sn):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False, eps=1e-4)
        self.gain = sn(nn.Linear(cond_dim, channels, bias=False))
        self.bias = sn(nn.Linear(cond_dim, channels, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + self.gain(cond))[:, :, None, None] + self.bias(cond)[:, :, None, None]


class GenBlock(nn.Module):
    """BigGAN up-block: two conditionally normalised 3×3 convs after a nearest ×2, plus a 1×1 skip."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, sn):
        super().__init__()
        self.norm0 = ConditionalGroupNorm(cond_dim, in_ch, sn)
        self.conv0 = sn(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.norm1 = ConditionalGroupNorm(cond_dim, out_ch, sn)
        self.conv1 = sn(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = sn(nn.Conv2d(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm0(x, cond)), scale_factor=2.0, mode="nearest")
        h = self.conv1(F.relu(self.norm1(self.conv0(h), cond)))
        return h + self.skip(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention(nn.Module):
    """SAGAN self-attention: queries at every position, keys/values max-pooled 2×2; residual scaled by γ."""

    def __init__(self, channels: int, sn):
        super().__init__()
        self.theta = sn(nn.Conv2d(channels, channels // 8, 1, bias=False))
        self.phi = sn(nn.Conv2d(channels, channels // 8, 1, bias=False))
        self.g = sn(nn.Conv2d(channels, channels // 2, 1, bias=False))
        self.out = sn(nn.Conv2d(channels // 2, channels, 1, bias=False))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.theta(x).flatten(2)                                   # (B, C/8, HW)
        k = F.max_pool2d(self.phi(x), 2).flatten(2)                    # (B, C/8, HW/4)
        v = F.max_pool2d(self.g(x), 2).flatten(2)                      # (B, C/2, HW/4)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)            # (B, HW, HW/4)
        h = (v @ attn.transpose(1, 2)).view(B, C // 2, H, W)
        return x + self.gamma * self.out(h)


class Generator(nn.Module):
    """``forward(z, labels) -> images`` in [-1, 1]: z (B, z_dim), labels (B,) long (None if unconditional).

    Every image is a function of its own (z, label) only (no batch statistics anywhere), in train and eval
    mode alike; only spectral norm's power iteration (a buffer update, train mode only) depends on calls.
    """

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = c = config
        sn = (lambda m: spectral_norm(m, eps=1e-6)) if c.g_spectral_norm else (lambda m: m)
        widths = [c.g_width * m for m in c.g_ch_mult]
        self.chunk = c.z_dim // len(widths)
        cond_dim = self.chunk + (c.shared_dim if c.num_classes else 0)
        self.shared = nn.Embedding(c.num_classes, c.shared_dim) if c.num_classes else None
        self.linear = sn(nn.Linear(self.chunk, widths[0] * 16))
        self.blocks = nn.ModuleList()
        self.attention = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            self.blocks.append(GenBlock(w_in, w_out, cond_dim, sn))
            side = 4 * 2 ** (i + 1)
            self.attention.append(SelfAttention(w_out, sn) if side in c.g_attention else nn.Identity())
        self.norm_out = nn.GroupNorm(_groups(widths[-1]), widths[-1], eps=1e-4)
        self.conv_out = sn(nn.Conv2d(widths[-1], c.in_channels, 3, padding=1))
        _init(self)

    @classmethod
    def from_state(cls, config: GANConfig | dict, state: dict) -> "Generator":
        """A generator in eval mode with ``state`` loaded (e.g. a checkpoint's ``["ema"]["module"]``)."""
        generator = cls(config if isinstance(config, GANConfig) else GANConfig.from_dict(config))
        generator.load_state_dict(state)
        return generator.eval()

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if z.dim() != 2 or z.shape[1] != c.z_dim:
            raise ValueError(f"Expected latents of shape (B, {c.z_dim}), got {tuple(z.shape)}.")
        _check_labels(labels, c.num_classes, z.shape[0], "generator")
        first, *rest = torch.split(z, self.chunk, dim=1)
        if self.shared is not None:
            shared = self.shared(labels).to(z.dtype)
            rest = [torch.cat([shared, chunk], dim=1) for chunk in rest]
        h = self.linear(first).view(z.shape[0], -1, 4, 4)
        for block, attention, cond in zip(self.blocks, self.attention, rest):
            h = attention(block(h, cond))
        return torch.tanh(self.conv_out(F.relu(self.norm_out(h))))


# ---- discriminator -----------------------------------------------------------------------------------------

class DiscBlock(nn.Module):
    """Residual discriminator block; ``first``: no pre-activation and the skip pools before its conv."""

    def __init__(self, in_ch: int, out_ch: int, *, down: bool, first: bool):
        super().__init__()
        self.down, self.first = down, first
        self.norm0 = nn.GroupNorm(_groups(out_ch if first else in_ch), out_ch if first else in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch) if not first else None
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.learn_skip = first or down or in_ch != out_ch
        if self.learn_skip:
            self.skip_norm = nn.GroupNorm(_groups(in_ch), in_ch)
            self.skip = nn.Conv2d(in_ch, out_ch, 1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            h = self.conv1(F.relu(self.norm0(self.conv0(x))))
            return self._pool(h) + self.skip(self.skip_norm(self._pool(x)))
        h = self.conv0(F.relu(self.norm0(x)))
        h = self._pool(self.conv1(F.relu(self.norm1(h))))
        if not self.learn_skip:
            return h + x
        return h + self._pool(self.skip(self.skip_norm(x)))


class Discriminator(nn.Module):
    """``forward(x, labels) -> (B,)`` logits: x (B, C, H, W) in [-1, 1], labels (B,) long (None if
    unconditional). Row i of the output depends on row i of the input only."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = c = config
        widths = [c.d_width * m for m in c.d_ch_mult]
        self.blocks = nn.ModuleList()
        w_in = c.in_channels
        for i, (w_out, down) in enumerate(zip(widths, c.d_downsample)):
            self.blocks.append(DiscBlock(w_in, w_out, down=down, first=i == 0))
            w_in = w_out
        self.linear = nn.Linear(w_in, 1)
        self.embed = nn.Embedding(c.num_classes, w_in) if c.num_classes else None
        _init(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.resolution, c.resolution):
            raise ValueError(f"Expected images of shape (B, {c.in_channels}, {c.resolution}, {c.resolution}), "
                             f"got {tuple(x.shape)}.")
        _check_labels(labels, c.num_classes, x.shape[0], "discriminator")
        h = x
        for block in self.blocks:
            h = block(h)
        h = F.relu(h).sum(dim=(2, 3))                                   # (B, C): sum over positions
        out = self.linear(h)[:, 0]
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1)             # projection: ⟨embed(y), h⟩
        return out


def parameter_counts(config: GANConfig) -> dict[str, int]:
    """Trainable parameters of the generator and of the discriminator built from ``config``."""
    g, d = Generator(config), Discriminator(config)
    return {"generator": sum(p.numel() for p in g.parameters()),
            "discriminator": sum(p.numel() for p in d.parameters())}

