"""Benchmark: per-sample GroupNorm affine gradients (the UNet's GroupNorm(32, C) layers).

Providers in one run: ``torch_ref`` (x̂ by ``F.group_norm``, product, reductions), ``triton`` (statistics,
x̂ and reductions in one pass per (row, group); CUDA only), ``native`` (C++/OpenMP, when built) and
``opacus`` (``compute_group_norm_grad_sample``).
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


def _fn(provider, x, go, groups):
    if provider == "torch_ref":
        return lambda: K.group_norm_grads_ref(x, go, groups)
    if provider == "triton":
        if DEVICE != "cuda":
            pytest.skip("triton runs on CPU only in its interpreter, which is not a speed measurement")
        return lambda: K.group_norm_grads(x, go, groups)
    if provider == "native":
        native = K.native
        if not native.available():
            pytest.skip(f"native build not loaded: {native.why_unavailable()}")
        if x.device.type != "cpu":
            pytest.skip("the native build is for CPU tensors")

        def run_native():
            with K.dispatch.forced("native"):
                return K.group_norm_grads(x, go, groups)

        return run_native
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
    layer = nn.GroupNorm(groups, x.shape[1], device=x.device, dtype=x.dtype)
    return lambda: compute_group_norm_grad_sample(layer, [x], go)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("res, channels", LEVELS)
def test_group_norm_grads(benchmark, provider, dtype, batch, res, channels):
    x = torch.randn(batch, channels, res, res, device=DEVICE, dtype=dtype)
    go = torch.randn_like(x)
    groups = min(32, channels // 4)
    fn = _fn(provider, x, go, groups)
    B.run(benchmark, fn, device=DEVICE, rounds=ROUNDS)
    B.record(benchmark, op="group_norm_grads", provider=provider, dtype=dtype, device=DEVICE,
             shape=f"B={batch} C={channels} groups={groups} {res}x{res}")
