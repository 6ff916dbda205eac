"""DPEngine against the slow loop reference (tests/reference.py): norms, clipped sums, final .grad, for every
layer type a diffusion UNet uses, every method, odd shapes, padding, groups and frozen parameters."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage.engine import DPEngine, check_per_sample_norms, make_private

_spec = importlib.util.spec_from_file_location("engine_test_reference", Path(__file__).parents[1] / "reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

METHODS = ["bk-mixed", "ghost", "vmap", "loop"]
DT = torch.float64


class Attention(nn.Module):
    """Self-attention over H·W positions built from 1x1 convs and Linear (as DDPM++ builds it)."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(1, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        att = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), -1)
        out = self.proj((att @ v.transpose(1, 2)))  # (b, hw, c): Linear with an extra leading dim
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNetBlock(nn.Module):
    """conv + GroupNorm + attention + time-embedding Linear + class Embedding: a tiny UNet-like block."""

    def __init__(self, c_in=3, c=4, num_classes=5):
        super().__init__()
        self.label = nn.Embedding(num_classes, 8)
        self.temb = nn.Linear(8, c)
        self.conv_in = nn.Conv2d(c_in, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.att = Attention(c)
        self.out = nn.Conv2d(c, c_in, 1)

    def forward(self, x, t, y):
        emb = torch.sin(t[:, None] * torch.arange(1, 9, dtype=x.dtype)) + self.label(y)
        h = self.conv_in(x) + self.temb(emb)[:, :, None, None]
        h = F.silu(self.norm(h))
        h = self.att(self.down(h))
        return self.out(F.interpolate(h, size=x.shape[2:]))


class Scale(nn.Module):
    """A layer with no rule: the engine must take it through the vmap fallback."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return x * self.gain + x.square().mean() * 0  # rows independent; mean*0 keeps it row-local


def _case(name, batch):
    """(model, loss_fn) in float64 for one layer type; loss rows = batch."""
    g = torch.Generator().manual_seed(batch)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=DT)

    if name == "linear_extra_dims":
        model, x = nn.Linear(5, 3), rnd(batch, 2, 4, 5)
    elif name == "conv_stride2":
        model, x = nn.Conv2d(3, 5, 3, stride=2, padding=1), rnd(batch, 3, 7, 5)
    elif name == "conv_groups2":
        model, x = nn.Conv2d(4, 6, 3, padding=1, groups=2), rnd(batch, 4, 6, 5)
    elif name == "conv_dilation_nobias":
        model, x = nn.Conv2d(3, 5, 3, dilation=2, padding=2, bias=False), rnd(batch, 3, 7, 6)
    elif name == "conv_1x1":
        model, x = nn.Conv2d(5, 3, 1), rnd(batch, 5, 4, 3)
    elif name == "conv_reflect_same":
        model, x = nn.Conv2d(3, 5, (3, 2), padding="same", padding_mode="reflect"), rnd(batch, 3, 5, 7)
    elif name == "conv_small_ghost":  # T=16 small against d·p: bk-mixed picks ghost norms
        model, x = nn.Conv2d(32, 32, 3, padding=1), rnd(batch, 32, 4, 4)
    elif name == "groupnorm":
        model, x = nn.GroupNorm(2, 4), rnd(batch, 4, 3, 5) * 3 + 1
    elif name == "layernorm":
        model, x = nn.LayerNorm(5), rnd(batch, 3, 5) * 2 + 1
    elif name == "embedding":
        model = nn.Embedding(7, 3, padding_idx=0)
        x = torch.randint(0, 7, (batch, 4), generator=g)
    elif name == "fallback":
        model, x = nn.Sequential(nn.Conv2d(3, 3, 1), Scale(3)), rnd(batch, 3, 4, 3)
    elif name == "unet_block":
        model = UNetBlock()
        x = (rnd(batch, 3, 8, 6), torch.rand(batch, generator=g, dtype=DT), torch.randint(0, 5, (batch,), generator=g))
    else:
        raise KeyError(name)
    model = model.to(DT)
    target = None

    def loss_fn(m):
        nonlocal target
        out = m(*x) if isinstance(x, tuple) else m(x)
        if target is None:
            target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
        return (out * target + 0.3 * out.square()).flatten(1).sum(1)

    return model, loss_fn


LAYERS = ["linear_extra_dims", "conv_stride2", "conv_groups2", "conv_dilation_nobias", "conv_1x1",
          "conv_reflect_same", "conv_small_ghost", "groupnorm", "layernorm", "embedding", "fallback", "unet_block"]


def _assert_grads(model, expected, atol=1e-10):
    params = [p for p in model.parameters() if p.requires_grad]
    for i, (p, e) in enumerate(zip(params, expected)):
        assert p.grad is not None, f"param {i} {tuple(p.shape)} has no grad"
        err = (p.grad - e).abs().max().item()
        assert err <= atol + 1e-8 * e.abs().max().item(), f"param {i} {tuple(p.shape)}: max error {err}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYERS)
def test_norms_and_grads_match_loop(name, method):
    for batch in (1, 3, 7):
        model, loss_fn = _case(name, batch)
        ref_norms = ref.per_sample_norms_loop(model, loss_fn)
        C = float(ref_norms.median())  # about half the samples are clipped
        engine = DPEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=5, method=method)
        stats = engine.step(loss_fn)
        torch.testing.assert_close(stats.norms, ref_norms, rtol=1e-9, atol=1e-12)
        _assert_grads(model, ref.dp_grads_loop(model, loss_fn, max_grad_norm=C, expected_batch_size=5))
        assert stats.num_samples == batch and stats.num_nonfinite == 0
