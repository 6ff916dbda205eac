"""Benchmark: per-sample squared weight-gradient norms of the UNet's 3×3 convolutions (materialised form).

Providers in one run: ``torch_ref`` (per-sample gradients by one grouped convolution, then squares),
``triton`` (the fused implicit-im2col kernel; CUDA only), ``native`` (the C++/OpenMP build, when built) and
``opacus`` (its per-layer code: ``compute_conv_grad_sample`` per-sample gradients, then their norms).
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


def _inputs(batch, res, channels, dtype):
    x = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
    go = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
    return x, go


def _fn(provider, x, go):
    geometry = dict(kernel_size=3, padding=1)
    if provider == "torch_ref":
        return lambda: K.conv_per_sample_sq_norms_ref(x, go, **geometry)
    if provider == "triton":
        if DEVICE != "cuda":
            pytest.skip("triton runs on CPU only in its interpreter, which is not a speed measurement")
        return lambda: K.conv_per_sample_sq_norms(x, go, **geometry)
    if provider == "native":
        native = K.native
        if not native.available():
            pytest.skip(f"native build not loaded: {native.why_unavailable()}")
        if x.device.type != "cpu":
            pytest.skip("the native build is for CPU tensors")

        def run_native():
            with K.dispatch.forced("native"):
                return K.conv_per_sample_sq_norms(x, go, **geometry)

        return run_native
    from opacus.grad_sample.conv import compute_conv_grad_sample
    layer = nn.Conv2d(x.shape[1], go.shape[1], 3, padding=1, bias=False, device=x.device, dtype=x.dtype)
    return lambda: compute_conv_grad_sample(layer, [x], go)[layer.weight].flatten(1).float().square().sum(1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("res, channels", LEVELS)
def test_per_sample_sq_norms(benchmark, provider, dtype, batch, res, channels):
    x, go = _inputs(batch, res, channels, dtype)
    fn = _fn(provider, x, go)
    B.run(benchmark, fn, device=DEVICE, rounds=ROUNDS)
    B.record(benchmark, op="conv_per_sample_sq_norms", provider=provider, dtype=dtype, device=DEVICE,
             shape=f"B={batch} C={channels}->{channels} {res}x{res} k=3")
