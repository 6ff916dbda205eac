"""The GAN loops on in-process gloo ranks (tests/helpers/ranks.py) compute at world 2 what one process computes.

Pre-training: each rank its rows of every discriminator batch, the gradients summed; the generator step on
rank 0, broadcast. DP fine-tune: one Poisson draw, each rank its slice of the records (each paired with the
fake of its own secret stream), one all-reduce, the noise once. Both: the same weights (float tolerance: the
sums are added in another order), the same ledger and ε log, the same checkpoint secrets, and a checkpoint
written at one world size resumes at the other."""

import json
import os
from dataclasses import replace

import pytest
import torch

from privimage import distributed
from privimage.config import GANFinetuneConfig, GANPretrainConfig
from privimage.data import load_dataset
from privimage.engine import PrivacyBudget
from privimage.engine.accounting import Mechanism
from privimage.models import GAN_PRESETS
from privimage.privacy import FINETUNE
from privimage.rundir import read_checkpoint

from ranks import run_ranks

# the references on one thread, as the ranks run: same summation order, so world 1 is bit for bit
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 8×8, 3 classes, 64 channels: GroupNorms of 2 channels a group. (With one channel a group, as in the "tiny"
# preset, a conv bias before a norm has an exactly zero gradient, Adam turns its rounding into lr-sized steps,
# and no two summation orders agree on it.)
GAN = replace(GAN_PRESETS["tiny"], g_width=32, d_width=32, d_ch_mult=(2, 2))
# 11 images, batch 5 (2 + 3 rows at world 2): 2 batches an epoch, so 5 steps cross epochs and resume mid-epoch;
# a generator step after every second discriminator step
PRETRAIN = GANPretrainConfig(steps=5, batch_size=5, d_steps_per_g_step=2, checkpoint_every=100, log_every=1,
                             loader="device")
# 23 records at q = 0.5 (about 11 a step, cut into micro-batches of 3: several per rank, uneven, padded),
# 4 discriminator steps, a generator step after the 2nd and the 4th (7 fakes in chunks of 3: the last short)
FINETUNE_CFG = GANFinetuneConfig(epochs=2, batch_size=12, physical_batch_size=3, max_grad_norm=1e-2,
                                 d_steps_per_g_step=2, g_batch_size=7, checkpoint_every=100, secure_noise=False)
PLAN = Mechanism(noise_multiplier=0.8, sample_rate=0.5, count=4)


def _data(size):
    data = load_dataset("embedded", split="sensitive", size=size, resolution=8, seed=3)
    return data.images, data.labels % GAN.num_classes


def _pretrain_worker(rank, world_size, run_dir, adopt, stop_at_step, resume):
    from privimage.train import pretrain_gan

    if adopt:
        distributed.use_group()
    images, labels = _data(11)
    pretrain_gan(run_dir, PRETRAIN, images=images, labels=labels, gan=GAN, seed=4, stop_at_step=stop_at_step,
                 resume=resume, log=lambda *_: None)


def _pretrain(run_dir, world_size, *, stop_at_step=None, resume=False):
    """Pre-train into ``run_dir`` on ``world_size`` ranks (world 1: the plain one-process path); its checkpoint."""
    run_ranks(_pretrain_worker, world_size, str(run_dir), world_size > 1, stop_at_step, resume, timeout=120)
    return read_checkpoint(run_dir / "checkpoints" / "pretrain.pt")


def _assert_same_weights(state, ref, parts):
    for part in parts:
        for key, value in ref[part].items():
            torch.testing.assert_close(state[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")


def _assert_same_log(state, ref, keys):
    assert len(state["log"]) == len(ref["log"])
    for key in keys:
        ours = [row[key] for row in state["log"]]
        theirs = [row[key] for row in ref["log"]]
        assert [v is None for v in ours] == [v is None for v in theirs], key
        assert [v for v in ours if v is not None] == pytest.approx([v for v in theirs if v is not None],
                                                                    rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return _pretrain(tmp_path_factory.mktemp("gan-pretrain") / "one", 1)


def _assert_same_pretrain(state, ref):
    assert state["step"] == ref["step"] == PRETRAIN.steps
    _assert_same_log(state, ref, ("d_loss", "g_loss"))
    _assert_same_weights(state, ref, ("generator", "discriminator", "ema"))


def test_gan_pretraining_on_two_ranks_equals_one_process(pretrained, tmp_path):
    two = _pretrain(tmp_path / "two", 2)
    _assert_same_pretrain(two, pretrained)
    assert (tmp_path / "two" / "samples" / "pretrain.png").is_file()
    # the generator really trained (two generator steps), so its equality says something
    init = _pretrain(tmp_path / "zero", 1, stop_at_step=1)
    assert any(not torch.equal(init["generator"][k], v) for k, v in pretrained["generator"].items())


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_gan_pretraining_resumes_under_another_world_size(pretrained, tmp_path, first, then):
    assert _pretrain(tmp_path, first, stop_at_step=3)["step"] == 3
    _assert_same_pretrain(_pretrain(tmp_path, then, resume=True), pretrained)


def _finetune_worker(rank, world_size, run_dir, adopt, stop_at_step, resume):
    from privimage.train import finetune_gan

    os.environ["PRIVIMAGE_DIST_CHECK_EVERY"] = "1"
    if adopt:
        distributed.use_group()
    images, labels = _data(23)
    budget = PrivacyBudget(10.0, 1e-5, plan={FINETUNE: PLAN})
    torch.manual_seed(9)
    from privimage.models import Discriminator, Generator

    init = {"generator": Generator(GAN).state_dict(), "discriminator": Discriminator(GAN).state_dict()}
    finetune_gan(run_dir, FINETUNE_CFG, images=images, labels=labels, gan=GAN, budget=budget, init_state=init,
                 seed=5, stop_at_step=stop_at_step, resume=resume, log=lambda *_: None)


def _finetune(run_dir, world_size, *, stop_at_step=None, resume=False):
    run_ranks(_finetune_worker, world_size, str(run_dir), world_size > 1, stop_at_step, resume, timeout=120)
    return read_checkpoint(run_dir / "checkpoints" / "finetune.pt")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gan-finetune") / "one"
    return _finetune(run_dir, 1), run_dir


def _assert_same_finetune(state, run_dir, ref, ref_dir):
    assert state["step"] == ref["step"] == PLAN.count
    assert json.loads((run_dir / "budget.json").read_text()) == json.loads((ref_dir / "budget.json").read_text())
    assert state["budget"]["spent"] == ref["budget"]["spent"] == {FINETUNE: PLAN.count}
    assert [r["epsilon"] for r in state["log"]] == [r["epsilon"] for r in ref["log"]]
    _assert_same_log(state, ref, ("d_loss", "g_loss"))
    _assert_same_weights(state, ref, ("generator", "discriminator", "ema"))
    # the checkpoint does not depend on the world size: the same secrets as one process's
    assert state["sampler"] == ref["sampler"] and state["record_randomness"] == ref["record_randomness"]
    assert torch.equal(state["noise_generator"], ref["noise_generator"])


def test_gan_finetune_on_two_ranks_equals_one_process(finetuned, tmp_path):
    ref, ref_dir = finetuned
    two = _finetune(tmp_path / "two", 2)
    _assert_same_finetune(two, tmp_path / "two", ref, ref_dir)
    # the steps did something the comparison can see: the discriminator and the generator moved
    torch.manual_seed(9)
    from privimage.models import Discriminator, Generator

    for net, part in ((Generator(GAN), "generator"), (Discriminator(GAN), "discriminator")):
        assert any(not torch.equal(ref[part][k], v) for k, v in net.state_dict().items()), part


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1)])
def test_gan_finetune_resumes_under_another_world_size(finetuned, tmp_path, first, then):
    ref, ref_dir = finetuned
    assert _finetune(tmp_path, first, stop_at_step=2)["step"] == 2
    state = _finetune(tmp_path, then, resume=True)
    _assert_same_finetune(state, tmp_path, ref, ref_dir)


def _mismatched_worker(rank, world_size, run_dir):
    from privimage.train import finetune_gan

    distributed.use_group()
    images, labels = _data(23)
    budget = PrivacyBudget(10.0, 1e-5, plan={FINETUNE: PLAN})
    finetune_gan(f"{run_dir}/{rank}", FINETUNE_CFG, images=images, labels=labels, gan=GAN, budget=budget,
                 init_state=None, seed=5 + rank, log=lambda *_: None)  # rank 1: another seed


def test_ranks_with_another_config_are_refused_before_the_first_step(tmp_path):
    errors = run_ranks(_mismatched_worker, 2, str(tmp_path), timeout=60, expect_errors=True)
    assert all(isinstance(e, str) and "disagree on the GAN fine-tune" in e and "seed=6" in e for e in errors), errors
    assert not any(tmp_path.rglob("finetune.pt"))  # nothing was trained or written
