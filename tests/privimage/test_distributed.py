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
