"""Pre-training and DP fine-tuning loops: exact resume, atomic checkpoints that carry the ledger, logs."""

import csv
from dataclasses import replace

import pytest
import torch

from privimage.config import FinetuneConfig, PretrainConfig
from privimage.data import load_dataset
from privimage.engine import PrivacyBudget
from privimage.privacy import FINETUNE, plan_privimage_budget
from privimage.models.unet import PRESETS
from privimage.train import finetune, load_checkpoint, pretrain

UNET = replace(PRESETS["tiny"], nf=8, ch_mult=(1,), attn_resolutions=(8,), resolution=8, num_classes=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_dataset("embedded", split="sensitive", size=48, resolution=8, seed=3)


@pytest.fixture(scope="module")
def budget_state():
    # Planned once: calibrating σ on the composition is the slow part of the accountant.
    budget = plan_privimage_budget(epsilon=8.0, delta=1e-4, sample_rate=0.25, steps=4)
    budget.spend("query")
    return budget.state_dict()


def _timeless(rows):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def _finetune(run_dir, data, budget_state, **kw):
    budget = PrivacyBudget.from_state_dict(budget_state)
    config = FinetuneConfig(physical_batch_size=8, num_noise=2, max_grad_norm=1e-2, lr=1e-3, secure_noise=False,
                            checkpoint_every=1, log_every=4)
    path = finetune(run_dir, config, images=data.images, labels=data.labels, unet=UNET, budget=budget,
                    init_state=None, seed=5, log=lambda *_: None, **kw)
    return budget, load_checkpoint(path)


def test_interrupted_finetune_resumes_to_the_same_parameters_and_epsilon(tmp_path, data, budget_state):
    full_budget, full = _finetune(tmp_path / "full", data, budget_state)
    part_budget, part = _finetune(tmp_path / "part", data, budget_state, stop_at_step=2)
    assert part["step"] == 2 and part["budget"]["spent"][FINETUNE] == 2
    resumed_budget, resumed = _finetune(tmp_path / "part", data, budget_state, resume=True)
    assert resumed["step"] == full["step"] == 4
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for key, value in full["ema"]["module"].items():
        assert torch.equal(resumed["ema"]["module"][key], value), key
    assert resumed["budget"]["spent"] == full["budget"]["spent"] == {"query": 1, FINETUNE: 4}
    assert resumed_budget.epsilon_spent().upper == full_budget.epsilon_spent().upper <= 8.0
    assert _timeless(resumed["log"]) == _timeless(full["log"])


def test_finetune_refuses_a_ledger_that_disagrees_with_the_checkpoint(tmp_path, data, budget_state):
    state = dict(budget_state, spent={"query": 1, FINETUNE: 3})
    with pytest.raises(ValueError, match="ledger records 3"):
        _finetune(tmp_path, data, state)


def test_checkpoint_contents_and_logs(tmp_path, data, budget_state):
    _, ckpt = _finetune(tmp_path, data, budget_state)
    for key in ("model", "ema", "optimizer", "sampler", "noise_generator", "budget", "unet", "step", "log"):
        assert key in ckpt
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert ckpt["sampler"]["seed"] == 5
    rows = list(csv.DictReader(open(tmp_path / "logs" / "finetune.csv")))
    assert [int(r["step"]) for r in rows] == [4]
    assert {"step", "loss", "epsilon", "images_per_s"} <= set(rows[0])
    assert 0 < float(rows[0]["epsilon"]) <= 8.0
    on_disk = PrivacyBudget.from_state_dict(__import__("json").loads((tmp_path / "budget.json").read_text()))
    assert on_disk.spent == {"query": 1, FINETUNE: 4}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, data, budget_state, monkeypatch):
    _finetune(tmp_path, data, budget_state, stop_at_step=1)
    path = tmp_path / "checkpoints" / "finetune.pt"
    before = path.read_bytes()
    import privimage.io as pio

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(pio.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _finetune(tmp_path, data, budget_state, resume=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_pretrain_resume_is_exact_and_learns(tmp_path, data):
    config = PretrainConfig(steps=6, batch_size=8, lr=2e-3, checkpoint_every=2, log_every=1)
    kw = dict(images=data.images, labels=data.labels, unet=UNET, seed=1, log=lambda *_: None)
    full = load_checkpoint(pretrain(tmp_path / "a", config, **kw))
    pretrain(tmp_path / "b", config, stop_at_step=3, **kw)
    resumed = load_checkpoint(pretrain(tmp_path / "b", config, resume=True, **kw))
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert _timeless(resumed["log"]) == _timeless(full["log"]) and len(full["log"]) == 6
    assert (tmp_path / "a" / "samples" / "pretrain.png").is_file()
    assert not any(k.startswith("_orig_mod.") for k in full["model"])


@pytest.mark.parametrize("loader", ["device", "ffcv"])
def test_pretrain_streams_the_subset_and_resumes_exactly_mid_epoch(tmp_path, data, loader):
    from privimage.query import ffcv_available

    if loader == "ffcv" and not ffcv_available():
        pytest.skip("FFCV not installed (pip install -e '.[ffcv]')")
    # 20 images, batch 8: 2 batches per epoch (4 dropped); steps 0-2 then 3-4 cross an epoch and resume mid-epoch.
    config = PretrainConfig(steps=5, batch_size=8, lr=2e-3, checkpoint_every=100, log_every=1, loader=loader)
    kw = dict(images=data.images[:20], labels=data.labels[:20], unet=UNET, seed=2, log=lambda *_: None)
    full = load_checkpoint(pretrain(tmp_path / "a", config, **kw))
    pretrain(tmp_path / "b", config, stop_at_step=3, **kw)
    resumed = load_checkpoint(pretrain(tmp_path / "b", config, resume=True, **kw))
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert _timeless(resumed["log"]) == _timeless(full["log"])
    assert (tmp_path / "b" / "query" / "subset.ffcv").is_file() == (loader == "ffcv")


def test_pretrain_on_a_subset_smaller_than_a_batch_uses_it_whole(tmp_path, data):
    logged = []
    path = pretrain(tmp_path, PretrainConfig(steps=2, batch_size=8, log_every=1), images=data.images[:5],
                    labels=data.labels[:5], unet=UNET, log=logged.append)
    assert load_checkpoint(path)["step"] == 2 and any("fewer than batch_size=8" in line for line in logged)


def test_secure_mode_resumes_exactly_from_the_saved_noise_and_sampler_state(tmp_path, data, budget_state):
    kw = dict(config=FinetuneConfig(physical_batch_size=8, num_noise=1, checkpoint_every=1, log_every=4),
              images=data.images, labels=data.labels, unet=UNET, init_state=None, seed=5, log=lambda *_: None)
    first, second = tmp_path / "a", tmp_path / "b"
    finetune(first, budget=PrivacyBudget.from_state_dict(budget_state), stop_at_step=2, **kw)
    part = load_checkpoint(first / "checkpoints" / "finetune.pt")
    assert part["sampler"]["secure"] and part["sampler"]["seed"] != 5
    import shutil
    shutil.copytree(first, second)
    a = load_checkpoint(finetune(first, budget=PrivacyBudget.from_state_dict(budget_state), resume=True, **kw))
    b = load_checkpoint(finetune(second, budget=PrivacyBudget.from_state_dict(budget_state), resume=True, **kw))
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
