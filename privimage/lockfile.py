"""One writer per run directory: an exclusive lock file naming its holder (pid, host, command, start time).

Every command that writes into a run directory holds ``RUN_DIR/.lock`` while it runs
(:meth:`privimage.rundir.RunDir.lock`). The file is created with ``O_CREAT | O_EXCL``, so of two processes
exactly one gets it; the other is refused with :class:`~privimage.errors.RunDirLocked` naming the holder.
The lock is removed when the command ends, however it ends (an exception, Ctrl-C). A process killed outright
(``kill -9``, a power cut) leaves the file behind: the next command finds it *stale* when it was taken on
this host by a process that is gone (no such pid, or a pid reused by a process that started later, read from
``/proc``) and takes it over, saying so. A lock taken on another host (a shared file system) cannot be checked
from here: the message says how to remove it once that host's command is known to be gone.
A lock taken by another process of the same ``torchrun`` job (the same ``TORCHELASTIC_RUN_ID``, on any host)
is stale too: under torchrun only rank 0 writes, so that process was an earlier attempt of the job, which
torchrun stops before it restarts the group (``--max-restarts``).

Why a lock file rather than ``flock``: it names its holder in the refusal, and it works the same on every
file system a run directory may live on; the stale check covers what ``flock`` would release by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from privimage.errors import RunDirLocked, StorageError

__all__ = ["hold_lock", "read_lock"]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc/PID/stat`` field 22), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_lock(path: Path) -> dict | None:
    """The holder recorded in lock file ``path`` (None when it is unreadable or not a holder record)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _stale(info: dict) -> bool:
    """True when the holder was an earlier attempt of this torchrun job, or was on this host and is gone (or its
    pid now belongs to a younger process)."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job and info.get("torchrun_id") == job:  # an earlier attempt of this torchrun job (module docstring)
        return True
    if info.get("host") != socket.gethostname():
        return False
    if not _alive(info["pid"]):
        return True
    started = info.get("pid_start")
    return started is not None and _start_time(info["pid"]) not in (None, started)


def _describe(info: dict) -> str:
    return (f"process {info['pid']} on host {info.get('host', '?')} (`privimage {info.get('command', '?')}`, since "
            f"{info.get('started', '?')})")


@contextlib.contextmanager
def hold_lock(path: Path, *, command: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock file ``path`` for the ``with`` block (module docstring); refuse if another holds it."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid_start": _start_time(os.getpid())}
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        info["torchrun_id"] = os.environ["TORCHELASTIC_RUN_ID"]
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:
                raise RunDirLocked(f"{path} exists but names no holder: another privimage command may be starting "
                                   f"in {path.parent}. If none is running, delete {path} and try again.") from None
            if holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
                raise RunDirLocked(f"{path.parent} is already locked by this process (`privimage "
                                   f"{holder.get('command', '?')}`); one command at a time.") from None
            if not _stale(holder):
                where = ("wait for it to finish, or stop it" if holder.get("host") == socket.gethostname() else
                         f"if it is no longer running on {holder.get('host')}, delete {path}")
                raise RunDirLocked(f"{path.parent} is in use by {_describe(holder)}; {where}. Two commands writing "
                                   f"one run directory would race on its checkpoints and ledger.") from None
            log(f"{path.parent}: removing the stale lock of {_describe(holder)}, which is no longer running")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        except OSError as err:
            raise StorageError(path, err, note="the run directory must be writable to lock it") from err
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StorageError(path, err) from err
        break
    else:
        raise RunDirLocked(f"{path}: could not take the lock (another process keeps taking it).")
    try:
        yield
    finally:
        if (read_lock(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
