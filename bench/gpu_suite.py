"""The GPU check: one command that verifies and measures everything GPU-only, within 8 minutes on one H100/H200.

    bash bench/gpu_suite.sh              # on the GPU machine; results in $OUT (or ./gpu-out)
    bash bench/gpu_suite.sh --smoke      # on any CPU: tiny sizes, GPU-only parts SKIPPED with the reason

Stages, most important first (``--list`` prints each one's cap on the GPU and in ``--smoke``; they sum to
8 minutes on the GPU):

1. ``env``: the carried wheels (``.whl/``, made by ``bench/gpu_wheels.sh``) and the project installed
   without the network; nvidia-smi, versions, what imports, bf16 matmul TFLOP/s and copy GB/s (``gpu_env.py``).
2. ``correctness``: ``tests/kernels/test_gpu.py``; the engine's exactness tests on CUDA in float64 and
   float32 (``-m on_device``, ``PRIVIMAGE_TEST_DEVICE=cuda``); compiled vs eager at σ = 0 for the DP step and
   the pre-training step on the UNet presets s and b (``dp_step.py --check-only``).
3. ``dp-step``: ``dp_step.py`` at the official physical batch (256 images × K = 8) on UNet "s", bf16
   then fp32: every method's time and peak memory, ratios to non-private.
4. ``kernels``: ``pytest bench/ --benchmark-enable`` (each Triton op against its torch reference at the
   UNet's layer shapes, batch 256) and ``layer_strategies.py`` (per layer with K = 8: fused vs materialised vs
   ghost norms, and the clipped sums).
5. ``throughput``: ``train_step.py`` (presets s and b, eager, then compiled), ``loaders.py`` at 32 and
   64, ``evaluate.py --features-check`` (bf16 vs fp32 FID features).
6. ``finetune``: ``finetune_projection.py``: the pipeline's fine-tune loop at the official CIFAR-10
   shapes for 3 logical steps, and the projection of the official fine-tune and pre-training.
7. ``scale``: ``distributed.py --device cuda`` (the DP step through a 1-rank NCCL group against the plain
   one, bytes all-reduced, the 8-GPU projection from the ``finetune`` stage's measured step) and
   ``train_step.py --gan`` at CIFAR-10 sizes (DP vs non-private discriminator step, GAN vs diffusion sampling).
8. ``summary``: ``summary.md``: every check PASS/FAIL/SKIPPED with its number and target.

Each command runs as a subprocess in its own process group with a time cap; a command over its cap is
killed (TIMEOUT) and the suite goes on, as it does after a failure (a failure is a result). Time left over by
a command rolls forward to the next: command i may run until the total deadline minus the caps of all that
follow, so the total stays within the sum of the caps. Scripts rewrite their JSON after every measurement,
so a command stopped by its cap still reports what it measured. ``results.json`` and ``summary.md`` are
rewritten after every command: a suite killed from outside leaves its results so far.

Files written to the output folder (the device tool returns at most 8, each ≤ 16 MiB): ``summary.md``,
``results.json`` (every stage, command, check and measurement), ``env.json``, ``kernels.csv`` (the op
benchmarks' rows) and ``log.txt`` (every command's output, the last 512 KiB of each).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gpu_report

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SITE = Path(tempfile.gettempdir()) / "privimage-gpu-site"  # carried wheels, and the project if pip cannot
LOG_TAIL = 512 * 1024
STATUS_ORDER = ["TIMEOUT", "FAILED", "OK", "SKIPPED"]  # a stage takes the first that one of its commands has


@dataclass
class Command:
    """One subprocess of a stage (or a reason it is skipped)."""

    name: str
    argv: list[str] = field(default_factory=list)
    cap_s: float = 30.0
    env: dict = field(default_factory=dict)
    skip: str | None = None  # reason: SKIPPED without running
    run_if_failed: str | None = None  # run only if the named command of the same stage failed


@dataclass
class Check:
    """One line of the summary: PASS / FAIL / SKIPPED, the number behind it, and the target."""

    stage: str
    name: str
    status: str
    value: str = ""
    target: str = ""
    reason: str = ""


class Suite:
    def __init__(self, out: Path, work: Path, smoke: bool, total_s: float, caps: dict[str, float]):
        self.out, self.work, self.smoke = out, work, smoke
        self.device = "cpu" if smoke else "cuda"
        self.py = sys.executable
        self.caps = caps
        self.start = time.monotonic()
        self.deadline = self.start + total_s
        self.total_s = total_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PRIVIMAGE_BENCH_RESULTS": str(work)}
        self.results: dict = {"suite": {"mode": "smoke" if smoke else "gpu", "started": gpu_report.now(),
                                        "total_cap_s": total_s, "argv": sys.argv[1:], "out": str(out)},
                              "stages": [], "checks": [], "data": {}}
        self.logs: list[str] = []

    # ---- running ------------------------------------------------------------------------------------------

    def run(self, stage: str, cmd: Command, reserved_after: float) -> dict:
        """Run ``cmd`` until the total deadline minus ``reserved_after`` (the caps of everything after it): its
        own cap plus whatever earlier commands left unused, never eating into the caps still to come."""
        rec = {"name": cmd.name, "argv": cmd.argv, "nominal_cap_s": round(cmd.cap_s, 1)}
        if cmd.skip:
            print(f"[{stage}] {cmd.name}: SKIPPED ({cmd.skip})", flush=True)
            return {**rec, "status": "SKIPPED", "reason": cmd.skip}
        cap = self.deadline - time.monotonic() - reserved_after
        rec["cap_s"] = round(cap, 1)
        if cap < 1:
            print(f"[{stage}] {cmd.name}: TIMEOUT (no time left)", flush=True)
            return {**rec, "status": "TIMEOUT", "reason": "no time left in the suite's total cap"}
        log = self.work / "logs" / f"{stage}-{cmd.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{stage}] {cmd.name}: running (cap {cap:.0f} s): {shlex.join(cmd.argv)}", flush=True)
        t0 = time.monotonic()
        with open(log, "wb") as f:
            try:
                proc = subprocess.Popen(cmd.argv, cwd=ROOT, env={**self.env, **cmd.env}, stdout=f,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                return {**rec, "status": "FAILED", "reason": f"could not start: {e}"}
            try:
                rc = proc.wait(timeout=cap)
                status = "OK" if rc == 0 else "FAILED"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, status = None, "TIMEOUT"
        wall = time.monotonic() - t0
        tail = _tail(log, LOG_TAIL)
        self.logs.append(f"===== [{stage}] {cmd.name}: {status} rc={rc} in {wall:.1f} s (cap {cap:.0f} s)\n"
                         f"$ {shlex.join(cmd.argv)}\n{tail}\n")
        last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
        print(f"[{stage}] {cmd.name}: {status} in {wall:.1f} s" + (f" -- {last[0][:200]}" if status != "OK" else ""),
              flush=True)
        return {**rec, "status": status, "rc": rc, "wall_s": round(wall, 1),
                "reason": "" if status == "OK" else f"{status.lower()}: {last[0][:300]}"}

    def run_stages(self, stages) -> None:
        """Each stage's commands are made when the stage starts (they may use earlier results); each stage's
        commands share its cap (``Command.cap_s`` are their shares)."""
        for i, stage in enumerate(stages):
            later_stages = sum(self.caps[s.key] for s in stages[i + 1:])
            t0 = time.monotonic()
            cmds, records = stage.commands(self), []
            for j, cmd in enumerate(cmds):
                if cmd.run_if_failed and not any(r["name"] == cmd.run_if_failed and r["status"] == "FAILED"
                                                 for r in records):
                    continue
                reserved = later_stages + sum(c.cap_s for c in cmds[j + 1:] if not c.skip)
                records.append(self.run(stage.key, cmd, reserved))
                self.collect()
                self.save(stage, records, t0, partial=True)
            self.save(stage, records, t0, partial=False)

    def save(self, stage, records, t0, partial: bool) -> None:
        statuses = [r["status"] for r in records]
        status = next((s for s in STATUS_ORDER if s in statuses), "SKIPPED")
        if status == "FAILED" and stage.key == "env" and all(r["status"] != "FAILED" for r in records
                                                              if r["name"] != "install-project"):
            status = "OK"  # pip could not install the project, the fallback did: recorded in env.json
        entry = {"key": stage.key, "title": stage.title, "status": status, "nominal_cap_s": self.caps[stage.key],
                 "wall_s": round(time.monotonic() - t0, 1), "commands": records, "partial": partial}
        self.results["stages"] = [s for s in self.results["stages"] if s["key"] != stage.key] + [entry]
        self.results["checks"] = [c for c in self.results["checks"] if c["stage"] != stage.key]
        try:
            checks = stage.checks(self, {r["name"]: r for r in records})
        except Exception as e:  # a bug in a check must not cost the rest of the run
            checks = [Check(stage.key, "the stage's checks", "FAIL",
                            reason=f"check code raised {type(e).__name__}: {e}")]
        self.results["checks"] += [asdict(c) for c in checks]
        self.write()

    def collect(self) -> None:
        """Every JSON the scripts wrote into the work folder, parsed, into results['data']."""
        for path in sorted(self.work.glob("*.json")):
            try:
                self.results["data"][path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                self.results["data"][path.stem] = {"_unreadable": str(e)}
        for name, key in (("kernels-cpu.csv" if self.smoke else "kernels-cuda.csv", "kernels_csv"),
                          ("loaders.csv", "loaders_csv")):
            if (self.work / name).exists():
                self.results["data"][key] = gpu_report.read_csv(self.work / name)

    def write(self) -> None:
        self.results["suite"]["wall_s"] = round(time.monotonic() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        _write(self.out / "results.json", json.dumps(self.results, indent=1, default=str) + "\n")
        _write(self.out / "summary.md", gpu_report.summary(self.results))
        _write(self.out / "log.txt", "".join(self.logs)[-(15 * 2 ** 20):])
        if "env" in self.results["data"]:
            _write(self.out / "env.json", json.dumps(self.results["data"]["env"], indent=1) + "\n")
        for name in ("kernels-cuda.csv", "kernels-cpu.csv"):
            if (self.work / name).exists():
                shutil.copyfile(self.work / name, self.out / "kernels.csv")

    # ---- helpers for the stages ---------------------------------------------------------------------------

    def python(self, *args) -> list[str]:
        return [self.py, *map(str, args)]

    def data(self, name: str) -> dict | None:
        d = self.results["data"].get(name)
        return d if isinstance(d, dict) and "_unreadable" not in d else None

    def gpu_only(self, why: str = "") -> str | None:
        return f"smoke run on the CPU: {why or 'needs a CUDA device'}" if self.smoke else None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's whole process group, SIGKILL five seconds later if anything is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    # the leader is gone; make sure no straggler of its group survives
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        text = f.read().decode("utf-8", "replace")
    return (f"[... {size - limit} bytes cut ...]\n" if size > limit else "") + text


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- installation (stage 1) ----------------------------------------------------------------------------------

def link_project(site: Path) -> None:
    """The project importable without pip: ``site/privimage`` holds links to privimage/'s entries and to
    engine/ and kernels/ (installed as privimage.engine and privimage.kernels), put on PYTHONPATH."""
    pkg = site / "privimage"
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    for entry in (ROOT / "privimage").iterdir():
        (pkg / entry.name).symlink_to(entry)
    (pkg / "engine").symlink_to(ROOT / "engine")
    (pkg / "kernels").symlink_to(ROOT / "kernels")


def install_commands(suite: Suite) -> list[Command]:
    if suite.smoke:
        why = "smoke run: the current environment is used"
        return [Command("install-wheels", skip=why), Command("install-project", skip=why)]
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    SITE.mkdir(parents=True, exist_ok=True)
    suite.env["PYTHONPATH"] = os.pathsep.join([str(SITE)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    source = ROOT / ".whl" / "SOURCE"
    if not (ROOT / ".git").exists() and source.exists():
        suite.env["PRIVIMAGE_GIT_SHA"] = source.read_text().split()[0]
    pip = [suite.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    return [Command("install-wheels", pip + ["--upgrade", "--target", str(SITE)] + wheels, cap_s=12,
                    skip=None if wheels else "no .whl/*.whl: run bench/gpu_wheels.sh here before the device call"),
            Command("install-project", pip + ["--no-build-isolation", "-e", str(ROOT)], cap_s=15),
            Command("link-project", suite.python("-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); "
                                                 f"import gpu_suite; gpu_suite.link_project(gpu_suite.SITE)"),
                    cap_s=3, run_if_failed="install-project")]


def main(argv=None) -> int:
    from gpu_stages import STAGES, caps_for  # the stage definitions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, GPU-only parts SKIPPED")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else ./gpu-out)")
    ap.add_argument("--stages", nargs="+", default=None, help="run only these stages (summary always)")
    ap.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                    help="override a stage's cap (its commands are scaled to it)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (printed at the end)")
    ap.add_argument("--list", action="store_true", help="print the stages and their caps, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        gpu, smoke = caps_for(False), caps_for(True)
        for s in STAGES:
            only = "" if s.default else " (only with --stages)"
            print(f"{s.key:12} GPU {gpu[s.key]:4.0f} s, smoke {smoke[s.key]:4.0f} s{only}  {s.title}")
        print(f"{'total':12} GPU {sum(gpu[s.key] for s in STAGES if s.default):4.0f} s")
        return 0
    out = args.out or Path(os.environ.get("OUT") or ROOT / "gpu-out")
    caps = caps_for(args.smoke)
    for item in args.cap:
        key, _, seconds = item.partition("=")
        if key not in caps:
            ap.error(f"--cap {item}: unknown stage {key!r}; stages: {', '.join(caps)}")
        caps[key] = float(seconds)
    selected = [s for s in STAGES if (s.default if args.stages is None else s.key in args.stages)]
    unknown = set(args.stages or []) - {s.key for s in STAGES}
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; stages: {', '.join(s.key for s in STAGES)}")
    work = Path(tempfile.mkdtemp(prefix="privimage-gpu-suite-"))
    suite = Suite(out.resolve(), work, args.smoke, sum(caps[s.key] for s in selected), caps)
    print(f"GPU suite ({'smoke, CPU' if args.smoke else 'GPU'}): {len(selected)} stages, total cap "
          f"{suite.total_s:.0f} s, output {suite.out}", flush=True)
    try:
        suite.run_stages(selected)
    finally:
        suite.write()
        if args.keep_work:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = (suite.out / "summary.md").read_text()
    print(summary.split("## Numbers")[0])  # the stages and checks: what a caller that sees the output's tail needs
    return 0


if __name__ == "__main__":
    import gpu_suite  # the stages import this module by its name: run that copy, not __main__'s

    sys.exit(gpu_suite.main())
