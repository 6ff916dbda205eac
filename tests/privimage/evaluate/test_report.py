"""privimage evaluate on a fake run directory: report files exist, parse, and label every metric's kind."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from privimage.cli import main
from privimage.data import load_dataset
from privimage.engine import Mechanism, PrivacyBudget
from privimage.evaluate.classify import CAConfig, SmallCNN
from privimage.evaluate.inception import FIDInceptionV3
from privimage.evaluate.report import EvaluateOptions, evaluate_run
from privimage.io import save_json

TINY_CA = CAConfig(arch="cnn", width=8, epochs=2, batch_size=20, lr=0.05)


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    """A run directory as `privimage run` writes it (issue 7), with embedded data standing in for samples."""
    monkeypatch.delenv("PRIVIMAGE_INCEPTION_WEIGHTS", raising=False)
    run = tmp_path / "00001-demo"
    save_json({"data": {"name": "embedded"}, "name": "demo", "launch": {"world_size": 2, "backend": "gloo"}},
              run / "config.json")
    budget = PrivacyBudget(10.0, 1e-5, plan={"query": Mechanism(5.0, 1.0, 1), "finetune": Mechanism(1.0, 0.01, 100)},
                           spent={"query": 1, "finetune": 50})
    save_json(budget.state_dict(), run / "budget.json")
    fake = load_dataset("embedded", split="sensitive", size=40, seed=5)
    (run / "samples").mkdir()
    np.savez(run / "samples" / "samples.npz", images=fake.images.numpy(), labels=fake.labels.numpy())
    (run / "logs").mkdir()
    (run / "logs" / "finetune.csv").write_text(
        "step,loss,epsilon,images_per_s\n" + "".join(f"{s},{1 / (s + 1):.4f},{0.01 * s:.3f},100\n" for s in range(50)))
    (run / "logs" / "pretrain.csv").write_text("step,loss,epsilon,images_per_s\n0,2.0,0.0,50\n10,1.5,0.0,51\n20,1.2,,52\n")
    (run / "query").mkdir()
    torch.save(SmallCNN(3, 5, width=8), run / "query" / "classifier.pt")
    real = load_dataset("embedded", split="sensitive_test", size=60, seed=0)
    np.savez(tmp_path / "real.npz", images=real.images.numpy(), labels=real.labels.numpy())
    return run


def test_proxy_report_files_exist_parse_and_are_labelled(run_dir, tmp_path):
    opts = EvaluateOptions(real=str(tmp_path / "real.npz"), ca=TINY_CA, cache_dir=str(tmp_path / "cache"),
                           is_splits=2, batch_size=16)
    evaluate_run(run_dir, opts, log=lambda _: None)
    report = json.loads((run_dir / "release" / "report.json").read_text())
    metrics = report["metrics"]
    assert {"proxy_fid", "proxy_inception_score", "proxy_precision_recall", "classification_accuracy"} == set(metrics)
    assert all(m["kind"] == "proxy" for name, m in metrics.items() if name.startswith("proxy_"))
    assert metrics["proxy_fid"]["value"] > 0 and metrics["proxy_fid"]["num_samples"] == 40
    assert metrics["proxy_fid"]["num_reference"] == 60
    assert 0 <= metrics["classification_accuracy"]["accuracy"] <= 1
    assert metrics["classification_accuracy"]["num_test"] == 60
    assert {m["computed_on"] for m in metrics.values()} == {"held_out", "samples"}  # --real: a held-out test set
    assert report["launch"] == {"world_size": 2, "backend": "gloo"}  # how the run was trained (config.json)
    privacy = report["privacy"]
    generator = privacy["generator"]
    assert generator["ledger"] == {"query": 1, "finetune": 50} and generator["delta"] == 1e-5
    assert 0 < generator["epsilon_spent"] < 10
    # the official protocol spends nothing: the total is the training epsilon, and nothing is recorded
    assert privacy["evaluation"] == {"epsilon": 0.0, "delta": 0.0, "releases": [],
                                     "ledger_file": "evaluation_ledger.json"}
    assert privacy["total"] == {"epsilon": generator["epsilon_spent"], "delta": 1e-5, "within_budget": True}
    assert not (run_dir / "evaluation_ledger.json").exists()
    assert "not_private" not in privacy  # the FID reference here is the --real test file, not training data
    assert len(report["config_hash"]) == 16 and report["versions"]["torch"] == torch.__version__
    assert report["samples"]["per_class"] == {str(c): int((np.load(run_dir / "samples/samples.npz")["labels"] == c).sum())
                                              for c in range(5) if (np.load(run_dir / "samples/samples.npz")["labels"] == c).any()}
    # The publishable report shows samples, epsilon and the public pre-training's loss; the fine-tune's loss
    # (noiseless, over drawn sensitive batches) and the real test images beside the samples are private.
    assert set(report["figures"]) == {"figures/samples.png", "figures/epsilon_finetune.png",
                                      "figures/loss_pretrain.png"}
    private = json.loads((run_dir / "private" / "report-private.json").read_text())
    assert set(private["figures"]) == {"figures/samples_vs_real.png", "figures/loss_finetune.png"}
    assert private["metrics"] == {} and private["privacy"]["not_private"] == []
    for folder, figures in ((run_dir / "release", report["figures"]), (run_dir / "private", private["figures"])):
        for figure in figures:
            with Image.open(folder / figure) as im:
                assert im.format == "PNG" and im.size[0] > 50
    assert not (run_dir / "release" / "figures" / "loss_finetune.png").exists()
    markdown = (run_dir / "release" / "report.md").read_text()
    assert "| proxy_fid | proxy |" in markdown and "## Privacy" in markdown and "not comparable" in markdown
    assert "held-out real test images" in markdown and "loss_finetune" not in markdown
    assert "PRIVATE" in (run_dir / "private" / "report-private.md").read_text().splitlines()[0]

    # the second evaluation reuses the cached reference statistics and gives the same proxy FID
    again = evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real.npz"), ca_protocol="none",
                                                  cache_dir=str(tmp_path / "cache"), is_splits=2), log=lambda _: None)
    assert again["metrics"]["proxy_fid"]["reference"].startswith("cache ")
    assert again["metrics"]["proxy_fid"]["value"] == pytest.approx(metrics["proxy_fid"]["value"], rel=1e-6)
    for key in ("precision", "recall"):  # recomputed from the real images: no per-image features are cached
        assert again["metrics"]["proxy_precision_recall"][key] == metrics["proxy_precision_recall"][key]

    # the cached file holds statistics only (no per-image features), usable as --reference-stats
    (stats_file,) = (tmp_path / "cache").glob("proxy-*.npz")
    assert set(np.load(stats_file).files) == {"mu", "sigma", "num", "kind", "network"}
    third = evaluate_run(run_dir, EvaluateOptions(reference_stats=str(stats_file), ca_protocol="none", is_splits=2),
                         log=lambda _: None)
    assert third["metrics"]["proxy_fid"]["value"] == pytest.approx(metrics["proxy_fid"]["value"], rel=1e-6)
    assert third["metrics"]["proxy_fid"]["computed_on"] == "public_reference"
    assert "proxy_precision_recall" not in third["metrics"]


def test_with_inception_weights_the_metric_is_fid_never_proxy(run_dir, tmp_path):
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "pt_inception.pth")
    samples = np.load(run_dir / "samples" / "samples.npz")
    np.savez(run_dir / "samples" / "samples.npz", images=samples["images"][:6], labels=samples["labels"][:6])
    real = np.load(tmp_path / "real.npz")
    np.savez(tmp_path / "real6.npz", images=real["images"][:6], labels=real["labels"][:6])
    report = evaluate_run(run_dir, EvaluateOptions(inception_weights=str(tmp_path / "pt_inception.pth"),
                                                   real=str(tmp_path / "real6.npz"), ca_protocol="none",
                                                   cache_dir=str(tmp_path / "cache"), is_splits=2, pr_k=2),
                          log=lambda _: None)
    assert {"fid", "inception_score", "precision_recall"} == set(report["metrics"])
    assert report["metrics"]["fid"]["kind"] == "inception" and report["metrics"]["fid"]["feature_dim"] == 2048
    assert report["metrics"]["inception_score"]["num_classes"] == 1008
    assert report["feature_network"]["name"] == "pt_inception.pth"


def test_reference_stats_of_another_kind_are_refused(run_dir, tmp_path):
    np.savez(tmp_path / "inception_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    opts = EvaluateOptions(reference_stats=str(tmp_path / "inception_stats.npz"), real=str(tmp_path / "real.npz"),
                           ca_protocol="none", is_splits=2)
    with pytest.raises(ValueError, match="kind 'inception'.*'proxy'"):
        evaluate_run(run_dir, opts, log=lambda _: None)


def test_without_any_feature_network_fidelity_is_skipped_and_said(run_dir, tmp_path):
    (run_dir / "query" / "classifier.pt").unlink()
    messages = []
    report = evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real.npz"), ca_protocol="none"),
                          log=messages.append)
    assert report["metrics"] == {}
    assert any("No Inception weights file" in m for m in messages)
    assert any("fidelity metrics skipped" in n for n in report["notes"])


def test_cli_evaluate(run_dir, tmp_path, capsys):
    code = main(["evaluate", str(run_dir), "--real", str(tmp_path / "real.npz"), "--ca-protocol", "none",
                 "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert code == 0 and "proxy_fid:" in out.out and "epsilon spent" in out.out
    assert "PROXY FID" in out.err
    code = main(["evaluate", str(run_dir), "--inception-weights", str(tmp_path / "nope.pth")])
    assert code == 2 and "nope.pth" in capsys.readouterr().err
    code = main(["evaluate", str(tmp_path / "no-such-run"), "--ca-protocol", "none"])
    assert code == 2 and "no-such-run does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"not a zip file at all", "is not a readable .npz file"),
    ("truncated", "is not a readable .npz file"),
    ({"mu": np.zeros(3), "sigma": np.eye(2)}, r"mu \(3,\) and sigma \(2, 2\) do not fit"),
    ({"mu": np.zeros(2), "sigma": np.array([[1.0, np.nan], [np.nan, 1.0]])}, "NaN or inf"),
    ({"mu": np.zeros(2), "sigma": np.array([[1.0, 0.5], [0.0, 1.0]])}, "not symmetric"),
    ({"mu": np.zeros(7), "sigma": np.eye(7), "kind": np.array("proxy")}, "dimension 7"),
])
def test_bad_reference_stats_files_are_named_by_the_cli(run_dir, tmp_path, capsys, content, message):
    path = tmp_path / "ref.npz"
    if isinstance(content, dict):
        np.savez(path, **content)
    elif content == "truncated":
        np.savez(path, mu=np.zeros(128), sigma=np.eye(128))
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    code = main(["evaluate", str(run_dir), "--reference-stats", str(path), "--real", str(tmp_path / "real.npz"),
                 "--ca-protocol", "none"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and re.search(message, err), err


def _sensitive_val(tmp_path, size=30):
    """Validation images drawn from the sensitive training split (disjoint from the sensitive_test file)."""
    val = load_dataset("embedded", split="sensitive", size=size, seed=11)
    np.savez(tmp_path / "val.npz", images=val.images.numpy(), labels=val.labels.numpy())
    return str(tmp_path / "val.npz")


def test_dpimagebench_selection_epsilon_enters_the_total_and_the_ledger(run_dir, tmp_path):
    real = np.load(tmp_path / "real.npz")
    small = torch.nn.functional.interpolate(torch.from_numpy(real["images"]).float(), size=16).byte().numpy()
    np.savez(tmp_path / "real16.npz", images=small, labels=real["labels"])  # other resolution: matched to samples
    (run_dir / "query" / "classifier.pt").unlink()
    opts = EvaluateOptions(real=str(tmp_path / "real16.npz"), val=_sensitive_val(tmp_path), ca_protocol="dpimagebench",
                           ca=TINY_CA, ca_archs=("cnn", "cnn"), selection_epsilon=0.25)
    report = evaluate_run(run_dir, opts, log=lambda _: None)
    ca = report["metrics"]["classification_accuracy"]
    assert ca["protocol"] == "dpimagebench" and [a["arch"] for a in ca["per_classifier"]] == ["cnn", "cnn"]
    assert ca["num_val"] == 30 and "val.npz" in ca["validation_data"]
    assert any("were resized" in n for n in report["notes"])

    privacy = report["privacy"]
    training = PrivacyBudget.from_state_dict(json.loads((run_dir / "budget.json").read_text())).epsilon_spent().upper
    assert privacy["generator"]["epsilon_spent"] == training
    (release,) = privacy["evaluation"]["releases"]
    assert release["epsilon"] == 0.5 and release["delta"] == 0.0 and release["epsilon_per_classifier"] == 0.25
    assert privacy["evaluation"]["epsilon"] == 0.5
    assert privacy["total"]["epsilon"] == pytest.approx(training + 0.5) and privacy["total"]["delta"] == 1e-5
    markdown = (run_dir / "release" / "report.md").read_text()
    assert "| **total** | **" + f"{training + 0.5:.4g}" + "** | **1e-05** |" in markdown
    assert "DPImageBench CA epoch selection" in markdown and "| cnn |" in markdown

    # evaluating again releases again: the ledger keeps both, and the total counts both
    again = evaluate_run(run_dir, opts, log=lambda _: None)
    assert [r["epsilon"] for r in again["privacy"]["evaluation"]["releases"]] == [0.5, 0.5]
    assert again["privacy"]["total"]["epsilon"] == pytest.approx(training + 1.0)
    assert len(json.loads((run_dir / "evaluation_ledger.json").read_text())["releases"]) == 2
    # ... and an evaluation that spends nothing still reports what was spent before
    third = evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real16.npz"), ca_protocol="none"),
                         log=lambda _: None)
    assert third["privacy"]["total"]["epsilon"] == pytest.approx(training + 1.0)


def test_selection_beyond_the_budget_and_without_budget_json_is_said(run_dir, tmp_path):
    (run_dir / "query" / "classifier.pt").unlink()
    opts = EvaluateOptions(real=str(tmp_path / "real.npz"), val=_sensitive_val(tmp_path), ca_protocol="dpimagebench",
                           ca=TINY_CA, ca_archs=("cnn",), selection_epsilon=20.0)
    report = evaluate_run(run_dir, opts, log=lambda _: None)
    assert report["privacy"]["total"]["within_budget"] is False
    assert any("exceeds the run's budget epsilon 10" in n for n in report["notes"])
    (run_dir / "budget.json").unlink()
    report = evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real.npz"), ca_protocol="none"),
                          log=lambda _: None)
    assert report["privacy"]["generator"] is None and report["privacy"]["total"] is None
    assert report["privacy"]["evaluation"]["epsilon"] == 20.0  # still on record
    assert "unknown (evaluation alone: 20)" in (run_dir / "release" / "report.md").read_text()
    (run_dir / "evaluation_ledger.json").write_text('{"releases": [{"epsilon": "a lot"}]}')
    with pytest.raises(ValueError, match="evaluation_ledger.json is not an evaluation ledger"):
        evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real.npz"), ca_protocol="none"), log=lambda _: None)


def test_selection_epsilon_must_be_given_and_validation_must_not_be_test_data(run_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="give its epsilon per classifier explicitly"):
        EvaluateOptions(ca_protocol="dpimagebench")
    with pytest.raises(ValueError, match="selection_epsilon=0"):
        EvaluateOptions(ca_protocol="dpimagebench", selection_epsilon=0)
    assert EvaluateOptions(ca_protocol="official", selection_epsilon=1.0).selection_epsilon_total == 0.0
    assert EvaluateOptions(ca_protocol="dpimagebench", selection_epsilon=0.5).selection_epsilon_total == 1.5

    (run_dir / "query" / "classifier.pt").unlink()
    real = str(tmp_path / "real.npz")
    opts = dict(real=real, ca_protocol="dpimagebench", ca=TINY_CA, ca_archs=("cnn",), selection_epsilon=1.0)
    with pytest.raises(ValueError, match="is also in the test set"):
        evaluate_run(run_dir, EvaluateOptions(val=real, **opts), log=lambda _: None)
    assert not (run_dir / "evaluation_ledger.json").exists()  # nothing was released
    test, val = np.load(real), np.load(_sensitive_val(tmp_path, size=20))
    np.savez(tmp_path / "mixed.npz", images=np.concatenate([test["images"][:7], val["images"]]),
             labels=np.concatenate([test["labels"][:7], val["labels"]]))
    from privimage.evaluate import classify

    selected_on, real_accuracy = [], classify.dpimagebench_accuracy

    def spy(train, train_labels, val, *args, **kwargs):
        selected_on.append(val.shape[0])
        return real_accuracy(train, train_labels, val, *args, **kwargs)

    monkeypatch.setattr(classify, "dpimagebench_accuracy", spy)
    messages = []
    report = evaluate_run(run_dir, EvaluateOptions(val=str(tmp_path / "mixed.npz"), **opts), log=messages.append)
    assert selected_on == [20]
    assert any("7 of 27 validation images are exact copies of test images" in m for m in messages)
    # the operator is told; the report is not (that count is a non-private statistic of the sensitive data)
    assert report["metrics"]["classification_accuracy"]["num_val"] == 27
    assert "7" not in " ".join(report["notes"]) and "20 validation" not in (run_dir / "release" / "report.md").read_text()


def test_fid_against_sensitive_training_data_goes_to_the_private_report_only(run_dir, tmp_path, monkeypatch):
    """The default reference is the sensitive training split: those numbers (no noise) are private, and the
    reference statistics are cached inside the run's private folder, never in a global cache."""
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "global"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    save_json({"data": {"sensitive": "embedded:sensitive,size=30",
                        "sensitive_test": "embedded:sensitive_test,size=20"}}, run_dir / "config.json")
    report = evaluate_run(run_dir, EvaluateOptions(ca_protocol="none", is_splits=2), log=lambda _: None)
    assert set(report["metrics"]) == {"proxy_inception_score"}  # on the samples alone
    private = json.loads((run_dir / "private" / "report-private.json").read_text())
    assert set(private["metrics"]) == {"proxy_fid", "proxy_precision_recall"}
    assert {m["computed_on"] for m in private["metrics"].values()} == {"sensitive_training"}
    (note,) = private["privacy"]["not_private"]
    assert "proxy_fid" in note and "sensitive training split" in note
    assert "Not covered by ε:" in (run_dir / "private" / "report-private.md").read_text()
    public_text = (run_dir / "release" / "report.md").read_text() + (run_dir / "release" / "report.json").read_text()
    assert "proxy_fid" not in public_text and "private report" in public_text
    (cached,) = (run_dir / "private" / "fid").glob("proxy-*.npz")
    assert set(np.load(cached).files) == {"mu", "sigma", "num", "kind", "network"}
    assert not (tmp_path / "global").exists() and not (tmp_path / "home").exists()
    # held-out test images as the reference: publishable, and said so
    report = evaluate_run(run_dir, EvaluateOptions(ca_protocol="none", is_splits=2, fid_split="sensitive_test"),
                          log=lambda _: None)
    assert report["metrics"]["proxy_fid"]["computed_on"] == "held_out"


def test_cli_shows_the_selection_epsilon_in_help_and_output(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "--selection-epsilon E" in helptext and "ON TOP of the training budget" in helptext
    assert "total epsilon = training epsilon + all evaluation epsilons" in helptext

    common = ["evaluate", str(run_dir), "--real", str(tmp_path / "real.npz"), "--ca-protocol", "dpimagebench",
              "--ca-archs", "cnn,cnn", "--ca-preset", "small", "--ca-epochs", "1", "--val", _sensitive_val(tmp_path)]
    assert main(common) == 2
    assert "--selection-epsilon" in capsys.readouterr().err
    assert main([*common, "--selection-epsilon", "0.3", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["selection_epsilon_total"] == pytest.approx(0.6)
    (run_dir / "query" / "classifier.pt").unlink()
    assert main([*common, "--selection-epsilon", "0.3"]) == 0
    out = capsys.readouterr().out
    training = PrivacyBudget.from_state_dict(json.loads((run_dir / "budget.json").read_text())).epsilon_spent().upper
    assert "evaluation epsilon 0.6 (1 release(s) in evaluation_ledger.json" in out
    assert f"total epsilon {training + 0.6:.4g} at delta 1e-05" in out


def test_samples_vs_real_grid_puts_each_class_beside_its_real_images(tmp_path):
    from privimage.evaluate.report import samples_vs_real_grid

    # sample of class c is filled with 10 + c, real image of class c with 100 + c; class 1 has one sample only
    sample_labels = torch.tensor([0, 0, 1, 2, 2, 2])
    real_labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 2])
    samples = (10 + sample_labels).byte()[:, None, None, None].expand(-1, 3, 4, 4).contiguous()
    real = (100 + real_labels).byte()[:, None, None, None].expand(-1, 3, 4, 4).contiguous()
    samples_vs_real_grid(samples, sample_labels, real, real_labels, tmp_path / "grid.png", per_class=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    step = 4 + 2  # tile plus the grid's 2-pixel padding
    assert grid.shape == (3 * step + 2, 5 * step + 2, 3)  # 3 classes x (2 samples, gap, 2 real)

    def tile(row, col):
        return int(grid[2 + row * step + 1, 2 + col * step + 1, 0])

    assert [[tile(r, c) for c in range(5)] for r in range(3)] == [
        [10, 10, 0, 100, 100],
        [11, 0, 0, 101, 101],
        [12, 12, 0, 102, 102],
    ]


def test_feature_extraction_and_classifier_training_show_progress(run_dir, tmp_path, monkeypatch):
    import io

    from privimage.evaluate import classify, features
    from privimage.progress import progress_bar

    bars = []

    def recorded(*args, **kwargs):
        bars.append(progress_bar(*args, **{**kwargs, "file": io.StringIO(), "log_interval": 0.0}))
        return bars[-1]

    monkeypatch.setattr(features, "progress_bar", recorded)
    monkeypatch.setattr(classify, "progress_bar", recorded)
    evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real.npz"), ca=TINY_CA, is_splits=2,
                                          cache_dir=str(tmp_path / "cache")), log=lambda _: None)
    shown = {bar.desc.split(" (")[0]: bar for bar in bars}
    assert set(shown) == {"reference features", "sample features", "CA train cnn"}
    assert shown["sample features"].n == 40 and shown["reference features"].n == 60
    assert shown["CA train cnn"].n == shown["CA train cnn"].total == 2 * 2  # 2 epochs of 40 images, batch 20
    for bar in bars:
        assert bar.fp.getvalue().count("\r") >= 2
    assert "loss=" in shown["CA train cnn"].fp.getvalue()


def test_real_data_comes_from_the_pipeline_config(run_dir, tmp_path):
    # privimage.config.RunConfig.to_dict(): one data spec per split, plus resolution, pad_to and seed
    save_json({"data": {"sensitive": "embedded:sensitive,size=60", "sensitive_test": "embedded:sensitive_test,size=24",
                        "public": "embedded:public", "resolution": 32, "pad_to": None, "seed": 0},
               "finetune": {"secure_noise": False}}, run_dir / "config.json")
    evaluate_run(run_dir, EvaluateOptions(ca_protocol="none", cache_dir=str(tmp_path / "cache"), is_splits=2),
                 log=lambda _: None)
    private = json.loads((run_dir / "private" / "report-private.json").read_text())
    assert private["metrics"]["proxy_fid"]["num_reference"] == 60  # the sensitive split's spec
    # the non-secure test mode is said loudly in the publishable report
    assert "NOT PRIVATE" in (run_dir / "release" / "report.md").read_text()


def test_load_real_pads_instead_of_resizing_when_asked():
    from privimage.evaluate.report import data_options, load_real

    config = {"data": {"sensitive_test": "embedded:sensitive_test,size=4,resolution=12", "resolution": 16,
                       "pad_to": 16}}
    images, labels = load_real(config, split="sensitive_test")
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)
    assert images[:, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0  # 2-pixel black border
    # A shared spec: the split asked for wins; a per-split spec keeps the reader's own split name.
    assert data_options({"data": "embedded:public,seed=3"}, "sensitive_test") == {
        "name": "embedded", "split": "sensitive_test", "seed": 3}
    assert data_options({"data": {"sensitive_test": "cifar10:test"}}, "sensitive_test") == {
        "name": "cifar10", "split": "test"}
    with pytest.raises(ValueError, match="no data set for split 'sensitive_test'"):
        data_options({"data": {"sensitive": "embedded:sensitive"}}, "sensitive_test")
