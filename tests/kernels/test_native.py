"""The native CPU build (CMakeLists.txt, csrc/) against the torch references and float64, through the public
ops with the backend pinned (``dispatch.forced("native")``), and the switch that sends ops there.

Skipped with the reason when the library is not built (build: csrc/build.sh).
"""

import pytest
import torch

from privimage import kernels as K
from privimage.kernels import dispatch, native

import kernel_cases as H

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native build not loaded: {native.why_unavailable()}")


def _poison(kw, *tensors):
    pad = kw.get("is_padding")
    for t in tensors:
        if pad is not None and t.shape[0]:
            t[pad] = float("nan")


@pytest.fixture
def counted(monkeypatch):
    """Calls of the native library (a list that grows by one per native op call)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    original = native._ops
    monkeypatch.setattr(native, "_ops", lambda: calls.append(1) or original())
    return calls


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.CONV_CASES)
@pytest.mark.parametrize("dtype, atol", H.DTYPES)
def test_conv_per_sample_sq_norms(counted, spec, kind, dtype, atol):
    x, go, geometry = H.conv_case(spec, dtype)
    kw = H.rows(kind, x.shape[0])
    _poison(kw, x, go)
    with dispatch.forced("native"):
        ours = K.conv_per_sample_sq_norms(x, go, **geometry, **kw)
    assert counted
    H.assert_within(ours, K.conv_per_sample_sq_norms_ref(x, go, **geometry, **kw),
                    K.conv_per_sample_sq_norms_ref(x.double(), go.double(), **geometry, **kw), atol, f"{spec} {kind}")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_per_sample_sq_norms(counted, spec, kind):
    A, G = H.linear_case(spec, torch.float32)
    kw = H.rows(kind, A.shape[0])
    _poison(kw, A, G)
    with dispatch.forced("native"):
        ours = K.per_sample_sq_norms(A, G, **kw)
    assert counted
    H.assert_within(ours, K.per_sample_sq_norms_ref(A, G, **kw),
                    K.per_sample_sq_norms_ref(A.double(), G.double(), **kw), 1e-5, f"{spec} {kind}")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
def test_group_norm_grads(counted, kind):
    x = torch.randn(7, 6, 5, 3) * 3 + 2
    g = torch.randn_like(x)
    kw = H.rows(kind, 7)
    _poison(kw, g)
    with dispatch.forced("native"):
        got = K.group_norm_grads(x, g, 3, **kw)
    assert counted
    for o, same, ref64 in zip(got, K.group_norm_grads_ref(x, g, 3, **kw),
                              K.group_norm_grads_ref(x.double(), g.double(), 3, **kw)):
        H.assert_within(o, same, ref64, 1e-5, "group norm grads")


def test_empty_batch(counted):
    with dispatch.forced("native"):
        assert K.conv_per_sample_sq_norms(torch.zeros(0, 3, 5, 4), torch.zeros(0, 2, 5, 4), 3, padding=1).shape == (0,)
        assert K.group_norm_grads(torch.zeros(0, 4, 3), torch.zeros(0, 4, 3), 2)[0].shape == (0, 4)


def test_switch_sends_cpu_ops_to_native_only_when_asked_and_where_it_pays(counted, monkeypatch):
    """PRIVIMAGE_NATIVE=1 sends per-sample weight norms to the native build where it measured faster (large
    per-sample gradient per position) and GroupNorm's affine gradients; unset, 0, float64 or LayerNorm: torch."""
    A, G = torch.randn(5, 64), torch.randn(5, 48)  # T=1, P·K = 3072 ≥ 256·T
    x, go = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 16, 16)  # T=256, P·K = 108: torch wins
    y = torch.randn(3, 4, 5, 5)
    for setting in (None, "0"):
        if setting is None:
            monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)
        else:
            monkeypatch.setenv("PRIVIMAGE_NATIVE", setting)
        K.per_sample_sq_norms(A, G)
        K.group_norm_grads(y, y, 2)
        assert counted == [], f"PRIVIMAGE_NATIVE={setting} must leave the native build off"
    monkeypatch.setenv("PRIVIMAGE_NATIVE", "1")
    torch.testing.assert_close(K.per_sample_sq_norms(A, G), K.per_sample_sq_norms_ref(A, G), rtol=1e-5, atol=0)
    assert counted == [1]
    K.group_norm_grads(y, y, 2)
    assert counted == [1, 1]
    K.conv_per_sample_sq_norms(x, go, 3, padding=1)
    K.per_sample_sq_norms(A.double(), G.double())
    K.layer_norm_grads(y, y, 5)
    assert counted == [1, 1], "native only where it pays, never float64, never LayerNorm"
