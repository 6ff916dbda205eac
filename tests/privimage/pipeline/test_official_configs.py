"""The official presets (cifar10 / celeba32 / celeba64 at eps 1, 5, 10) on tiny files in the real formats:
``--dry-run`` with the command line's roots, every split each preset needs through the loaders the pipeline,
``privimage finetune --resume`` and the evaluation use, and a whole official run with tiny training settings."""

import doctest
import json

import numpy as np
import pytest
import torch

from privimage.cli import build_parser, main
from privimage.commands.run import resolve
from privimage.config import CONFIGS
from privimage.evaluate.report import load_real
from privimage.io import save_json
from privimage.pipeline import config_json, load_run_config, load_split

OFFICIAL = [f"{ds}-eps{eps}" for ds in ("cifar10", "celeba32", "celeba64") for eps in (1, 5, 10)]
# One public image of each of the 1000 ImageNet classes, so whatever classes the noisy query picks have images.
PUBLIC_LABELS = {"train_data_batch_1": list(range(1, 501)), "train_data_batch_2": list(range(501, 1001))}
CELEBA_PARTITIONS = (0, 0, 0, 0, 0, 0, 1, 2, 2, 2)  # 6 train, 1 valid, 3 test
# (sensitive images, sensitive_test images, sensitive classes, resolution) of the tiny files per preset family
EXPECTED = {"cifar10": (20, 4, 10, 32), "celeba32": (6, 3, 2, 32), "celeba64": (6, 3, 2, 64)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def roots(tmp_path_factory, cifar10_writer, celeba_writer, imagenet_npz_writer):
    """Folders of tiny files in the real formats: cifar10, celeba, imagenet32, imagenet64."""
    base, rng = tmp_path_factory.mktemp("data"), np.random.default_rng(0)
    cifar10_writer(base / "cifar10", rng)
    celeba_writer(base / "celeba", rng, partitions=CELEBA_PARTITIONS)
    for side in (32, 64):
        imagenet_npz_writer(base / f"imagenet{side}", rng, side=side, labels=PUBLIC_LABELS)
    return {name: base / name for name in ("cifar10", "celeba", "imagenet32", "imagenet64")}


def _root_args(name, roots):
    sensitive = roots["cifar10" if name.startswith("cifar10") else "celeba"]
    public = roots["imagenet64" if name.startswith("celeba64") else "imagenet32"]
    return ["--sensitive-root", str(sensitive), "--public-root", str(public)]


# One preset per data set (the calibration takes ~10-40 s each on the shared CPU; the roots work the same for all).
@pytest.mark.parametrize("name", ["cifar10-eps1", "celeba32-eps5", "celeba64-eps10"])
def test_dry_run_takes_the_roots_and_plans_the_standard_split(name, roots, tmp_path, capsys):
    assert main(["run", "--config", name, "--dry-run", *_root_args(name, roots), "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    data, privacy = out["config"]["data"], out["privacy"]
    sensitive_root, public_root = _root_args(name, roots)[1::2]
    assert data["sensitive"].endswith(f",root={sensitive_root}")
    assert data["sensitive_test"].endswith(f",root={sensitive_root}")
    assert data["public"].endswith(f",root={public_root}") and data["root"] == sensitive_root
    # Without reading the files, the dry run sizes the split by its standard size (and says so).
    n = 50_000 if name.startswith("cifar10") else 162_770
    assert privacy["num_sensitive"] == n and "standard size" in privacy["num_sensitive_from"]
    assert privacy["finetune_sample_rate"] == 16384 / n and privacy["finetune_steps"] == round(50 * n / 16384)
    assert privacy["epsilon_planned"] <= out["config"]["epsilon"] and privacy["finetune_noise_multiplier"] > 0
    assert not any(tmp_path.iterdir())


def test_official_delta_is_below_one_over_n():
    """A delta of 1/n or more permits releasing one person's record in the clear."""
    for name in OFFICIAL:
        n = 50_000 if name.startswith("cifar10") else 162_770
        assert CONFIGS[name].delta < 1 / n, name


def test_config_docstring_examples():
    import privimage.config

    result = doctest.testmod(privimage.config)
    assert result.attempted > 0 and result.failed == 0


def test_a_missing_root_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--config", "cifar10-eps10", "--dry-run", "--sensitive-root", str(tmp_path / "nope")]) == 2
    assert "--sensitive-root" in capsys.readouterr().err


def _official_config(name, roots):
    """The config exactly as `privimage run --config NAME --sensitive-root .. --public-root ..` resolves it."""
    return resolve(build_parser().parse_args(["run", "--config", name, *_root_args(name, roots)]))


@pytest.mark.parametrize("name", OFFICIAL)
def test_every_split_loads_for_the_pipeline_and_the_resume(name, roots, tmp_path):
    cfg = _official_config(name, roots)
    n_train, n_test, classes, resolution = EXPECTED[name.rsplit("-", 1)[0]]
    splits = {which: load_split(cfg, which) for which in ("sensitive", "sensitive_test", "public")}
    for which, n, k in (("sensitive", n_train, classes), ("sensitive_test", n_test, classes), ("public", 1000, 1000)):
        ds = splits[which]
        assert ds.images.shape == (n, 3, resolution, resolution) and ds.images.dtype == torch.uint8, which
        assert ds.num_classes == k and 0 <= int(ds.labels.min()) and int(ds.labels.max()) < k, which
    # `privimage finetune RUN --resume` rebuilds the config from config.json: the roots come with it.
    save_json(config_json(cfg), tmp_path / "config.json")
    assert torch.equal(load_split(load_run_config(tmp_path), "sensitive").images, splits["sensitive"].images)


# The evaluation reads the real test set through its own config.json reader: the same split as the pipeline.
@pytest.mark.parametrize("name", ["cifar10-eps10", "celeba64-eps10"])
def test_the_evaluation_reads_the_same_held_out_split(name, roots):
    cfg = _official_config(name, roots)
    expected = load_split(cfg, "sensitive_test")
    images, labels = load_real(json.loads(json.dumps(config_json(cfg))), split="sensitive_test")
    assert torch.equal(images, expected.images) and torch.equal(labels, expected.labels)


# Everything but the data specs and the privacy settings shrunk so an official preset runs in seconds (the
# native resolutions are checked above; 16x16 keeps the pre-training's end-of-run sample grid cheap).
TINY = {"data": {"resolution": 16},
        "model": "tiny", "model_overrides": {"nf": 8, "ch_mult": [1], "attn_resolutions": []},
        "query": {"classifier_width": 4, "classifier_epochs": 1},
        "pretrain": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "sample_every": 0, "log_every": 1},
        "finetune": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "num_noise": 1},
        "sample": {"num_samples": 10, "batch_size": 10, "num_steps": 2, "grid_per_class": 1}}


@pytest.mark.parametrize("name", ["cifar10-eps10", "celeba64-eps1"])
def test_official_run_on_tiny_files(name, roots, tmp_path, monkeypatch):
    """query -> pre-train -> DP fine-tune -> samples (the evaluation's reading is the test above)."""
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"base": name, **TINY}))
    assert main(["run", "--config", str(config), *_root_args(name, roots), "--no-evaluate",
                 "--out", str(tmp_path / "runs")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    n_train, _, classes, _ = EXPECTED[name.rsplit("-", 1)[0]]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["num_sensitive"] == n_train  # the run plans with the loaded data, not the standard size
    budget = json.loads((run_dir / "budget.json").read_text())
    assert budget["spent"] == {"query": 1, "finetune": plan["finetune_steps"]}
    selected = json.loads((run_dir / "query" / "selected_labels.json").read_text())
    assert len(selected["label_map"]) == 50 and len(selected["sensitive_class_names"]) == classes
    assert np.load(run_dir / "query" / "histogram.npy").shape == (classes, 1000)
    with np.load(run_dir / "samples" / "samples.npz") as z:
        assert z["images"].shape == (10, 3, 16, 16)
    assert json.loads((run_dir / "config.json").read_text())["data"]["root"] == _root_args(name, roots)[1]
