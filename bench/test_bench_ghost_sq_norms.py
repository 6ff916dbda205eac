"""Benchmark: ghost per-sample norms ⟨AAᵀ, GGᵀ⟩ where they pay (small T): the 16×16 and 8×8 UNet levels'
3×3 convolutions and the attention projections (Linear over H·W tokens).

Providers in one run: ``torch_ref`` (unfold, then Gram matrices), ``triton`` (T×T tiles in registers; CUDA
only), ``native`` (C++/OpenMP, when built) and ``opacus`` (``compute_linear_norm_sample``, its ghost norm, for
Linear; for Conv2d Opacus 1.6 has no norm sampler and computes per-sample gradients, timed as such).
"""

import pytest
import torch
import torch.nn as nn

from privimage import kernels as K

import harness as B

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# UNet levels (resolution, channels): 32×32 with 32-64 channels, 16×16 with 64-128, 8×8 with 128.
# (kind, resolution, channels): conv levels where T = H·W is small, and attention's Linear on 8×8 tokens.
LEVELS = [("conv", 16, 64), ("conv", 16, 128), ("conv", 8, 128), ("linear", 8, 128), ("linear", 16, 64)] \
    if B.full_shapes(DEVICE) else [("conv", 16, 64), ("conv", 8, 128), ("linear", 8, 128)]
BATCHES = B.bench_batches(DEVICE)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
PROVIDERS = ["torch_ref", "triton", "native", "opacus"]
ROUNDS = 20 if DEVICE == "cuda" else 5


def _fn(provider, kind, batch, res, channels, dtype):
    if kind == "conv":
        x = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
        go = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
        args, ref, ours = (x, go), K.conv_ghost_sq_norms_ref, K.conv_ghost_sq_norms
        kw = dict(kernel_size=3, padding=1)
    else:  # q/k/v projection of an attention block: tokens = H·W positions, channels → 3·channels
        A = torch.randn(batch, res * res, channels, device=DEVICE, dtype=dtype)
        G = torch.randn(batch, res * res, 3 * channels, device=DEVICE, dtype=dtype)
        args, ref, ours, kw = (A, G), K.ghost_sq_norms_ref, K.ghost_sq_norms, {}
    if provider == "torch_ref":
        return lambda: ref(*args, **kw)
    if provider == "triton":
        if DEVICE != "cuda":
            pytest.skip("triton runs on CPU only in its interpreter, which is not a speed measurement")
        return lambda: ours(*args, **kw)
    if provider == "native":
        native = K.native
        if not native.available():
            pytest.skip(f"native build not loaded: {native.why_unavailable()}")
        if not hasattr(native, ours.__name__):
            pytest.skip(f"the native build has no {ours.__name__} (not built natively: its torch reference is already batched GEMMs on CPU)")
        return lambda: getattr(native, ours.__name__)(*args, **kw)
    if kind == "conv":
        from opacus.grad_sample.conv import compute_conv_grad_sample
        layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=DEVICE, dtype=dtype)
        return lambda: compute_conv_grad_sample(layer, [args[0]], args[1])[layer.weight].flatten(1).float().square().sum(1)
    from opacus.grad_sample.linear import compute_linear_norm_sample
    layer = nn.Linear(channels, 3 * channels, bias=False, device=DEVICE, dtype=dtype)
    return lambda: compute_linear_norm_sample(layer, [args[0]], args[1])[layer.weight].square()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind, res, channels", LEVELS)
def test_ghost_sq_norms(benchmark, provider, dtype, batch, kind, res, channels):
    fn = _fn(provider, kind, batch, res, channels, dtype)
    B.run(benchmark, fn, device=DEVICE, rounds=ROUNDS)
    shape = (f"B={batch} C={channels}->{channels} {res}x{res} k=3" if kind == "conv"
             else f"B={batch} T={res * res} d={channels} p={3 * channels}")
    B.record(benchmark, op=f"{kind}_ghost_sq_norms", provider=provider, dtype=dtype, device=DEVICE, shape=shape)
