"""`privimage query`: writes the DP outputs and the subset into the run directory; --help teaches privacy."""

import json

import numpy as np
import pytest

from privimage.cli import main
from privimage.engine import Mechanism, PrivacyBudget
from privimage.privacy import QUERY
from privimage.query import ffcv_available

ARGS = ["query", "--sensitive", "embedded:sensitive,size=100", "--public", "embedded:public,size=600",
        "--top-k", "1", "--top-n", "3", "--classifier-width", "4", "--classifier-epochs", "1"]


def test_help_explains_privacy(capsys):
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    out = capsys.readouterr().out
    assert "sensitivity" in out and "sqrt(K)" in out and "--epsilon-query" in out and "post-processing" in out


def test_query_writes_the_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main([*ARGS, "--epsilon-query", "2", "--delta", "1e-5", "--run-dir", str(run), "--no-ffcv"]) == 0
    selected = json.loads((run / "query" / "selected_labels.json").read_text())
    assert len(selected["selected_labels"]) == 3 and selected["top_k"] == 1
    assert np.load(run / "query" / "histogram.npy").shape == (60,)
    assert (run / "query" / "classifier.pt").is_file()
    assert json.loads((run / "config.json").read_text())["top_n"] == 3
    subset = np.load(run / "query" / "subset.npz")
    assert set(subset["labels"].tolist()) == set(selected["selected_labels"])
    budget = PrivacyBudget.from_state_dict(json.loads((run / "budget.json").read_text()))
    assert budget.spent == {QUERY: 1} and budget.epsilon_spent().upper <= 2.0
    # The planned query is spent: running again in the same directory is refused (it would cost more).
    assert main([*ARGS, "--run-dir", str(run)]) == 2
    assert "already spent" in capsys.readouterr().err


@pytest.mark.skipif(not ffcv_available(), reason="FFCV not installed")
def test_query_uses_a_planned_budget_and_writes_ffcv(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    planned = PrivacyBudget(3.0, 1e-5, plan={QUERY: Mechanism(4.0)})
    (run / "budget.json").write_text(json.dumps(planned.state_dict()))
    assert main([*ARGS, "--run-dir", str(run)]) == 0
    assert json.loads((run / "query" / "selected_labels.json").read_text())["sigma"] == 4.0
    assert (run / "query" / "subset.ffcv").stat().st_size > 0


def test_missing_epsilon_is_a_clear_error(tmp_path, capsys):
    assert main([*ARGS, "--run-dir", str(tmp_path / "new")]) == 2
    assert "--epsilon-query is required" in capsys.readouterr().err


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
        assert main([*ARGS, "--epsilon-query", "2", "--run-dir", str(run), "--no-ffcv", *flags]) == 0
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
