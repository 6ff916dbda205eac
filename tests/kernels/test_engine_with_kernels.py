"""The engine's DP step with the kernels (Triton interpreter) equals the step with the torch references.

The engine's layer rules call the privimage.kernels ops, whose dispatch runs Triton (its interpreter under
TRITON_INTERPRET=1, or compiled on CUDA) or the torch path; counting wrappers prove the kernels ran. The kernels
run on ``$PRIVIMAGE_TEST_DEVICE`` (the ``device`` fixture): under Triton's interpreter on the CPU (default),
compiled on CUDA (the GPU suite); the reference is always the ops' torch path on the CPU, and the comparison is
by precision (tests/conftest.py, ``within_precision``). The model mixes a layer the engine takes ghost norms
of (few positions, wide) with one it takes materialised norms of (many positions, narrow), so bk-mixed
exercises ghost_sq_norms + clipped_weight_grad, and the ghost method (which keeps no per-sample gradients)
also per_sample_sq_norms. The native CPU build's counterpart is test_engine_native.py.
"""

import pytest
import torch
import torch.nn as nn

from privimage import kernels as K
from privimage.engine import DPEngine

ATOL = 1e-5  # relative to the largest float64 reference value


@pytest.fixture
def kernels_device(request, device):
    """The device the kernels run on: the CPU under Triton's interpreter (the ``interpret`` fixture), or CUDA."""
    if device.type == "cpu":
        request.getfixturevalue("interpret")
    return device


def _kernels_on(device, monkeypatch):
    """From here on, the engine's ops on ``device`` go to the kernels (on CUDA they always do)."""
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _on(device, x, kw):
    return x.to(device), {k: v.to(device) for k, v in kw.items()}


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(20, 24), nn.GELU(), nn.Linear(24, 3))


def _grads(method, x, **kw):
    model = _model().to(x.device, x.dtype)
    engine = DPEngine(model, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=4, method=method)
    engine.step(lambda m: m(x).square().mean((1, 2)), **kw)
    return [p.grad.cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("method, ops", [
    ("bk-mixed", ["ghost_sq_norms", "clipped_weight_grad"]),
    ("ghost", ["ghost_sq_norms", "per_sample_sq_norms"])])
def test_dp_step_with_kernels_equals_references(kernels_device, monkeypatch, within_precision, method, ops):
    x = torch.randn(6, 2, 20)  # two rows per sample (the engine folds equal-sized groups into positions)
    kw = dict(is_padding=torch.tensor([False, False, True, False, False, False]),
              groups=torch.tensor([0, 1, 2, 1, 0, 2]))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)  # the reference is the ops' torch path
    want = _grads(method, x, **kw)
    want64 = _grads(method, x.double(), **kw)
    _kernels_on(kernels_device, monkeypatch)
    calls = {name: 0 for name in ops}
    for name in ops:
        original = getattr(K, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counting)
    x_dev, kw_dev = _on(kernels_device, x, kw)
    got = _grads(method, x_dev, **kw_dev)
    assert all(n > 0 for n in calls.values()), f"kernels not called: {calls}"
    for i, (g, w, w64) in enumerate(zip(got, want, want64)):
        within_precision(g, w, w64, ATOL, f"param {i}")
    assert any(g.abs().sum() > 0 for g in got)


def _conv_grads(x, is_padding):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.GroupNorm(1, 5), nn.SiLU(),
                          nn.Conv2d(5, 16, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16 * 6, 2))
    model = model.to(x.device, x.dtype)
    engine = DPEngine(model, max_grad_norm=0.3, noise_multiplier=0.0, expected_batch_size=3)
    engine.step(lambda m: m(x).square().sum(1), is_padding=is_padding.to(x.device))
    return [p.grad.cpu().clone() for p in model.parameters()]


def test_dp_step_with_conv_kernels_equals_references(kernels_device, monkeypatch, within_precision):
    """Convolutions: materialised norms (first conv, T=20), ghost norms (second, T=6, wide) and the clipped
    weight gradient, with per-sample gradients not kept (KEEP_FACTOR=0) so every conv op goes to a kernel;
    GroupNorm's per-sample affine gradients by its fused kernel."""
    from privimage.engine import plan

    monkeypatch.setattr(plan, "KEEP_FACTOR", 0.0)
    x = torch.randn(3, 3, 5, 4)
    is_padding = torch.tensor([False, True, False])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PRIVIMAGE_NATIVE", raising=False)  # the reference is the ops' torch path
    want = _conv_grads(x, is_padding)
    want64 = _conv_grads(x.double(), is_padding)
    _kernels_on(kernels_device, monkeypatch)
    ops = ["conv_per_sample_sq_norms", "conv_ghost_sq_norms", "conv_clipped_weight_grad", "group_norm_grads"]
    calls = {name: 0 for name in ops}
    for name in ops:
        def counting(*args, _original=getattr(K, name), _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counting)
    got = _conv_grads(x.to(kernels_device), is_padding)
    assert all(n > 0 for n in calls.values()), f"kernels not called: {calls}"
    for i, (g, w, w64) in enumerate(zip(got, want, want64)):
        within_precision(g, w, w64, ATOL, f"param {i}")
