"""The engine's DP step with the native CPU build equals the step with the ops' torch paths (σ = 0).

With ``PRIVIMAGE_NATIVE=1`` (opt-in) and no Triton interpreter, the kernels' dispatch hands GroupNorm affine
gradients on CPU to the native C++ build (the engine's default plans use no other op it implements); unset
or 0, everything runs torch. The
profiler shows which ``privimage_native::*`` ops ran, so each test proves the native code was used in one
step and not in the other.

The block is a UNet residual block at an odd 5×7 resolution: GroupNorm (8 groups of 4 channels) → SiLU →
3×3 conv 32→32, twice, plus the in/out convolutions and a one-group GroupNorm (the attention block's).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage.engine import DPEngine
from privimage.kernels import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native build not loaded: {native.why_unavailable()} (CI builds it)")


class _ResBlock(nn.Module):
    def __init__(self, c=32):
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, padding=1)
        self.norm0, self.conv0 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
        self.norm_out, self.conv_out = nn.GroupNorm(1, c), nn.Conv2d(c, 3, 1)

    def forward(self, x):
        h = self.conv_in(x)
        r = self.conv1(F.silu(self.norm1(self.conv0(F.silu(self.norm0(h))))))
        return self.conv_out(F.silu(self.norm_out((h + r) / math.sqrt(2))))


def _step(method, x, **kw):
    """One engine step at σ = 0; the clipped, summed gradients and the native ops the profiler saw."""
    torch.manual_seed(3)
    model = _ResBlock()
    engine = DPEngine(model, max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=4, method=method)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.step(lambda m: (m(x) - x).square().mean((1, 2, 3)), **kw)
    ran = {e.key for e in prof.key_averages() if e.key.startswith("privimage_native::")}
    return [p.grad.clone() for p in model.parameters()], ran


@pytest.mark.parametrize("method", ["bk-mixed", "ghost"])
@pytest.mark.parametrize("rows", ["plain", "padding"])
def test_dp_step_with_native_equals_torch(monkeypatch, method, rows):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 5, 7) * 2 + 1
    kw = dict(is_padding=torch.tensor([False, True, False, False, False])) if rows == "padding" else {}
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)
    want, ran = _step(method, x, **kw)
    assert not ran, f"the engine must use the native build only with PRIVIMAGE_NATIVE=1; ran {ran}"
    monkeypatch.setenv("PRIVIMAGE_NATIVE", "1")
    got, ran = _step(method, x, **kw)
    assert ran == {"privimage_native::norm_affine_grads"}, ran
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in got)


def test_switched_off_and_float64_stay_on_torch(monkeypatch):
    """PRIVIMAGE_NATIVE=0 runs no native op; float64 (the tests' upcast references) never goes native even
    when switched on: the C++ computes in float32."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PRIVIMAGE_NATIVE", "0")
    assert not _step("bk-mixed", torch.randn(3, 3, 5, 7))[1]
    monkeypatch.setenv("PRIVIMAGE_NATIVE", "1")
    torch.set_default_dtype(torch.float64)
    try:
        _, ran = _step("bk-mixed", torch.randn(3, 3, 5, 7))
    finally:
        torch.set_default_dtype(torch.float32)
    assert not ran, ran
