"""`privimage run` with the GAN generator (kind "gan", PRIVIMAGE+G) end to end on the smallest GAN config: the
same run directory, release, samples, grid and report as the diffusion run; the release holds only public
things; the ledger counts the query and every discriminator step; a run stopped mid fine-tune and resumed
equals an uninterrupted one (test mode), and so does the run under `torchrun` on 2 ranks (float tolerance);
configs that mix the two kinds are refused by name."""

import errno
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from privimage.cli import main
from privimage.config import CONFIGS, RunConfig, config_from_json
from privimage.errors import ConfigError, StorageError
from privimage.models import Generator
from privimage.models.gan import GANConfig
from privimage.release import load_release_generator
from privimage.rundir import RunDir
from ranks import torchrun
from release_checks import assert_release_holds_no_secret, key_encodings
from cli_runs import module_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: test-gan with the secure fine-tune (the release check needs real secrets) and the evaluation on.
SECURE = {"base": "test-gan", "evaluate": True, "finetune": {"secure_noise": True}}
#: test-gan (test mode) with 64-channel networks: GroupNorms of 2 channels a group, so that no parameter's gradient
#: is exactly zero (a conv bias before a one-channel-a-group norm), which Adam would turn into lr-sized steps of
#: rounding noise that no other summation order (2 ranks) reproduces.
WIDE = {"base": "test-gan", "model_overrides": {"g_width": 32, "d_width": 32, "d_ch_mult": [2, 2]}}


def _run(tmp, config: dict | str, out: str) -> "RunDir":
    if isinstance(config, dict):
        path = tmp / f"{out}.json"
        path.write_text(json.dumps(config))
        config = str(path)
    assert main(["run", "--config", config, "--out", str(tmp / out)]) == 0
    (run_dir,) = (tmp / out).iterdir()
    return RunDir(run_dir)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gan")
    with module_cli(tmp):
        return _run(tmp, SECURE, "runs")


def test_a_gan_run_makes_the_run_directory_release_samples_grid_and_report(secure_run):
    run = secure_run
    for rel in ("config.json", "budget.json", "plan.json", "query/histogram.npy", "query/selected_labels.json",
                "query/subset.npz", "checkpoints/pretrain.pt", "checkpoints/finetune.pt", "logs/pretrain.csv",
                "logs/finetune.csv", "logs/timings.json", "samples/samples.npz", "samples/grid.png",
                "samples/pretrain.png", "release/model.safetensors", "release/config.json", "release/privacy.json",
                "release/PRIVACY.md", "release/samples.png", "release/report.json", "release/report.md"):
        assert (run.path / rel).is_file(), rel
    cfg = run.load_config()
    assert cfg == config_from_json(json.dumps(SECURE), source="test") and cfg.kind == "gan"
    assert "num_steps" not in json.loads(run.config_path.read_text())["sample"]
    assert run.load_checkpoint("pretrain", model_kind="gan")["step"] == cfg.pretrain.steps
    # the ledger: the query once and every discriminator step of the plan, within the budget
    budget, plan = run.load_budget(), run.load_plan()
    assert dict(budget.spent) == {"query": 1, "finetune": plan["finetune_steps"]}
    assert plan["finetune_steps"] == cfg.finetune.steps(64) == 8
    assert budget.epsilon_spent().upper <= cfg.epsilon
    # samples: one forward per image, balanced labels, as many as configured
    images, labels = run.load_samples()
    classes = len(run.load_selection()["sensitive_class_names"])
    assert images.dtype == np.uint8 and images.shape == (cfg.sample.num_samples, 3, 8, 8)
    assert labels.tolist() == [i % classes for i in range(cfg.sample.num_samples)]
    statement = json.loads(run.release_privacy_path.read_text())
    assert statement["private"] is True and statement["training"]["ledger"] == dict(budget.spent)
    ft = statement["mechanisms"]["finetune"]
    assert ft["model"] == "gan" and "discriminator" in ft["mechanism"] and ft["steps"] == 8
    assert json.loads(run.public_report_path.read_text())


def test_the_gan_release_holds_the_ema_generator_and_no_secret(secure_run):
    run = secure_run
    state = run.load_checkpoint("finetune", model_kind="gan")
    assert state["sampler"]["secure"] and state["record_randomness"]["secure"]
    gan = GANConfig.from_dict(state["gan"])
    with safe_open(str(run.release_model_path), framework="pt") as f:
        names, metadata = set(f.keys()), f.metadata()
        tensors = {name: f.get_tensor(name) for name in names}
    assert names == set(Generator(gan).state_dict())  # the generator only: no discriminator, no EMA prefix
    assert all(torch.equal(t, state["ema"]["module"][n]) for n, t in tensors.items())  # the EMA weights
    assert any(not torch.equal(t, state["generator"][n]) for n, t in tensors.items())
    assert set(metadata) == {"format", "gan_config", "weights"} and metadata["weights"] == "ema"
    generator = load_release_generator(run)
    assert generator.config == gan and not generator.training
    assert all(torch.equal(p, tensors[n]) for n, p in generator.state_dict().items())
    key = state["record_randomness"]["key"]
    secrets = {"sampler seed": str(state["sampler"]["seed"]).encode(),
               "sampler seed (hex)": f"{state['sampler']['seed']:x}".encode(),
               **{f"per-record key ({how})": value for how, value in key_encodings(key).items()},
               "noise generator state": bytes(state["noise_generator"][1000:1032].tolist())}
    secrets.update({f"logged d_loss {row['d_loss']}": repr(row["d_loss"]).encode() for row in state["log"]})
    assert_release_holds_no_secret(run.release_dir, secrets)


def test_gan_sample_command_redraws_the_same_images_and_refuses_sampler_flags(secure_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(secure_run.path, run_dir)
    before, _ = RunDir(run_dir).load_samples()
    assert main(["sample", str(run_dir), "--batch-size", "3"]) == 0
    after, _ = RunDir(run_dir).load_samples()
    assert np.array_equal(before, after)  # per-image seeds: the same images at any batch size
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--guidance", "2"]) == 2
    assert "--guidance: diffusion sampler settings" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The WIDE test-mode run in one process: (run directory, its cache)."""
    tmp = tmp_path_factory.mktemp("gan-reference")
    with module_cli(tmp) as cache:
        return _run(tmp, WIDE, "reference"), cache


def test_resume_mid_fine_tune_equals_an_uninterrupted_gan_run(reference_run, tmp_path, monkeypatch, capsys):
    reference, cache = reference_run
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(cache))
    save = RunDir.save_checkpoint
    writes = []

    def failing(run, stage, state):  # the fine-tune's second checkpoint (step 4 of 8) hits a full disk
        writes.append(stage)
        if stage == "finetune" and writes.count("finetune") == 2:
            raise StorageError(run.checkpoint_path(stage), OSError(errno.ENOSPC, "No space left on device"))
        return save(run, stage, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", failing)
    config = tmp_path / "wide.json"
    config.write_text(json.dumps(WIDE))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "stopped")]) == 2
    (run_dir,) = (tmp_path / "stopped").iterdir()
    run = RunDir(run_dir)
    assert run.load_checkpoint("finetune", model_kind="gan")["step"] == 2
    assert run.load_budget().spent["finetune"] == 4  # the ledger was written before the checkpoint that failed
    assert not run.release_dir.exists()
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 0, capsys.readouterr().err
    ours, theirs = (r.load_checkpoint("finetune", model_kind="gan") for r in (run, reference))
    assert ours["budget"]["spent"] == theirs["budget"]["spent"] == {"query": 1, "finetune": 8}
    assert run.load_budget().spent == reference.load_budget().spent
    for part in ("generator", "discriminator"):
        assert all(torch.equal(ours[part][k], v) for k, v in theirs[part].items()), part
    assert np.array_equal(run.load_samples()[0], reference.load_samples()[0])
    released, ref_released = (load_release_generator(r).state_dict() for r in (run, reference))
    assert all(torch.equal(released[k], v) for k, v in ref_released.items())


@pytest.mark.slow
def test_a_gan_run_under_torchrun_on_two_ranks_equals_the_one_process_run(reference_run, tmp_path):
    reference, cache = reference_run
    config = tmp_path / "wide.json"
    config.write_text(json.dumps(WIDE))
    torchrun("run", "--config", config, "--out", tmp_path / "two", cache=cache)
    (run_dir,) = (tmp_path / "two").iterdir()  # one run directory: rank 1 made none
    run = RunDir(run_dir)
    launch = json.loads(run.config_path.read_text())["launch"]
    assert {k: launch[k] for k in ("world_size", "backend")} == {"world_size": 2, "backend": "gloo"}
    assert launch["torchrun_id"]  # the job id torchrun's --standalone drew (a restart resumes this run)
    assert json.loads(run.budget_path.read_text()) == json.loads(reference.budget_path.read_text())
    for stage, parts, losses in (("pretrain", ("generator", "discriminator", "ema"), ("d_loss", "g_loss")),
                                 ("finetune", ("generator", "discriminator", "ema"), ("d_loss", "g_loss"))):
        ours, theirs = (r.load_checkpoint(stage, model_kind="gan") for r in (run, reference))
        assert ours["step"] == theirs["step"] == ours["steps"]
        assert [r["epsilon"] for r in ours["log"]] == [r["epsilon"] for r in theirs["log"]]
        for key in losses:  # g_loss is None before the first generator step
            assert [r[key] is None for r in ours["log"]] == [r[key] is None for r in theirs["log"]]
            assert ([r[key] for r in ours["log"] if r[key] is not None]
                    == pytest.approx([r[key] for r in theirs["log"] if r[key] is not None], rel=1e-4, abs=1e-6))
        for part in parts:
            for k, v in theirs[part].items():
                torch.testing.assert_close(ours[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{stage} {part}.{k}")
    ours, theirs = (r.load_checkpoint("finetune", model_kind="gan") for r in (run, reference))
    # the checkpoint does not depend on the world size: the same secrets as one process's
    assert ours["sampler"] == theirs["sampler"] and ours["record_randomness"] == theirs["record_randomness"]
    assert torch.equal(ours["noise_generator"], theirs["noise_generator"])
    # samples from the released generator, each rank its batches: the same images up to the weights' rounding
    (images, labels), (ref_images, ref_labels) = run.load_samples(), reference.load_samples()
    assert np.array_equal(labels, ref_labels)
    assert np.abs(images.astype(int) - ref_images.astype(int)).max() <= 1
    assert (run.release_model_path.is_file() and not (run.path / ".lock").exists())


@pytest.mark.parametrize("config, match", [
    ({"base": "test-gan", "finetune": {"num_noise": 2}}, "finetune.num_noise is a diffusion setting.*kind='gan'"),
    ({"base": "test-gan", "pretrain": {"label_dropout": 0.1}}, "pretrain.label_dropout is a diffusion setting"),
    ({"base": "test-gan", "sample": {"guidance": 1.0}}, "sample.guidance is a diffusion setting"),
    ({"base": "test-gan", "model_overrides": {"nf": 8}}, "model_overrides.nf is a UNet setting"),
    ({"base": "test-gan", "model": "s"}, "model='s': expected a GAN preset"),
    ({"base": "test", "finetune": {"d_steps_per_g_step": 2}}, "finetune.d_steps_per_g_step is a gan setting"),
    ({"base": "test", "pretrain": {"g_lr": 1e-3}}, "pretrain.g_lr is a gan setting.*kind='diffusion'"),
    ({"base": "test", "model_overrides": {"g_width": 8}}, "model_overrides.g_width is a GAN setting"),
    ({"base": "test", "kind": "gann"}, "kind='gann'.*did you mean 'gan'"),
    ({"base": "test-gan", "finetune": {"betas": [0.5]}}, r"finetune.betas=\(0.5,\): expected two numbers"),
    ({"base": "test-gan", "pretrain": {"d_steps_per_g_step": 0}}, "pretrain.d_steps_per_g_step=0"),
])
def test_a_config_mixing_the_kinds_is_a_config_error_naming_the_key(tmp_path, capsys, config, match):
    with pytest.raises(ConfigError, match=match):
        config_from_json(json.dumps(config), source="x.json")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    assert main(["run", "--config", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback


def test_the_gan_presets_load_and_a_kind_switch_takes_the_kinds_own_sections():
    for name in ("demo-gan", "test-gan", "cifar10-gan-eps1", "cifar10-gan-eps10"):
        cfg = CONFIGS[name]
        assert cfg.kind == "gan" and RunConfig.from_dict(cfg.to_dict(), CONFIGS["demo"]) == cfg, name
    assert CONFIGS["cifar10-gan-eps1"].finetune.max_grad_norm == 1e-3
    switched = config_from_json(json.dumps({"base": "test", "kind": "gan", "model": "tiny"}), source="x")
    assert type(switched.finetune).__name__ == "GANFinetuneConfig" and switched.model_overrides == {}
    with pytest.raises(ConfigError, match="pretrain: a PretrainConfig section with kind='gan'"):
        RunConfig(kind="gan", model="demo")
