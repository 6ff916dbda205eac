"""Run a function on W processes of a gloo process group (CPU), for the distributed tests.

``run_ranks(fn, world_size, *args)`` starts W processes, each with one torch thread, joins a gloo group through
a file store in a temporary folder, calls ``fn(rank, world_size, *args)`` and returns the W return values
(in rank order). An exception in any rank fails the call with that rank's traceback; a run longer than
``timeout`` seconds kills every process and fails. ``fn`` must be importable (a module-level function).
``torchrun(*args, cache=...)`` runs ``torchrun --standalone --nproc_per_node=2 -m privimage ARGS`` instead (the
real launcher, in a subprocess).

The processes fork from multiprocessing's fork server, which imports torch and privimage.engine once per test
session: the ranks of each later call start in well under a second instead of importing torch again.

Trap: a rank unpickles ``fn`` by its module's name, which pytest's importlib mode derives from the repository
root (``tests.engine.test_distributed``). A plain ``pytest`` (as CI runs it) does not put that root on sys.path,
and the ranks inherit the parent's sys.path, so :func:`run_ranks` appends the root (after everything else: the
installed privimage is still the one imported).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "privimage.engine", "privimage.engine.distributed", "privimage.train"]


def _entry(rank: int, fn, world_size: int, store: str, out: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as err:  # reported to the parent, which fails the test with it
        result = ("error", f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)


def run_ranks(fn, world_size: int, *args, timeout: float = 60.0, expect_errors: bool = False) -> list:
    """``[fn(r, world_size, *args) for r in ranks]``, each in its own process (module docstring).

    With ``expect_errors``, a rank's exception is returned as its message (a str) instead of failing."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:  # the ranks import fn's test module by its rootdir-based name (module docstring)
        sys.path.append(root)
    mp.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(fn, world_size, store, tmp, args), nprocs=world_size, join=False,
                                 start_method="forkserver")
        try:
            import time

            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks of {fn.__name__} ran past {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as fh:
                status, value = pickle.load(fh)
            if status == "error" and not expect_errors:
                raise AssertionError(value)
            results.append(value)
        return results


def torchrun(*args, cache, timeout=240, launcher=("--standalone", "--nproc_per_node=2"), env=None):
    """``torchrun LAUNCHER -m privimage ARGS`` (its output); on a timeout the agent and its workers are killed."""
    return finish_torchrun(start_torchrun(*args, cache=cache, launcher=launcher, env=env), timeout, args)


def start_torchrun(*args, cache, launcher, env=None):
    """The torchrun agent, started (output to a file: a worker the agent leaves behind cannot block the read)."""
    marker = uuid.uuid4().hex  # names this launch's processes (torchrun puts its workers in sessions of their own)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRIVIMAGE_CACHE_DIR": str(cache), "PRIVIMAGE_DIST_TIMEOUT_S": "120",
           "PRIVIMAGE_DIST_CHECK_EVERY": "1", "PRIVIMAGE_TEST_LAUNCH": marker, **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "privimage", *map(str, args)]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.log, proc.marker = log, marker
    return proc


def finish_torchrun(proc, timeout, args):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(proc)
        raise AssertionError(f"torchrun {' '.join(map(str, args))} ran past {timeout} s:\n{_output(proc)[-4000:]}")
    finally:
        kill_launch(proc)  # workers an agent left behind
    out = _output(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def _output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def kill_launch(proc) -> None:
    """SIGKILL the agent's process group and every process carrying this launch's marker (its workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    needle = f"PRIVIMAGE_TEST_LAUNCH={proc.marker}".encode()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if needle in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
