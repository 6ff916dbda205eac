"""The GPU check (``bench/gpu_suite.sh``) runs its smoke mode on the CPU, so it cannot rot between the sessions
that have a GPU; and its time caps stop a command that overruns while the suite goes on."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "correctness", "dp-step", "kernels", "throughput", "finetune", "scale"]


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


def _write_gpu_run(work: Path) -> None:
    """The files a GPU run's commands leave in the work folder (the scripts' formats), with known verdicts."""
    (work / "logs").mkdir(parents=True)

    def dump(name, data):
        (work / name).write_text(json.dumps(data))

    env = {"device": "NVIDIA H200", "git_sha": "abc1234", "versions": {"python": "3.12.3", "torch": "2.11.0",
                                                                        "triton": "3.6.0", "cuda": "13.0"}}
    imports = {m: {"ok": True} for m in ["privimage", "privimage.engine", "privimage.kernels", "triton", "opacus",
                                         "prv_accountant", "dp_accounting", "pytest", "pytest_benchmark",
                                         "hypothesis"]}
    imports["dp_accounting"] = {"ok": False, "error": "ModuleNotFoundError: No module named 'tree'"}
    dump("env.json", {"environment": env, "cuda_available": True, "gpu": {"name": "NVIDIA H200"}, "imports": imports,
                      "ceilings": {"matmul": {"dtype": "bfloat16", "n": 8192, "tflops": 780.0},
                                   "copy": {"gb_per_s": 4300.0}}})
    (work / "logs" / "correctness-gpu-tests.log").write_text(
        "tests/kernels/test_gpu.py::test_conv_ops_on_cuda[a] PASSED [ 50%]\n"
        "tests/kernels/test_gpu.py::test_conv_ops_on_cuda[b] PASSED [100%]\n")
    (work / "logs" / "correctness-engine-float32.log").write_text(
        "tests/kernels/test_engine_with_kernels.py::test_dp_step_with_conv_kernels_equals_references PASSED\n"
        "tests/engine/test_dp_sgd.py::test_norms_and_grads_match_loop[float32-conv_1x1-bk-mixed-sum] PASSED\n"
        "tests/engine/test_dp_sgd.py::test_norms_and_grads_match_loop[float32-conv_1x1-ghost-sum] FAILED\n")
    (work / "logs" / "correctness-engine-float64.log").write_text(
        "tests/engine/test_dp_sgd.py::test_norms_and_grads_match_loop[float64-conv_1x1-bk-mixed-sum] PASSED\n")
    dump("compiled_s.json", {"check": {"bk-mixed-compiled": {"max_rel_grad_error": 3e-6, "worst_param": "a"},
                                       "nonprivate-compiled": {"max_rel_grad_error": 0.9, "worst_param": "b"}}})
    rows = [{"method": "nonprivate", "median_ms": 100.0, "peak_mem_mb": 1000.0, "first_step_s": 1.0,
             "time_ratio": 1.0, "mem_ratio": 1.0, "speedup_vs_best_opacus": 5.0},
            {"method": "bk-mixed", "median_ms": 105.0, "peak_mem_mb": 1200.0, "first_step_s": 1.0,
             "time_ratio": 1.05, "mem_ratio": 1.2, "speedup_vs_best_opacus": 4.8},
            {"method": "opacus-hooks", "median_ms": 500.0, "peak_mem_mb": 9000.0, "first_step_s": 1.0},
            {"method": "vmap", "error": "RuntimeError: Input type (c10::BFloat16) and bias type (float)"},
            {"method": "bk-mixed-compiled", "peak_mem_mb": 1100.0, "first_step_s": 40.0}]  # cut short
    dump("dp_step_bfloat16.json", {"meta": {"preset": "s", "batch": 256, "k": 8, "rows": 2048}, "rows": rows})
    fields = ["op", "provider", "mode", "shape", "dtype", "median_ms"]
    with open(work / "kernels-cuda.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for shape, ref, tri in (("B=256 C=64", 3.0, 1.0), ("B=256 C=128", 2.0, 1.5)):
            w.writerow(dict(op="conv_per_sample_sq_norms", provider="torch_ref", mode="forward", shape=shape,
                            dtype="bfloat16", median_ms=ref))
            w.writerow(dict(op="conv_per_sample_sq_norms", provider="triton", mode="forward", shape=shape,
                            dtype="bfloat16", median_ms=tri))
    (work / "logs" / "kernels-op-benches.log").write_text("bench/test_bench_x.py::test_x[a-triton] PASSED\n")
    layer = {"name": "net.conv_in", "kind": "Conv2d", "count": 2, "a": [2048, 3, 32, 32], "g": [2048, 32, 32, 32],
             "fastest_norm": "fused", "strategies": {
                 "fused": {"median_ms": 1.0, "peak_mb": 2.0, "max_rel_diff": 1e-3},
                 "ghost": {"skipped": "ghost would cost 300x the materialised norms"},
                 "materialise": {"median_ms": 3.0, "peak_mb": 200.0},
                 "clipped-fused": {"median_ms": 1.0, "peak_mb": 1.0, "max_rel_diff": 2e-3},
                 "clipped-torch": {"median_ms": 1.5, "peak_mb": 1.0}}}
    dump("layer_strategies.json", {"meta": {"preset": "s", "samples": 256, "k": 8, "dtype": "bfloat16"},
                                   "layers": [layer]})
    step = {"median_ms": 50.0, "images_per_s": 5120.0}
    dp = {"median_ms": 400.0, "images_per_s": 640.0, "ratio_vs_pretrain": 8.0}
    dump("train_step_eager.json", {"results": [{"preset": p, "batch": 256, "pretrain": step, "dp_k8": dp}
                                               for p in ("s", "b")]})
    dump("train_step_compiled.json", {"results": [{"preset": "s", "batch": 256, "compile_s": 30.0,
                                                   "pretrain": step}]})  # cut short before its DP step
    (work / "loaders.csv").write_text("loader,resolution,images,batch,workers,setup_s,first_epoch_s,images_per_s\n"
                                      "device,32,20000,256,0,0.1,0.2,900000\n")
    dump("evaluate_features.json", {"images_per_set": 2000, "fid_rel_diff": 0.002, "feature_rel_err": 1e-2,
                                    "float32": {"fid": 100.0, "images_per_s": 5000.0},
                                    "bfloat16": {"fid": 100.2, "images_per_s": 9000.0}})
    dump("finetune_projection.json", {
        "meta": {"config": "cifar10-eps10", "images": 50000, "physical_batch_size": 256, "num_noise": 8,
                 "expected_batch_size": 16384, "planned_steps": 153, "device": "NVIDIA H200"},
        "steps": [{"step": 1, "images": 16400, "seconds": 20.0, "images_per_s": 820.0},
                  {"step": 2, "images": 16300, "seconds": 11.0, "images_per_s": 1480.0}],
        "median_step_s": 11.0, "epsilon_s": 0.5, "projected_finetune_s": 153 * 11.5,
        "pretrain": {"steps": 100000, "batch": 256, "step_ms": 50.0, "measured_batch": 256},
        "projected_pretrain_s": 5000.0})
    dump("distributed.json", {
        "overhead": {"preset": "cifar10-eps10", "backend": "nccl", "images": 64, "k": 4, "plain_ms": 100.0,
                     "distributed_ms": 108.0, "ratio": 1.08, "bytes_all_reduced": 7018008},
        "projection": {"preset": "cifar10-eps10", "steps": 153, "rows": [
            {"T1_s": 11.5, "gpus": g, "busbw_GBs": 400.0, "allreduce_ms": 0.03 * (g > 1), "step_s": 11.5 / g,
             "hours": 153 * 11.5 / g / 3600} for g in (1, 8)]}})
    dump("train_step_gan.json", {
        "discriminator_step": [{"preset": "32", "batch": 32, "non_private": {"median_ms": 10.0},
                                "dp": {"median_ms": 12.0}, "dp_over_non_private": 1.2}],
        "sampling": [{"setting": "CIFAR-10 sizes", "gan_images_per_s": 5e4, "diffusion_images_per_s": 800.0,
                      "sampler_steps": 50, "gan_over_diffusion": 62.5}]})


def test_gpu_run_checks_judge_the_numbers_and_say_what_is_missing(tmp_path):
    """The GPU-only verdicts, which the smoke run skips, on the files a GPU run leaves (with known answers):
    a wrong number FAILs, a missing one FAILs and says why, and the summary renders every section."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_report
        import gpu_stages
        import gpu_suite
    finally:
        sys.path.remove(str(ROOT / "bench"))
    work = tmp_path / "work"
    _write_gpu_run(work)
    suite = gpu_suite.Suite(tmp_path / "out", work, smoke=False, total_s=480, caps=gpu_stages.caps_for(False))
    suite.collect()
    ok = {"status": "OK"}
    cut = {"name": "compiled-b", "status": "TIMEOUT", "reason": "timeout: after 15 s"}
    verdicts = {}
    for stage in gpu_stages.STAGES[:-1]:
        cmds = {n: {"name": n, **ok} for n in ("env", "gpu-tests", "engine-float32", "engine-float64", "compiled-s",
                                               "dp-step-bfloat16", "op-benches", "layer-strategies", "loaders",
                                               "train-step-eager", "train-step-compiled", "evaluate-features",
                                               "finetune", "distributed", "gan-step")}
        cmds["compiled-b"] = cut
        cmds["dp-step-float32"] = {"name": "dp-step-float32", "status": "FAILED", "reason": "failed: OOM"}
        verdicts.update({c.name: c for c in stage.checks(suite, cmds)})
    status = {name: c.status for name, c in verdicts.items()}
    assert status["CUDA device"] == "PASS" and status["project imports"] == "PASS"
    assert status["carried wheels import"] == "FAIL" and "tree" in verdicts["carried wheels import"].value
    assert status["Triton kernels on CUDA (tests/kernels/test_gpu.py)"] == "PASS"
    assert status["engine = loop reference on cuda, float32 (to precision)"] == "FAIL"
    assert "ghost-sum" in verdicts["engine = loop reference on cuda, float32 (to precision)"].reason
    assert status["engine with the kernels = torch path, on cuda"] == "PASS"
    assert status["engine = loop reference on cuda, float64"] == "PASS"
    assert status["compiled = eager at σ=0, DP step, UNet s (max rel. grad error)"] == "PASS"
    assert status["compiled = eager at σ=0, pre-training step, UNet s (max rel. grad error)"] == "FAIL"
    b = verdicts["compiled = eager at σ=0, DP step, UNet b (max rel. grad error)"]
    assert b.status == "FAIL" and "TIMEOUT" in b.reason
    assert status["every method ran (bfloat16)"] == "FAIL" and "vmap" in verdicts["every method ran (bfloat16)"].reason
    assert status["bk-mixed time / non-private (bfloat16)"] == "PASS"
    assert status["bk-mixed peak memory / non-private (bfloat16)"] == "FAIL"
    assert status["bk-mixed speed-up over the best Opacus (bfloat16)"] == "PASS"
    assert status["bk-mixed compiled time / non-private compiled (bfloat16)"] == "FAIL"  # no timing: cut short
    assert "OOM" in verdicts["bk-mixed time / non-private (float32)"].reason
    ops = verdicts["each Triton op ≥ 2× its torch reference (UNet shapes, batch 256)"]
    assert ops.status == "FAIL" and ops.value.startswith("1 of 2; slowest 1.33×")
    assert status["fused and ghost norms = materialised norms, per layer (max rel. diff)"] == "PASS"
    assert status["training steps measured (eager)"] == "PASS"
    assert status["training steps measured (compiled)"] == "FAIL"
    assert status["FID with bf16 features within 1% of fp32 (random-weight Inception)"] == "PASS"
    assert status["official CIFAR-10 fine-tune ≤ 1 h on one GPU (projection)"] == "PASS"
    assert verdicts["official CIFAR-10 fine-tune ≤ 1 h on one GPU (projection)"].value.startswith("29.3 min")
    assert status["1-rank NCCL DP step ≤ 1.05× the plain step"] == "FAIL"  # 1.08×
    assert status["8-GPU fine-tune projection (from the measured step; a projection)"] == "PASS"
    assert status["GAN DP discriminator step ≤ 1.3× non-private"] == "PASS"
    assert status["GAN sampling ≥ 100× the diffusion model's"] == "FAIL"  # 62.5×

    results = {"suite": {"mode": "gpu", "total_cap_s": 480, "wall_s": 470}, "stages": [],
               "checks": [vars(c) for c in verdicts.values()], "data": suite.results["data"]}
    summary = gpu_report.summary(results)
    assert "not rendered" not in summary
    for heading in ("Device ceilings", "DP step, UNet s", "Triton ops vs torch", "Per-layer strategies",
                    "Training steps", "Subset loaders", "FID features", "Fine-tune, config cifar10-eps10",
                    "Distributed DP step", "PRIVIMAGE+G"):
        assert f"### {heading}" in summary, heading
    assert "Pre-training: 100,000 steps" in summary and "= 1.39 h" in summary
