"""DPEngine against the slow loop reference (tests/helpers/reference.py): norms, clipped sums, final .grad, for every
layer type a diffusion UNet uses, every method, odd shapes, padding, groups and frozen parameters.

The exactness tests take the ``device`` and ``precision`` fixtures (tests/conftest.py): on the CPU in float64 by
default; the GPU suite re-runs them on CUDA in float64 and float32 (``PRIVIMAGE_TEST_DEVICE``,
``PRIVIMAGE_TEST_DTYPES``)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage.engine import DPEngine, check_per_sample_norms, make_private

import reference as ref

METHODS = ["bk-mixed", "ghost", "vmap", "loop"]
DT = torch.float64
ATOL = 1e-5  # dtypes other than float64: relative to the largest float64 reference value (STYLE.md §3)


class Attention(nn.Module):
    """Self-attention over H·W positions built from 1x1 convs and Linear (as DDPM++ builds it)."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(1, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        att = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), -1)
        out = self.proj((att @ v.transpose(1, 2)))  # (b, hw, c): Linear with an extra leading dim
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNetBlock(nn.Module):
    """conv + GroupNorm + attention + time-embedding Linear + class Embedding: a tiny UNet-like block."""

    def __init__(self, c_in=3, c=4, num_classes=5):
        super().__init__()
        self.label = nn.Embedding(num_classes, 8)
        self.temb = nn.Linear(8, c)
        self.conv_in = nn.Conv2d(c_in, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.att = Attention(c)
        self.out = nn.Conv2d(c, c_in, 1)

    def forward(self, x, t, y):
        emb = torch.sin(t[:, None] * torch.arange(1, 9, dtype=x.dtype, device=x.device)) + self.label(y)
        h = self.conv_in(x) + self.temb(emb)[:, :, None, None]
        h = F.silu(self.norm(h))
        h = self.att(self.down(h))
        return self.out(F.interpolate(h, size=x.shape[2:]))


class Scale(nn.Module):
    """A layer with no rule: the engine must take it through the vmap fallback."""

    def __init__(self, c):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return x * self.gain + x.square().mean() * 0  # rows independent; mean*0 keeps it row-local


def _case(name, batch, reduction="sum", device="cpu", dtype=DT):
    """(model, loss_fn) for one layer type, built in float64 from seeds (so a float64 twin of any case is one call
    away), then moved to ``device`` and ``dtype``; loss rows = batch; per-row sum or mean over outputs."""
    g = torch.Generator().manual_seed(batch)
    torch.manual_seed(batch)  # the modules' initial weights

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=DT)

    if name == "linear_extra_dims":
        model, x = nn.Linear(5, 3), rnd(batch, 2, 4, 5)
    elif name == "conv_stride2":
        model, x = nn.Conv2d(3, 5, 3, stride=2, padding=1), rnd(batch, 3, 7, 5)
    elif name == "conv_groups2":
        model, x = nn.Conv2d(4, 6, 3, padding=1, groups=2), rnd(batch, 4, 6, 5)
    elif name == "conv_dilation_nobias":
        model, x = nn.Conv2d(3, 5, 3, dilation=2, padding=2, bias=False), rnd(batch, 3, 7, 6)
    elif name == "conv_1x1":
        model, x = nn.Conv2d(5, 3, 1), rnd(batch, 5, 4, 3)
    elif name == "conv_reflect_same":
        model, x = nn.Conv2d(3, 5, (3, 2), padding="same", padding_mode="reflect"), rnd(batch, 3, 5, 7)
    elif name == "conv_small_ghost":  # T=16 small against d·p: bk-mixed picks ghost norms
        model, x = nn.Conv2d(32, 32, 3, padding=1), rnd(batch, 32, 4, 4)
    elif name == "conv_wide":  # more than 64 input channels: per-sample grads in input-channel chunks
        model, x = nn.Conv2d(70, 3, 3, padding=1), rnd(batch, 70, 3, 4)
    elif name == "groupnorm":
        model, x = nn.GroupNorm(2, 4), rnd(batch, 4, 3, 5) * 3 + 1
    elif name == "layernorm":
        model, x = nn.LayerNorm(5), rnd(batch, 3, 5) * 2 + 1
    elif name == "embedding":
        model = nn.Embedding(7, 3, padding_idx=0)
        x = torch.randint(0, 7, (batch, 4), generator=g)
    elif name == "fallback":
        model, x = nn.Sequential(nn.Conv2d(3, 3, 1), Scale(3)), rnd(batch, 3, 4, 3)
    elif name == "unet_block":
        model = UNetBlock()
        x = (rnd(batch, 3, 8, 6), torch.rand(batch, generator=g, dtype=DT), torch.randint(0, 5, (batch,), generator=g))
    else:
        raise KeyError(name)
    model = model.to(DT).to(device, dtype)
    x = tuple(_to(a, device, dtype) for a in x) if isinstance(x, tuple) else _to(x, device, dtype)
    target = None

    def loss_fn(m):
        nonlocal target
        out = m(*x) if isinstance(x, tuple) else m(x)
        if target is None:
            target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=DT).to(out)
        per_elem = (out * target + 0.3 * out.square()).flatten(1)
        return per_elem.sum(1) if reduction == "sum" else per_elem.mean(1)

    return model, loss_fn


def _to(t, device, dtype):
    """A case tensor on ``device``; floating-point ones in ``dtype`` (indices keep theirs)."""
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)


LAYERS = ["linear_extra_dims", "conv_stride2", "conv_groups2", "conv_dilation_nobias", "conv_1x1",
          "conv_reflect_same", "conv_small_ghost", "conv_wide", "groupnorm", "layernorm", "embedding", "fallback", "unet_block"]


def _assert_grads(model, expected, atol=1e-10):
    params = [p for p in model.parameters() if p.requires_grad]
    for i, (p, e) in enumerate(zip(params, expected)):
        assert p.grad is not None, f"param {i} {tuple(p.shape)} has no grad"
        err = (p.grad - e).abs().max().item()
        assert err <= atol + 1e-8 * e.abs().max().item(), f"param {i} {tuple(p.shape)}: max error {err}"


def _check_against_loop(within, stats, model, loss_fn, twin, *, C, B, norms=True, **kw):
    """The engine's norms (``stats.norms``) and ``.grad`` against the loop reference on the same model and loss.

    float64: to ~1e-9 relative. Other dtypes: ``within_precision`` against the loop run on ``twin()`` (the
    same (model, loss_fn) built in float64 on the CPU), the loop at the test's dtype being the reference of the
    same precision. ``kw``: the loop's ``groups``/``is_padding``.
    """
    expected = ref.dp_grads_loop(model, loss_fn, max_grad_norm=C, expected_batch_size=B, **kw)
    ref_norms = ref.per_sample_norms_loop(model, loss_fn, **kw) if norms else None
    params = [p for p in model.parameters() if p.requires_grad]
    if params[0].dtype == torch.float64:
        if norms:
            torch.testing.assert_close(stats.norms.cpu(), ref_norms, rtol=1e-9, atol=1e-12)
        _assert_grads(model, expected)
        return
    model64, loss64 = twin()
    kw64 = {k: v.cpu() for k, v in kw.items()}
    if norms:
        within(stats.norms, ref_norms, ref.per_sample_norms_loop(model64, loss64, **kw64), ATOL, "norms")
    expected64 = ref.dp_grads_loop(model64, loss64, max_grad_norm=C, expected_batch_size=B, **kw64)
    for i, (p, e, e64) in enumerate(zip(params, expected, expected64)):
        assert p.grad is not None, f"param {i} {tuple(p.shape)} has no grad"
        within(p.grad, e, e64, ATOL, f"param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYERS)
def test_norms_and_grads_match_loop(name, method, reduction, device, precision, within_precision):
    for batch in (1, 3, 7):
        model, loss_fn = _case(name, batch, reduction, device, precision)
        C = float(ref.per_sample_norms_loop(model, loss_fn).median())  # about half the samples are clipped
        engine = DPEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=5, method=method)
        stats = engine.step(loss_fn)
        _check_against_loop(within_precision, stats, model, loss_fn, lambda: _case(name, batch, reduction),
                            C=C, B=5)
        assert stats.num_samples == batch and stats.num_nonfinite == 0


# ---- padding, groups, frozen parameters, NaN, noise, accumulation ------------------------------------------

def _unet_case(batch, seed=0, device="cpu", dtype=DT):
    """(model, x, t, y, target) of the UNet-like block, built in float64 from seeds, on ``device`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = UNetBlock().to(DT).to(device, dtype)
    x = torch.randn(batch, 3, 8, 6, generator=g, dtype=DT)
    t = torch.rand(batch, generator=g, dtype=DT)
    y = torch.randint(0, 5, (batch,), generator=g)
    target = torch.randn(batch, 3, 8, 6, generator=g, dtype=DT)
    return (model, *(_to(a, device, dtype) for a in (x, t, y, target)))


@pytest.mark.parametrize("method", METHODS)
def test_padding_rows_count_for_nothing_even_if_nan(method, device, precision, within_precision):
    pad = torch.tensor([False, True, False, False, True, False, False], device=device)
    keep = ~pad  # the reference runs on the real rows alone (a NaN row would poison its shared backward)

    def case(device=device, dtype=precision):
        model, x, t, y, target = _unet_case(7, device=device, dtype=dtype)
        x = x.clone()
        x[1] = float("nan")  # garbage in a padding row must not leak, for every method (loop included)
        k = keep.to(x.device)

        def loss_fn(m):
            return (m(x, t, y) - target).square().flatten(1).mean(1)

        def loss_real(m):
            return (m(x[k], t[k], y[k]) - target[k]).square().flatten(1).mean(1)

        return model, loss_fn, loss_real

    model, loss_fn, loss_real = case()
    engine = DPEngine(model, max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, method=method)
    stats = engine.step(loss_fn, is_padding=pad)
    assert stats.num_samples == 5 and stats.num_nonfinite == 0
    assert stats.clip_factors[pad].eq(0).all()
    _check_against_loop(within_precision, stats, model, loss_real, lambda: case("cpu", DT)[::2], C=0.05, B=6,
                        norms=False)


@pytest.mark.parametrize("method", METHODS)
def test_all_padding_batch_gives_noise_alone(method):
    model, x, t, y, target = _unet_case(3)
    sigma, C, B = 1.3, 0.7, 9.0
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=B, method=method,
                      generator=torch.Generator().manual_seed(5))
    engine.step(lambda m: (m(x, t, y) - target).square().flatten(1).sum(1), is_padding=torch.ones(3, dtype=torch.bool))
    gen = torch.Generator().manual_seed(5)
    for p in model.parameters():
        expected = torch.randn(p.shape, generator=gen, dtype=DT) * sigma * C / B
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups", [[0, 1, 2, 0, 1, 2, 0, 1, 2], [2, 0, 0, 1, 2, 2, 3, 3, 3]],
                         ids=["uniform", "ragged"])
def test_groups_clip_each_sample_over_its_rows(method, groups, device, precision, within_precision):
    groups = torch.tensor(groups, device=device)

    def case(device=device, dtype=precision):
        model, x, t, y, target = _unet_case(9, device=device, dtype=dtype)

        def loss_fn(m):  # three noise draws of one image: each row is scaled by 1/k as diffusion losses do
            return (m(x, t, y) - target).square().flatten(1).mean(1) / 3

        return model, loss_fn

    model, loss_fn = case()
    C = float(ref.per_sample_norms_loop(model, loss_fn, groups=groups).median())
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=4, method=method)
    stats = engine.step(loss_fn, groups=groups)
    _check_against_loop(within_precision, stats, model, loss_fn, lambda: case("cpu", DT), C=C, B=4, groups=groups)


@pytest.mark.parametrize("method", METHODS)
def test_frozen_parameters_are_skipped(method, device, precision, within_precision):
    def case(device=device, dtype=precision):
        model, x, t, y, target = _unet_case(5, device=device, dtype=dtype)
        for p in list(model.conv_in.parameters()) + list(model.label.parameters()) + [model.norm.bias]:
            p.requires_grad_(False)

        def loss_fn(m):
            return (m(x, t, y) - target).square().flatten(1).sum(1)

        return model, loss_fn

    model, loss_fn = case()
    engine = DPEngine(model, max_grad_norm=0.1, noise_multiplier=0.0, expected_batch_size=5, method=method)
    stats = engine.step(loss_fn)
    _check_against_loop(within_precision, stats, model, loss_fn, lambda: case("cpu", DT), C=0.1, B=5)
    assert model.conv_in.weight.grad is None and model.label.weight.grad is None and model.norm.bias.grad is None


def test_all_methods_agree_in_float32():
    torch.manual_seed(3)
    model = UNetBlock()
    x, t, y = torch.randn(6, 3, 8, 6), torch.rand(6), torch.randint(0, 5, (6,))
    results = {}
    for method in METHODS:
        engine = DPEngine(model, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=6, method=method)
        engine.step(lambda m: m(x, t, y).square().flatten(1).mean(1))
        results[method] = [p.grad.clone() for p in model.parameters()]
    for method in METHODS[1:]:
        for a, b in zip(results["bk-mixed"], results[method]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["input", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_sample_is_dropped_and_counted(method, bad, where, device, precision, within_precision):
    """One image with a NaN/inf pixel (in the model's input, or in the loss's target only) drops that sample
    alone, for every method: the other samples' clipped gradients are exact (issue 13: ``loop`` used to
    silence the whole micro-batch, its shared backward turning 0·NaN into NaN for every row)."""
    keep = torch.arange(5) != 2  # expected: the clipped sum of the other four samples, still divided by 5

    def case(device=device, dtype=precision):
        model, x, t, y, target = _unet_case(5, device=device, dtype=dtype)
        x, target = x.clone(), target.clone()
        (x if where == "input" else target)[2, 0, 1, 1] = bad
        k = keep.to(x.device)

        def loss_fn(m):
            return (m(x, t, y) - target).square().flatten(1).sum(1)

        def loss_rest(m):
            return (m(x[k], t[k], y[k]) - target[k]).square().flatten(1).sum(1)

        return model, loss_fn, loss_rest

    model, loss_fn, loss_rest = case()
    engine = DPEngine(model, max_grad_norm=0.1, noise_multiplier=0.0, expected_batch_size=5, method=method)
    stats = engine.step(loss_fn)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert stats.num_nonfinite == 1 and stats.num_samples == 5
    _check_against_loop(within_precision, stats, model, loss_rest, lambda: case("cpu", DT)[::2], C=0.1, B=5,
                        norms=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_pair_is_dropped_from_per_sample_kept_gradients(bad, caplog):
    """Samples of two tiled rows (the GAN's real/fake pairs) keep per-SAMPLE conv gradients; a NaN/inf image
    drops its pair alone (its kept gradient zeroed per sample), the others exact against the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.SiLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 2)).double()
    S = 4
    x, target = torch.randn(2 * S, 2, 4, 4, dtype=DT), torch.randn(2 * S, 2, dtype=DT)
    x[S + 1, 0, 2, 2] = bad  # the fake of pair 1
    groups = torch.arange(S).repeat(2)
    rest = groups != 1

    def loss_fn(m):
        return (m(x) - target).square().sum(1)

    def loss_rest(m):
        return (m(x[rest]) - target[rest]).square().sum(1)

    engine = DPEngine(model, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=S,
                      norm_strategy="materialise")
    with caplog.at_level("INFO", logger="privimage.engine.plan"):
        stats = engine.step(loss_fn, groups=groups)
    assert stats.num_nonfinite == 1 and stats.num_samples == S
    assert any(r.getMessage().startswith("DP layer 0 (Conv2d): materialise norms, per-sample grads kept")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    want = ref.dp_grads_loop(model, loss_rest, max_grad_norm=0.5, expected_batch_size=S,
                             groups=torch.tensor([0, 1, 2, 0, 1, 2]))
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
    engine.close()


def _ks_pvalue(samples, std):
    """Two-sided one-sample Kolmogorov-Smirnov test of samples against N(0, std²) (asymptotic p-value)."""
    x, _ = torch.sort(samples.double().flatten() / std)
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return max(0.0, min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def test_noise_std_is_sigma_c_over_expected_batch_size():
    model = nn.Linear(60, 50)  # 3050 noise values in one step
    sigma, C, B = 0.8, 2.0, 16
    x = torch.randn(4, 60)
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=B,
                      generator=torch.Generator().manual_seed(11))
    engine.step(lambda m: m(x).sum(1) * 0)  # zero gradient: .grad is the noise alone
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert _ks_pvalue(noise, sigma * C / B) > 0.025
    assert _ks_pvalue(noise, 2 / 3 * sigma * C / B) < 0.025
    assert _ks_pvalue(noise, 1.5 * sigma * C / B) < 0.025


class InPlace(nn.Module):
    """A conv whose output is modified in place after the conv returned (its gradient is then not G)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.conv(x)
        h.relu_()
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("method", ["bk-mixed", "ghost"])
def test_output_modified_in_place_falls_back_to_probes_and_matches_the_loop(method, caplog):
    """Eager capture asks autograd for the layers' outputs; an in-place op on one is seen (version counter),
    the step runs its forward again with probes and stays exact; a plain model keeps the direct capture."""
    torch.manual_seed(0)
    model = InPlace().double()
    x, target = torch.randn(6, 2, 5, 4, dtype=DT), torch.randn(6, 2, dtype=DT)
    groups = torch.arange(3).repeat(2)  # pairs, tiled

    def loss_fn(m):
        return (m(x) - target).square().sum(1)

    C = float(ref.per_sample_norms_loop(model, loss_fn, groups=groups).median())
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=3.0, method=method)
    assert engine._probes.direct
    with caplog.at_level("INFO", logger="privimage.engine.capture"):
        for _ in range(2):  # the fallback step, then a step with probes from the start
            engine.step(loss_fn, groups=groups)
            want = ref.dp_grads_loop(model, loss_fn, max_grad_norm=C, expected_batch_size=3.0, groups=groups)
            for p, w in zip(model.parameters(), want):
                torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
    assert not engine._probes.direct
    assert sum("modified in place" in r.getMessage() for r in caplog.records) == 1
    engine.close()
    plain = DPEngine(nn.Linear(3, 2).double(), max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=2.0)
    plain.step(lambda m: m(torch.randn(2, 3, dtype=DT)).sum(1))
    assert plain._probes.direct
    plain.close()


@pytest.mark.parametrize("method", ["bk-mixed", "ghost"])
def test_micro_batches_equal_one_batch_and_noise_is_added_once(method):
    model, x, t, y, target = _unet_case(7)

    def loss_on(rows):
        return lambda m: (m(x[rows], t[rows], y[rows]) - target[rows]).square().flatten(1).sum(1)

    def run(splits):
        engine = DPEngine(model, max_grad_norm=0.1, noise_multiplier=1.0, expected_batch_size=8, method=method,
                          generator=torch.Generator().manual_seed(2))
        for rows in splits:
            engine.accumulate(loss_on(rows))
        stats = engine.finalize()
        return [p.grad.clone() for p in model.parameters()], stats

    one, stats_one = run([slice(0, 7)])
    three, stats_three = run([slice(0, 3), slice(3, 5), slice(5, 7)])
    assert stats_one.num_samples == stats_three.num_samples == 7
    for a, b in zip(one, three):  # same generator seed: equal only if the noise was drawn once
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_divisor_is_expected_batch_size_not_drawn_size():
    model = nn.Linear(3, 1).to(DT)
    x = torch.randn(3, 3, dtype=DT)
    engine = DPEngine(model, max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=10)
    engine.step(lambda m: m(x).sum(1))  # no clipping: grad = Σ_i x_i / 10, not / 3
    torch.testing.assert_close(model.weight.grad, x.sum(0, keepdim=True) / 10)
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.3], dtype=DT))


def test_dp_training_lowers_the_loss():
    torch.manual_seed(0)
    w_true = torch.randn(8, 2)
    data_x = torch.randn(512, 8)
    data_y = (data_x @ w_true).argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.GroupNorm(4, 16), nn.SiLU(), nn.Linear(16, 2))
    opt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), max_grad_norm=1.0,
                       noise_multiplier=1.0, expected_batch_size=64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)

    def full_loss():
        with torch.no_grad():
            return float(F.cross_entropy(model(data_x), data_y))

    before = full_loss()
    for _ in range(30):
        idx = torch.nonzero(torch.rand(512, generator=gen) < 64 / 512).squeeze(1)  # Poisson sampling
        opt.step(lambda m: F.cross_entropy(m(data_x[idx]), data_y[idx], reduction="none"))
    assert full_loss() < 0.7 * before


# ---- refusals, checks and logging --------------------------------------------------------------------------

def test_batchnorm_is_refused_with_groupnorm_advice():
    with pytest.raises(ValueError, match="GroupNorm"):
        DPEngine(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), max_grad_norm=1.0, noise_multiplier=1.0,
                 expected_batch_size=4)


def test_reduced_loss_is_refused():
    model = nn.Linear(3, 1)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match=r"shape \(R,\)"):
        engine.step(lambda m: m(torch.randn(4, 3)).mean())


def test_check_per_sample_norms_passes_rowwise_and_fails_batch_mixing_layers():
    class MixesRows(nn.Module):  # uses the batch mean: no per-sample method can be right
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x - x.mean(0)) * self.w

    def loss_fn(m, batch):
        return m(batch).square().sum(1)

    batch = torch.randn(5, 3, dtype=DT)
    good = check_per_sample_norms(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).to(DT), loss_fn, batch)
    assert good.ok and good.max_abs_error < 1e-10
    bad = check_per_sample_norms(nn.Sequential(nn.Linear(3, 3), MixesRows()).to(DT), loss_fn, batch)
    assert not bad.ok


def test_layer_choices_are_logged_once(caplog):
    model, x, t, y, target = _unet_case(3)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=3)
    with caplog.at_level("INFO", logger="privimage.engine.plan"):
        for _ in range(2):
            engine.step(lambda m: m(x, t, y).square().flatten(1).sum(1))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DP layer")]
    assert len(lines) == len({line.split(" (")[0] for line in lines}) == 9  # 9 parameterised layers, once each
    assert any("temb (Linear): ghost" in line for line in lines)
    assert any("conv_in (Conv2d): materialise" in line for line in lines)


def test_bf16_autocast_norms_close_to_fp32():
    torch.manual_seed(0)
    model = UNetBlock()
    x, t, y = torch.randn(4, 3, 8, 6), torch.rand(4), torch.randint(0, 5, (4,))

    def loss_fn(m):
        return m(x, t, y).float().square().flatten(1).mean(1)

    exact = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4).accumulate(loss_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4).accumulate(loss_fn)
    assert low.norms.dtype == torch.float32
    torch.testing.assert_close(low.norms, exact.norms, rtol=5e-2, atol=1e-4)


def test_compiled_model_forward_has_no_graph_break_and_matches_eager():
    """The model's forward (with the engine's probes) compiles as one graph (fullgraph=True), without
    recompiling on later steps, and gives the eager result. aot_eager keeps the test fast: it runs Dynamo and
    AOTAutograd, which are where graph breaks and wrong gradients would come from, without Inductor codegen."""
    import torch._dynamo

    torch._dynamo.reset()
    model, x, t, y, target = _unet_case(4)
    engine = DPEngine(model, max_grad_norm=0.1, noise_multiplier=0.0, expected_batch_size=4)
    expected = engine.step(lambda m: (m(x, t, y) - target).square().flatten(1).sum(1)).norms
    grads = [p.grad.clone() for p in model.parameters()]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    counts = []
    for _ in range(3):
        got = engine.step(lambda m: (compiled(x, t, y) - target).square().flatten(1).sum(1)).norms
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[1] == counts[2], f"recompiled on a later step: {counts}"
    engine.close()


def test_ops_dispatch_conv_kernels_under_triton_interpret(monkeypatch):
    """The engine's conv rules reach privimage.kernels' fused conv norm op under TRITON_INTERPRET=1 (the cost model
    picks fused norms where Triton runs) and get the torch result."""
    kernels = pytest.importorskip("privimage.kernels")
    if not hasattr(kernels, "conv_per_sample_sq_norms"):
        pytest.skip("privimage.kernels has no conv_per_sample_sq_norms yet")

    def run():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.GELU(),
                              nn.Conv2d(4, 8, 3, padding=1, groups=2))
        x = torch.randn(3, 3, 6, 5)
        engine = DPEngine(model, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=3, method="ghost")
        return engine.step(lambda m: m(x).square().flatten(1).mean(1)).norms

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    want = run()
    calls = []
    original = kernels.conv_per_sample_sq_norms
    monkeypatch.setattr(kernels, "conv_per_sample_sq_norms", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(run(), want, rtol=1e-5, atol=1e-7)
    assert len(calls) == 2


def _poisson_steps(physical, drawn_sizes, seed=0):
    """Physical batches of a fixed size holding ``drawn`` real rows each, the rest marked as padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for drawn in drawn_sizes:
        pad = torch.ones(physical, dtype=torch.bool)
        pad[torch.randperm(physical, generator=g)[:drawn]] = False
        out.append(pad)
    return out


def test_compiled_step_equals_eager_step_and_does_not_recompile():
    """compile=True (forward, norms + clip factors, clipped sums as compiled regions) gives the eager step's
    norms and noisy gradients, noise included (same seeded generator), on Poisson batches of different drawn
    sizes padded to one physical size, with rows grouped into samples; after the first step nothing
    recompiles (``error_on_recompile``). aot_eager: Dynamo and AOTAutograd, where graph breaks, guards and
    wrong gradients come from, without Inductor's C++ build (Inductor runs in bench/dp_step.py)."""
    import torch._dynamo

    torch._dynamo.reset()
    model, x, t, y, target = _unet_case(8)
    groups = torch.arange(8) // 2  # 4 samples of 2 rows: a sample's rows are padding together

    def loss_fn(m):
        return (m(x, t, y) - target).square().flatten(1).sum(1)

    def run(compile, steps):
        engine = DPEngine(model, max_grad_norm=0.05, noise_multiplier=0.7, expected_batch_size=3,
                          generator=torch.Generator().manual_seed(5), compile=compile, compile_backend="aot_eager")
        out = []

        def step(pad):
            stats = engine.step(loss_fn, is_padding=pad.repeat_interleave(2), groups=groups)
            out.append((stats.norms, stats.num_samples, [p.grad.clone() for p in model.parameters()]))

        step(steps[0])  # compiles every region; the later steps must reuse them
        with torch._dynamo.config.patch(error_on_recompile=True):
            for pad in steps[1:]:
                step(pad)
        engine.close()
        return out

    steps = _poisson_steps(4, [3, 1, 4, 0])
    compiled = run(True, steps)
    for (n_e, s_e, g_e), (n_c, s_c, g_c) in zip(run(False, steps), compiled):
        assert int(s_c) == int(s_e)
        torch.testing.assert_close(n_c, n_e, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_step_drops_nonfinite_sample_like_eager():
    """A NaN sample takes the sanitising variant of the clipped-sums region; it is dropped as in eager."""
    import torch._dynamo

    torch._dynamo.reset()
    model, x, t, y, target = _unet_case(5)
    x = x.clone()
    x[2] = float("nan")

    def run(compile):
        engine = DPEngine(model, max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=5, compile=compile,
                          compile_backend="aot_eager")
        stats = engine.step(lambda m: (m(x, t, y) - target).square().flatten(1).sum(1))
        engine.close()
        return stats, [p.grad.clone() for p in model.parameters()]

    (stats_c, grads_c), (stats_e, grads_e) = run(True), run(False)
    assert int(stats_c.num_nonfinite) == int(stats_e.num_nonfinite) == 1
    for a, b in zip(grads_c, grads_e):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["ghost", "vmap", "loop"])
def test_compile_needs_bk_mixed(method):
    with pytest.raises(ValueError, match="compile=True needs method='bk-mixed'"):
        DPEngine(nn.Linear(2, 1), max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=1, method=method,
                 compile=True)


@pytest.mark.parametrize("method", ["bk-mixed", "ghost", "vmap"])
def test_bf16_autocast_forward_matches_the_loop(method):
    """Under bf16 autocast every method clips the same per-sample gradients as the loop (vmap replays each
    layer's forward under the recorded autocast state: its inputs are bf16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 2, (6,))

    def loss_fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return nn.functional.cross_entropy(out.float(), y, reduction="none")

    grads = {}
    for name in (method, "loop"):
        model.zero_grad()
        engine = DPEngine(model, max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=6, method=name)
        engine.accumulate(loss_fn)
        engine.finalize()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    err = (grads[method] - grads["loop"]).norm() / grads["loop"].norm()
    assert err < 2e-2, f"{method} vs loop under bf16 autocast: relative error {float(err):.3g}"
