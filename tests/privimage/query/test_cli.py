"""`privimage query`: the query stage of `privimage run` into a run directory (DP outputs, relabelled subset, the
run config and budget the later stages read); --help teaches privacy."""

import json

import numpy as np
import pytest

from privimage.cli import main
from privimage.engine import Mechanism, PrivacyBudget
from privimage.privacy import QUERY

ARGS = ["query", "--sensitive", "embedded:sensitive,size=100", "--public", "embedded:public,size=600",
        "--top-k", "1", "--top-n", "3", "--classifier-width", "4", "--classifier-epochs", "1"]


def test_help_explains_privacy(capsys):
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    out = capsys.readouterr().out
    assert "sensitivity" in out and "sqrt(K)" in out and "--epsilon-query" in out and "post-processing" in out


def test_standalone_query_writes_a_run_directory_of_the_one_query_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main([*ARGS, "--epsilon-query", "2", "--delta", "1e-5", "--run-dir", str(run)]) == 0
    # The per-class query of `privimage run`: one row per sensitive class, at least one public class each.
    selected = json.loads((run / "query" / "selected_labels.json").read_text())
    assert selected["per_class"] and selected["top_k"] == 1 and len(selected["sensitive_class_names"]) == 5
    assert len(selected["label_map"]) == 5 and np.load(run / "query" / "histogram.npy").shape == (5, 60)
    assert (run / "query" / "classifier.pt").is_file() and not (run / "query" / "subset.ffcv").exists()
    # config.json is a run config (what `privimage pretrain` reads), with the flags in it.
    from privimage.pipeline import load_run_config

    cfg = load_run_config(run)
    assert cfg.query.top_n == 3 and cfg.data.sensitive == "embedded:sensitive,size=100" and cfg.delta == 1e-5
    # The subset is the selected public images, relabelled to the sensitive class that chose each.
    with np.load(run / "query" / "subset.npz") as subset:
        assert set(subset["labels"].tolist()) == set(selected["label_map"].values())
    budget = PrivacyBudget.from_state_dict(json.loads((run / "budget.json").read_text()))
    assert budget.spent == {QUERY: 1} and budget.epsilon_spent().upper <= 2.0
    # The planned query is spent: running again in the same directory is refused (it would cost more).
    assert main([*ARGS, "--run-dir", str(run)]) == 2
    assert "already spent" in capsys.readouterr().err
    # A standalone query plans no fine-tune: the fine-tune says so, without a traceback.
    assert main(["finetune", str(run)]) == 2
    assert "plans no fine-tune" in capsys.readouterr().err


def test_query_uses_a_planned_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    planned = PrivacyBudget(3.0, 1e-5, plan={QUERY: Mechanism(4.0)})
    (run / "budget.json").write_text(json.dumps(planned.state_dict()))
    assert main([*ARGS, "--run-dir", str(run)]) == 0
    assert json.loads((run / "query" / "selected_labels.json").read_text())["sigma"] == 4.0
    assert json.loads((run / "budget.json").read_text())["spent"] == {QUERY: 1}


def test_flags_cannot_change_a_run_directory_s_config(tmp_path, capsys):
    from privimage.config import CONFIGS
    from privimage.io import save_json
    from privimage.pipeline import config_json

    save_json(config_json(CONFIGS["test"]), tmp_path / "config.json")
    assert main(["query", "--run-dir", str(tmp_path), "--top-n", "7"]) == 2
    assert "fixes this run's settings" in capsys.readouterr().err
    assert not (tmp_path / "budget.json").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert main(["query", "--config", "test", "--run-dir", str(tmp_path / "r"), "--top-n", "4", "--epsilon-query",
                 "2", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["query"]["top_n"] == 4 and out["budget"].startswith("a standalone query")
    assert out["query_noise_multiplier"] > 0 and 1.9 < out["query_epsilon_alone"] <= 2.0
    assert not (tmp_path / "r").exists()


def _released_histograms(tmp_path, monkeypatch, *flags):
    """Histograms of two runs with the same public settings, and where each run's noise came from."""
    import privimage.engine as engine

    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    secure_calls = []
    real = engine.secure_generator
    monkeypatch.setattr(engine, "secure_generator", lambda *a: secure_calls.append(1) or real(*a))
    out = []
    for name in ("a", "b"):
        run = tmp_path / (name + "".join(flags))
        assert main([*ARGS, "--epsilon-query", "2", "--run-dir", str(run), *flags]) == 0
        out.append(np.load(run / "query" / "histogram.npy"))
    return out, len(secure_calls)


def test_query_noise_is_secure_by_default_and_reproducible_only_under_the_loud_test_flag(tmp_path, monkeypatch,
                                                                                        capsys):
    (a, b), secure = _released_histograms(tmp_path, monkeypatch)
    assert secure == 2 and not np.array_equal(a, b)  # fresh OS-seeded noise each time
    assert "NOT private" not in capsys.readouterr().err
    (a, b), secure = _released_histograms(tmp_path, monkeypatch, "--insecure-test-noise")
    assert secure == 0 and np.array_equal(a, b)
    assert "NOT private" in capsys.readouterr().err
    (a, b), secure = _released_histograms(tmp_path, monkeypatch, "--secure-noise")
    assert secure == 2 and not np.array_equal(a, b)
    assert "--secure-noise is deprecated and has no effect" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    assert "NOT PRIVATE" in " ".join(capsys.readouterr().out.split())
