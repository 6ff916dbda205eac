"""The per-layer plan: every forced norm strategy gives the loop reference's clipped sums (rows grouped into
samples, padding), the fused path through Triton's interpreter, and the cost model's choices and file."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from privimage import kernels as K
from privimage.engine import CostModel, DPEngine
from privimage.engine.plan import DEFAULT_COSTS, Planner

import reference as ref

STRATEGIES = ["materialise", "fused", "ghost"]


class Net(nn.Module):
    """Convolutions (one strided, one grouped), GroupNorm, LayerNorm and Linear layers on tokens."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.tokens = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm(self.conv0(x))))          # (R, 6, 3, 2)
        h = self.ln(self.tokens(h.flatten(2).transpose(1, 2)))     # (R, 6 tokens, 5)
        return self.head(F.silu(h)).flatten(1)


def _case(rows, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net().to(dtype)
    x = torch.randn(rows, 3, 5, 4, generator=g, dtype=dtype)
    target = torch.randn(rows, 12, generator=g, dtype=dtype)

    def loss_fn(m):
        return (m(x) - target).square().mean(1)

    return model, x, loss_fn


GROUPINGS = {  # rows -> (groups, is_padding): K rows per sample (the fine-tune's layout), or ragged samples
    "uniform": (torch.arange(8) // 2, torch.tensor([False] * 6 + [True] * 2)),
    # the GAN's pairs: rows tiled [0..3, 0..3] (real images, then their fakes), a padded pair
    "pairs": (torch.arange(4).repeat(2), torch.tensor([False, False, True, False] * 2)),
    "ragged": (torch.tensor([0, 1, 1, 2, 0, 2, 2, 3]), torch.tensor([False, False, False, False, True, False, False,
                                                                      False])),
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("method", ["bk-mixed", "ghost"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forced_strategy_gives_the_loop_references_clipped_sums(caplog, strategy, method, grouping):
    groups, pad = GROUPINGS[grouping]
    model, _, loss_fn = _case(8, torch.float64)
    C = float(ref.per_sample_norms_loop(model, loss_fn, groups=groups, is_padding=pad).median())
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=4.0, method=method,
                      norm_strategy=strategy)
    with caplog.at_level("INFO", logger="privimage.engine.plan"):
        engine.step(loss_fn, groups=groups, is_padding=pad)
    engine.close()
    want = ref.dp_grads_loop(model, loss_fn, max_grad_norm=C, expected_batch_size=4.0, groups=groups, is_padding=pad)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
    plans = {r.getMessage().split(" (")[0][len("DP layer "):]: r.getMessage() for r in caplog.records
             if r.getMessage().startswith("DP layer")}
    for name in ("conv0", "conv1", "tokens", "head"):
        assert f": {strategy} norms" in plans[name], plans[name]


@pytest.mark.parametrize("strategy", ["fused", "ghost"])
def test_forced_kernels_in_the_interpreter_give_the_loop_references_clipped_sums(interpret_kernels, monkeypatch,
                                                                                 strategy):
    """The fused and ghost norm kernels and the clipped-sum kernel really run (Triton's interpreter, float32)
    with several rows per sample and padding, as a fine-tune steps, and agree with the loop reference."""
    groups, pad = GROUPINGS["uniform"]
    model, _, loss_fn = _case(8, torch.float32, seed=1)
    C = float(ref.per_sample_norms_loop(model, loss_fn, groups=groups, is_padding=pad).median())
    want = ref.dp_grads_loop(model, loss_fn, max_grad_norm=C, expected_batch_size=4.0, groups=groups, is_padding=pad)
    ops = ["per_sample_sq_norms", "conv_per_sample_sq_norms"] if strategy == "fused" else \
        ["ghost_sq_norms", "conv_ghost_sq_norms"]
    ops += ["clipped_weight_grad", "conv_clipped_weight_grad", "group_norm_grads", "layer_norm_grads"]
    calls = {name: 0 for name in ops}
    for name in ops:
        def counting(*args, _original=getattr(K, name), _name=name, **kwargs):
            calls[_name] += 1
            assert kwargs.get("grouping") is not None or _name.endswith("norm_grads"), \
                f"{_name} called without the grouping"
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counting)
    interpret_kernels()
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=4.0, norm_strategy=strategy)
    engine.step(loss_fn, groups=groups, is_padding=pad)
    engine.close()
    assert all(n > 0 for n in calls.values()), f"kernels not called: {calls}"
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


@pytest.fixture
def interpret_kernels(monkeypatch):
    """A function that switches Triton's interpreter on for the rest of the test."""
    from privimage.kernels import dispatch

    if not dispatch.HAVE_TRITON:
        pytest.skip("triton is not installed (the `test` extra installs it)")
    return lambda: monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_auto_plan_in_the_interpreter_takes_fused_kernels_for_grouped_rows(interpret_kernels, monkeypatch, caplog):
    """Where Triton runs, the default cost model sends layers whose per-row gradients are not kept to the fused
    kernels even when samples span several rows (the fine-tune's case), not to a torch materialisation."""
    from privimage.engine import plan

    monkeypatch.setattr(plan, "KEEP_FACTOR", 0.0)  # keep nothing, as for the large layers of a real UNet
    groups, pad = GROUPINGS["uniform"]
    model, _, loss_fn = _case(8, torch.float32)
    interpret_kernels()
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0)
    with caplog.at_level("INFO", logger="privimage.engine.plan"):
        engine.step(loss_fn, groups=groups, is_padding=pad)
    engine.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DP layer conv")]
    assert lines and all("fused norms" in line or "ghost norms" in line for line in lines), lines


def _plan(costs, strategy="auto", **shape):
    kw = dict(rows=8, positions=16, K=36, P=8, groups=1, sum_sq_rows=8, uniform=True, held=10 ** 9,
              keep_positions=16, fused_runs=True, single_call=True, detail="")
    kw.update(shape)
    return Planner(strategy, costs).weight(**kw)


def test_default_costs_are_the_mixed_ghost_norm_rule():
    """Defaults: ghost iff g·T²·Σn²·(K+P) < g·R·T·K·P, else keep if allowed, else fused where Triton runs."""
    costs = DEFAULT_COSTS["cpu"]
    # T(K+P) = 16·44 = 704 > K·P = 288: materialised work is smaller; kept (memory allows)
    assert (_plan(costs).norm, _plan(costs).keep) == ("materialise", True)
    assert _plan(costs, held=0).norm == "fused"
    assert (_plan(costs, held=0, fused_runs=False).norm, _plan(costs, held=0, fused_runs=False).keep) == \
        ("materialise", False)
    assert _plan(costs, positions=4, keep_positions=4).norm == "ghost"  # 4·44 = 176 < 288
    # two rows per sample double a sample's positions: 8·44 = 352 > 288, no longer ghost
    assert _plan(costs, positions=4, keep_positions=8, sum_sq_rows=16).norm != "ghost"
    # ragged samples without Triton: ghost would be a per-sample torch loop, so auto avoids it
    assert _plan(costs, positions=4, uniform=False, fused_runs=False).norm != "ghost"


def test_measured_costs_change_the_choice_and_forcing_overrides_them():
    slow_fused = CostModel(fused=10.0, clipped_sum=1.0)
    assert _plan(slow_fused, held=0).norm == "materialise"
    assert _plan(CostModel(materialise=5.0, clipped_sum=1.0, kept_sum=1.0)).norm == "fused"
    assert _plan(CostModel(ghost=100.0), positions=4, keep_positions=4).norm == "materialise"
    assert _plan(slow_fused, "fused", held=0).norm == "fused"
    assert _plan(DEFAULT_COSTS["cpu"], "ghost").norm == "ghost"
    # a convolution called twice can take only materialised norms: forcing falls back to the cost model
    assert _plan(DEFAULT_COSTS["cpu"], "ghost", single_call=False).norm == "materialise"


def test_cost_model_file_by_device_name_then_type(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"devices": {"cpu": {"ghost": 2.5, "clipped_sum": 0.5}, "NVIDIA X": {"fused": 0.1}}}))
    assert CostModel.load(path, "cpu") == CostModel(ghost=2.5, clipped_sum=0.5)
    model = nn.Linear(3, 2)
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0, cost_model=path)
    assert engine.planner.costs == CostModel(ghost=2.5, clipped_sum=0.5)
    engine.close()
    path.write_text(json.dumps({"devices": {"cpu": {"ghots": 1.0}}}))
    with pytest.raises(ValueError, match="unknown cost-model coefficients \\['ghots'\\]"):
        CostModel.load(path, "cpu")
    path.write_text("[]")
    with pytest.raises(ValueError, match="'devices' table"):
        CostModel.load(path, "cpu")
    path.write_text(json.dumps({"devices": {"cuda": {"fused": 0.5}}}))
    assert CostModel.load(path, "cpu") == DEFAULT_COSTS["cpu"], "an unnamed device keeps the defaults"


@pytest.mark.parametrize("kw, message", [
    (dict(norm_strategy="fastest"), "norm_strategy='fastest'"),
    (dict(norm_strategy="ghost", method="vmap"), "needs method='bk-mixed' or 'ghost'"),
    (dict(norm_strategy="fused", method="loop"), "needs method='bk-mixed' or 'ghost'"),
])
def test_bad_strategies_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        DPEngine(nn.Linear(2, 1), max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=1.0, **kw)
