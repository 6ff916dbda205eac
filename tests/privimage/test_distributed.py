"""privimage.distributed: the backend choice and the plain single process (no torchrun variables)."""

import pytest

from privimage import distributed
from privimage.cli import main
from privimage.errors import DeviceError


def test_nccl_asked_for_without_a_gpu_per_rank_is_refused(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("PRIVIMAGE_DIST_BACKEND", "nccl")
    with pytest.raises(DeviceError, match="nccl needs one CUDA device per rank.*2 rank.*0 CUDA.*=gloo"):
        distributed.choose_backend()
    monkeypatch.setenv("PRIVIMAGE_DIST_BACKEND", "mpi")
    with pytest.raises(DeviceError, match="'mpi' is not a backend"):
        distributed.choose_backend()
    monkeypatch.delenv("PRIVIMAGE_DIST_BACKEND")
    assert distributed.choose_backend() == "gloo"


def test_nccl_refusal_is_one_line_at_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999", "PRIVIMAGE_DIST_BACKEND": "nccl"}.items():
        monkeypatch.setenv(name, value)
    assert main(["budget", "--epsilon", "1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs one CUDA device per rank" in err[0]


def test_one_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() is None
    assert distributed.is_writer() and distributed.launch_info() == {"world_size": 1, "backend": None}
    assert distributed.share("x") == "x"
    distributed.barrier()  # nothing to wait for


def test_a_record_names_this_torchrun_job_only_under_it_and_a_restart_is_a_count_above_zero(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert not distributed.written_by_this_job({"torchrun_id": "job-1"}) and not distributed.restarted()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert distributed.written_by_this_job({"world_size": 2, "torchrun_id": "job-1"})
    assert not distributed.written_by_this_job({"world_size": 2, "torchrun_id": "job-2"})
    assert not distributed.written_by_this_job({"world_size": 1, "backend": None})  # one process, no job
    assert not distributed.written_by_this_job(None) and not distributed.restarted()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.restarted()


def test_a_checkpoint_records_how_it_was_launched(tmp_path):
    from privimage.rundir import RunDir

    run = RunDir(tmp_path)
    assert run.checkpoint_launch("finetune") is None  # none written yet
    run.save_checkpoint("finetune", {"kind": "finetune", "step": 0})
    assert run.checkpoint_launch("finetune") == {"world_size": 1, "backend": None}
    assert run.load_checkpoint("finetune")["step"] == 0
    run.checkpoint_path("finetune").write_bytes(b"not a checkpoint")
    assert run.checkpoint_launch("finetune") is None  # unreadable: the stage's own read names it
