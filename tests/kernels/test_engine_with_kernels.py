"""The engine's DP step with the kernels (Triton interpreter) equals the step with the torch references.

privimage.engine.ops calls the privimage.kernels op of the same name when TRITON_INTERPRET=1 (or on CUDA);
counting wrappers prove the kernels ran. The model mixes a layer the engine takes ghost norms of (few
positions, wide) with one it takes materialised norms of (many positions, narrow), so bk-mixed exercises
ghost_sq_norms + clipped_weight_grad, and the ghost method (which keeps no per-sample gradients) also
per_sample_sq_norms. The native CPU build's counterpart is test_engine_native.py.
"""

import pytest
import torch
import torch.nn as nn

from privimage import kernels as K
from privimage.engine import DPEngine


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 24), nn.GELU(), nn.Linear(24, 3))


def _grads(method, x, **kw):
    model = _model()
    engine = DPEngine(model, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=4, method=method)
    engine.step(lambda m: m(x).square().mean((1, 2)), **kw)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method, ops", [
    ("bk-mixed", ["ghost_sq_norms", "clipped_weight_grad"]),
    ("ghost", ["ghost_sq_norms", "per_sample_sq_norms"])])
def test_dp_step_with_kernels_equals_references(interpret, monkeypatch, method, ops):
    x = torch.randn(6, 2, 20)  # two rows per sample (the engine folds equal-sized groups into positions)
    kw = dict(is_padding=torch.tensor([False, False, True, False, False, False]),
              groups=torch.tensor([0, 1, 2, 1, 0, 2]))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)  # the reference is engine.ops' torch code
    want = _grads(method, x, **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = {name: 0 for name in ops}
    for name in ops:
        original = getattr(K, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counting)
    got = _grads(method, x, **kw)
    assert all(n > 0 for n in calls.values()), f"kernels not called: {calls}"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got)


def _conv_grads(x, is_padding):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.GroupNorm(1, 5), nn.SiLU(),
                          nn.Conv2d(5, 16, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16 * 6, 2))
    engine = DPEngine(model, max_grad_norm=0.3, noise_multiplier=0.0, expected_batch_size=3)
    engine.step(lambda m: m(x).square().sum(1), is_padding=is_padding)
    return [p.grad.clone() for p in model.parameters()]


def test_dp_step_with_conv_kernels_equals_references(interpret, monkeypatch):
    """Convolutions: materialised norms (first conv, T=20), ghost norms (second, T=6, wide) and the clipped
    weight gradient, with per-sample gradients not kept (KEEP_FACTOR=0) so every conv op goes to a kernel;
    GroupNorm's per-sample affine gradients by its fused kernel."""
    from privimage.engine import layers

    monkeypatch.setattr(layers, "KEEP_FACTOR", 0.0)
    x = torch.randn(3, 3, 5, 4)
    is_padding = torch.tensor([False, True, False])
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)  # the reference is engine.ops' torch code
    want = _conv_grads(x, is_padding)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops = ["conv_per_sample_sq_norms", "conv_ghost_sq_norms", "conv_clipped_weight_grad", "group_norm_grads"]
    calls = {name: 0 for name in ops}
    for name in ops:
        def counting(*args, _original=getattr(K, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counting)
    got = _conv_grads(x, is_padding)
    assert all(n > 0 for n in calls.values()), f"kernels not called: {calls}"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
