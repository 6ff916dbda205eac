"""Benchmark: the book-keeping clipped sum Σ_s c_s ∇W_s of the UNet's 3×3 convolutions.

Providers in one run: ``torch_ref`` (one weight-gradient convolution on c-scaled output gradients),
``triton`` (one implicit-GEMM kernel with c applied in-kernel; CUDA only), ``native`` (C++/OpenMP, when
built) and ``opacus`` (its path: per-sample gradients by ``compute_conv_grad_sample``, then the optimizer's
``einsum("i,i...", c, grad_sample)``).
"""

import pytest
import torch
import torch.nn as nn

from privimage import kernels as K

import harness as B

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# UNet levels (resolution, channels): 32×32 with 32-64 channels, 16×16 with 64-128, 8×8 with 128.
LEVELS = [(32, 32), (32, 64), (16, 64), (16, 128), (8, 128)] if B.full_shapes(DEVICE) else [(32, 32), (16, 64),
                                                                                              (8, 128)]
BATCHES = B.bench_batches(DEVICE)
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
PROVIDERS = ["torch_ref", "triton", "native", "opacus"]
ROUNDS = 20 if DEVICE == "cuda" else 5


def _fn(provider, x, go, c):
    geometry = dict(kernel_size=3, padding=1)
    if provider == "torch_ref":
        return lambda: K.conv_clipped_weight_grad_ref(x, go, c, **geometry)
    if provider == "triton":
        if DEVICE != "cuda":
            pytest.skip("triton runs on CPU only in its interpreter, which is not a speed measurement")
        return lambda: K.conv_clipped_weight_grad(x, go, c, **geometry)
    if provider == "native":
        native = K.native
        if not native.available():
            pytest.skip(f"native build not loaded: {native.why_unavailable()}")
        if not hasattr(native, "conv_clipped_weight_grad"):
            pytest.skip("the native build has no conv_clipped_weight_grad (not built natively: its torch reference is one weight-gradient convolution)")
        return lambda: native.conv_clipped_weight_grad(x, go, c, **geometry)
    from opacus.grad_sample.conv import compute_conv_grad_sample
    layer = nn.Conv2d(x.shape[1], go.shape[1], 3, padding=1, bias=False, device=x.device, dtype=x.dtype)
    return lambda: torch.einsum("i,i...", c.to(x.dtype), compute_conv_grad_sample(layer, [x], go)[layer.weight])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("res, channels", LEVELS)
def test_clipped_weight_grad(benchmark, provider, dtype, batch, res, channels):
    x, go = _inputs(batch, res, channels, dtype)
    c = torch.rand(batch, device=DEVICE)
    fn = _fn(provider, x, go, c)
    B.run(benchmark, fn, device=DEVICE, rounds=ROUNDS)
    B.record(benchmark, op="conv_clipped_weight_grad", provider=provider, dtype=dtype, device=DEVICE,
             shape=f"B={batch} C={channels}->{channels} {res}x{res} k=3")


def _inputs(batch, res, channels, dtype):
    x = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
    go = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
    return x, go
