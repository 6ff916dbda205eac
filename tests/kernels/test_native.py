"""The native CPU build (CMakeLists.txt, csrc/) against the torch references and float64.

Skipped with the reason when the library is not built (build: csrc/build.sh). When built, the
privimage.kernels ops hand CPU float32/bf16 tensors to it, which is tested here too.
"""

import pytest
import torch

from privimage import kernels as K
from privimage.kernels import native

import kernel_cases as H

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native build not loaded: {native.why_unavailable()}")


def _poison(kw, *tensors):
    pad = kw.get("is_padding")
    for t in tensors:
        if pad is not None and t.shape[0]:
            t[pad] = float("nan")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.CONV_CASES)
@pytest.mark.parametrize("dtype, atol", H.DTYPES)
def test_conv_per_sample_sq_norms(spec, kind, dtype, atol):
    x, go, geometry = H.conv_case(spec, dtype)
    kw = H.rows(kind, x.shape[0])
    _poison(kw, x, go)
    ours = native.conv_per_sample_sq_norms(x, go, **geometry, **kw)
    H.assert_within(ours, K.conv_per_sample_sq_norms_ref(x, go, **geometry, **kw),
                    K.conv_per_sample_sq_norms_ref(x.double(), go.double(), **geometry, **kw), atol, f"{spec} {kind}")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_per_sample_sq_norms(spec, kind):
    A, G = H.linear_case(spec, torch.float32)
    kw = H.rows(kind, A.shape[0])
    _poison(kw, A, G)
    H.assert_within(native.per_sample_sq_norms(A, G, **kw), K.per_sample_sq_norms_ref(A, G, **kw),
                    K.per_sample_sq_norms_ref(A.double(), G.double(), **kw), 1e-5, f"{spec} {kind}")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
def test_group_norm(kind):
    x = torch.randn(7, 6, 5, 3) * 3 + 2
    g = torch.randn_like(x)
    kw = H.rows(kind, 7)
    _poison(kw, g)
    x64, g64 = x.double(), g.double()
    H.assert_within(native.group_norm_sq_norms(x, g, 3, **kw), K.group_norm_sq_norms_ref(x, g, 3, **kw),
                    K.group_norm_sq_norms_ref(x64, g64, 3, **kw), 1e-5, "group norm")
    kw.pop("num_samples", None)
    c = torch.rand(3 if "sample_index" in kw else 7)
    for got, same, ref64 in zip(native.group_norm_clipped_grads(x, g, c, 3, **kw),
                                K.group_norm_clipped_grads_ref(x, g, c, 3, **kw),
                                K.group_norm_clipped_grads_ref(x64, g64, c.double(), 3, **kw)):
        H.assert_within(got, same, ref64, 1e-5, "group norm clipped")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
def test_group_norm_grads_dispatch_to_native(monkeypatch, kind):
    """privimage.kernels.group_norm_grads (the engine's GroupNorm op) runs the native build on CPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)
    calls = []
    original = native._op
    monkeypatch.setattr(native, "_op", lambda: calls.append(1) or original())
    x = torch.randn(7, 6, 5, 3) * 3 + 2
    g = torch.randn_like(x)
    kw = H.rows(kind, 7)
    _poison(kw, g)
    got = K.group_norm_grads(x, g, 3, **kw)
    assert calls, "privimage.kernels.group_norm_grads did not use the native build on CPU"
    for o, same, ref64 in zip(got, K.group_norm_grads_ref(x, g, 3, **kw),
                              K.group_norm_grads_ref(x.double(), g.double(), 3, **kw)):
        H.assert_within(o, same, ref64, 1e-5, "group norm grads")


def test_empty_batch():
    assert native.conv_per_sample_sq_norms(torch.zeros(0, 3, 5, 4), torch.zeros(0, 2, 5, 4), 3, padding=1).shape == (0,)
    assert native.group_norm_sq_norms(torch.zeros(0, 4, 3), torch.zeros(0, 4, 3), 2).shape == (0,)


def test_kernels_ops_dispatch_to_native_on_cpu(monkeypatch):
    """Per-sample weight norms go native where it measured faster (large per-sample gradient per position),
    to the reference elsewhere; PRIVIMAGE_NATIVE=0 switches the native build off."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    original = native.conv_per_sample_sq_norms_raw
    monkeypatch.setattr(native, "conv_per_sample_sq_norms_raw", lambda *a: calls.append(1) or original(*a))
    A, G = torch.randn(5, 64), torch.randn(5, 48)  # T=1, P·K = 3072 ≥ 256·T
    torch.testing.assert_close(K.per_sample_sq_norms(A, G), K.per_sample_sq_norms_ref(A, G), rtol=1e-5, atol=0)
    assert calls == [1], "privimage.kernels did not use the native build on CPU"
    x, go = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16)  # T=256, P·K = 108: the reference wins
    K.conv_per_sample_sq_norms(x, go, 3, padding=1)
    assert calls == [1]
    monkeypatch.setenv("PRIVIMAGE_NATIVE", "0")
    K.per_sample_sq_norms(A, G)
    assert calls == [1], "PRIVIMAGE_NATIVE=0 must switch the native build off"
