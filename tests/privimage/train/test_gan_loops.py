"""GAN pre-training and DP fine-tuning loops: exact resume, the ledger (exact, durable first, spent before
the noise), secure mode, sampling, and inputs that do not fit."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from privimage.config import GANFinetuneConfig, GANPretrainConfig, PretrainConfig
from privimage.data import load_dataset
from privimage.engine import DPEngine, Mechanism, PrivacyBudget
from privimage.errors import DataError, RunDirError
from privimage.gan import sample_gan, sample_gan_in_batches
from privimage.models import GAN_PRESETS, Generator
from privimage.privacy import FINETUNE
from privimage.train import load_checkpoint, pretrain
from privimage.train.gan_finetune import finetune_gan
from privimage.train.gan_pretrain import pretrain_gan, pretrained_init

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GAN = replace(GAN_PRESETS["tiny"], num_classes=5)


@pytest.fixture(scope="module")
def data():
    return load_dataset("embedded", split="sensitive", size=40, resolution=8, seed=3)


@pytest.fixture(scope="module")
def budget_state():
    # a plan written out (σ calibration is the accountant's job, tested there): the query spent, 5 D steps
    budget = PrivacyBudget(8.0, 1e-4, plan={"query": Mechanism(4.0, 1.0, 1), FINETUNE: Mechanism(1.0, 0.25, 5)},
                           spent={"query": 1})
    return budget.state_dict()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    run_dir = tmp_path_factory.mktemp("pre")
    pretrain_gan(run_dir, GANPretrainConfig(steps=4, batch_size=8, d_steps_per_g_step=2, log_every=1),
                 images=data.images, labels=data.labels, gan=GAN, log=lambda *_: None)
    return run_dir


def _timeless(rows):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def _finetune(run_dir, data, budget_state, init=None, secure=False, **kw):
    budget = PrivacyBudget.from_state_dict(budget_state)
    config = GANFinetuneConfig(physical_batch_size=6, d_steps_per_g_step=2, g_batch_size=7, checkpoint_every=1,
                               log_every=5, secure_noise=secure)
    path = finetune_gan(run_dir, config, images=data.images, labels=data.labels, gan=GAN, budget=budget,
                        init_state=init, seed=5, log=lambda *_: None, **kw)
    return budget, load_checkpoint(path)


def _assert_same_state(a, b):
    for part in ("generator", "discriminator"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)
    for key, value in a["ema"]["module"].items():
        assert torch.equal(b["ema"]["module"][key], value), ("ema", key)
    assert _timeless(a["log"]) == _timeless(b["log"])


def test_interrupted_finetune_resumes_to_the_same_networks_and_ledger(tmp_path, data, budget_state, pretrained):
    init = pretrained_init(pretrained)
    full_budget, full = _finetune(tmp_path / "full", data, budget_state, init)
    # stop after 3 discriminator steps: between two generator steps (n_D = 2)
    _, part = _finetune(tmp_path / "part", data, budget_state, init, stop_at_step=3)
    assert part["step"] == 3 and part["budget"]["spent"] == {"query": 1, FINETUNE: 3}
    resumed_budget, resumed = _finetune(tmp_path / "part", data, budget_state, init, resume=True)
    assert resumed["step"] == full["step"] == 5
    _assert_same_state(full, resumed)
    assert resumed["budget"]["spent"] == full["budget"]["spent"] == {"query": 1, FINETUNE: 5}
    on_disk = json.loads((tmp_path / "part" / "budget.json").read_text())
    assert on_disk["spent"] == {"query": 1, FINETUNE: 5}
    assert resumed_budget.epsilon_spent().upper == full_budget.epsilon_spent().upper <= 8.0
    assert not any(k.startswith("_orig_mod.") for k in full["generator"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_ledger_is_spent_before_the_noise_and_on_disk_before_the_checkpoint(tmp_path, data, budget_state,
                                                                                 monkeypatch):
    seen = []
    finalize = DPEngine.finalize

    def spy(engine):
        seen.append(json.loads((tmp_path / "budget.json").read_text())["spent"][FINETUNE]
                    if (tmp_path / "budget.json").exists() else None)
        return finalize(engine)

    monkeypatch.setattr(DPEngine, "finalize", spy)
    from privimage.rundir import RunDir

    def failing_save(run, stage, state):
        raise OSError("disk full")

    monkeypatch.setattr(RunDir, "save_checkpoint", failing_save)
    budget = PrivacyBudget.from_state_dict(budget_state)
    with pytest.raises(OSError, match="disk full"):
        finetune_gan(tmp_path, GANFinetuneConfig(physical_batch_size=6, secure_noise=False, checkpoint_every=1),
                     images=data.images, labels=data.labels, gan=GAN, budget=budget, init_state=None,
                     log=lambda *_: None)
    # the first step's release was counted in memory before its noise, and on disk before its checkpoint
    assert budget.spent[FINETUNE] == 1 and seen == [None]
    assert json.loads((tmp_path / "budget.json").read_text())["spent"] == {"query": 1, FINETUNE: 1}


def test_finetune_refuses_a_ledger_that_disagrees_with_the_checkpoint(tmp_path, data, budget_state):
    with pytest.raises(RunDirError, match="ledger records 2"):
        _finetune(tmp_path, data, dict(budget_state, spent={"query": 1, FINETUNE: 2}))


def test_secure_mode_keeps_its_secrets_in_the_checkpoint_and_resumes_exactly(tmp_path, data, budget_state):
    first, second = tmp_path / "a", tmp_path / "b"
    _, part = _finetune(first, data, budget_state, secure=True, stop_at_step=2)
    assert part["sampler"]["secure"] and part["sampler"]["seed"] != 5
    assert part["record_randomness"]["secure"]
    shutil.copytree(first, second)
    _, a = _finetune(first, data, budget_state, secure=True, resume=True)
    _, b = _finetune(second, data, budget_state, secure=True, resume=True)
    _assert_same_state(a, b)
    _, other = _finetune(tmp_path / "c", data, budget_state, secure=True)
    assert other["record_randomness"]["key"] != a["record_randomness"]["key"]


def test_pretrain_resumes_exactly_mid_epoch_and_writes_samples(tmp_path, data):
    # 40 images, batch 8: 5 batches per epoch; steps 0-6 then 7-8 cross an epoch and a generator step
    config = GANPretrainConfig(steps=9, batch_size=8, d_steps_per_g_step=2, checkpoint_every=100, log_every=1,
                               loader="device")
    kw = dict(images=data.images, labels=data.labels, gan=GAN, seed=2, log=lambda *_: None)
    full = load_checkpoint(pretrain_gan(tmp_path / "a", config, **kw))
    pretrain_gan(tmp_path / "b", config, stop_at_step=7, **kw)
    resumed = load_checkpoint(pretrain_gan(tmp_path / "b", config, resume=True, **kw))
    _assert_same_state(full, resumed)
    assert full["kind"] == "gan-pretrain" and full["step"] == 9 and len(full["log"]) == 9
    assert (tmp_path / "a" / "samples" / "pretrain.png").is_file()
    init = pretrained_init(tmp_path / "a")
    assert set(init) == {"generator", "discriminator", "gan"}
    for key, value in full["ema"]["module"].items():
        assert torch.equal(init["generator"][key], value)


def test_checkpoints_of_another_kind_and_architecture_are_refused(tmp_path, data, budget_state):
    from privimage.models.unet import PRESETS

    unet = replace(PRESETS["tiny"], nf=8, ch_mult=(1,), attn_resolutions=(8,), resolution=8, num_classes=5)
    pretrain(tmp_path / "diffusion", PretrainConfig(steps=1, batch_size=8), images=data.images,
             labels=data.labels, unet=unet, log=lambda *_: None)
    with pytest.raises(RunDirError, match="not 'gan-pretrain'"):
        pretrained_init(tmp_path / "diffusion")
    other = replace(GAN, g_width=8)
    wrong = {"generator": Generator(other).state_dict(), "discriminator": {}, "gan": other.to_dict()}
    with pytest.raises(RunDirError, match="architecture"):
        _finetune(tmp_path / "ft", data, budget_state, wrong)


@pytest.mark.parametrize("images, labels, match", [
    (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), r"shape \(N, 3, 8, 8\)"),
    (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "3 channels"),
    (torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), "uint8"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.full((4,), 5), r"\[0, 5\)"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), "labels of shape"),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), "empty"),
])
def test_images_and_labels_that_do_not_fit_the_gan_are_named(tmp_path, budget_state, images, labels, match):
    with pytest.raises(DataError, match=match):
        pretrain_gan(tmp_path, GANPretrainConfig(steps=1), images=images, labels=labels, gan=GAN, log=lambda *_: None)
    with pytest.raises(DataError, match=match):
        finetune_gan(tmp_path, GANFinetuneConfig(), images=images, labels=labels, gan=GAN, init_state=None,
                     budget=PrivacyBudget.from_state_dict(budget_state), log=lambda *_: None)


def test_sampling_is_per_image_seeded_and_balanced():
    torch.manual_seed(0)
    g = Generator(GAN)
    idx, y = torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 0])
    batch = sample_gan(g, indices=idx, labels=y, seed=3)
    torch.testing.assert_close(sample_gan(g, indices=idx[4:5], labels=y[4:5], seed=3)[0], batch[4])
    assert not torch.allclose(sample_gan(g, indices=idx, labels=y, seed=4), batch)
    images, labels = sample_gan_in_batches(g, num=11, seed=3, batch_size=4)
    assert images.dtype == torch.uint8 and images.shape == (11, 3, 8, 8)
    assert labels.tolist() == [i % 5 for i in range(11)]
    first, _ = sample_gan_in_batches(g, num=5, seed=3, batch_size=5)
    assert torch.equal(first, images[:5])
