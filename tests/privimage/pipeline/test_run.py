"""`privimage run` end to end on the smallest config, then the stage subcommands on its run directory; the same run
as separate stage commands (`privimage query`, `pretrain`, `finetune`, `sample`) gives the same result."""

import json

import numpy as np
import pytest

from privimage.cli import main
from cli_runs import module_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`privimage run --config test` once for the module: (folder of run directories, class cache)."""
    tmp = tmp_path_factory.mktemp("run")
    with module_cli(tmp) as cache:
        assert main(["run", "--config", "test", "--out", str(tmp / "runs")]) == 0
    return tmp / "runs", cache


def test_query_pretrain_finetune_sample_as_separate_commands_equal_privimage_run(runs, tmp_path, monkeypatch):
    """One query stage: `privimage query` then the stage commands make what `privimage run` makes (the test
    config's non-secure test mode makes both reproducible from the seed)."""
    import torch

    out, cache = runs
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    run_dir, whole = tmp_path / "stages", out / "00000-test"
    assert main(["query", "--config", "test", "--run-dir", str(run_dir)]) == 0
    assert main(["pretrain", str(run_dir)]) == 0
    assert main(["finetune", str(run_dir)]) == 0
    assert main(["sample", str(run_dir)]) == 0
    assert np.array_equal(np.load(run_dir / "query" / "histogram.npy"), np.load(whole / "query" / "histogram.npy"))
    for rel in ("query/subset.npz", "samples/samples.npz"):
        with np.load(run_dir / rel) as ours, np.load(whole / rel) as theirs:
            assert ours.files == theirs.files and all(np.array_equal(ours[k], theirs[k]) for k in ours.files), rel
    for rel in ("query/selected_labels.json", "budget.json", "plan.json"):
        assert json.loads((run_dir / rel).read_text()) == json.loads((whole / rel).read_text()), rel
    ours = torch.load(run_dir / "checkpoints" / "finetune.pt", weights_only=False)["ema"]
    theirs = torch.load(whole / "checkpoints" / "finetune.pt", weights_only=False)["ema"]
    assert all(torch.equal(ours["module"][k], theirs["module"][k]) for k in theirs["module"])


def test_run_end_to_end_then_stages(runs, tmp_path, monkeypatch, capsys):
    out, cache = runs
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    run_dir = out / "00000-test"
    for rel in ("config.json", "budget.json", "plan.json", "query/classifier.pt", "query/histogram.npy",
                "query/selected_labels.json", "query/subset.npz", "checkpoints/pretrain.pt",
                "checkpoints/finetune.pt", "logs/pretrain.csv", "logs/finetune.csv", "samples/samples.npz",
                "samples/grid.png", "release/model.safetensors"):
        assert (run_dir / rel).is_file(), rel
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["name"] == "embedded" and config["name"] == "test"
    budget = json.loads((run_dir / "budget.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert budget["spent"] == {"query": 1, "finetune": plan["finetune_steps"]}
    with np.load(run_dir / "samples" / "samples.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (10, 3, 8, 8)
        assert z["labels"].tolist() == [i % 5 for i in range(10)]
    selected = json.loads((run_dir / "query" / "selected_labels.json").read_text())
    assert len(selected["label_map"]) == 5 and selected["per_class"]
    assert np.load(run_dir / "query" / "histogram.npy").shape == (5, 60)

    # The run ends with its release: weights, public config, privacy statement (loud: the test config is the
    # non-secure test mode), the query's DP outputs and the samples grid; no checkpoint, log or private report.
    release = run_dir / "release"
    assert {str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()} == {
        "model.safetensors", "config.json", "privacy.json", "PRIVACY.md", "query/histogram.npy",
        "query/selected_labels.json", "samples.png"}
    assert (release / "samples.png").read_bytes() == (run_dir / "samples" / "grid.png").read_bytes()
    statement = json.loads((release / "privacy.json").read_text())
    assert statement["private"] is False and statement["training"]["ledger"] == budget["spent"]
    assert "NOT PRIVATE" in (release / "PRIVACY.md").read_text()

    # A finished fine-tune resumed spends nothing more; sampling again is free, reproducible, and reads the
    # release, never the private checkpoint.
    assert main(["finetune", str(run_dir), "--resume"]) == 0
    assert json.loads((run_dir / "budget.json").read_text())["spent"] == budget["spent"]
    first = np.load(run_dir / "samples" / "samples.npz")["images"]
    import torch

    import privimage.train as train

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("sampling read a private checkpoint")

    with monkeypatch.context() as m:
        m.setattr(train, "load_checkpoint", no_checkpoint)
        m.setattr(torch, "load", no_checkpoint)
        assert main(["sample", str(run_dir), "--batch-size", "3"]) == 0
    assert np.array_equal(np.load(run_dir / "samples" / "samples.npz")["images"], first)
    # Without a release, sampling exports it first (from the finished fine-tune), then samples the same images.
    import shutil

    shutil.rmtree(release)
    assert main(["sample", str(run_dir)]) == 0
    assert (release / "model.safetensors").is_file() and (release / "privacy.json").is_file()
    assert np.array_equal(np.load(run_dir / "samples" / "samples.npz")["images"], first)
    assert main(["export", str(run_dir)]) == 0 and (release / "samples.png").is_file()
    # A fresh fine-tune over it is refused: its releases stay counted.
    assert main(["finetune", str(run_dir)]) == 2
    assert "refusing to start afresh" in capsys.readouterr().err

    # A bad option names the value.
    assert main(["run", "--config", "nope", "--out", str(tmp_path / "runs")]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_config_file_overrides_and_errors(tmp_path):
    from privimage.config import CONFIGS, load_config

    path = tmp_path / "c.json"
    path.write_text(json.dumps({"base": "test", "epsilon": 3.0, "finetune": {"num_noise": 4}}))
    cfg = load_config(str(path))
    assert cfg.epsilon == 3.0 and cfg.finetune.num_noise == 4 and cfg.model == CONFIGS["test"].model
    path.write_text(json.dumps({"finetune": {"noise": 4}}))
    with pytest.raises(ValueError, match="noise"):
        load_config(str(path))
    path.write_text(json.dumps({"epsilon": -1}))
    with pytest.raises(ValueError, match="epsilon=-1"):
        load_config(str(path))
    path.write_text(json.dumps({"pretrain": {"loader": "mmap"}}))
    with pytest.raises(ValueError, match="pretrain.loader"):
        load_config(str(path))
    with pytest.raises(ValueError, match="batch_size=100000"):
        CONFIGS["test"].finetune.__class__(batch_size=100000).sample_rate(64)


def test_dry_run_prints_config_and_calibrated_noise(tmp_path, capsys):
    assert main(["run", "--config", "test", "--dry-run", "--epsilon", "5", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["epsilon"] == 5.0 and out["config"]["name"] == "test"
    privacy = out["privacy"]
    # test config: 64 sensitive images, expected batch 16 -> q = 0.25, 2 epochs -> 8 steps
    assert privacy["finetune_sample_rate"] == 0.25 and privacy["finetune_steps"] == 8
    assert privacy["finetune_noise_multiplier"] > 0 and privacy["epsilon_planned"] <= 5.0
    assert not any(tmp_path.iterdir())  # nothing written


def test_finetune_stage_passes_the_compile_setting(tmp_path, monkeypatch):
    """`finetune.compile` in a run config reaches the DP fine-tuning loop (and so DPEngine's compile)."""
    import privimage.pipeline as pipeline
    import torch

    import privimage.train as train
    from privimage.config import RunConfig, load_config
    from privimage.engine import Mechanism, PrivacyBudget
    from privimage.privacy import FINETUNE, QUERY

    cfg = RunConfig.from_dict({"pretrain": {"steps": 0}, "finetune": {"compile": True}}, base=load_config("test"))
    budget = PrivacyBudget(10.0, 1e-5, plan={QUERY: Mechanism(5.0, 1.0, 1), FINETUNE: Mechanism(1.0, 0.1, 2)})
    (tmp_path / "budget.json").write_text(json.dumps(budget.state_dict()))
    seen = {}
    monkeypatch.setattr(train, "finetune", lambda run_dir, config, **kwargs: seen.update(config=config) or run_dir)
    monkeypatch.setattr(pipeline, "_model_config", lambda *args: None)  # the model needs the query's outputs
    pipeline.stage_finetune(tmp_path, cfg, log=lambda _: None)
    assert seen["config"].compile is True
