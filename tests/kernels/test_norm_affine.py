"""Bias and GroupNorm/LayerNorm affine norms and clipped sums in the interpreter vs reference and float64."""

import pytest
import torch

from privimage import kernels as K

import kernel_cases as H

# (name, make inputs (dtype) -> (x or None, grad_out), op kwargs); offsets on x make the variance pass matter
def _gn():
    x = torch.randn(7, 6, 5, 3, dtype=torch.float64) * 3 + 2
    return x, torch.randn_like(x), dict(num_groups=3)


def _gn_big_channels():  # CG·L crosses the tile width; one group (the attention block's GroupNorm(1, C))
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    return x, torch.randn_like(x), dict(num_groups=1)


def _ln():
    x = torch.randn(5, 4, 7, dtype=torch.float64) - 1
    return x, torch.randn_like(x), dict(normalized_shape=7)


def _ln_2d():
    x = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    return x, torch.randn_like(x), dict(normalized_shape=(5, 3))


def _bias_conv():
    g = torch.randn(7, 5, 4, 6, dtype=torch.float64)
    return None, g, dict(channel_dim=1)


def _bias_linear():
    g = torch.randn(5, 3, 20, dtype=torch.float64)
    return None, g, dict(channel_dim=-1)


CASES = {"gn": _gn, "gn-one-group": _gn_big_channels, "ln": _ln, "ln-2d": _ln_2d, "bias-conv": _bias_conv,
         "bias-linear": _bias_linear}


def _ops(name):
    if name.startswith("gn"):
        return K.group_norm_sq_norms, K.group_norm_sq_norms_ref, K.group_norm_clipped_grads, K.group_norm_clipped_grads_ref
    if name.startswith("ln"):
        return K.layer_norm_sq_norms, K.layer_norm_sq_norms_ref, K.layer_norm_clipped_grads, K.layer_norm_clipped_grads_ref
    return K.bias_sq_norms, K.bias_sq_norms_ref, K.bias_clipped_grad, K.bias_clipped_grad_ref


def _call(op, x, g, extra, *more, **kw):
    if x is None:
        return op(g, *more, **extra, **kw)
    args = list(extra.values())
    return op(x, g, *more, *args, **kw)


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_sq_norms_fp32(interpret, name, kind):
    x, g, extra = CASES[name]()
    kw = H.rows(kind, g.shape[0])
    if "is_padding" in kw:
        g[kw["is_padding"]] = float("nan")
    op, ref, _, _ = _ops(name)
    x32, g32 = (None if x is None else x.float()), g.float()
    x64, g64 = (None if x32 is None else x32.double()), g32.double()
    ours = _call(op, x32, g32, extra, **kw)
    H.assert_within(ours, _call(ref, x32, g32, extra, **kw), _call(ref, x64, g64, extra, **kw), 1e-5, name)


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("name", ["gn", "gn-one-group"])
def test_group_norm_grads_fp32(interpret, name, kind):
    """The per-sample (∇γ, ∇β) vectors themselves (what the engine keeps for its clipped sum)."""
    x, g, extra = CASES[name]()
    kw = H.rows(kind, g.shape[0])
    if "is_padding" in kw:
        g[kw["is_padding"]] = float("nan")
    x32, g32 = x.float(), g.float()
    ours = K.group_norm_grads(x32, g32, extra["num_groups"], **kw)
    same = K.group_norm_grads_ref(x32, g32, extra["num_groups"], **kw)
    ref64 = K.group_norm_grads_ref(x32.double(), g32.double(), extra["num_groups"], **kw)
    for o, s, r in zip(ours, same, ref64):
        assert o.dtype == torch.float32 and o.shape == (ref64[0].shape[0], x.shape[1])
        H.assert_within(o, s, r, 1e-5, name)


@pytest.mark.parametrize("name", ["gn", "ln", "bias-conv"])
def test_sq_norms_bf16(interpret, name):
    x, g, extra = CASES[name]()
    op, ref, _, _ = _ops(name)
    xb, gb = (None if x is None else x.bfloat16()), g.bfloat16()
    x64, g64 = (None if xb is None else xb.double()), gb.double()
    H.assert_within(_call(op, xb, gb, extra), _call(ref, xb, gb, extra), _call(ref, x64, g64, extra), 1e-4, name)


@pytest.mark.parametrize("kind", ["plain", "multi-row", "padding"])
@pytest.mark.parametrize("name", list(CASES))
def test_clipped_fp32(interpret, name, kind):
    x, g, extra = CASES[name]()
    kw = H.rows(kind, g.shape[0])
    S = kw.pop("num_samples", g.shape[0])
    c = torch.rand(S)
    c[0] = 0.0
    drop = c[kw.get("sample_index", torch.arange(g.shape[0]))] == 0
    if "is_padding" in kw:
        drop = drop | kw["is_padding"]
    g[drop] = float("nan")  # rows with factor 0 or padding are never read
    _, _, op, ref = _ops(name)
    x32, g32 = (None if x is None else x.float()), g.float()
    x64, g64 = (None if x32 is None else x32.double()), g32.double()
    ours = _call(op, x32, g32, extra, c, **kw)
    same = _call(ref, x32, g32, extra, c, **kw)
    ref64 = _call(ref, x64, g64, extra, c.double(), **kw)
    if not isinstance(ours, tuple):
        ours, same, ref64 = (ours,), (same,), (ref64,)
    for o, s, r in zip(ours, same, ref64):
        H.assert_within(o, s, r, 1e-5, name)


def test_empty_and_all_padding(interpret):
    x = torch.randn(0, 4, 3, 3)
    assert K.group_norm_sq_norms(x, x, 2).shape == (0,)
    x = torch.randn(3, 4, 3, 3)
    pad = torch.ones(3, dtype=torch.bool)
    assert (K.group_norm_sq_norms(x, x, 2, is_padding=pad) == 0).all()
    w, b = K.group_norm_clipped_grads(x, x, torch.ones(3), 2, is_padding=pad)
    assert (w == 0).all() and (b == 0).all() and w.shape == (4,)
