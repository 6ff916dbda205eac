"""The GPU check (``bench/gpu_suite.sh``) runs its smoke mode on the CPU, so it cannot rot between the sessions
that have a GPU; and its time caps stop a command that overruns while the suite goes on."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "correctness", "dp-step", "kernels", "throughput", "finetune"]


def _suite(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_run_writes_its_files_and_a_summary_of_every_stage_and_check(tmp_path):
    proc = _suite(tmp_path, "--smoke", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert {"summary.md", "results.json", "env.json", "log.txt"} <= set(files), files
    assert len(files) <= 8 and max(files.values()) <= 16 * 2 ** 20  # what the device tool returns

    results = json.loads((tmp_path / "results.json").read_text())
    assert [s["key"] for s in results["stages"]] == STAGES
    failed = {s["key"]: [(c["name"], c["status"], c.get("reason")) for c in s["commands"]]
              for s in results["stages"] if s["status"] != "OK"}
    assert not failed, failed  # every stage runs something on the CPU, and nothing fails or times out
    checks = results["checks"]
    assert {c["stage"] for c in checks} == set(STAGES)
    assert all(c["status"] in ("PASS", "SKIPPED") for c in checks), [c for c in checks if c["status"] == "FAIL"]
    assert all(c["reason"] for c in checks if c["status"] == "SKIPPED")
    for stage in STAGES:  # each stage checked something real on the CPU
        assert any(c["status"] == "PASS" for c in checks if c["stage"] == stage), stage
    gpu_only = [c for c in checks if "CUDA" in c["name"] or "Triton" in c["name"] or "compiled" in c["name"]]
    assert gpu_only and all(c["status"] == "SKIPPED" for c in gpu_only)
    for key in ("env", "dp_step_float32", "layer_strategies", "train_step_eager", "finetune_projection"):
        assert key in results["data"], key

    summary = (tmp_path / "summary.md").read_text()
    assert "## Stages" in summary and "## Checks" in summary and "## Numbers" in summary
    for i, stage in enumerate(results["stages"]):
        assert re.search(rf"^\| {i + 1} \| {re.escape(stage['key'])}: .* \| OK \|", summary, re.M), stage["key"]
    for c in checks:
        assert f"| {c['stage']} | {c['name']} | {c['status']} |" in summary, c


def test_a_command_over_its_cap_is_killed_with_its_children_and_the_suite_goes_on(tmp_path):
    start = time.monotonic()
    proc = _suite(tmp_path, "--smoke", "--stages", "selftest", "--cap", "selftest=4", timeout=300)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (stage,) = json.loads((tmp_path / "results.json").read_text())["stages"]
    commands = {c["name"]: c for c in stage["commands"]}
    assert commands["fail"]["status"] == "FAILED" and commands["fail"]["rc"] == 3
    assert commands["sleep"]["status"] == "TIMEOUT"  # it sleeps 600 s: only the cap ends it
    assert stage["status"] == "TIMEOUT" and wall < 120
    pids = [int(p) for p in re.findall(r"pid=(\d+)", (tmp_path / "log.txt").read_text())]
    assert len(pids) == 2  # the sleeping command and the child it started

    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
    assert "| 1 | selftest: " in (tmp_path / "summary.md").read_text()
