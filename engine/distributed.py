"""DP-SGD over a torch.distributed process group: many ranks, one logical batch per step, the same privacy.

The mechanism does not depend on the world size W: each step releases Σ_i c_i g_i + N(0, σ²C²I) over ONE
Poisson sample of the data set, whatever the number of processes computing it. Step t, on every rank r:

1. **the same Poisson draw.** Every rank's :class:`~privimage.engine.PoissonSampler` holds rank 0's secret
   seed, handed over in memory (:func:`share_sampler`, a broadcast; never through a file, the seed is a
   secret), so all ranks draw the identical logical batch;
2. **its slice.** Rank r clips the r-th of W contiguous, near-equal slices of the drawn indices, cut into
   physical micro-batches (:func:`shard`; an uneven split is fine, an empty slice too);
3. **one all-reduce.** The clipped sums of every parameter (and the step's private counts) travel as one flat
   buffer per dtype (:class:`GradientReducer`; one buffer in practice) in ONE all-reduce (SUM). Rank 0 adds
   the Gaussian noise N(0, σ²C²I), drawn from ITS generator, to its local sum BEFORE the all-reduce, so every
   rank receives Σ_r S_r + noise: the noise is drawn once, with std σC for any W (not √W·σC, as if each rank
   noised its share; not σC/√W, as if each noised a 1/W share). The other ranks' generators are never used;
4. **the same update.** Every rank divides by the public L and its optimizer steps: the replicas stay
   bit-identical (ring and tree all-reduces hand every rank the same bytes). :func:`check_replicas` asserts it
   with a 64-bit fingerprint of the parameters every ``check_every`` steps, and :class:`DPEngine` refuses, at
   construction, ranks whose settings or parameters differ (:func:`refuse_mismatch`).

With W = 1 the distributed path computes exactly what the plain engine computes (the reduce is the identity).

Example (run with ``torchrun --nproc_per_node=2 script.py``; ``gloo`` on CPUs, ``nccl`` with one GPU per rank):

    import torch, torch.distributed as dist, torch.nn as nn
    from privimage.engine import DPEngine, PoissonSampler, secure_generator
    from privimage.engine.distributed import broadcast_parameters, shard, share_sampler

    dist.init_process_group("gloo")
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    x, y = torch.randn(1000, 10), torch.randn(1000, 1)             # every rank holds the data set
    model = nn.Linear(10, 1)
    broadcast_parameters(model, group)                              # rank 0's initial weights everywhere
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = share_sampler(PoissonSampler(sample_rate=0.05, steps=100, physical_batch_size=16, secure=True),
                            group)                                  # rank 0's secret seed everywhere
    engine = DPEngine(model, max_grad_norm=1.0, noise_multiplier=1.1, expected_batch_size=0.05 * len(x),
                      generator=secure_generator() if rank == 0 else None, process_group=group)
    for batch in sampler.logical_batches(len(x)):
        for mb in shard(batch, 16, rank=rank, world_size=world).physical:   # this rank's micro-batches
            i = mb.indices
            engine.accumulate(lambda m: (m(x[i]) - y[i]).square().sum(1), is_padding=mb.is_padding)
        engine.finalize()                                           # one all-reduce; noise once, on rank 0
        opt.step(); opt.zero_grad()
    dist.destroy_process_group()

Traps: the data set must be the same on every rank (indices mean the same records); only rank 0's noise
generator matters, so its state is the one a checkpoint keeps (a checkpoint is then independent of W); every
rank must call :meth:`DPEngine.finalize` once per step, even with an empty slice, or the all-reduce hangs.

Test hook (fault injection for the elastic-restart tests): ``PRIVIMAGE_TEST_EXIT_AT=RANK:N`` makes global rank
RANK exit at once (``os._exit(1)``, as a killed process) just before the N-th all-reduce (N from 1) of a
:class:`GradientReducer`, on the first attempt of a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` unset or
0). Each reducer counts its own: a :class:`~privimage.engine.DPEngine`'s counts its logical steps (clipped
sums), and so does any other loop's (the GAN pre-training sums its discriminator gradients through one), so in
a job that runs both, N fires in whichever reaches it first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from privimage.engine.sampling import LogicalBatch, PoissonSampler, split_physical

__all__ = ["DEFAULT_BUCKET_BYTES", "GradientReducer", "broadcast_from_rank0", "broadcast_parameters", "check_replicas",
           "collective_device", "fingerprint", "refuse_mismatch", "rank_rows", "shard", "share_sampler"]


def _src(group) -> int:
    """The global rank of ``group``'s rank 0 (collectives name their source by global rank)."""
    return dist.get_global_rank(group, 0) if group is not None and group != dist.group.WORLD else 0


def collective_device(group) -> torch.device:
    """Where this group's collectives want their tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(obj, group):
    """``obj`` as rank 0 holds it, on every rank (pickled, in memory: fit for secrets such as seeds)."""
    box = [obj]
    dist.broadcast_object_list(box, src=_src(group), group=group, device=collective_device(group))
    return box[0]


def share_sampler(sampler: PoissonSampler, group) -> PoissonSampler:
    """Rank 0's sampler (its secret seed included) on every rank: every rank then draws the same batches."""
    return PoissonSampler.from_state_dict(broadcast_from_rank0(sampler.state_dict(), group))


def rank_rows(n: int, *, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s rows of ``n``: the ``rank``-th of ``world_size`` contiguous slices, sizes differing by at
    most one (``n = 5``, 2 ranks: rows 0-1 and 2-4). The one rule every split across ranks follows."""
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"Expected 0 <= rank={rank} < world_size={world_size}.")
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def shard(batch: LogicalBatch, physical_batch_size: int, *, rank: int, world_size: int) -> LogicalBatch:
    """Rank ``rank``'s share of ``batch``: the ``rank``-th of ``world_size`` contiguous slices of the drawn
    indices (sizes differ by at most one), cut into padded micro-batches of ``physical_batch_size`` rows.

    ``size`` stays the whole batch's (private, for logs). An empty slice has no micro-batch at all.
    """
    chosen = batch.indices()
    mine = chosen[rank_rows(len(chosen), rank=rank, world_size=world_size)]
    return LogicalBatch(step=batch.step, size=batch.size,
                        physical=split_physical(mine, physical_batch_size, min_batches=0))


def refuse_mismatch(settings: dict, group, what: str) -> None:
    """Raise ValueError unless every rank passes equal ``settings`` (compared with rank 0's, key by key)."""
    world = dist.get_world_size(group)
    gathered = [None] * world
    dist.all_gather_object(gathered, settings, group=group)
    reference = gathered[0]
    problems = []
    for r, other in enumerate(gathered[1:], start=1):
        for key in sorted(set(reference) | set(other), key=str):
            if reference.get(key, "<missing>") != other.get(key, "<missing>"):
                a, b = _short(reference.get(key, "<missing>")), _short(other.get(key, "<missing>"))
                problems.append(f"rank {r} has {key}={b}, rank 0 has {a}")
    if problems:
        raise ValueError(f"The ranks of the process group disagree on {what}: " + "; ".join(problems[:6])
                         + ("; ..." if len(problems) > 6 else "")
                         + ". Start every rank with the same settings (same config, same command line).")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 64-bit fingerprint (int64 scalar, CPU) of the tensors' exact bits, order and positions included.

    Σ_j bits_j · w_j mod 2^64 over every element's bit pattern, with odd weights w_j that depend on the
    element's position: integer arithmetic, so the result does not depend on the summation order, and a
    change to any single element always changes it (an odd weight is invertible mod 2^64).
    """
    total = torch.zeros((), dtype=torch.int64)
    offset = 0
    for t in tensors:
        t = t.detach().contiguous().reshape(-1)
        bits = t.view(_INT_OF_SIZE[t.element_size()]).to(torch.int64)
        pos = torch.arange(offset, offset + bits.numel(), device=bits.device, dtype=torch.int64)
        weights = 2 * (pos % (1 << 20)) + 1
        total = total + (bits * weights).sum().cpu()
        offset += bits.numel()
    return total


def check_replicas(tensors: Sequence[torch.Tensor], group, what: str = "parameters") -> None:
    """Raise RuntimeError unless ``tensors`` are bit-identical on every rank (by :func:`fingerprint`)."""
    mine = fingerprint(tensors).to(collective_device(group)).reshape(1)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    values = [int(v) for v in gathered]
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(f"The replicas' {what} are not identical: ranks {differ} differ from rank 0 "
                           f"(fingerprints {values}). Every rank must start from the same state "
                           f"(broadcast_parameters) and apply the same updates.")


def broadcast_parameters(module: nn.Module, group) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (what DDP does at construction)."""
    tensors = [t.data for t in list(module.parameters()) + list(module.buffers())]
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.broadcast(flat, src=_src(group), group=group)
        _unflatten_into(flat, bucket)


#: :class:`GradientReducer`'s default bucket size: None, one flat buffer per dtype (see the class docstring).
DEFAULT_BUCKET_BYTES: int | None = None


class GradientReducer:
    """One all-reduce (SUM) per logical step of every parameter's clipped sum and a few private counts.

    The tensors are packed into one flat buffer per dtype (a single buffer when they share one), or, with
    ``bucket_bytes``, into consecutive buckets of about that size, each all-reduced asynchronously as soon as
    it is packed and unpacked as it arrives (packing overlaps the transfer). The counts ride in the first
    buffer (exact in float32 below 2^24). ``tensors`` and the result are in the order given; each element is
    summed over the same ranks whatever the bucketing, so the result does not depend on it.

    Why no overlap with the backward pass: a clipped sum Σ_i c_i g_i exists only once every layer's
    per-sample norms are known (c_i needs ‖g_i‖ over ALL parameters), i.e. after the last micro-batch's
    whole backward; the engine then forms the sums in one pass, which is what the buckets can overlap.
    """

    def __init__(self, group, *, bucket_bytes: int | None = DEFAULT_BUCKET_BYTES):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialised: call "
                             "torch.distributed.init_process_group first (torchrun sets what it needs).")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_bytes = bucket_bytes
        self.bytes_last_step = 0  # bytes all-reduced by the latest call (for benchmarks)
        self.calls = 0  # all-reduces made (the test hook counts them)

    @property
    def is_noise_rank(self) -> bool:
        """Rank 0 of the group: the one rank that draws the DP noise."""
        return self.rank == 0

    def all_reduce(self, tensors: Sequence[torch.Tensor], counts: Sequence[torch.Tensor | float]):
        """(Σ_ranks tensors, Σ_ranks counts): new tensors, counts as floats."""
        self.calls += 1
        _exit_if_asked(self.calls)
        buckets = _buckets(list(tensors), self.bucket_bytes)
        flats, works = [], []
        for k, bucket in enumerate(buckets):
            parts = [t.reshape(-1) for t in bucket]
            if k == 0:
                parts.append(torch.stack([torch.as_tensor(c, dtype=bucket[0].dtype, device=bucket[0].device)
                                          .reshape(()) for c in counts]))
            flats.append(torch.cat(parts))
            works.append(dist.all_reduce(flats[-1], op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        self.bytes_last_step = sum(f.numel() * f.element_size() for f in flats)
        reduced = {}
        for flat, work, bucket in zip(flats, works, buckets):
            work.wait()
            outs = [torch.empty_like(t) for t in bucket]
            _unflatten_into(flat, outs)
            reduced.update({id(t): o for t, o in zip(bucket, outs)})
        summed_counts = flats[0][-len(counts):].tolist() if counts else []
        return tuple(reduced[id(t)] for t in tensors), summed_counts


def _exit_if_asked(call: int) -> None:
    """The test hook of the module docstring (``PRIVIMAGE_TEST_EXIT_AT=RANK:N``)."""
    spec = os.environ.get("PRIVIMAGE_TEST_EXIT_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return
    rank, at = (int(v) for v in spec.split(":"))
    if dist.get_rank() == rank and call == at:
        os._exit(1)


def _buckets(tensors: list[torch.Tensor], limit_bytes: int | None = None) -> list[list[torch.Tensor]]:
    """Tensors grouped by (dtype, device), in first-seen order; with ``limit_bytes``, each group cut into runs
    of consecutive tensors of at most that many bytes (a larger tensor is a bucket of its own)."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    if limit_bytes is None:
        return list(groups.values())
    out = []
    for group in groups.values():
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if not out or out[-1][0].dtype != t.dtype or out[-1][0].device != t.device or size + nbytes > limit_bytes:
                out.append([])
                size = 0
            out[-1].append(t)
            size += nbytes
    return out


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def check_backend_device(params: Sequence[torch.Tensor], group) -> None:
    """NCCL moves CUDA tensors only: refuse CPU parameters with a clear error rather than a hang or a crash."""
    backend = dist.get_backend(group)
    if backend == "nccl" and any(p.device.type != "cuda" for p in params):
        raise ValueError("The process group uses the NCCL backend, which moves CUDA tensors only, but the model's "
                         "parameters are on the CPU. Move the model to this rank's GPU, or use the gloo backend "
                         "on CPUs.")


def engine_settings(engine, named_params) -> dict:
    """What every rank's engine must agree on (public mechanism settings and the parameters' shapes)."""
    return {"max_grad_norm": engine.max_grad_norm, "noise_multiplier": engine.noise_multiplier,
            "expected_batch_size": engine.expected_batch_size, "method": engine.method, "compile": engine.compile,
            "check_every": engine.check_every,
            "parameters": [(name, tuple(p.shape), str(p.dtype)) for name, p in named_params]}
