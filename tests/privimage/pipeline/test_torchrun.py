"""`torchrun ... -m privimage ...` with 2 ranks (gloo, CPU) makes what one process makes: the same ledger and ε, the
same fine-tuned weights (float tolerance: the all-reduce adds in another order) in the tests' non-secure mode,
on two simulated nodes (two agents at a c10d rendezvous) and on one node (`--standalone`) through a rank killed
mid-fine-tune and the restart torchrun makes of the group (`--max-restarts`); a world-1 checkpoint resumes under
world 2 and the reverse. Rank 0 alone writes."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from ranks import finish_torchrun as _finish
from ranks import kill_launch as _kill_launch
from ranks import start_torchrun as _start_torchrun
from ranks import torchrun as _torchrun
from cli_runs import run_once

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CONFIG = {"base": "test", "finetune": {"epochs": 1}, "sample": {"batch_size": 4}}  # 4 fine-tune steps, 3 batches


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: `privimage run` in this process, (run dir, config file, cache)."""
    return run_once(tmp_path_factory.mktemp("torchrun"), CONFIG)


def _finetune_state(run):
    return torch.load(run / "checkpoints" / "finetune.pt", map_location="cpu", weights_only=False)


def _assert_same_finetune(run, ref):
    assert json.loads((run / "budget.json").read_text()) == json.loads((ref / "budget.json").read_text())
    a, b = _finetune_state(run), _finetune_state(ref)
    assert a["step"] == b["step"] == 4
    assert [r["epsilon"] for r in a["log"]] == [r["epsilon"] for r in b["log"]]
    assert [r["loss"] for r in a["log"]] == pytest.approx([r["loss"] for r in b["log"]], rel=1e-5)
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    for key in b["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-5, atol=1e-6)
    # the checkpoint does not depend on the world size: the same secrets and keys as one process's
    assert a["sampler"] == b["sampler"] and a["loss_randomness"] == b["loss_randomness"]
    assert torch.equal(a["noise_generator"], b["noise_generator"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_run_equals_one_process(one_process, tmp_path):
    """Two "nodes" on this machine: two torchrun agents (one rank each) meeting at a c10d rendezvous, as on a
    cluster (a shared file system holds the run directory)."""
    ref, config, cache = one_process
    port, args = _free_port(), ("run", "--config", config, "--out", tmp_path / "two")
    agents = [_start_torchrun(*args, cache=cache, launcher=(
        "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
        "--rdzv-id=privimage-test-two-nodes", f"--rdzv-conf=is_host={int(node == 0)}")) for node in (0, 1)]
    try:
        outs = [_finish(agent, 240, args) for agent in agents]
    finally:
        for agent in agents:
            _kill_launch(agent)
    assert sum("run directory:" in out for out in outs) == 1  # rank 0 (on either node) alone made and wrote it
    (run,) = (tmp_path / "two").iterdir()  # one run directory: rank 1 made none
    _assert_same_finetune(run, ref)
    # the samples of each rank's batches, gathered: the same images as one process's, bit for bit
    with np.load(run / "samples" / "samples.npz") as a, np.load(ref / "samples" / "samples.npz") as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in b.files)
    launch = json.loads((run / "config.json").read_text())["launch"]
    assert launch == {"world_size": 2, "backend": "gloo", "torchrun_id": "privimage-test-two-nodes"}
    assert json.loads((ref / "config.json").read_text())["launch"] == {"world_size": 1, "backend": None}
    assert (run / "release" / "model.safetensors").is_file()
    assert not (run / ".lock").exists()


def test_a_rank_killed_mid_finetune_restarts_the_job_which_resumes_with_the_same_ledger(one_process, tmp_path):
    """`torchrun --max-restarts 1`: rank 1 dies (the engine's test hook) before the all-reduce of the last of the
    4 fine-tune steps, after the checkpoint at step 2; torchrun restarts both ranks with the same command, and
    `privimage run` resumes the run directory its first attempt made: the uninterrupted run's ledger, ε log and
    weights (steps 3 and 4 recomputed from the checkpoint with the same randomness, counted once)."""
    ref, config, cache = one_process
    out = _torchrun("run", "--config", config, "--out", tmp_path / "runs", cache=cache,
                    launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    env={"PRIVIMAGE_TEST_EXIT_AT": "1:4"})
    (run,) = (tmp_path / "runs").iterdir()  # the restart made no second run directory
    assert "was made by an earlier attempt of this job; resuming it" in out, out[-4000:]
    assert "finetune: resuming at step 2/4" in out
    _assert_same_finetune(run, ref)
    with np.load(run / "samples" / "samples.npz") as a, np.load(ref / "samples" / "samples.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in b.files)
    assert not (run / ".lock").exists()


def _before_finetune(ref, run):
    """A copy of the run directory ``ref`` as it was before its fine-tune."""
    from privimage.privacy import FINETUNE
    from privimage.rundir import RunDir

    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("finetune*", "release", "samples"))
    r = RunDir(run)
    budget = r.load_budget()
    budget.spent.pop(FINETUNE)
    r.save_budget(budget)
    return run


def test_a_rank_killed_mid_finetune_command_restarts_it_which_resumes_with_the_same_ledger(one_process, tmp_path):
    """`torchrun --max-restarts 1 -m privimage finetune RUN_DIR` (no --resume): rank 1 dies before the all-reduce of
    the last of the 4 steps, after the checkpoint at step 2; the restarted attempt finds that its job wrote the
    checkpoint (its "launch") and resumes from it instead of refusing a fresh start: the uninterrupted ledger,
    ε log and weights."""
    ref, _, cache = one_process
    run = _before_finetune(ref, tmp_path / "killed")
    out = _torchrun("finetune", run, cache=cache, launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    env={"PRIVIMAGE_TEST_EXIT_AT": "1:4"})
    assert "was written by an earlier attempt of this job; resuming from it" in out, out[-4000:]
    assert "finetune: resuming at step 2/4" in out
    _assert_same_finetune(run, ref)
    assert not (run / ".lock").exists()


def test_world_two_resumes_a_world_one_checkpoint(one_process, tmp_path):
    from privimage.pipeline import load_run_config, stage_finetune

    ref, _, cache = one_process
    run = _before_finetune(ref, tmp_path / "resume")
    stage_finetune(run, load_run_config(run), stop_at_step=2, log=lambda m: None)  # world 1, then stop
    assert _finetune_state(run)["step"] == 2
    _torchrun("finetune", run, "--resume", cache=cache)  # world 2 finishes
    _assert_same_finetune(run, ref)


def _finetune_two_ranks(rank, world_size, run_dir, stop_at_step):
    from privimage import distributed
    from privimage.pipeline import load_run_config, stage_finetune

    os.environ["PRIVIMAGE_DIST_CHECK_EVERY"] = "1"
    distributed.use_group()
    stage_finetune(run_dir, load_run_config(run_dir), stop_at_step=stop_at_step, log=lambda m: None)


def test_world_one_resumes_a_world_two_checkpoint(one_process, tmp_path):
    """The reverse of the test above, the world-2 part on in-process ranks (tests/helpers/ranks.py, no torchrun)."""
    from privimage.pipeline import load_run_config, stage_finetune

    from ranks import run_ranks

    ref, _, _ = one_process
    run = _before_finetune(ref, tmp_path / "reverse")
    run_ranks(_finetune_two_ranks, 2, str(run), 2, timeout=180)  # world 2, then stop
    assert _finetune_state(run)["step"] == 2
    stage_finetune(run, load_run_config(run), resume=True, log=lambda m: None)  # world 1 finishes
    _assert_same_finetune(run, ref)
