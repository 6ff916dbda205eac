"""The stages every rank shares under torchrun, on in-process gloo ranks (tests/helpers/ranks.py): each computes at
world 2 what one process computes. Pre-training: the same weights (float tolerance: the gradients are summed
in another order), resumable across world sizes. Query: the same votes exactly, the noise drawn once (the
same release in the non-secure test mode). Sampling: the same images bit for bit."""

import json
import os

from dataclasses import replace

import pytest
import torch

from privimage import distributed
from privimage.config import PretrainConfig
from privimage.data import load_dataset
from privimage.models.unet import PRESETS
from privimage.rundir import read_checkpoint

from ranks import run_ranks

# the references on one thread, as the ranks run: same summation order, so world 1 is bit for bit
pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET = replace(PRESETS["tiny"], nf=8, ch_mult=(1,), attn_resolutions=(8,), resolution=8, num_classes=5)
# 11 images, batch 5 (2 + 3 rows at world 2): 2 batches an epoch, so 5 steps cross epochs and resume mid-epoch
PRETRAIN = PretrainConfig(steps=5, batch_size=5, lr=2e-3, checkpoint_every=100, log_every=1, loader="device")


def _pretrain_worker(rank, world_size, run_dir, adopt, stop_at_step, resume):
    from privimage.train import pretrain

    if adopt:
        distributed.use_group()
    data = load_dataset("embedded", split="sensitive", size=11, resolution=8, seed=3)
    pretrain(run_dir, PRETRAIN, images=data.images, labels=data.labels, unet=UNET, seed=4,
             stop_at_step=stop_at_step, resume=resume, log=lambda *_: None)


def _pretrain(run_dir, world_size, *, stop_at_step=None, resume=False):
    """Pre-train into ``run_dir`` on ``world_size`` ranks (world 1: the plain one-process path); its checkpoint."""
    run_ranks(_pretrain_worker, world_size, str(run_dir), world_size > 1, stop_at_step, resume, timeout=120)
    return read_checkpoint(run_dir / "checkpoints" / "pretrain.pt")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return _pretrain(tmp_path_factory.mktemp("pretrain") / "one", 1)


def _assert_same_pretrain(state, ref):
    assert state["step"] == ref["step"] == PRETRAIN.steps
    assert [r["loss"] for r in state["log"]] == pytest.approx([r["loss"] for r in ref["log"]], rel=1e-5)
    for part in ("model", "ema"):
        for key, value in ref[part].items():
            torch.testing.assert_close(state[part][key], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")


def test_pretraining_on_two_ranks_equals_one_process(pretrained, tmp_path):
    two = _pretrain(tmp_path / "two", 2)
    _assert_same_pretrain(two, pretrained)
    assert not any(key.startswith("module.") for key in two["model"])  # DDP's wrapper is not in the checkpoint
    assert (tmp_path / "two" / "samples" / "pretrain.png").is_file()


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_pretraining_resumes_under_another_world_size(pretrained, tmp_path, first, then):
    assert _pretrain(tmp_path, first, stop_at_step=3)["step"] == 3
    _assert_same_pretrain(_pretrain(tmp_path, then, resume=True), pretrained)


def _votes_worker(rank, world_size, adopt):
    from privimage.query import QueryClassifier
    from privimage.query.stage import shared_votes

    if adopt:
        distributed.use_group()
    torch.manual_seed(0)
    classifier = QueryClassifier(num_classes=7, channels=3, resolution=8, width=4)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (23,), generator=g)
    # batches of 4: rank 0 classifies batches 0, 2, 4 (the last one short), rank 1 batches 1, 3, 5
    return shared_votes(classifier, images, labels, num_classes=3, top_k=2, batch_size=4).counts


def test_query_votes_on_two_ranks_are_the_one_process_votes_exactly():
    (one,) = run_ranks(_votes_worker, 1, False)
    two = run_ranks(_votes_worker, 2, True)
    assert one.sum() == 23 * 2
    for counts in two:  # every rank holds the summed histogram
        assert torch.equal(counts, one)


def _query_worker(rank, world_size, run_dir, cache, adopt):
    from privimage.pipeline import load_run_config, stage_query

    os.environ["PRIVIMAGE_CACHE_DIR"] = cache
    if adopt:
        distributed.use_group()
    return stage_query(run_dir, load_run_config(run_dir), log=lambda *_: None)


def test_query_stage_on_two_ranks_releases_once_what_one_process_releases(tmp_path):
    from privimage.config import load_config
    from privimage.pipeline import load_split, plan_budget, write_run_plan
    from privimage.rundir import RunDir

    cfg = load_config("test")
    assert not cfg.finetune.secure_noise  # the non-secure test mode: the noise is seeded, comparable
    n = len(load_split(cfg, "sensitive"))
    runs = {}
    for world_size in (1, 2):
        run = RunDir(tmp_path / f"world{world_size}")
        run.path.mkdir()
        write_run_plan(run, cfg, plan_budget(cfg, n), n)
        maps = run_ranks(_query_worker, world_size, str(run.path), str(tmp_path / "cache"), world_size > 1,
                         timeout=120)
        assert all(m == maps[0] for m in maps)  # the selection reached every rank
        runs[world_size] = run
    one, two = runs[1], runs[2]
    assert (two.path / "query" / "histogram.npy").read_bytes() == (one.path / "query" / "histogram.npy").read_bytes()
    assert two.load_selection() == one.load_selection()
    assert json.loads(two.budget_path.read_text()) == json.loads(one.budget_path.read_text())  # spent once
    for a, b in zip(two.load_subset(), one.load_subset()):
        assert (a == b).all()


def _sample_worker(rank, world_size, adopt):
    from privimage.diffusion import EDMDenoiser, SamplerConfig, sample_in_batches
    from privimage.models import UNet

    if adopt:
        distributed.use_group()
    torch.manual_seed(0)
    den = EDMDenoiser(UNet(UNET)).eval()
    parts = distributed.my_batches(11, 3)  # 4 batches: ranks 0 and 1 draw 2 each, the last one short
    images, labels = sample_in_batches(den, num=11, shape=(3, 8, 8), num_classes=5, seed=7, batch_size=3,
                                       config=SamplerConfig(num_steps=3), batches=parts)
    assert len(images) == sum(p.stop - p.start for p in parts)
    return distributed.gather_batches(images, parts, 11), distributed.gather_batches(labels, parts, 11)


def test_sampling_on_two_ranks_gathers_the_one_process_images_bit_for_bit():
    ((ref_images, ref_labels),) = run_ranks(_sample_worker, 1, False)
    (images, labels), (none, _) = run_ranks(_sample_worker, 2, True)
    assert none is None  # rank 0 alone holds them
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    assert labels.tolist() == [i % 5 for i in range(11)] and ref_images.float().std() > 0
