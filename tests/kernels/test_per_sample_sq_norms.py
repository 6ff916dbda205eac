"""per_sample_sq_norms / conv_per_sample_sq_norms in Triton's interpreter against the reference and float64."""

import pytest
import torch

from privimage.kernels import (conv_per_sample_sq_norms, conv_per_sample_sq_norms_ref, per_sample_sq_norms,
                               per_sample_sq_norms_ref)

import kernel_cases as H


def _poison(kw, *tensors):
    """NaN in padding rows: a kernel that reads them fails the finiteness check."""
    pad = kw.get("is_padding")
    for t in tensors:
        if pad is not None and t.shape[0]:
            t[pad] = float("nan")


def _run_conv(spec, dtype, atol, kind):
    x, go, geometry = H.conv_case(spec, dtype)
    kw = H.rows(kind, x.shape[0])
    _poison(kw, x, go)
    ours = conv_per_sample_sq_norms(x, go, **geometry, **kw)
    same = conv_per_sample_sq_norms_ref(x, go, **geometry, **kw)
    ref64 = conv_per_sample_sq_norms_ref(x.double(), go.double(), **geometry, **kw)
    H.assert_within(ours, same, ref64, atol, f"conv {spec} {dtype} {kind}")
    return ours


def _run_linear(spec, dtype, atol, kind):
    A, G = H.linear_case(spec, dtype)
    kw = H.rows(kind, A.shape[0])
    _poison(kw, A, G)
    ours = per_sample_sq_norms(A, G, **kw)
    H.assert_within(ours, per_sample_sq_norms_ref(A, G, **kw), per_sample_sq_norms_ref(A.double(), G.double(), **kw),
                    atol, f"linear {spec} {dtype} {kind}")
    return ours


@pytest.mark.parametrize("kind", ["plain", "multi-row"])
@pytest.mark.parametrize("spec", H.CONV_CASES)
def test_conv_fp32(interpret, spec, kind):
    _run_conv(spec, torch.float32, 1e-5, kind)


@pytest.mark.parametrize("spec", H.CONV_CASES)
def test_conv_bf16(interpret, spec):
    _run_conv(spec, torch.bfloat16, 1e-4, "plain")


@pytest.mark.parametrize("kind", ["padding", "all-padding"])
def test_conv_padding_rows_count_for_nothing(interpret, kind):
    ours = _run_conv(H.CONV_CASES[1].values[0], torch.float32, 1e-5, kind)
    pad = H.rows(kind, 7)["is_padding"]
    assert (ours[pad] == 0).all() and (ours[~pad] > 0).all()


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_fp32(interpret, spec, kind):
    _run_linear(spec, torch.float32, 1e-5, kind)


@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_bf16(interpret, spec):
    _run_linear(spec, torch.bfloat16, 1e-4, "plain")


def test_empty_batch(interpret):
    A, G = torch.zeros(0, 4, 3), torch.zeros(0, 4, 5)
    assert per_sample_sq_norms(A, G).shape == (0,)
    out = per_sample_sq_norms(A, G, sample_index=torch.zeros(0, dtype=torch.long), num_samples=2)
    assert out.tolist() == [0.0, 0.0]
    x, go = torch.zeros(0, 3, 5, 4), torch.zeros(0, 2, 5, 4)
    assert conv_per_sample_sq_norms(x, go, 3, padding=1).shape == (0,)


def test_multi_row_sample_is_norm_of_summed_gradient(interpret):
    """Rows of one sample are summed BEFORE the norm: ‖g_a + g_b‖², not ‖g_a‖² + ‖g_b‖²."""
    A, G = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    joint = per_sample_sq_norms(A, G, sample_index=torch.tensor([0, 0]))
    summed = torch.einsum("rtp,rtd->pd", G, A).square().sum()
    torch.testing.assert_close(joint, summed.view(1), rtol=1e-5, atol=0)
    assert not torch.allclose(joint, per_sample_sq_norms(A, G).sum().view(1))
