"""RunDir: one home for the run directory's paths; every reader names the file and the fix; checkpoints load
weights only; one writer at a time (the lock: refused, stale, other host, released on error)."""

import json
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from privimage.config import CONFIGS
from privimage.engine import Mechanism, PrivacyBudget
from privimage.errors import MissingRunFile, RunDirError, RunDirLocked, StorageError
from privimage.rundir import RunDir, read_checkpoint


@pytest.fixture
def run(tmp_path):
    budget = PrivacyBudget(8.0, 1e-4, plan={"query": Mechanism(5.0), "finetune": Mechanism(1.0, 0.25, 2)})
    with RunDir.create(tmp_path / "runs", "test", command="test", config=CONFIGS["test"], budget=budget,
                       plan={"num_sensitive": 64}, log=lambda *_: None) as made:
        pass
    return made


def test_create_numbers_locks_and_writes_the_first_files(run, tmp_path):
    assert run.path == tmp_path / "runs" / "00000-test"
    assert run.load_config() == CONFIGS["test"]
    assert run.load_budget().plan["finetune"].count == 2 and run.load_plan() == {"num_sensitive": 64}
    assert not run.lock_path.exists()  # released when the block ended
    assert RunDir.make(tmp_path / "runs", "test").path.name == "00001-test"
    # every path is under the run directory, and the names other modules use come from RunDir
    paths = [run.config_path, run.budget_path, run.subset_path, run.checkpoint_path("finetune"), run.log_path("pretrain"),
             run.training_grid_path("finetune", 4), run.release_model_path, run.public_report_path, run.lock_path]
    assert all(p.is_relative_to(run.path) for p in paths)
    assert run.training_grid_path("finetune", 4).name == "finetune-000004.png"
    from privimage.evaluate.report import PRIVATE_REPORT, PUBLIC_REPORT

    assert run.path / PUBLIC_REPORT == run.public_report_path and run.path / PRIVATE_REPORT == run.private_report_path
    with pytest.raises(ValueError, match="training stage"):
        run.checkpoint_path("query")


def test_create_removes_the_new_folder_when_its_first_writes_fail(tmp_path, monkeypatch):
    import privimage.rundir as rundir

    def full_disk(*args, **kwargs):
        raise StorageError(tmp_path / "x", OSError(28, "No space left on device"))

    monkeypatch.setattr(rundir, "save_json", full_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        with RunDir.create(tmp_path / "runs", "test", command="test", config=CONFIGS["test"], budget=None, plan={},
                           log=lambda *_: None):
            pass
    assert list((tmp_path / "runs").iterdir()) == []


def test_open_names_what_is_not_a_run_directory(tmp_path):
    with pytest.raises(MissingRunFile, match="does not exist"):
        RunDir.open(tmp_path / "nope")
    with pytest.raises(RunDirError, match="is not a run directory: it has no config.json"):
        RunDir.open(tmp_path)


CORRUPT = {  # what to write, the loader, the fix the message must give
    "budget.json": (b'{"epsilon": 8', "load_budget", "ledger of privacy spent"),
    "config.json": (b"\xff\xfe not json", "load_config", "release/config.json"),
    "query/subset.npz": (b"PK\x03\x04 truncated", "load_subset", "rebuilt from the query's selection"),
    "query/selected_labels.json": (b"[1, 2]", "load_selection", "query that made it is spent"),
    "samples/samples.npz": (b"", "load_samples", "privimage sample"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_every_reader_names_the_corrupt_file_and_what_to_do(run, name):
    content, loader, fix = CORRUPT[name]
    path = run.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(RunDirError) as err:
        getattr(run, loader)()
    message = str(err.value)
    assert str(path) in message and fix in message and "\n" not in message


def test_a_truncated_subset_and_a_subset_of_the_wrong_shape_are_named(run):
    run.save_subset(np.zeros((4, 3, 8, 8), np.uint8), np.zeros(4, np.int64))
    images, labels = run.load_subset()
    assert images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
    blob = run.subset_path.read_bytes()
    run.subset_path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RunDirError, match=r"subset.npz is truncated or corrupt \(BadZipFile"):
        run.load_subset()
    np.savez(run.subset_path, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4))
    with pytest.raises(RunDirError, match="subset.npz is truncated or corrupt"):
        run.load_subset()


def test_a_missing_checkpoint_says_which_command_makes_it(run):
    with pytest.raises(MissingRunFile, match=r"finetune.pt does not exist: the finetune stage has not checkpointed"):
        run.load_checkpoint("finetune")


def test_a_truncated_checkpoint_is_named_with_the_fix(run):
    run.save_checkpoint("pretrain", {"kind": "pretrain", "step": 1, "model": {"w": torch.ones(3)}})
    assert run.load_checkpoint("pretrain")["step"] == 1
    path = run.checkpoint_path("pretrain")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunDirError, match=r"pretrain.pt is truncated or corrupt .*delete it and run `privimage "
                                          r"pretrain"):
        run.load_checkpoint("pretrain")
    run.save_checkpoint("finetune", {"kind": "pretrain", "step": 1})
    with pytest.raises(RunDirError, match="is a 'pretrain' checkpoint, not 'finetune'"):
        run.load_checkpoint("finetune")


class _Payload:
    """Unpickling this would create a file: the marker that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_before_any_of_it_runs(run, tmp_path):
    marker = tmp_path / "code-ran"
    run.checkpoints_dir.mkdir()
    torch.save({"kind": "finetune", "step": 1, "payload": _Payload(str(marker))}, run.checkpoint_path("finetune"))
    assert not marker.exists()
    with pytest.raises(RunDirError, match=r"finetune.pt holds more than tensors and plain containers .*could run code"):
        run.load_checkpoint("finetune")
    with pytest.raises(RunDirError, match="could run code"):
        read_checkpoint(run.checkpoint_path("finetune"))
    assert not marker.exists()
    # the same file through plain pickle WOULD run it: the test's payload is real
    with zipfile.ZipFile(run.checkpoint_path("finetune")) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    import pickle

    pickle.loads(data)
    assert marker.exists()


# ---- the lock ------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(run):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from privimage.rundir import RunDir\n"
                               "with RunDir(sys.argv[1]).lock('finetune', log=print):\n"
                               "    print('locked', flush=True); time.sleep(60)", str(run.path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"in use by process {holder.pid} on host .*privimage finetune.*wait for "
                                               r"it to finish"):
            with run.lock("finetune --resume"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed outright: its lock is stale (no such process) and is taken over, with a note
    notes = []
    with run.lock("finetune --resume", log=notes.append):
        assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    assert "stale lock" in notes[0] and str(holder.pid) in notes[0]
    assert not run.lock_path.exists()


def test_the_lock_is_released_on_error_and_one_process_cannot_take_it_twice(run):
    with pytest.raises(ZeroDivisionError):
        with run.lock("pretrain"):
            with pytest.raises(RunDirLocked, match="already locked by this process"):
                with run.lock("finetune"):
                    pass
            1 / 0
    assert not run.lock_path.exists()


def test_a_lock_from_another_host_is_not_guessed_stale(run):
    run.lock_path.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-other", "command": "finetune",
                                         "started": "then"}))
    with pytest.raises(RunDirLocked, match=r"if it is no longer running on .*-other, delete .*\.lock"):
        with run.lock("finetune"):
            pass
    run.lock_path.write_text("")
    with pytest.raises(RunDirLocked, match="names no holder"):
        with run.lock("finetune"):
            pass


def test_a_lock_of_an_earlier_attempt_of_this_torchrun_job_is_stale_on_any_host(run, monkeypatch):
    """torchrun restarts a group only once every worker of the attempt before has stopped, so the lock that
    attempt's rank 0 left (on whichever node it ran) is taken over; another job's is not."""
    run.lock_path.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-other", "command": "run",
                                         "started": "then", "torchrun_id": "job-7"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    with pytest.raises(RunDirLocked, match="-other"):
        with run.lock("run"):
            pass
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    notes = []
    with run.lock("run", log=notes.append):
        assert json.loads(run.lock_path.read_text())["torchrun_id"] == "job-7"
    assert "stale lock" in notes[0] and not run.lock_path.exists()


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(run):
    from privimage.lockfile import _start_time

    me = _start_time(os.getpid())
    if me is None:
        pytest.skip("no /proc on this system")
    run.lock_path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "run",
                                         "pid_start": "1"}))  # a live pid, but not the process that took the lock
    with run.lock("run", log=lambda *_: None):
        pass
