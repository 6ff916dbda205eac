"""DPEngine over a gloo process group (privimage.engine.distributed), on CPU processes (tests/helpers/ranks.py).

The references: the plain one-process engine on the same drawn batches (exact at world 1, 1e-12 in float64 at
world 2), and the Gaussian of std σC for the noise (a KS test that rejects √2·σC and σC/√2)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from privimage.engine import DPEngine, PoissonSampler
from privimage.engine import distributed as D
from privimage.engine.sampling import LogicalBatch, split_physical

from ranks import run_ranks

# the references on one thread, as the ranks run: same summation order, so world 1 is bit for bit
pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, PHYS = 20, 3  # data set size; physical batch (odd, so the ranks' micro-batches split unevenly)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(N, 3, generator=g,
                                                                                 dtype=torch.float64)


def _batches(sampler):
    """The sampler's steps, then a one-example batch (one rank's slice is empty)."""
    return list(sampler.logical_batches(N)) + [LogicalBatch(step=3, size=1,
                                                            physical=split_physical(torch.tensor([5]), PHYS))]


def _train(engine, batches, rank=0, world_size=1):
    """SGD over ``batches``; per step the (grads, num_samples, loss_sum), and the final parameters."""
    x, y = _data()
    opt = torch.optim.SGD(engine.params, lr=0.5)
    steps = []
    for batch in batches:
        mine = D.shard(batch, PHYS, rank=rank, world_size=world_size) if engine._reducer else batch
        for mb in mine.physical:
            i = mb.indices
            engine.accumulate(lambda m: (m(x[i]) - y[i]).square().sum(1), is_padding=mb.is_padding)
        stats = engine.finalize()
        steps.append(([p.grad.clone() for p in engine.params], stats.num_samples, stats.loss_sum))
        opt.step()
        opt.zero_grad()
    return steps, [p.detach().clone() for p in engine.params]


def _settings(**kw):
    return dict(max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=8.0, **kw)


def _same_batch_worker(rank, world_size, bucket_bytes=D.DEFAULT_BUCKET_BYTES):
    # rank 1 starts with another seed: share_sampler must hand it rank 0's
    sampler = D.share_sampler(PoissonSampler(sample_rate=0.4, steps=3, physical_batch_size=PHYS,
                                             seed=123 if rank == 0 else 999), dist.group.WORLD)
    engine = DPEngine(_model(), **_settings(), process_group=dist.group.WORLD, check_every=1)
    engine._reducer.bucket_bytes = bucket_bytes
    return _train(engine, _batches(sampler), rank, world_size)


# 600 bytes: the model's 6 float64 tensors (576, 32, 32, 32, 1536, 24 bytes) in 4 buckets
@pytest.mark.parametrize("world_size, bucket_bytes", [(1, D.DEFAULT_BUCKET_BYTES), (2, D.DEFAULT_BUCKET_BYTES),
                                                      (2, 600 if D.DEFAULT_BUCKET_BYTES is None else None)])
def test_ranks_compute_what_one_process_computes_at_sigma_0(world_size, bucket_bytes):
    results = run_ranks(_same_batch_worker, world_size, bucket_bytes)
    sampler = PoissonSampler(sample_rate=0.4, steps=3, physical_batch_size=PHYS, seed=123)
    ref_steps, ref_params = _train(DPEngine(_model(), **_settings()), _batches(sampler))
    assert all(s[1] > 0 for s in ref_steps), "every step should draw examples"
    for steps, params in results:
        for (grads, count, loss), (ref_grads, ref_count, ref_loss) in zip(steps, ref_steps, strict=True):
            assert count == ref_count and loss == pytest.approx(ref_loss, rel=1e-12)
            for g, r in zip(grads, ref_grads, strict=True):
                if world_size == 1:  # the reduce is the identity: bit for bit
                    assert torch.equal(g, r)
                else:
                    torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
        for p, r in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-12)
    # the replicas are bit-identical
    for p0, p1 in zip(results[0][1], results[-1][1]):
        assert torch.equal(p0, p1)


SIGMA, C, L, STEPS = 1.3, 0.7, 4.0, 30


def _noise_worker(rank, world_size):
    torch.manual_seed(0)
    model = nn.Linear(50, 20).double()  # 1,020 parameters
    x = torch.randn(6, 50, dtype=torch.float64)
    engine = DPEngine(model, max_grad_norm=C, noise_multiplier=SIGMA, expected_batch_size=L,
                      generator=torch.Generator().manual_seed(100 + rank), process_group=dist.group.WORLD,
                      check_every=1)
    draws = []
    for step in range(STEPS):
        batch = LogicalBatch(step=step, size=6, physical=split_physical(torch.arange(6), 2))
        for mb in D.shard(batch, 2, rank=rank, world_size=world_size).physical:
            i = mb.indices
            engine.accumulate(lambda m: 0.0 * m(x[i]).sum(1), is_padding=mb.is_padding)  # zero gradients
        engine.finalize()
        draws.append(torch.cat([p.grad.reshape(-1) for p in engine.params]) * L / C)  # N(0, σ²) if right
    return torch.cat(draws)


def test_noise_std_is_sigma_c_with_two_ranks():
    from scipy import stats as scipy_stats

    a, b = run_ranks(_noise_worker, 2)
    assert torch.equal(a, b)  # every rank applies the same noisy gradient
    sample = a.numpy()
    assert len(sample) == STEPS * 1020
    assert scipy_stats.kstest(sample, "norm", args=(0, SIGMA)).pvalue > 0.01
    # noise from every rank (√2·σC) or a 1/W share each (σC/√2) is rejected
    assert scipy_stats.kstest(sample, "norm", args=(0, SIGMA * math.sqrt(2))).pvalue < 1e-6
    assert scipy_stats.kstest(sample, "norm", args=(0, SIGMA / math.sqrt(2))).pvalue < 1e-6


def _refusal_worker(rank, world_size):
    group = dist.group.WORLD
    found = {}
    try:  # a different σ on rank 1
        DPEngine(_model(), **{**_settings(), "noise_multiplier": 1.0 + 0.5 * rank}, process_group=group)
    except ValueError as err:
        found["config"] = str(err)
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += rank * 1e-9
    try:  # different initial weights
        DPEngine(model, **_settings(), process_group=group)
    except RuntimeError as err:
        found["weights"] = str(err)
    D.broadcast_parameters(model, group)  # the fix the error names
    engine = DPEngine(model, **_settings(), process_group=group, check_every=2)
    engine.finalize()
    engine.finalize()
    with torch.no_grad():  # a replica that drifts is caught at the next check
        model[-1].bias[0] += rank * 1e-12
    try:
        engine.finalize()
    except RuntimeError as err:
        found["drift"] = str(err)
    return found


def test_ranks_that_disagree_are_refused():
    for found in run_ranks(_refusal_worker, 2):
        assert "noise_multiplier=1.5, rank 0 has 1.0" in found["config"]
        assert "initial parameters" in found["weights"] and "ranks [1]" in found["weights"]
        assert "broadcast_parameters" in found["weights"]
        assert "ranks [1] differ" in found["drift"]


# ---- in one process --------------------------------------------------------------------------------------

@pytest.mark.parametrize("drawn, world_size", [(0, 2), (1, 2), (7, 2), (7, 3), (10, 4), (3, 5)])
def test_shard_splits_the_drawn_batch_into_near_equal_slices(drawn, world_size):
    chosen = torch.randperm(100)[:drawn].sort().values
    batch = LogicalBatch(step=4, size=drawn, physical=split_physical(chosen, PHYS))
    shards = [D.shard(batch, PHYS, rank=r, world_size=world_size) for r in range(world_size)]
    assert torch.equal(torch.cat([s.indices() for s in shards]), chosen)  # every example once, in order
    sizes = [len(s.indices()) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for s, n in zip(shards, sizes):
        assert (s.step, s.size) == (4, drawn)
        assert len(s.physical) == -(-n // PHYS)  # no all-padding micro-batch for an empty slice
        assert all(len(mb.indices) == PHYS for mb in s.physical)
    with pytest.raises(ValueError, match="rank=2 < world_size=2"):
        D.shard(batch, PHYS, rank=2, world_size=2)


def test_fingerprint_sees_any_single_change():
    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7), torch.randn(4).bfloat16()]
    base = D.fingerprint(tensors)
    assert base == D.fingerprint([t.clone() for t in tensors])
    for k, t in enumerate(tensors):
        for j in range(t.numel()):
            changed = [x.clone() for x in tensors]
            flat = changed[k].view(-1)
            flat[j] = -flat[j] if flat[j] != 0 else 1
            assert D.fingerprint(changed) != base
    assert D.fingerprint(tensors[::-1]) != base  # order counts


def test_nccl_with_cpu_parameters_is_refused(monkeypatch):
    monkeypatch.setattr(D.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="NCCL backend, which moves CUDA tensors only.*gloo"):
        D.check_backend_device([nn.Parameter(torch.zeros(2))], group=None)

