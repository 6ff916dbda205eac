"""privimage evaluate on a fake run directory: report files exist, parse, and label every metric's kind."""

import json

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
    save_json({"data": {"name": "embedded"}, "name": "demo"}, run / "config.json")
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
    report = json.loads((run_dir / "report.json").read_text())
    metrics = report["metrics"]
    assert {"proxy_fid", "proxy_inception_score", "proxy_precision_recall", "classification_accuracy"} == set(metrics)
    assert all(m["kind"] == "proxy" for name, m in metrics.items() if name.startswith("proxy_"))
    assert metrics["proxy_fid"]["value"] > 0 and metrics["proxy_fid"]["num_samples"] == 40
    assert metrics["proxy_fid"]["num_reference"] == 60
    assert 0 <= metrics["classification_accuracy"]["accuracy"] <= 1
    assert metrics["classification_accuracy"]["num_test"] == 60
    privacy = report["privacy"]
    assert privacy["ledger"] == {"query": 1, "finetune": 50} and privacy["delta"] == 1e-5
    assert 0 < privacy["epsilon_spent"] < 10
    assert len(report["config_hash"]) == 16 and report["versions"]["torch"] == torch.__version__
    assert report["samples"]["per_class"] == {str(c): int((np.load(run_dir / "samples/samples.npz")["labels"] == c).sum())
                                              for c in range(5) if (np.load(run_dir / "samples/samples.npz")["labels"] == c).any()}
    assert set(report["figures"]) == {"evaluate/samples_vs_real.png", "evaluate/loss_finetune.png",
                                      "evaluate/epsilon_finetune.png", "evaluate/loss_pretrain.png"}
    for figure in report["figures"]:
        with Image.open(run_dir / figure) as im:
            assert im.format == "PNG" and im.size[0] > 50
    markdown = (run_dir / "report.md").read_text()
    assert "| proxy_fid | proxy |" in markdown and "## Privacy" in markdown and "not comparable" in markdown

    # the second evaluation reuses the cached reference statistics and gives the same proxy FID
    again = evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real.npz"), ca_protocol="none",
                                                  cache_dir=str(tmp_path / "cache"), is_splits=2), log=lambda _: None)
    assert again["metrics"]["proxy_fid"]["reference"].startswith("cache ")
    assert again["metrics"]["proxy_fid"]["value"] == pytest.approx(metrics["proxy_fid"]["value"], rel=1e-6)

    # the cached file is an ordinary mu/sigma statistics file (with its kind), usable as --reference-stats
    (stats_file,) = (tmp_path / "cache").glob("proxy-*.npz")
    third = evaluate_run(run_dir, EvaluateOptions(reference_stats=str(stats_file), ca_protocol="none", is_splits=2),
                         log=lambda _: None)
    assert third["metrics"]["proxy_fid"]["value"] == pytest.approx(metrics["proxy_fid"]["value"], rel=1e-6)
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


def test_dpimagebench_protocol_through_the_report_counts_its_selection_epsilon(run_dir, tmp_path):
    real = np.load(tmp_path / "real.npz")
    small = torch.nn.functional.interpolate(torch.from_numpy(real["images"]).float(), size=16).byte().numpy()
    np.savez(tmp_path / "real16.npz", images=small, labels=real["labels"])  # other resolution: matched to samples
    (run_dir / "query" / "classifier.pt").unlink()
    report = evaluate_run(run_dir, EvaluateOptions(real=str(tmp_path / "real16.npz"), val=str(tmp_path / "real.npz"),
                                                   ca_protocol="dpimagebench", ca=TINY_CA, ca_archs=("cnn",),
                                                   selection_epsilon=0.5), log=lambda _: None)
    ca = report["metrics"]["classification_accuracy"]
    assert ca["protocol"] == "dpimagebench" and [a["arch"] for a in ca["per_classifier"]] == ["cnn"]
    assert report["privacy"]["evaluation_selection_epsilon"] == 0.5
    assert any("were resized" in n for n in report["notes"]) and any("Report Noisy Max" in n for n in report["notes"])
    assert "| cnn |" in (run_dir / "report.md").read_text()


def test_real_data_comes_from_the_pipeline_config(run_dir, tmp_path):
    # privimage.config.RunConfig.to_dict(): one data spec per split, plus resolution, pad_to and seed
    save_json({"data": {"sensitive": "embedded:sensitive,size=60", "sensitive_test": "embedded:sensitive_test,size=24",
                        "public": "embedded:public", "resolution": 32, "pad_to": None, "seed": 0}},
              run_dir / "config.json")
    report = evaluate_run(run_dir, EvaluateOptions(ca_protocol="none", cache_dir=str(tmp_path / "cache"),
                                                   is_splits=2), log=lambda _: None)
    assert report["metrics"]["proxy_fid"]["num_reference"] == 60  # the sensitive split's spec


def test_load_real_pads_instead_of_resizing_when_asked():
    from privimage.evaluate.report import data_options, load_real

    config = {"data": {"sensitive_test": "embedded:sensitive_test,size=4,resolution=12", "resolution": 16,
                       "pad_to": 16}}
    images, labels = load_real(config, split="sensitive_test")
    assert images.shape == (4, 3, 16, 16) and labels.shape == (4,)
    assert images[:, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0  # 2-pixel black border
    assert data_options({"data": "embedded:public,seed=3"}, "sensitive_test") == {"name": "embedded", "seed": 3}
    with pytest.raises(ValueError, match="no data set for split 'sensitive_test'"):
        data_options({"data": {"sensitive": "embedded:sensitive"}}, "sensitive_test")
