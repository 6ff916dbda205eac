"""privimage under ``torchrun``: one process per rank, rank 0 writes, the DP fine-tune shared by every rank.

``torchrun --nproc_per_node=N -m privimage run ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` set; :func:`init_from_env` (called by
the CLI) joins them into one process group. Without those variables nothing happens: one process, as always.

Backend: NCCL when every rank of this node has its own CUDA device (``torch.cuda.device_count() >=
LOCAL_WORLD_SIZE``), gloo otherwise; ``PRIVIMAGE_DIST_BACKEND=gloo|nccl`` forces one (NCCL without a CUDA
device per rank is refused with a clear error). With NCCL, rank r of a node uses ``cuda:LOCAL_RANK``.

What runs where (the contract of this version):

* the DP fine-tune runs on every rank (:class:`privimage.engine.DPEngine` with ``process_group``: one Poisson
  draw, each rank its slice, one all-reduce, the noise once on rank 0; :mod:`privimage.engine.distributed`);
* pre-training runs on every rank under DistributedDataParallel, each rank streaming its rows of every batch
  (:mod:`privimage.train.pretrain`);
* the GAN (``kind = "gan"``) trains on every rank too: each discriminator step split across the ranks (the
  DP one through the engine's process group, as above), each generator step on rank 0 and broadcast
  (:mod:`privimage.train.gan_ranks`);
* the query: rank 0 trains the classifier (public data) and hands it to every rank, each rank classifies its
  batches of the sensitive images (:func:`my_batches`), the vote counts are all-reduced (SUM) and rank 0 alone
  draws the noise and releases the selection, which it hands to the others
  (:func:`privimage.query.stage.shared_votes`);
* sampling: each rank draws its batches of images (:func:`my_batches`: image i's seed fixes it, and each
  batch is the one-process batch), rank 0 gathers them (:func:`gather_batches`) and writes: samples.npz is
  the same for any world size;
* every other stage (evaluation, export) runs on rank 0 alone while the others
  wait at a barrier (``PRIVIMAGE_DIST_TIMEOUT_S``, default 24 hours, bounds that wait);
* only rank 0 writes (:func:`is_writer`): the run directory, its lock, checkpoints, the ledger, logs. A
  checkpoint holds what one process would hold (rank 0's noise generator; the sampler and the diffusion
  randomness are the same on every rank), so a run resumes under any world size.

The fine-tune asserts every ``PRIVIMAGE_DIST_CHECK_EVERY`` steps (default 100; the tests use 1) that the
replicas' weights are bit-identical (:func:`privimage.engine.distributed.check_replicas`).

The secret seeds (the Poisson sampler's, the diffusion randomness key) travel from rank 0 to the others in
memory, through the process group, never through a file.

Elastic restarts (``torchrun --max-restarts N``): when a rank dies, torchrun stops the others and starts the
whole group again with the same command line. The job is named by torchrun's run id (``TORCHELASTIC_RUN_ID``:
``--rdzv-id``, or a fresh one per ``--standalone`` launch), which :func:`launch_info` records in the run
directory's ``config.json``; ``privimage run`` started again by the same job finds the run directory its
earlier attempt made (:func:`torchrun_job`) and resumes it from its last checkpoint, with its ledger, instead
of starting a new one (:mod:`privimage.commands.run`); ``privimage pretrain|finetune RUN_DIR`` restarted by
the job resume from the stage's checkpoint when its ``"launch"`` names this job
(:func:`privimage.commands.resume_after_restart`). A lock left by an earlier attempt of the same job is
taken over (:mod:`privimage.lockfile`): torchrun starts a new attempt only after every worker of the previous
one has stopped. Several nodes need one shared file system for the run directory (every rank reads its files).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from privimage.errors import DeviceError

__all__ = ["Launch", "alone", "announce_restart", "barrier", "current", "gather_batches", "init_from_env", "is_writer",
           "launch_info", "my_batches", "restarted", "share", "shutdown", "torchrun_job", "use_group",
           "written_by_this_job"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in the job: rank, world size, backend, the group and its device (NCCL)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    group: object

    @property
    def device(self) -> torch.device | None:
        """``cuda:LOCAL_RANK`` under NCCL, else None (the config's device)."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else None


_LAUNCH: Launch | None = None


def choose_backend(requested: str | None = None) -> str:
    """"nccl" iff every rank of this node can have its own CUDA device, else "gloo" (module docstring)."""
    requested = (requested or os.environ.get("PRIVIMAGE_DIST_BACKEND") or "auto").lower()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return "nccl" if gpus >= local_world >= 1 and gpus > 0 else "gloo"
    if requested == "gloo":
        return "gloo"
    if requested == "nccl":
        if gpus < local_world:
            raise DeviceError(f"PRIVIMAGE_DIST_BACKEND=nccl needs one CUDA device per rank, but this node runs "
                              f"{local_world} rank(s) and has {gpus} CUDA device(s). Use "
                              f"PRIVIMAGE_DIST_BACKEND=gloo (CPUs), or fewer ranks per node.")
        return "nccl"
    raise DeviceError(f"PRIVIMAGE_DIST_BACKEND={requested!r} is not a backend privimage supports (gloo or nccl).")


def init_from_env(backend: str | None = None) -> Launch | None:
    """Join torchrun's process group if this process was started by torchrun; else None (one process)."""
    global _LAUNCH
    if _LAUNCH is not None:
        return _LAUNCH
    if not all(v in os.environ for v in _TORCHRUN_VARS):
        return None
    import torch.distributed as dist

    chosen = choose_backend(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=float(os.environ.get("PRIVIMAGE_DIST_TIMEOUT_S", 24 * 3600)))
    if not dist.is_initialized():
        dist.init_process_group(chosen, timeout=timeout, **_restart_store(timeout))
    _LAUNCH = Launch(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                     backend=dist.get_backend(), group=dist.group.WORLD)
    return _LAUNCH


def _restart_store(timeout: timedelta) -> dict:
    """The store for a RESTARTED single-node torchrun attempt, else nothing (torchrun's own).

    torchrun shares one TCP store between its rendezvous and the workers (``TORCHELASTIC_USE_AGENT_STORE``)
    and does not separate the attempts' keys in it, so a restarted group's gloo/NCCL setup can read the previous
    attempt's addresses and fail ("connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712). On
    one node every rank's restart count is the attempt's number, so the keys are put under
    ``privimage/attemptN``. Several nodes do not share one count (a node whose workers did not fail restarts
    with its count unchanged): there, export ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` before torchrun (a fresh
    store per attempt); :func:`init_from_env` says so on rank 0 when restarts are allowed.
    """
    job = torchrun_job()
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if shared and nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get(
            "RANK") == "0" and job is not None and job[1] == 0:
        import sys

        print("privimage: torchrun --max-restarts over several nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
              "before torchrun on every node, or a restarted group may fail to connect (pytorch/pytorch#135712).",
              file=sys.stderr, flush=True)
    if job is None or job[1] == 0 or not shared or nodes != 1:
        return {}
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"privimage/attempt{job[1]}", store), "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"])}


def use_group(group=None, *, local_rank: int = 0) -> Launch:
    """Run privimage's stages in an already initialised process group (default: the world), as torchrun's
    launch would: for code that makes its own group (the tests' in-process ranks, an embedding program)."""
    global _LAUNCH
    import torch.distributed as dist

    group = group if group is not None else dist.group.WORLD
    _LAUNCH = Launch(rank=dist.get_rank(group), world_size=dist.get_world_size(group), local_rank=local_rank,
                     backend=dist.get_backend(group), group=group)
    return _LAUNCH


@contextlib.contextmanager
def alone():
    """Inside: this process works as the only one (no launch), for a command rank 0 runs alone."""
    global _LAUNCH
    saved, _LAUNCH = _LAUNCH, None
    try:
        yield
    finally:
        _LAUNCH = saved


def check_every() -> int:
    """Steps between the fine-tune's replica checks (``PRIVIMAGE_DIST_CHECK_EVERY``, default 100; 0: never)."""
    return int(os.environ.get("PRIVIMAGE_DIST_CHECK_EVERY", "100"))


def current() -> Launch | None:
    """The launch :func:`init_from_env` joined, or None in a plain single process."""
    return _LAUNCH


def is_writer() -> bool:
    """True on the one process that writes files: rank 0, or the only process."""
    return _LAUNCH is None or _LAUNCH.rank == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if _LAUNCH is not None:
        import torch.distributed as dist

        dist.barrier(group=_LAUNCH.group)


def share(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if _LAUNCH is None:
        return obj
    from privimage.engine.distributed import broadcast_from_rank0

    return broadcast_from_rank0(obj, _LAUNCH.group)


def my_batches(n: int, batch_size: int) -> list[slice]:
    """This rank's batches of ``n`` items: batches ``rank, rank + W, ...`` of the ``batch_size`` chunks one
    process would make (all of them in one process). Each batch is the one-process batch, computed alone, so
    what it gives is the same bit for bit for any world size (the query's logits, the sampler's images)."""
    rank, world = (_LAUNCH.rank, _LAUNCH.world_size) if _LAUNCH is not None else (0, 1)
    starts = range(rank * batch_size, n, world * batch_size)
    return [slice(start, min(n, start + batch_size)) for start in starts]


def gather_batches(rows: torch.Tensor, parts: list[slice], n: int) -> torch.Tensor | None:
    """On rank 0, the (n, ...) tensor whose ``parts`` (:func:`my_batches`) each rank computed as ``rows`` (in
    that order); None on the other ranks; ``rows`` itself in one process."""
    if _LAUNCH is None:
        return rows
    import torch.distributed as dist

    group = _LAUNCH.group
    dst = 0 if group is dist.group.WORLD else dist.get_global_rank(group, 0)
    gathered = [None] * _LAUNCH.world_size if _LAUNCH.rank == 0 else None
    dist.gather_object(([(p.start, p.stop) for p in parts], rows.cpu()), gathered, dst=dst, group=group)
    if _LAUNCH.rank != 0:
        return None
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    for their_parts, their_rows in gathered:
        offset = 0
        for start, stop in their_parts:
            out[start:stop] = their_rows[offset:offset + stop - start]
            offset += stop - start
    return out


def launch_info() -> dict:
    """``{"world_size": N, "backend": ...}`` for config.json and the reports (backend None in one process),
    with ``"torchrun_id"`` (:func:`torchrun_job`) under torchrun."""
    if _LAUNCH is None:
        return {"world_size": 1, "backend": None}
    job = torchrun_job()
    return {"world_size": _LAUNCH.world_size, "backend": _LAUNCH.backend,
            **({"torchrun_id": job[0]} if job is not None else {})}


def torchrun_job() -> tuple[str, int] | None:
    """(torchrun's run id, this node's restart count) when torchrun's elastic agent started this process, else
    None. The run id is the same for every attempt of the job; the restart count is 0 on the first attempt
    (a node whose own workers did not fail may restart with its count unchanged, so the id, not the count,
    tells a job's attempts apart from other jobs)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    return run_id, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def written_by_this_job(launch) -> bool:
    """True when ``launch`` (the :func:`launch_info` record of a run directory's config.json or of a checkpoint)
    names this process's torchrun job (:func:`torchrun_job`): an earlier attempt of this job wrote it."""
    job = torchrun_job()
    return job is not None and isinstance(launch, dict) and launch.get("torchrun_id") == job[0]


def restarted() -> bool:
    """True when this attempt of the torchrun job is a restart: some rank's ``TORCHELASTIC_RESTART_COUNT`` is
    above 0 (a node whose own workers did not fail restarts with its count unchanged, so every rank's count is
    gathered). Collective under a launch: every rank calls it."""
    job = torchrun_job()
    count = job[1] if job is not None else 0
    if _LAUNCH is None:
        return count > 0
    import torch.distributed as dist

    counts = [None] * _LAUNCH.world_size
    dist.all_gather_object(counts, count, group=_LAUNCH.group)
    return max(counts) > 0


def announce_restart(what: str) -> None:
    """On rank 0, to stderr: ``torchrun job ID (restart N on this node): WHAT`` (a restarted attempt says what it
    continues)."""
    if is_writer():
        import sys

        job_id, attempt = torchrun_job()
        print(f"torchrun job {job_id} (restart {attempt} on this node): {what}", file=sys.stderr, flush=True)


def shutdown() -> None:
    """Leave the process group (at the end of the command)."""
    global _LAUNCH
    if _LAUNCH is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _LAUNCH = None
