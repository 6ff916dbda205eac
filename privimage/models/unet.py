"""The DDPM++ / NCSN++ UNet that DPDM (arXiv 2210.09929) and PrivImage (arXiv 2311.12850) train.

Architecture facts carried over from score_sde's NCSN++ (Song et al., arXiv 2011.13456) in the DPDM
configuration (``resblock_type="biggan"``, ``progressive="none"``, positional embedding, ``skip_rescale``):

* the noise level enters as a sinusoidal (transformer-style) embedding of ``c_noise`` with ``nf`` channels,
  plus a learned class embedding of the same width (``num_classes + 1`` rows: the last row is the "no
  label" used for classifier-free guidance), then two Linear layers to ``4·nf`` with a SiLU between;
* BigGAN-style residual blocks: GroupNorm → SiLU → (resample) → conv3×3 → + Linear(time) → GroupNorm →
  SiLU → dropout → conv3×3, a 1×1 conv on the skip when shapes change, the sum divided by √2; down- and
  up-sampling happen *inside* such a block (average pooling / nearest neighbour, no FIR);
* single-head self-attention blocks at the listed resolutions (GroupNorm, q/k/v projections, softmax over
  positions, output projection, residual divided by √2); a middle ResBlock-Attention-ResBlock;
* the decoder has ``num_res_blocks + 1`` blocks per level, each consuming one skip connection.

Every layer with parameters is Conv2d, Linear, GroupNorm or Embedding, so the DP-SGD engine has a per-sample
rule for each one (no BatchNorm: it would mix the samples of a batch). Attention projections are ``nn.Linear``
applied to (B, H·W, C) tokens, which the engine treats as a linear layer with extra dimensions.

``num_groups`` of each GroupNorm is ``min(C // 4, 32)`` as in score_sde; the output convolution is
zero-initialised (score_sde's ``init_scale=0``) so an untrained denoiser starts as the skip path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UNet", "UNetConfig", "PRESETS", "build_unet", "count_parameters"]


@dataclass(frozen=True)
class UNetConfig:
    """Public architecture settings (they go into config.json and every checkpoint)."""

    resolution: int = 32                      # input side length; must be divisible by 2**(levels-1)
    in_channels: int = 3                      # 3 for RGB, 1 for grayscale
    nf: int = 32                              # channels of the first level; every width is nf * ch_mult
    ch_mult: tuple[int, ...] = (1, 2, 2)      # one entry per resolution level
    num_res_blocks: int = 2                   # encoder blocks per level (decoder: one more)
    attn_resolutions: tuple[int, ...] = (16,) # side lengths that get a self-attention block
    num_classes: int = 10                     # 0: unconditional (no class embedding)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.nf < 4 or self.nf % 4:
            raise ValueError(f"Expected nf={self.nf} to be a multiple of 4 (GroupNorm uses nf // 4 groups).")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"Expected ch_mult={self.ch_mult} to be a non-empty tuple of integers >= 1.")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution={self.resolution} is not divisible by 2**{len(self.ch_mult) - 1} "
                             f"(one halving per level of ch_mult={self.ch_mult}).")
        if self.num_res_blocks < 1 or self.num_classes < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"Expected num_res_blocks={self.num_res_blocks} >= 1, num_classes={self.num_classes}"
                             f" >= 0, dropout={self.dropout} in [0, 1).")
        if self.in_channels not in (1, 3):
            raise ValueError(f"Expected in_channels={self.in_channels} in (1, 3).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["ch_mult"] = tuple(d["ch_mult"])
        d["attn_resolutions"] = tuple(d["attn_resolutions"])
        return cls(**d)


# The official sizes (DPDM / PrivImage configs). Parameter counts are pinned by tests/privimage/models.
PRESETS: dict[str, UNetConfig] = {
    # CIFAR-10, PrivImage "s" (about 1.75M parameters), "m" and "b" (about 6.1M)
    "s": UNetConfig(nf=32, ch_mult=(1, 2, 2), attn_resolutions=(16,), num_classes=10),
    "m": UNetConfig(nf=32, ch_mult=(1, 2, 4), attn_resolutions=(16,), num_classes=10),
    "b": UNetConfig(nf=32, ch_mult=(1, 4, 4), attn_resolutions=(16,), num_classes=10),
    # CelebA 32x32 (DPDM): attention at 8 and 16, unconditional; CelebA 64x64: four levels
    "celeba32": UNetConfig(nf=32, ch_mult=(1, 2, 2), attn_resolutions=(8, 16), num_classes=0),
    "celeba64": UNetConfig(resolution=64, nf=32, ch_mult=(1, 1, 2, 2), attn_resolutions=(16,), num_classes=0),
    # tests and the CPU demo: small and fast, same block types
    "tiny": UNetConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_classes=10),
}


def build_unet(preset: str | UNetConfig = "s", **overrides) -> "UNet":
    """A UNet from a preset name (see :data:`PRESETS`) or a config, with fields overridden.

    Example:
        >>> net = build_unet("tiny", resolution=16, num_classes=3)
        >>> net(torch.zeros(2, 3, 16, 16), torch.zeros(2), torch.tensor([0, 3])).shape
        torch.Size([2, 3, 16, 16])
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"Unknown UNet preset {preset!r}; choose one of {sorted(PRESETS)}.")
        preset = PRESETS[preset]
    return UNet(replace(preset, **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of a real-valued noise level (Vaswani et al.; DDPM's ``get_timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(max_positions) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """BigGAN-style residual block with time conditioning; optional 2x down/up-sampling inside."""

    def __init__(self, in_ch: int, out_ch: int | None, temb_dim: int, *, up: bool = False, down: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.up, self.down = up, down
        self.norm0 = _norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm1 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # score_sde: the residual branch's last conv starts at zero scale
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv0(h)
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.dropout(F.silu(self.norm1(h)))
        h = self.conv1(h)
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * (1 / math.sqrt(2))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, residual divided by √2 (score_sde AttnBlockpp)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)             # (B, HW, C) tokens
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)             # softmax(q kᵀ / √C) v, one head
        h = self.proj(h).transpose(1, 2).reshape(B, C, H, W)
        return (x + h) * (1 / math.sqrt(2))


class UNet(nn.Module):
    """``forward(x, c_noise, labels)``: x (B, C, H, W) already scaled by c_in, c_noise (B,), labels (B,) long.

    With ``num_classes > 0`` a label equal to ``num_classes`` means "no label" (classifier-free guidance);
    ``labels=None`` is the same as all "no label".
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        nf, temb_dim = c.nf, 4 * c.nf
        self.label_embed = nn.Embedding(c.num_classes + 1, nf) if c.num_classes else None
        self.temb0 = nn.Linear(nf, temb_dim)
        self.temb1 = nn.Linear(temb_dim, temb_dim)
        self.conv_in = nn.Conv2d(c.in_channels, nf, 3, padding=1)

        def block(i, o, **kw):
            return ResBlock(i, o, temb_dim, dropout=c.dropout, **kw)

        levels = len(c.ch_mult)
        self.down = nn.ModuleList()       # entries: (ResBlock, AttnBlock|None) or a down-sampling ResBlock
        skips = [nf]
        ch, res = nf, c.resolution
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(nn.ModuleList([block(ch, nf * mult),
                                                AttnBlock(nf * mult) if res in c.attn_resolutions else nn.Identity()]))
                ch = nf * mult
                skips.append(ch)
            if level != levels - 1:
                self.down.append(block(ch, ch, down=True))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([block(ch, ch), AttnBlock(ch), block(ch, ch)])
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = c.ch_mult[level]
            for _ in range(c.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), nf * mult))
                ch = nf * mult
            self.up.append(AttnBlock(ch) if res in c.attn_resolutions else nn.Identity())
            if level != 0:
                self.up.append(block(ch, ch, up=True))
                res *= 2
        assert not skips
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        temb = timestep_embedding(c_noise, c.nf).to(x.dtype)
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), c.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.label_embed(labels)
        temb = self.temb1(F.silu(self.temb0(temb)))

        hs = [self.conv_in(x)]
        for entry in self.down:
            if isinstance(entry, ResBlock):
                hs.append(entry(hs[-1], temb))
            else:
                res, attn = entry
                hs.append(attn(res(hs[-1], temb)))
        h = hs[-1]
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for module in self.up:
            if isinstance(module, ResBlock) and not module.up:
                h = module(torch.cat([h, hs.pop()], dim=1), temb)
            elif isinstance(module, ResBlock):
                h = module(h, temb)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))
