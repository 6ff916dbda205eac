"""clipped_weight_grad / conv_clipped_weight_grad in the interpreter against the reference and float64."""

import pytest
import torch

from privimage.kernels import (clipped_weight_grad, clipped_weight_grad_ref, conv_clipped_weight_grad,
                               conv_clipped_weight_grad_ref)

import kernel_cases as H


def _factors(kw, R):
    """Clip factors in (0, 1], one exactly zero (a sample the engine dropped), per sample."""
    S = kw.get("num_samples", R)
    c = torch.rand(S) * 0.9 + 0.1
    if S > 1:
        c[S - 1] = 0.0
    return c


def _poison(kw, c, *tensors):
    """NaN in padding rows and in rows whose factor is zero: neither may be read."""
    R = tensors[0].shape[0]
    sample_index = kw.get("sample_index", torch.arange(R))
    drop = c[sample_index] == 0
    if "is_padding" in kw:
        drop = drop | kw["is_padding"]
    for t in tensors:
        t[drop] = float("nan")


def _run_conv(spec, dtype, atol, kind):
    x, go, geometry = H.conv_case(spec, dtype)
    kw = H.rows(kind, x.shape[0])
    kw.pop("num_samples", None)
    c = _factors(H.rows(kind, x.shape[0]), x.shape[0])
    _poison(kw, c, x, go)
    ours = conv_clipped_weight_grad(x, go, c, **geometry, **kw)
    ref64 = conv_clipped_weight_grad_ref(x.double(), go.double(), c.double(), **geometry, **kw)
    H.assert_within(ours, conv_clipped_weight_grad_ref(x, go, c, **geometry, **kw), ref64, atol, f"conv {spec} {kind}")


@pytest.mark.parametrize("kind", ["plain", "multi-row"])
@pytest.mark.parametrize("spec", H.CONV_CASES)
def test_conv_fp32(interpret, spec, kind):
    _run_conv(spec, torch.float32, 1e-5, kind)


@pytest.mark.parametrize("spec", H.CONV_CASES)
def test_conv_bf16(interpret, spec):
    _run_conv(spec, torch.bfloat16, 1e-4, "plain")


@pytest.mark.parametrize("kind", ["padding", "all-padding"])
def test_conv_padding(interpret, kind):
    _run_conv(H.CONV_CASES[1].values[0], torch.float32, 1e-5, kind)


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_fp32(interpret, spec, kind):
    A, G = H.linear_case(spec, torch.float32)
    kw = H.rows(kind, A.shape[0])
    kw.pop("num_samples", None)
    c = _factors(H.rows(kind, A.shape[0]), A.shape[0])
    _poison(kw, c, A, G)
    ours = clipped_weight_grad(A, G, c, **kw)
    assert ours.shape == (G.shape[-1], A.shape[-1])
    ref64 = clipped_weight_grad_ref(A.double(), G.double(), c.double(), **kw)
    H.assert_within(ours, clipped_weight_grad_ref(A, G, c, **kw), ref64, 1e-5, f"linear {spec} {kind}")


@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_bf16(interpret, spec):
    A, G = H.linear_case(spec, torch.bfloat16)
    c = torch.rand(A.shape[0])
    ref64 = clipped_weight_grad_ref(A.double(), G.double(), c.double())
    H.assert_within(clipped_weight_grad(A, G, c), clipped_weight_grad_ref(A, G, c), ref64, 1e-4, f"bf16 {spec}")


def test_all_padding_is_zero_and_empty_batch(interpret):
    A, G = torch.randn(3, 4, 5), torch.randn(3, 4, 2)
    out = clipped_weight_grad(A, G, torch.ones(3), is_padding=torch.ones(3, dtype=torch.bool))
    assert out.shape == (2, 5) and (out == 0).all()
    empty = clipped_weight_grad(torch.zeros(0, 4, 5), torch.zeros(0, 4, 2), torch.ones(0))
    assert empty.shape == (2, 5) and (empty == 0).all()


def test_engine_contract_per_row_factors(interpret):
    """The engine passes per-row factors without a sample index: Σ_r c_r G_rᵀA_r (p, d) float32."""
    A, G, c = torch.randn(4, 3, 5), torch.randn(4, 3, 2), torch.rand(4)
    want = torch.einsum("r,rtp,rtd->pd", c.double(), G.double(), A.double())
    out = clipped_weight_grad(A, G, c)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
