"""The `privimage` command: help that teaches, one-line errors with exit code 2, the budget tool."""

import json
import subprocess
import sys

import pytest

from privimage.cli import main


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "privimage", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "budget" in out and "differential privacy" in out


def test_bad_argument_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["budget", "--epsilon", "-1", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "10"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epsilon" in err[0] and "-1 is not > 0" in err[0]


def test_impossible_budget_exits_2_with_the_reason(capsys):
    code = main(["budget", "--epsilon", "0.0001", "--delta", "1e-5", "--sample-rate", "0.5", "--steps", "100"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small" in err[0]


def test_budget_json_meets_the_target(capsys):
    assert main(["budget", "--epsilon", "5", "--delta", "1e-5", "--sample-rate", "0.05", "--steps", "50",
                 "--num-examples", "2000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["composed_epsilon"] <= 5
    assert result["query_epsilon_alone"] <= 0.5
    assert result["expected_batch_size"] == 100
    assert result["finetune_noise_multiplier"] > 0
