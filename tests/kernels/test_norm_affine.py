"""GroupNorm/LayerNorm per-sample affine gradients in the interpreter vs the reference and float64, and the
torch path (what the engine runs on CPU) vs the same."""

import pytest
import torch

from privimage import kernels as K
from privimage.kernels import dispatch

import kernel_cases as H


# (name, make inputs -> (x, grad_out, the op's layer argument)); offsets on x make the variance pass matter
def _gn():
    x = torch.randn(7, 6, 5, 3, dtype=torch.float64) * 3 + 2
    return x, torch.randn_like(x), 3


def _gn_big_channels():  # CG·L crosses the tile width; one group (the attention block's GroupNorm(1, C))
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    return x, torch.randn_like(x), 1


def _ln():
    x = torch.randn(5, 4, 7, dtype=torch.float64) - 1
    return x, torch.randn_like(x), 7


def _ln_2d():
    x = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    return x, torch.randn_like(x), (5, 3)


CASES = {"gn": _gn, "gn-one-group": _gn_big_channels, "ln": _ln, "ln-2d": _ln_2d}


def _ops(name):
    if name.startswith("gn"):
        return K.group_norm_grads, K.group_norm_grads_ref
    return K.layer_norm_grads, K.layer_norm_grads_ref


def _check(name, kind, dtype, atol, backend=None):
    x, g, arg = CASES[name]()
    kw = H.rows(kind, g.shape[0])
    if "is_padding" in kw:
        g[kw["is_padding"]] = float("nan")  # padding rows are never read
    op, ref = _ops(name)
    x1, g1 = x.to(dtype), g.to(dtype)
    if backend is None:
        ours = op(x1, g1, arg, **kw)
    else:
        with dispatch.forced(backend):
            ours = op(x1, g1, arg, **kw)
    same = ref(x1, g1, arg, **kw)
    ref64 = ref(x1.double(), g1.double(), arg, **kw)
    S = kw.get("num_samples", g.shape[0])
    for o, s, r in zip(ours, same, ref64):
        assert o.dtype == torch.float32 and o.shape[0] == S
        H.assert_within(o, s, r, atol, f"{name} {kind}")


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_grads_fp32(interpret, name, kind):
    _check(name, kind, torch.float32, 1e-5)


@pytest.mark.parametrize("name", ["gn", "ln"])
def test_grads_bf16(interpret, name):
    _check(name, "plain", torch.bfloat16, 1e-4)


@pytest.mark.parametrize("kind", H.ROW_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_torch_path(monkeypatch, name, kind):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check(name, kind, torch.float32, 1e-5, backend="torch")


def test_empty_and_all_padding(interpret):
    x = torch.randn(0, 4, 3, 3)
    assert K.group_norm_grads(x, x, 2)[0].shape == (0, 4)
    x = torch.randn(3, 4, 3, 3)
    w, b = K.group_norm_grads(x, x, 2, is_padding=torch.ones(3, dtype=torch.bool))
    assert (w == 0).all() and (b == 0).all() and w.shape == (3, 4)
