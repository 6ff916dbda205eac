"""The GPU suite's stages: what each runs (GPU run and ``--smoke``) and the checks it reports.

See ``bench/gpu_suite.py`` for the order, the caps and how commands run. A check is PASS or FAIL on the GPU
run, or SKIPPED with its reason (GPU-only parts of a smoke run, targets judged on a GPU only); a measurement
that is missing because its command failed or ran out of time is a FAIL that says so.

(Just over 400 lines: one table of stages, each with its command and its check side by side.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import gpu_report as R
from gpu_suite import Check, Command, Suite, install_commands

# Targets (DESIGN.md and issue 14).
DP_TIME, DP_MEMORY, VS_OPACUS, OP_SPEEDUP, FINETUNE_S = 1.1, 1.1, 4.0, 2.0, 3600.0
COMPILE_TOLERANCE = 1e-3  # compiled vs eager in float32: a wrong gradient is O(1) (as Inductor's CPU bug was)
FID_TOLERANCE = 0.01
OFFICIAL = dict(preset="s", batch=256, k=8)  # the official fine-tune's physical batch: 256 images × K = 8
SMOKE = dict(preset="tiny", batch=2, k=2)
PERF_SKIP = "smoke run on the CPU: performance targets are judged on a GPU"
# pytest in this process, one test after another (pyproject's addopts spread the suite over workers with
# pytest-xdist, which the GPU image lacks and whose output the verdicts would not parse).
PYTEST = ("-m", "pytest", "-o", "addopts=--import-mode=importlib -ra --benchmark-disable", "-p", "no:xdist",
          "-p", "no:cacheprovider")


@dataclass
class Stage:
    key: str
    title: str
    gpu_cap: float
    smoke_cap: float
    commands: Callable[[Suite], list[Command]]
    checks: Callable[[Suite, dict], list[Check]]
    default: bool = True


def shares(suite: Suite, key: str, *parts: float) -> list[float]:
    """The stage's cap split in the given proportions."""
    return [suite.caps[key] * p / sum(parts) for p in parts]


def missing(cmd: dict | None) -> str:
    if cmd is None:
        return "not run"
    return f"no result: {cmd['name']} {cmd['status']}" + (f" ({cmd.get('reason')})" if cmd.get("reason") else "")


def check(stage, name, ok, value, target, reason="") -> Check:
    return Check(stage, name, "PASS" if ok else "FAIL", value, target, reason)


# ---- 1. environment ----------------------------------------------------------------------------------------

def env_commands(suite: Suite) -> list[Command]:
    cmds = install_commands(suite)
    installs, env = shares(suite, "env", 27, 18)
    total = sum(c.cap_s for c in cmds)
    for c in cmds:
        c.cap_s *= installs / total
    return cmds + [Command("env", suite.python("bench/gpu_env.py", "--json", suite.work / "env.json", "--seconds",
                                               1 if suite.smoke else 6, "--device", suite.device), cap_s=env)]


def env_checks(suite: Suite, cmds: dict) -> list[Check]:
    env = suite.data("env")
    if env is None:
        return [Check("env", "environment recorded", "FAIL", reason=missing(cmds.get("env")))]
    imports = env.get("imports", {})
    out = []
    if suite.smoke:
        out.append(Check("env", "CUDA device", "SKIPPED", reason=suite.gpu_only()))
    else:
        gpu = env.get("gpu", {})
        out.append(check("env", "CUDA device", env.get("cuda_available"), gpu.get("name", "none"), "present",
                         env.get("error", "")))
    for name, modules in (("project imports", ["privimage", "privimage.engine", "privimage.kernels", "triton"]),
                          ("carried wheels import", ["opacus", "prv_accountant", "dp_accounting"]),
                          ("test tools import", ["pytest", "pytest_benchmark", "hypothesis"])):
        bad = [m for m in modules if not imports.get(m, {}).get("ok")]
        out.append(check("env", name, not bad, ", ".join(modules) if not bad else "missing: " + ", ".join(
            f"{m} ({imports.get(m, {}).get('error', '?')})" for m in bad), "all import"))
    return out


# ---- 2. correctness ----------------------------------------------------------------------------------------

def pytest_results(log) -> dict[str, str]:
    """test id -> PASSED/FAILED/ERROR/SKIPPED, from ``pytest -v`` lines (works for a run cut short)."""
    if not log.exists():
        return {}
    text = log.read_text("utf-8", "replace")
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)",
                                                         text, re.M)}


ENGINE_TESTS = ["tests/kernels", "tests/engine"]  # the tests that take the ``device`` fixture, by -m on_device


def correctness_commands(suite: Suite) -> list[Command]:
    """Most telling first: the kernels on CUDA, the engine in float32 (with the kernel-engine tests), compiled
    = eager on UNet s, then the engine in float64 and compiled = eager on UNet b."""
    pytest = suite.python(*PYTEST, "-v", "--continue-on-collection-errors")
    gpu, f32, comp_s, f64, comp_b = shares(suite, "correctness", 35, 40, 40, 30, 15)
    if suite.smoke:
        selection = ["tests/engine/test_dp_sgd.py", "-m", "on_device", "-k", "conv_1x1 and bk-mixed and sum"]
        f32_args, f64_args = selection, selection
    else:
        f32_args = ENGINE_TESTS + ["-m", "on_device"]
        f64_args = ENGINE_TESTS + ["-m", "on_device", "-k", "not test_engine_with_kernels"]  # no precision param

    def engine(dtype, args, cap, skip=None):
        return Command(f"engine-{dtype}", pytest + args, cap_s=cap, skip=skip,
                       env={"PRIVIMAGE_TEST_DEVICE": suite.device, "PRIVIMAGE_TEST_DTYPES": dtype})

    def compiled(preset, cap):
        return Command(f"compiled-{preset}", suite.python(
            "bench/dp_step.py", "--check-only", "--device", suite.device, "--preset", preset,
            "--batch", OFFICIAL["batch"], "--k", OFFICIAL["k"], "--json", suite.work / f"compiled_{preset}.json"),
            cap_s=cap, skip=suite.gpu_only("Inductor takes minutes on this CPU (and computed wrong gradients "
                                           "for this UNet there)"))

    return [Command("gpu-tests", pytest + ["tests/kernels/test_gpu.py"], cap_s=gpu, skip=suite.gpu_only()),
            engine("float32", f32_args, f32 + (gpu if suite.smoke else 0)), compiled("s", comp_s),
            engine("float64", f64_args, f64, skip="smoke run: the normal suite runs these on the CPU in float64"
                   if suite.smoke else None), compiled("b", comp_b)]


def correctness_checks(suite: Suite, cmds: dict) -> list[Check]:
    out = []
    where = suite.device
    gpu = pytest_results(suite.work / "logs" / "correctness-gpu-tests.log")
    if suite.smoke:
        out.append(Check("correctness", "Triton kernels on CUDA (tests/kernels/test_gpu.py)", "SKIPPED",
                         reason=suite.gpu_only()))
    else:
        out.append(_tests_check("Triton kernels on CUDA (tests/kernels/test_gpu.py)", gpu, cmds.get("gpu-tests")))
    logs = {d: pytest_results(suite.work / "logs" / f"correctness-engine-{d}.log") for d in ("float32", "float64")}
    groups = {"float64": ({k: v for k, v in logs["float64"].items() if "float64" in k}, "engine-float64"),
              "float32": ({k: v for k, v in logs["float32"].items() if "float32" in k}, "engine-float32"),
              "kernels": ({k: v for k, v in logs["float32"].items() if "test_engine_with_kernels" in k},
                          "engine-float32")}
    for group, title in (("float32", f"engine = loop reference on {where}, float32 (to precision)"),
                         ("kernels", f"engine with the kernels = torch path, on {where}"),
                         ("float64", f"engine = loop reference on {where}, float64")):
        if suite.smoke and group != "float32":
            out.append(Check("correctness", title, "SKIPPED", reason="smoke run: the normal suite runs these on "
                                                                    "the CPU"))
        else:
            results, cmd = groups[group]
            out.append(_tests_check(title, results, cmds.get(cmd)))
    for preset in ("s", "b"):
        data = suite.data(f"compiled_{preset}")
        for method, what in (("bk-mixed-compiled", "DP step"), ("nonprivate-compiled", "pre-training step")):
            name = f"compiled = eager at σ=0, {what}, UNet {preset} (max rel. grad error)"
            if suite.smoke:
                out.append(Check("correctness", name, "SKIPPED", reason=suite.gpu_only("compilation")))
                continue
            row = (data or {}).get("check", {}).get(method)
            if row is None:
                out.append(Check("correctness", name, "FAIL", reason=missing(cmds.get(f"compiled-{preset}"))))
                continue
            err = row["max_rel_grad_error"]
            out.append(check("correctness", name, err <= COMPILE_TOLERANCE, f"{err:.2e} ({row['worst_param']})",
                             f"≤ {COMPILE_TOLERANCE:g}"))
    return out


def _tests_check(name: str, results: dict, cmd: dict | None) -> Check:
    counts = {s: sum(1 for v in results.values() if v == s) for s in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    value = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    bad = [k for k, v in results.items() if v in ("FAILED", "ERROR")]
    if not results:
        return Check("correctness", name, "FAIL", reason=missing(cmd) if cmd and cmd["status"] != "OK" else
                     "no test ran")
    reason = ("failing: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")) if bad else ""
    if not bad and cmd and cmd["status"] == "TIMEOUT":
        return Check("correctness", name, "FAIL", value, "all pass", f"cut short: {missing(cmd)}")
    return check("correctness", name, not bad and counts["PASSED"] > 0, value, "all pass", reason)


# ---- 3. DP step --------------------------------------------------------------------------------------------

def dp_step_commands(suite: Suite) -> list[Command]:
    common = ["bench/dp_step.py", "--device", suite.device, "--no-check"]
    if suite.smoke:
        return [Command("dp-step-float32", suite.python(
            *common, "--preset", SMOKE["preset"], "--batch", SMOKE["batch"], "--k", SMOKE["k"], "--dtype", "float32",
            "--warmup", 0, "--repeats", 1, "--memory", "in-process", "--json", suite.work / "dp_step_float32.json",
            "--methods", "nonprivate", "bk-mixed", "opacus-hooks", "opacus-ghost"),
            cap_s=suite.caps["dp-step"])]
    caps = shares(suite, "dp-step", 55, 45)
    return [Command(f"dp-step-{dtype}", suite.python(
        *common, "--preset", OFFICIAL["preset"], "--batch", OFFICIAL["batch"], "--k", OFFICIAL["k"], "--dtype", dtype,
        "--warmup", 1, "--repeats", 5, "--json", suite.work / f"dp_step_{dtype}.json"), cap_s=cap)
        for dtype, cap in zip(("bfloat16", "float32"), caps)]


def dp_step_checks(suite: Suite, cmds: dict) -> list[Check]:
    out = []
    for dtype in ("bfloat16", "float32"):
        if suite.smoke and dtype == "bfloat16":
            continue
        cmd = cmds.get(f"dp-step-{dtype}")
        rows = {r["method"]: r for r in (suite.data(f"dp_step_{dtype}") or {}).get("rows", [])}
        errors = [f"{m}: {r['error']}" for m, r in rows.items() if "error" in r]
        out.append(check("dp-step", f"every method ran ({dtype})", rows and not errors,
                         f"{len(rows) - len(errors)} of {len(rows)}", "no error", "; ".join(errors) or
                         ("" if rows else missing(cmd))))
        for method, key, name, target, better in [
                ("bk-mixed", "time_ratio", "bk-mixed time / non-private", DP_TIME, "max"),
                ("bk-mixed", "mem_ratio", "bk-mixed peak memory / non-private", DP_MEMORY, "max"),
                ("bk-mixed", "speedup_vs_best_opacus", "bk-mixed speed-up over the best Opacus", VS_OPACUS, "min"),
                ("bk-mixed-compiled", "time_ratio_vs_compiled", "bk-mixed compiled time / non-private compiled",
                 DP_TIME, "max"),
                ("bk-mixed-compiled", "mem_ratio_vs_compiled", "bk-mixed compiled memory / non-private compiled",
                 DP_MEMORY, "max")]:
            name = f"{name} ({dtype})"
            if suite.smoke:
                out.append(Check("dp-step", name, "SKIPPED", reason=PERF_SKIP))
                continue
            value = rows.get(method, {}).get(key)
            if value is None:
                reason = rows.get(method, {}).get("error") or missing(cmd)
                out.append(Check("dp-step", name, "FAIL", reason=reason))
                continue
            ok = value <= target if better == "max" else value >= target
            sign = "≤" if better == "max" else "≥"
            out.append(check("dp-step", name, ok, f"{value:.2f}×", f"{sign} {target:g}×"))
    return out


# ---- 4. kernels --------------------------------------------------------------------------------------------

def kernels_commands(suite: Suite) -> list[Command]:
    ops, layers = shares(suite, "kernels", 40, 30)
    if suite.smoke:
        bench = Command("op-benches", suite.python(*PYTEST, "bench/", "--collect-only", "-q"), cap_s=ops)
        layer_args = ["--preset", SMOKE["preset"], "--resolution", 8, "--samples", SMOKE["batch"], "--k", SMOKE["k"],
                      "--repeats", 2]
    else:
        bench = Command("op-benches", suite.python(*PYTEST, "bench/", "--benchmark-enable", "-v",
                                                   "--continue-on-collection-errors", "-k", "torch_ref or triton"),
                        cap_s=ops,
                        env={"PRIVIMAGE_BENCH_BATCHES": str(OFFICIAL["batch"])})
        layer_args = ["--preset", OFFICIAL["preset"], "--samples", OFFICIAL["batch"], "--k", OFFICIAL["k"],
                      "--repeats", 10]
    return [bench, Command("layer-strategies", suite.python(
        "bench/layer_strategies.py", "--device", suite.device, *layer_args, "--json",
        suite.work / "layer_strategies.json"), cap_s=layers)]


def kernels_checks(suite: Suite, cmds: dict) -> list[Check]:
    out = []
    name = f"each Triton op ≥ {OP_SPEEDUP:g}× its torch reference (UNet shapes, batch {OFFICIAL['batch']})"
    if suite.smoke:
        out.append(Check("kernels", name, "SKIPPED", reason=suite.gpu_only("Triton runs compiled on CUDA only")))
        cmd = cmds.get("op-benches")
        out.append(check("kernels", "op benchmarks collect", cmd and cmd["status"] == "OK", cmd and cmd["status"],
                         "no error", "" if cmd and cmd["status"] == "OK" else missing(cmd)))
    else:
        pairs = R.op_speedups(suite.results["data"].get("kernels_csv", []))
        if not pairs:
            out.append(Check("kernels", name, "FAIL", reason=missing(cmds.get("op-benches"))))
        else:
            worst = min(pairs, key=lambda p: p["speedup"])
            n_ok = sum(p["speedup"] >= OP_SPEEDUP for p in pairs)
            out.append(check("kernels", name, n_ok == len(pairs),
                             f"{n_ok} of {len(pairs)}; slowest {worst['speedup']:.2f}× ({worst['op']} "
                             f"{worst['shape']} {worst['dtype']})", f"≥ {OP_SPEEDUP:g}× each"))
        tests = pytest_results(suite.work / "logs" / "kernels-op-benches.log")
        bad = [k for k, v in tests.items() if v in ("FAILED", "ERROR")]
        out.append(check("kernels", "op benchmarks ran", tests and not bad, f"{len(tests)} cases", "no error",
                         "; ".join(bad[:8]) if bad else ("" if tests else missing(cmds.get("op-benches")))))
    data = suite.data("layer_strategies")
    name = "fused and ghost norms = materialised norms, per layer (max rel. diff)"
    if data is None or not data.get("layers"):
        out.append(Check("kernels", name, "FAIL", reason=missing(cmds.get("layer-strategies"))))
        return out
    tol = 5e-2 if data["meta"].get("dtype") == "bfloat16" else 1e-4
    diffs, errors = [], []
    for layer in data["layers"]:
        for strategy, r in layer["strategies"].items():
            if "error" in r:
                errors.append(f"{layer['name']} {strategy}: {r['error']}")
            elif "max_rel_diff" in r:
                diffs.append((r["max_rel_diff"], f"{layer['name']} {strategy}"))
    worst = max(diffs) if diffs else (float("nan"), "")
    out.append(check("kernels", name, diffs and not errors and worst[0] <= tol,
                     f"{worst[0]:.1e} ({worst[1]}), {len(data['layers'])} layers", f"≤ {tol:g} "
                     f"({data['meta'].get('dtype')})", "; ".join(errors[:5])))
    return out


# ---- 5. throughput -----------------------------------------------------------------------------------------

def throughput_commands(suite: Suite) -> list[Command]:
    eager, loaders, features, compiled, draws = shares(suite, "throughput", 15, 12, 13, 20, 3)
    if suite.smoke:
        train = ["--presets", SMOKE["preset"], "--batch", SMOKE["batch"], "--k", SMOKE["k"], "--warmup", 0,
                 "--repeats", 1]
        load = ["--size", 200, "--resolutions", 8, "--batch", 64, "--epochs", 2, "--loaders", "device"]
    else:
        train = ["--presets", "s", "b", "--batch", OFFICIAL["batch"], "--k", OFFICIAL["k"], "--warmup", 2,
                 "--repeats", 5]
        load = ["--size", 20000, "--resolutions", 32, 64, "--batch", 256, "--epochs", 3]
    return [Command("train-step-eager", suite.python("bench/train_step.py", "--device", suite.device, *train,
                                                     "--json", suite.work / "train_step_eager.json"), cap_s=eager),
            Command("loaders", suite.python("bench/loaders.py", "--device", suite.device, *load), cap_s=loaders),
            Command("record-draws", suite.python("bench/randomness.py", "--device", suite.device, "--repeats",
                                                 2 if suite.smoke else 10, "--json", suite.work / "randomness.json"),
                    cap_s=draws),
            Command("evaluate-features", suite.python("bench/evaluate.py", "--features-check", "--device",
                                                      suite.device, "--images", 2000), cap_s=features,
                    skip=suite.gpu_only("the Inception at 299×299 takes seconds per image on this CPU")),
            Command("train-step-compiled", suite.python("bench/train_step.py", "--device", suite.device, *train,
                                                        "--compile", "--json",
                                                        suite.work / "train_step_compiled.json"),
                    cap_s=compiled, skip=suite.gpu_only("compilation"))]


def throughput_checks(suite: Suite, cmds: dict) -> list[Check]:
    out = []
    for mode in ("eager", "compiled"):
        name = f"training steps measured ({mode})"
        if suite.smoke and mode == "compiled":
            out.append(Check("throughput", name, "SKIPPED", reason=suite.gpu_only("compilation")))
            continue
        results = (suite.data(f"train_step_{mode}") or {}).get("results", [])
        complete = [r for r in results if "pretrain" in r and any(k.startswith("dp_k") for k in r)]
        value = "; ".join(f"{r['preset']}: pretrain {r['pretrain']['images_per_s']:.4g} img/s" +
                          "".join(f", DP K={k[4:]} {v['images_per_s']:.4g} img/s" for k, v in r.items()
                                  if k.startswith("dp_k")) for r in complete)
        want = 1 if suite.smoke else 2
        out.append(check("throughput", name, len(complete) >= want, value, f"{want} preset(s)",
                         "" if len(complete) >= want else missing(cmds.get(f"train-step-{mode}"))))
    draws = (suite.data("randomness") or {}).get("timings", [])
    out.append(check("throughput", "per-record secret draws: loop vs vectorised", bool(draws), "; ".join(
        f"{r['shape']}: loop {r['loop']['median_ms']:.3g} ms, vectorised {r['vectorised']['median_ms']:.3g} ms"
        for r in draws), "rows", "" if draws else missing(cmds.get("record-draws"))))
    rows = suite.results["data"].get("loaders_csv", [])
    out.append(check("throughput", "loaders measured", bool(rows), "; ".join(
        f"{r['loader']} {r['resolution']}px {int(r['images_per_s']):,} img/s" for r in rows), "rows",
        "" if rows else missing(cmds.get("loaders"))))
    name = f"FID with bf16 features within {FID_TOLERANCE:.0%} of fp32 (random-weight Inception)"
    if suite.smoke:
        out.append(Check("throughput", name, "SKIPPED", reason=suite.gpu_only("bf16 on the GPU")))
    else:
        feats = suite.data("evaluate_features")
        if feats is None:
            out.append(Check("throughput", name, "FAIL", reason=missing(cmds.get("evaluate-features"))))
        else:
            out.append(check("throughput", name, feats["fid_rel_diff"] <= FID_TOLERANCE,
                             f"{feats['fid_rel_diff']:.2%} (fp32 {feats['float32']['fid']:.2f}, bf16 "
                             f"{feats['bfloat16']['fid']:.2f})", f"≤ {FID_TOLERANCE:.0%}"))
    return out


# ---- 6. the official fine-tune -------------------------------------------------------------------------------

def finetune_commands(suite: Suite) -> list[Command]:
    if suite.smoke:
        args = ["--config", "test", "--images", 32, "--steps", 1, "--sigma", 1.0]
    else:
        args = ["--config", "cifar10-eps10", "--steps", 3, "--sigma", 2.2]
    pretrain = R.pretrain_step(suite.results["data"])
    if pretrain:
        args += ["--pretrain-step-ms", f"{pretrain['median_ms']:.3f}", "--pretrain-batch", pretrain["batch"]]
    return [Command("finetune", suite.python("bench/finetune_projection.py", "--device", suite.device, *args,
                                             "--json", suite.work / "finetune_projection.json"),
                    cap_s=suite.caps["finetune"])]


def finetune_checks(suite: Suite, cmds: dict) -> list[Check]:
    data = suite.data("finetune_projection") or {}
    steps = data.get("steps", [])
    out = [check("finetune", "fine-tune loop ran", bool(steps), f"{len(steps)} logical step(s)", "steps logged",
                 "" if steps else missing(cmds.get("finetune")))]
    name = "official CIFAR-10 fine-tune ≤ 1 h on one GPU (projection)"
    if suite.smoke:
        out.append(Check("finetune", name, "SKIPPED", reason=PERF_SKIP))
    elif "projected_finetune_s" not in data:
        out.append(Check("finetune", name, "FAIL", reason=missing(cmds.get("finetune"))))
    else:
        s = data["projected_finetune_s"]
        out.append(check("finetune", name, s <= FINETUNE_S, f"{s / 60:.1f} min ({data['meta']['planned_steps']} "
                         f"steps × {data['median_step_s'] + data['epsilon_s']:.2f} s, {data['meta']['device']})",
                         "≤ 60 min"))
    return out


# ---- 7. scale: the distributed step over NCCL, the GAN (issues 17 and 18) ----------------------------------

NCCL_OVERHEAD, GAN_DP_RATIO, GAN_SAMPLING = 1.05, 1.3, 100.0


def scale_commands(suite: Suite) -> list[Command]:
    dist_cap, gan_cap = shares(suite, "scale", 1, 1)
    if suite.smoke:
        dist = ["--presets", "demo", "--overhead-preset", "demo", "--images", 2, "--k", 1, "--repeats", 2,
                "--bucket-presets", "demo", "--bucket-kib", 1024, "--allreduce-repeats", 2]
        gan = ["--presets", "demo", "--warmup", 0, "--repeats", 1, "--sample-repeats", 1, "--skip-cifar-sampling"]
    else:  # T₁ for the 8-GPU projection: the finetune stage's measured logical step, when it has one
        ft = suite.data("finetune_projection") or {}
        step = [f"{ft['median_step_s'] + ft.get('epsilon_s', 0.0):.3f}"] if "median_step_s" in ft else []
        dist = ["--presets", "demo", "cifar10-eps10", "--overhead-preset", "cifar10-eps10", "--images", 64,
                "--k", 4, "--repeats", 8, "--gpus", 1, 8, *(["--step-s", *step] if step else [])]
        gan = ["--presets", "32", "--warmup", 2, "--repeats", 5, "--config-batches"]
    return [Command("distributed", suite.python("bench/distributed.py", "--device", suite.device, *dist, "--json",
                                                suite.work / "distributed.json"), cap_s=dist_cap),
            Command("gan-step", suite.python("bench/train_step.py", "--gan", "--device", suite.device, *gan,
                                             "--json", suite.work / "train_step_gan.json"), cap_s=gan_cap)]


def scale_checks(suite: Suite, cmds: dict) -> list[Check]:
    out = []
    dist = suite.data("distributed") or {}
    over = dist.get("overhead") or {}
    name = f"1-rank {'gloo' if suite.smoke else 'NCCL'} DP step ≤ {NCCL_OVERHEAD}× the plain step"
    if not over:
        out.append(Check("scale", name, "FAIL", reason=missing(cmds.get("distributed"))))
    elif suite.smoke:
        out.append(Check("scale", name, "SKIPPED", f"{over['ratio']:.3f}×", reason=PERF_SKIP))
    else:
        out.append(check("scale", name, over["ratio"] <= NCCL_OVERHEAD,
                         f"{over['ratio']:.3f}× ({over['distributed_ms']:.1f} vs {over['plain_ms']:.1f} ms, "
                         f"{over['bytes_all_reduced'] / 2 ** 20:.2f} MiB all-reduced)", f"≤ {NCCL_OVERHEAD}×"))
    proj = dist.get("projection") or {}
    rows = proj.get("rows", []) if isinstance(proj, dict) else proj
    out.append(check("scale", "8-GPU fine-tune projection (from the measured step; a projection)", bool(rows),
                     f"{len(rows)} rows", "rows", "" if rows else missing(cmds.get("distributed"))))
    gan = suite.data("train_step_gan") or {}
    for name, rows, key, target, ok in (
            (f"GAN DP discriminator step ≤ {GAN_DP_RATIO}× non-private", gan.get("discriminator_step", []),
             "dp_over_non_private", f"≤ {GAN_DP_RATIO}×", lambda v: v <= GAN_DP_RATIO),
            (f"GAN sampling ≥ {GAN_SAMPLING:g}× the diffusion model's", gan.get("sampling", []),
             "gan_over_diffusion", f"≥ {GAN_SAMPLING:g}×", lambda v: v >= GAN_SAMPLING)):
        values = [(f"{r.get('preset') or r.get('setting')}" + (f" ({r['batch']} pairs)" if "batch" in r else ""),
                   r[key], r.get("flop_ratio")) for r in rows if key in r]
        value = "; ".join(f"{p}: {v:.3g}×" + (f" (FLOP ratio {f:.3g}×)" if f else "") for p, v, f in values)
        if not values:
            out.append(Check("scale", name, "FAIL", reason=missing(cmds.get("gan-step"))))
        elif suite.smoke:
            out.append(Check("scale", name, "SKIPPED", value, target, PERF_SKIP))
        else:
            out.append(check("scale", name, all(ok(v) for _, v, _ in values), value, target))
    return out


# ---- self-test (not run by default): what the time caps and failures do ------------------------------------

def selftest_commands(suite: Suite) -> list[Command]:
    sleeper = ("import os, subprocess, sys, time; child = subprocess.Popen(['sleep', '600']); "
               "print(f'pid={os.getpid()} pid={child.pid}', flush=True); time.sleep(600)")
    fail, sleep = shares(suite, "selftest", 1, 1)
    return [Command("fail", suite.python("-c", "raise SystemExit(3)"), cap_s=fail),
            Command("sleep", suite.python("-c", sleeper), cap_s=sleep)]


STAGES = [
    Stage("env", "environment and install", 40, 90, env_commands, env_checks),
    Stage("correctness", "GPU tests, engine exactness on the device, compiled = eager", 145, 120,
          correctness_commands, correctness_checks),
    Stage("dp-step", "DP step vs non-private and Opacus (bench/dp_step.py)", 95, 90, dp_step_commands,
          dp_step_checks),
    Stage("kernels", "Triton ops vs torch; per-layer norm strategies", 65, 90, kernels_commands, kernels_checks),
    Stage("throughput", "training steps, loaders, FID features", 55, 120, throughput_commands, throughput_checks),
    Stage("finetune", "official fine-tune: 3 logical steps and the projection", 45, 120, finetune_commands,
          finetune_checks),
    Stage("scale", "distributed step over NCCL at world 1, 8-GPU projection; the GAN's DP step and sampling", 35,
          120, scale_commands, scale_checks),
    Stage("selftest", "self-test of the time caps (not run by default)", 4, 4, selftest_commands,
          lambda suite, cmds: [], default=False),
]


def caps_for(smoke: bool) -> dict[str, float]:
    return {s.key: float(s.smoke_cap if smoke else s.gpu_cap) for s in STAGES}
