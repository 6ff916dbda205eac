"""The GAN (PRIVIMAGE+G) under torchrun at its edges: a rank killed in a late DP discriminator step, and
pre-training batches with fewer rows than ranks.

* `torchrun --max-restarts 1 ... run --config <test-gan>`: rank 1 dies (the engine's test hook) just before
  the all-reduce of the 7th of the 8 discriminator steps, after the checkpoint at step 6; torchrun restarts
  both ranks, the restarted `privimage run` resumes the run directory its first attempt made, and steps 7 and
  8 (and the generator step and EMA after step 8) are recomputed from the checkpoint with the same randomness:
  the one-process run's ledger, ε log, networks, EMA, release and samples, each discriminator step counted once.
* A pre-training batch smaller than the world size leaves a rank with no rows: that rank skips its forward,
  adds zeros to the one all-reduce, and the run is the one-process run.
"""

import json

import numpy as np
import pytest
import torch

from privimage.config import GANPretrainConfig
from privimage.models import GAN_PRESETS, Discriminator, Generator
from privimage.release import load_release_generator
from privimage.rundir import RunDir, read_checkpoint

from ranks import run_ranks
from ranks import torchrun as _torchrun
from cli_runs import run_once

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: test-gan (test mode) with 64-channel networks, as the GAN torchrun equality test runs it: GroupNorms of 2
#: channels a group, so no gradient is exactly zero and two summation orders agree to float tolerance.
WIDE = {"base": "test-gan", "model_overrides": {"g_width": 32, "d_width": 32, "d_ch_mult": [2, 2]}}
STEPS = 8  # test-gan's discriminator steps (64 records, q = 1/4, 2 epochs): checkpoints and generator steps every 2
#: the hook's N: each GradientReducer counts its own all-reduces (engine/distributed.py), and the fine-tune's
#: engine makes one per discriminator step; pre-training's (4 steps) never reaches 7
KILLED_AT = 7


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: `privimage run` of WIDE in this process, (run dir, config file, cache)."""
    run, config, cache = run_once(tmp_path_factory.mktemp("gan-restart"), WIDE)
    return RunDir(run), config, cache


def _assert_same_run(run: RunDir, ref: RunDir):
    assert json.loads(run.budget_path.read_text()) == json.loads(ref.budget_path.read_text())
    for stage in ("pretrain", "finetune"):
        ours, theirs = (r.load_checkpoint(stage, model_kind="gan") for r in (run, ref))
        assert ours["step"] == theirs["step"] == ours["steps"], stage
        assert [r["step"] for r in ours["log"]] == [r["step"] for r in theirs["log"]], stage  # each step once
        assert [r["epsilon"] for r in ours["log"]] == [r["epsilon"] for r in theirs["log"]], stage
        for key in ("d_loss", "g_loss"):  # g_loss is None before the first generator step
            mine, ref_values = ([r[key] for r in s["log"]] for s in (ours, theirs))
            assert [v is None for v in mine] == [v is None for v in ref_values], (stage, key)
            assert ([v for v in mine if v is not None]
                    == pytest.approx([v for v in ref_values if v is not None], rel=1e-4, abs=1e-6)), (stage, key)
        for part in ("generator", "discriminator", "ema"):
            torch.testing.assert_close(ours[part], theirs[part], rtol=1e-5, atol=1e-6, msg=f"{stage} {part}")
    ours, theirs = (r.load_checkpoint("finetune", model_kind="gan") for r in (run, ref))
    assert ours["budget"]["spent"] == theirs["budget"]["spent"] == {"query": 1, "finetune": STEPS}
    # the secrets a resumed run continues with are the one-process run's (any world size, any attempt)
    assert ours["sampler"] == theirs["sampler"] and ours["record_randomness"] == theirs["record_randomness"]
    assert torch.equal(ours["noise_generator"], theirs["noise_generator"])
    (images, labels), (ref_images, ref_labels) = run.load_samples(), ref.load_samples()
    assert np.array_equal(labels, ref_labels)
    assert np.abs(images.astype(int) - ref_images.astype(int)).max() <= 1  # the weights' rounding, at most
    released, ref_released = (load_release_generator(r).state_dict() for r in (run, ref))
    torch.testing.assert_close(released, ref_released, rtol=1e-5, atol=1e-6)
    assert not (run.path / ".lock").exists()


@pytest.mark.slow
def test_a_rank_killed_in_a_late_discriminator_step_restarts_the_gan_job_which_resumes_with_the_same_ledger(
        one_process, tmp_path):
    ref, config, cache = one_process
    out = _torchrun("run", "--config", config, "--out", tmp_path / "runs", cache=cache,
                    launcher=("--standalone", "--nproc_per_node=2", "--max-restarts=1"),
                    env={"PRIVIMAGE_TEST_EXIT_AT": f"1:{KILLED_AT}"})
    (run_dir,) = (tmp_path / "runs").iterdir()  # the restart made no second run directory
    assert "was made by an earlier attempt of this job; resuming it" in out, out[-4000:]
    # the hook fired in the fine-tune (not in pre-training), after the checkpoint at step 6: the ledger the
    # restart continues counts exactly the checkpointed steps, none of the step in flight
    assert "finetune (GAN): resuming at step 6/8" in out and "ledger {'query': 1, 'finetune': 6}" in out, out[-4000:]
    run = RunDir(run_dir)
    _assert_same_run(run, ref)
    # every GAN checkpoint names the job that wrote it, as `privimage pretrain|finetune RUN_DIR` restarted by
    # the same job needs to resume from it (privimage.commands.resume_after_restart)
    launch = json.loads(run.config_path.read_text())["launch"]
    assert launch["world_size"] == 2 and launch["torchrun_id"]
    assert all(run.checkpoint_launch(stage) == launch for stage in ("pretrain", "finetune"))


# ------------------------------------------------------------------------------------------------------------
# Pre-training batches with fewer rows than ranks

#: The smallest preset: with one rank's rows empty, the all-reduce adds zeros, so world 2 is one process bit for bit
GAN = GAN_PRESETS["tiny"]
#: 3 images, ONE a discriminator step: at world 2, rank 0's rows of every batch are rows 0:0, none;
#: 3 steps cross an epoch, a generator step after the 2nd
ONE_ROW = GANPretrainConfig(steps=3, batch_size=1, d_steps_per_g_step=2, checkpoint_every=100, log_every=1,
                            loader="device")


def _pretrain_worker(rank, world_size, run_dir, adopt):
    from privimage import distributed
    from privimage.data import load_dataset
    from privimage.train import pretrain_gan

    if adopt:
        distributed.use_group()
    data = load_dataset("embedded", split="sensitive", size=3, resolution=8, seed=3)
    pretrain_gan(run_dir, ONE_ROW, images=data.images, labels=data.labels % GAN.num_classes, gan=GAN, seed=4,
                 log=lambda *_: None)


def _pretrain(run_dir, world_size):
    run_ranks(_pretrain_worker, world_size, str(run_dir), world_size > 1, timeout=120)
    return read_checkpoint(run_dir / "checkpoints" / "pretrain.pt")


def test_gan_pretraining_where_a_rank_has_no_rows_of_a_batch_equals_one_process(tmp_path):
    """A batch of one image on two ranks: rank 0 holds none of its rows, skips its forward (the generator's
    cannot take an empty batch), adds zeros to the one all-reduce and still takes the generator step; the run
    is the one-process run, bit for bit (x + 0 = x)."""
    two, one = _pretrain(tmp_path / "two", 2), _pretrain(tmp_path / "one", 1)
    assert two["step"] == one["step"] == ONE_ROW.steps
    assert [r["step"] for r in two["log"]] == [1, 2, 3]
    assert [r["g_loss"] is None for r in two["log"]] == [True, False, False]  # the generator step after step 2
    for key in ("d_loss", "g_loss"):
        assert [r[key] for r in two["log"]] == [r[key] for r in one["log"]], key
    for part in ("generator", "discriminator", "ema", "optimizer_g", "optimizer_d"):
        torch.testing.assert_close(two[part], one[part], rtol=0, atol=0, msg=part)
    # both networks moved from their initial weights (pretrain_gan's, seeded by its seed): the equality says
    # something about the steps
    torch.manual_seed(4)
    initial = {"generator": Generator(GAN).state_dict(), "discriminator": Discriminator(GAN).state_dict()}
    for part, init in initial.items():
        assert any(not torch.equal(v, one[part][k]) for k, v in init.items()), part
