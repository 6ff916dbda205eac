"""ghost_sq_norms / conv_ghost_sq_norms in the interpreter against the reference, float64, and the
materialised norms (the two formulas must agree)."""

import pytest
import torch

from privimage.kernels import (conv_ghost_sq_norms, conv_ghost_sq_norms_ref, conv_per_sample_sq_norms_ref,
                               ghost_sq_norms, ghost_sq_norms_ref, per_sample_sq_norms_ref)

import kernel_cases as H


def _poison(kw, *tensors):
    pad = kw.get("is_padding")
    for t in tensors:
        if pad is not None and t.shape[0]:
            t[pad] = float("nan")


def _run_conv(spec, dtype, atol, kind):
    x, go, geometry = H.conv_case(spec, dtype)
    kw = H.rows(kind, x.shape[0])
    _poison(kw, x, go)
    ours = conv_ghost_sq_norms(x, go, **geometry, **kw)
    ref64 = conv_ghost_sq_norms_ref(x.double(), go.double(), **geometry, **kw)
    H.assert_within(ours, conv_ghost_sq_norms_ref(x, go, **geometry, **kw), ref64, atol, f"conv {spec} {kind}")
    # the ghost identity: the same numbers as the materialised per-sample gradient norms
    torch.testing.assert_close(ref64, conv_per_sample_sq_norms_ref(x.double(), go.double(), **geometry, **kw))


@pytest.mark.parametrize("kind", ["plain", "multi-row"])
@pytest.mark.parametrize("spec", H.CONV_CASES)
def test_conv_fp32(interpret, spec, kind):
    _run_conv(spec, torch.float32, 1e-5, kind)


@pytest.mark.parametrize("spec", H.CONV_CASES[1:3])
def test_conv_bf16(interpret, spec):
    _run_conv(spec, torch.bfloat16, 1e-4, "plain")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("spec", H.LINEAR_CASES)
def test_linear_fp32(interpret, spec, kind):
    A, G = H.linear_case(spec, torch.float32)
    kw = H.rows(kind, A.shape[0])
    _poison(kw, A, G)
    ours = ghost_sq_norms(A, G, **kw)
    ref64 = ghost_sq_norms_ref(A.double(), G.double(), **kw)
    H.assert_within(ours, ghost_sq_norms_ref(A, G, **kw), ref64, 1e-5, f"linear {spec} {kind}")
    torch.testing.assert_close(ref64, per_sample_sq_norms_ref(A.double(), G.double(), **kw))


def test_linear_bf16(interpret):
    A, G = H.linear_case(H.LINEAR_CASES[2].values[0], torch.bfloat16)
    H.assert_within(ghost_sq_norms(A, G), ghost_sq_norms_ref(A, G), ghost_sq_norms_ref(A.double(), G.double()),
                    1e-4, "linear bf16")


def test_long_sample_spans_many_tiles(interpret):
    """Several rows of T=13 positions stacked into one sample: position tiles straddle rows."""
    A, G = torch.randn(5, 13, 4), torch.randn(5, 13, 3)
    sample_index = torch.tensor([1, 0, 1, 1, 0])
    ours = ghost_sq_norms(A, G, sample_index=sample_index)
    ref64 = per_sample_sq_norms_ref(A.double(), G.double(), sample_index=sample_index)
    H.assert_within(ours, ghost_sq_norms_ref(A, G, sample_index=sample_index), ref64, 1e-5, "stacked rows")


def test_empty_batch(interpret):
    assert ghost_sq_norms(torch.zeros(0, 4, 3), torch.zeros(0, 4, 5)).shape == (0,)
    x, go = torch.zeros(0, 3, 5, 4), torch.zeros(0, 2, 3, 2)
    assert conv_ghost_sq_norms(x, go, 3, stride=2, padding=1).shape == (0,)
