"""File-system faults during `privimage run`: each write of a run (query classifier, ledger, subset, checkpoints,
samples, report, release) made to fail in turn with ENOSPC or EACCES. Each fault ends the command with one
line naming the file and the cause (exit code 2), leaves the previous file as it was and no temporary file,
and `privimage run --resume` continues after it. The run that went through every fault ends with the same
ledger, the same weights and the same samples as an uninterrupted run (the non-secure test mode makes both
reproducible). A fault after the query's spend but before its selection is written cannot be resumed without
spending twice: that run directory is refused with the reason."""

import errno
import json
import os
import tempfile

import numpy as np
import pytest
import torch

from privimage.cli import main
from privimage.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The test preset, shrunk: 2 pre-training steps (a checkpoint each), 4 fine-tune steps (checkpoints at 2 and 4),
# a 10-image sampler of 2 steps, and the evaluation on (the small CA preset, proxy FID).
CONFIG = {"base": "test", "evaluate": True,
          "pretrain": {"steps": 2, "checkpoint_every": 1},
          "finetune": {"epochs": 1, "checkpoint_every": 2},
          "sample": {"num_samples": 10, "num_steps": 2}}


class Faults:
    """Make the next write to a file of the run directory fail: EACCES where the temporary file is created,
    ENOSPC where its bytes are flushed to disk (where a full disk shows)."""

    def __init__(self, monkeypatch):
        self.armed: tuple[str, int] | None = None
        self.skip = 0
        self.previous: bytes | None = None  # the target's bytes when its write failed
        self.run_root = None
        real_mkstemp, real_fsync = tempfile.mkstemp, os.fsync

        def mkstemp(*args, dir=None, prefix=None, **kwargs):
            self._maybe(errno.EACCES, os.path.join(dir, prefix[1:].rsplit(".", 1)[0]) if dir and prefix else "")
            return real_mkstemp(*args, dir=dir, prefix=prefix, **kwargs)

        def fsync(fd):
            tmp = os.readlink(f"/proc/self/fd/{fd}")
            name = os.path.basename(tmp)
            if name.startswith(".") and name.endswith(".tmp"):
                self._maybe(errno.ENOSPC, os.path.join(os.path.dirname(tmp), name[1:].rsplit(".", 2)[0]))
            return real_fsync(fd)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fsync", fsync)

    def arm(self, relative: str, code: int, skip: int = 0) -> None:
        """Fail the write to ``relative`` after ``skip`` writes to it succeeded."""
        self.armed, self.skip = (relative, code), skip

    def _maybe(self, code: int, target: str) -> None:
        if self.armed is None or self.run_root is None or self.armed[1] != code:
            return
        relative = os.path.relpath(target, self.run_root)
        if relative.split(os.sep, 1)[-1] == self.armed[0]:  # <run dir>/<relative>
            if self.skip:
                self.skip -= 1
                return
            self.armed = None
            self.previous = open(target, "rb").read() if os.path.isfile(target) else None  # noqa: SIM115
            raise OSError(code, os.strerror(code))


def _state(run_dir):
    """Every file's bytes (temporary files would show as .tmp)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _ledger(run_dir):
    return json.loads((run_dir / "budget.json").read_text())["spent"]


def _finished(run_dir):
    state = torch.load(run_dir / "checkpoints" / "finetune.pt", weights_only=True)
    with np.load(run_dir / "samples" / "samples.npz") as z:
        samples = z["images"]
    return _ledger(run_dir), state["model"], samples


# (file relative to the run directory, errno, writes to it that pass first): in the order a run writes them,
# each fault armed for the `--resume` after the previous one. The query's classifier (before the spend), the
# query's spend itself, the subset (after it: rebuilt from the selection), pre-training's second checkpoint and
# its log, the fine-tune's ledger at step 4 (the step-2 checkpoint passes), then its checkpoint at step 4 (the
# ledger already counts 4: the resume recounts from the step-2 checkpoint), the samples, the public report,
# the release's privacy statement, the timings.
CHAIN = [("query/classifier.pt", errno.ENOSPC, 0), ("budget.json", errno.EACCES, 0),
         ("query/subset.npz", errno.ENOSPC, 0), ("checkpoints/pretrain.pt", errno.EACCES, 1),
         ("logs/pretrain.csv", errno.ENOSPC, 0), ("budget.json", errno.ENOSPC, 1),
         ("checkpoints/finetune.pt", errno.EACCES, 0), ("samples/samples.npz", errno.ENOSPC, 0),
         ("release/report.json", errno.EACCES, 0), ("release/privacy.json", errno.ENOSPC, 0),
         ("logs/timings.json", errno.EACCES, 0)]


def test_every_write_fails_in_turn_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "faults.json"
    config.write_text(json.dumps(CONFIG))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "reference")]) == 0
    (reference,) = (tmp_path / "reference").iterdir()
    capsys.readouterr()

    faults = Faults(monkeypatch)
    faults.run_root = str(tmp_path / "faulty")
    run_dir = tmp_path / "faulty" / reference.name
    faults.arm(*CHAIN[0])
    command = ["run", "--config", str(config), "--out", str(tmp_path / "faulty")]
    for i, (relative, code, _) in enumerate(CHAIN):
        assert main(command) == 2, (relative, capsys.readouterr().err)
        assert faults.armed is None, f"{relative} was never written"
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("privimage run: error: could not write ") and str(run_dir / relative) in err, err
        assert f"{os.strerror(code)} ({errno.errorcode[code]})" in err, err
        after = _state(run_dir)
        assert not [p for p in after if p.endswith(".tmp")], after.keys()
        assert after.get(relative) == faults.previous, relative  # the previous file (or none), exactly as it was
        assert not (run_dir / ".lock").exists()
        RunDir(run_dir).load_budget()  # the ledger is readable after every fault
        if i + 1 < len(CHAIN):
            faults.arm(*CHAIN[i + 1])
        command = ["run", "--resume", str(run_dir)]
    assert main(command) == 0, capsys.readouterr().err

    ledger, model, samples = _finished(run_dir)
    ref_ledger, ref_model, ref_samples = _finished(reference)
    assert ledger == ref_ledger == {"query": 1, "finetune": 4}
    assert all(torch.equal(model[k], v) for k, v in ref_model.items())
    assert np.array_equal(samples, ref_samples)
    from safetensors.torch import load_file

    released, ref_released = (load_file(str(d / "release" / "model.safetensors")) for d in (run_dir, reference))
    assert released.keys() == ref_released.keys() and all(torch.equal(released[k], v) for k, v in ref_released.items())
    for name in ("release/privacy.json", "query/histogram.npy", "query/subset.npz"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_spent_query_whose_selection_was_never_written_is_not_made_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "faults.json"
    config.write_text(json.dumps(CONFIG))
    faults = Faults(monkeypatch)
    faults.run_root = str(tmp_path / "runs")
    faults.arm("query/histogram.npy", errno.ENOSPC)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "runs")]) == 2
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert _ledger(run_dir) == {"query": 1}  # spent before its output existed
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "records the query as spent, but its outputs" in err and "Start a new run directory" in err
    assert _ledger(run_dir) == {"query": 1}
