"""Everything is checked before anything is written or spent, and every bad input is one line naming it
(exit code 2): config values by key path, data specs, the device, delta >= 1/n, --out, file-system faults."""

import errno
import json

import pytest

from privimage.cli import main
from privimage.config import CONFIGS, RunConfig
from privimage.errors import ConfigError, DataError, PrivacyError


@pytest.mark.parametrize("override, message", [
    ({"data": "oops"}, "data: expected a section (a JSON object with keys among sensitive,"),
    ({"pretrain": {"steps": 2.5}}, "pretrain.steps: expected an integer, got 2.5"),
    ({"pretrain": {"steps": "ten"}}, "pretrain.steps: expected an integer, got 'ten' (a string)"),
    ({"pretrain": {"steps": True}}, "pretrain.steps: expected an integer, got True"),
    ({"pretrain": {"checkpoint_every": 0}}, "pretrain.checkpoint_every=0: expected an integer >= 1"),
    ({"finetune": {"lr": "1e-3"}}, "finetune.lr: expected a number, got '1e-3'"),
    ({"finetune": {"method": "bk-mix"}}, "finetune.method='bk-mix': expected one of bk-mixed, ghost, vmap, loop; "
                                        "did you mean 'bk-mixed'?"),
    ({"finetune": {"compile": True, "method": "ghost"}}, "finetune.compile=True: expected false with"),
    ({"finetune": {"noise": 4}}, "Unknown config key finetune.noise; did you mean 'num_noise'?"),
    ({"epsiln": 1}, "Unknown config key epsiln; did you mean 'epsilon'?"),
    ({"epsilon": float("nan")}, "epsilon: expected a finite number, got nan"),
    ({"epsilon": 1e9}, "epsilon=1000000000.0: expected a finite number in (0, 100]"),
    ({"delta": 1}, "delta=1.0: expected a number in (0, 1)"),
    ({"name": "../../etc"}, "name='../../etc': expected 1-64 letters"),
    ({"device": "gpu"}, "device='gpu': expected auto, cpu, cuda or cuda:N"),
    ({"model": "tinny"}, "did you mean 'tiny'?"),
    ({"model_overrides": {"nf": "8"}}, "model_overrides.nf: expected an integer, got '8'"),
    ({"model_overrides": {"resolution": 16}}, "model_overrides='resolution': expected keys among"),
    ({"model_overrides": {"dropout": 0.1}}, "model_overrides.dropout=0.1: expected 0: the DP fine-tune refuses"),
    ({"model_overrides": {"ch_mult": [1, 2, 2, 2, 2]}}, "resolution=8 is not divisible by 2**4"),
    ({"data": {"sensitive": "embeded:sensitive"}}, "unknown data set 'embeded'; did you mean 'embedded'?"),
    ({"data": {"sensitive": "cifar10"}}, "cifar10 has no split 'sensitive' (its splits: train, test)"),
    ({"data": {"public": "embedded:public,size=0"}}, "size=0 is not in [1,"),
    ({"data": {"pad_to": 32}}, "data.pad_to=32: expected null or data.resolution=8"),
    ({"sample": {"num_steps": 1}}, "sample.num_steps=1: expected an integer >= 2"),
    ({"query": {"max_per_label": 0}}, "query.max_per_label=0: expected null (no cap) or an integer >= 1"),
])
def test_every_bad_value_is_named_by_its_key_path(override, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(override, CONFIGS["test"])
    assert message in str(err.value)


def test_every_preset_is_valid_and_round_trips_through_json():
    from privimage.rundir import config_json

    for name, cfg in CONFIGS.items():
        d = json.loads(json.dumps(config_json(cfg)))
        for key in ("name", "root"):
            d["data"].pop(key)
        d["data"]["resolution"] = d["data"]["resolution"] or d["data"]["pad_to"]
        assert RunConfig.from_dict(d, CONFIGS["demo"]) == cfg, name


def test_lossless_conversions_only():
    cfg = RunConfig.from_dict({"pretrain": {"steps": 3.0}, "finetune": {"lr": 1}}, CONFIGS["test"])
    assert cfg.pretrain.steps == 3 and type(cfg.pretrain.steps) is int
    assert cfg.finetune.lr == 1.0 and type(cfg.finetune.lr) is float


def _run(tmp_path, capsys, *args, config=None):
    """`privimage run --dry-run` in-process: (exit code, stderr lines); asserts nothing was written."""
    argv = ["run", "--out", str(tmp_path / "runs"), *args]
    if config is not None:
        (tmp_path / "c.json").write_text(config if isinstance(config, str) else json.dumps(config))
        argv += ["--config", str(tmp_path / "c.json")]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "runs").exists()
    return code, err


@pytest.mark.parametrize("config, message", [
    ({"base": "test", "data": "oops"}, "c.json: data: expected a section"),
    ({"base": "test", "finetune": {"method": "bk-mix"}}, "did you mean 'bk-mixed'?"),
    ('{"base": "test", "epsilon": Infinity}', "epsilon: expected a finite number, got inf"),
    ('{"base": "test",', "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got [1, 2] (a list)"),
    ({"base": "tst"}, "base='tst' is not a preset"),
    ({"base": "test", "delta": 0.5}, "delta=0.5 is not below 1/n = 0.0156 for n=64 sensitive images"),
    ({"base": "test", "query": {"top_k": 61}}, "query.top_k=61 exceeds the 60 public classes"),
    ({"base": "test", "query": {"top_n": 400}}, "5 sensitive classes x 80 public classes each exceed the 60"),
    ({"base": "test", "finetune": {"batch_size": 65}}, "finetune.batch_size=65 exceeds the 64 sensitive images"),
    ({"base": "test", "finetune": {"epochs": 100000, "batch_size": 1}},
     "at most 1000000 DP-SGD steps (epochs x N / batch_size gives 6400000)"),
    ({"base": "test", "device": "cuda"}, "device='cuda' was asked for, but no CUDA device is available"),
])
def test_bad_configs_fail_before_anything_is_written_with_one_line(tmp_path, capsys, config, message):
    for dry in ([], ["--dry-run"]):  # the run and --dry-run check the same things
        code, err = _run(tmp_path, capsys, *dry, config=config)
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_delta_above_one_over_n_is_refused_and_the_override_is_stated(tmp_path, capsys):
    from privimage.preflight import check_delta, large_delta_note

    with pytest.raises(PrivacyError, match=r"Use delta <= 1/\(10 n\) = 0.0016"):
        check_delta(0.5, 64)
    assert check_delta(1e-3, 64) is None
    assert "NOT a meaningful privacy guarantee" in check_delta(0.5, 64, allow=True)
    assert large_delta_note(1 / 64, 64) is not None and large_delta_note(1e-3, 64) is None
    assert main(["budget", "--epsilon", "10", "--delta", "0.5", "--sample-rate", "0.1", "--steps", "10",
                 "--num-examples", "64"]) == 2
    assert "delta=0.5 is not below 1/n" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"base": "test", "delta": 0.5}))
    assert main(["run", "--config", str(tmp_path / "c.json"), "--allow-large-delta", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["allow_large_delta"] and "NOT a meaningful" in out["privacy"]["large_delta"]


def test_the_release_statement_and_the_reports_say_when_delta_was_allowed_above_one_over_n(tmp_path):
    from privimage.evaluate.markdown import privacy_markdown
    from privimage.evaluate.privacy import generator_privacy, privacy_summary
    from privimage.release import _statement, _statement_markdown
    from privimage.rundir import RunDir

    run = RunDir(tmp_path)
    from privimage.engine import Mechanism, PrivacyBudget

    run.save_budget(PrivacyBudget(8.0, 0.5, plan={"finetune": Mechanism(1.0, 0.25, 2)}))
    run.save_plan({"num_sensitive": 64})
    gen = generator_privacy(run.path)
    assert "NOT a meaningful" in gen["large_delta"]
    assert "NOT a meaningful" in "\n".join(privacy_markdown(privacy_summary(gen, [])))
    statement = _statement(run, {"secure": True, "num_examples": 64})
    assert "NOT a meaningful" in statement["large_delta"] and statement["large_delta"] in statement["not_covered"]
    assert "NOT a meaningful" in _statement_markdown(statement)


@pytest.mark.parametrize("argv, message", [
    (["run", "--epsilon", "inf"], "argument --epsilon: inf is not a finite number > 0: an infinite epsilon"),
    (["run", "--epsilon", "nan"], "argument --epsilon: nan is not a finite number"),
    (["run", "--seed", "-1"], "argument --seed: -1 is not an integer in [0, 2**63)"),
    (["run", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["sample", "x", "--steps", "zero"], "argument --steps: 'zero' is not an integer"),
    (["budget", "--epsilon", "1", "--delta", "2", "--sample-rate", "0.1", "--steps", "1"], "2 is not in (0, 1)"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err


def test_out_naming_a_file_or_a_path_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in ("afile", "afile/sub"):
        for dry in ([], ["--dry-run"]):
            assert main(["run", "--config", "test", "--out", str(tmp_path / out), *dry]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{tmp_path / 'afile'} is a file, not a folder" in err[0], err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_refused_run_directory_is_one_line_naming_the_folder(tmp_path, capsys, monkeypatch, code):
    import os
    from pathlib import Path

    real = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.parent == tmp_path / "runs":
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["run", "--config", "test", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"could not write {tmp_path / 'runs'}: {os.strerror(code)} ({errno.errorcode[code]})" \
        in err[0], err
    assert list((tmp_path / "runs").iterdir()) == []


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVIMAGE_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["run", "--config", "nope", "--out", str(tmp_path)])


def test_data_spec_checks_name_the_spec_and_the_file(tmp_path, cifar10_writer, imagenet_npz_writer):
    import numpy as np

    from privimage.data import inspect_spec

    with pytest.raises(DataError, match="needs root="):
        inspect_spec("cifar10:train", "sensitive")
    with pytest.raises(DataError, match="is not a folder"):
        inspect_spec(f"cifar10:train,root={tmp_path / 'none'}", "sensitive")
    folder, *_ = cifar10_writer(tmp_path / "c", np.random.default_rng(0))
    info = inspect_spec(f"cifar10:train,root={tmp_path / 'c'}", "sensitive")
    assert (info.num_classes, info.channels, info.resolution) == (10, 3, 32)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: missing"):
        inspect_spec(f"cifar10:train,root={tmp_path / 'c'}", "sensitive")
    imagenet_npz_writer(tmp_path / "i", np.random.default_rng(0), side=32, labels={"train_data_batch_1": [1, 2, 3]})
    info = inspect_spec(f"imagenet32:train,root={tmp_path / 'i'}", "public")
    assert (info.num_classes, info.size, info.resolution) == (1000, 3, 32)
    with pytest.raises(DataError, match=r"rows of 3072 bytes; expected 3x64x64"):
        inspect_spec(f"imagenet64:train,root={tmp_path / 'i'}", "public")
    (tmp_path / "i" / "train_data_batch_1.npz").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(DataError, match="train_data_batch_1.npz: truncated or corrupt npz"):
        inspect_spec(f"imagenet32:train,root={tmp_path / 'i'}", "public")


def test_stage_commands_check_first_and_name_what_is_missing(tmp_path, capsys):
    from privimage.engine import Mechanism, PrivacyBudget
    from privimage.rundir import RunDir

    budget = PrivacyBudget(8.0, 1e-4, plan={"query": Mechanism(5.0), "finetune": Mechanism(1.0, 0.25, 2)})
    with RunDir.create(tmp_path, "test", command="test", config=CONFIGS["test"], budget=budget, plan={},
                       log=lambda *_: None) as run:
        pass
    files = sorted(p.name for p in run.path.iterdir())
    assert main(["finetune", str(run.path), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["checked"]["data.sensitive"] == "generated (no files)"
    for argv, message in ((["pretrain", str(run.path)], "subset.npz does not exist: run the query stage first"),
                          (["finetune", str(run.path)], "pretrain.pt does not exist: the pretrain stage has not checkpointed"),
                          (["sample", str(run.path)], "finetune.pt does not exist"),
                          (["export", str(run.path)], "finetune.pt does not exist"),
                          (["evaluate", str(run.path)], "samples.npz does not exist: run `privimage sample"),
                          (["finetune", str(tmp_path)], "is not a run directory: it has no config.json"),
                          (["finetune", str(run.path), "--sensitive-root", str(tmp_path)],
                           "unknown key 'root' for embedded")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert sorted(p.name for p in run.path.iterdir()) == files  # nothing written, no lock left
