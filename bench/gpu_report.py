"""``summary.md`` of the GPU suite from its ``results.json``: stages, checks against targets, the numbers.

Pure functions of the results (no torch, no project import), so the driver can write the summary after every
command, whatever state the machine is in.
"""

from __future__ import annotations

import csv
import datetime
from pathlib import Path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def op_speedups(rows: list[dict]) -> list[dict]:
    """Per (op, mode, shape, dtype) measured by both: the torch reference's median over Triton's (latest rows)."""
    by = {}
    for r in rows:
        by[(r["op"], r["mode"], r["shape"], r["dtype"], r["provider"])] = float(r["median_ms"])
    out = []
    for (op, mode, shape, dtype, provider), ms in by.items():
        ref = by.get((op, mode, shape, dtype, "torch_ref"))
        if provider == "triton" and ref:
            out.append({"op": op, "mode": mode, "shape": shape, "dtype": dtype, "torch_ms": ref, "triton_ms": ms,
                        "speedup": ref / ms if ms > 0 else float("inf")})
    return sorted(out, key=lambda p: (p["op"], p["dtype"], p["shape"]))


def pretrain_step(data: dict) -> dict | None:
    """The pre-training step of UNet "s" from train_step (compiled when measured, else eager)."""
    for mode in ("compiled", "eager"):
        for r in (data.get(f"train_step_{mode}") or {}).get("results", []):
            if r.get("preset") == "s" and "pretrain" in r:
                return {"median_ms": r["pretrain"]["median_ms"], "batch": r["batch"], "mode": mode}
    return None


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]


def _f(v, fmt=".2f", suffix=""):
    return "" if v is None else f"{v:{fmt}}{suffix}"


def summary(results: dict) -> str:
    suite, data = results["suite"], results["data"]
    env = (data.get("env") or {}).get("environment", {})
    versions = env.get("versions", {})
    lines = [f"# GPU check ({suite['mode']}): {env.get('device', '?')}", "",
             f"{suite.get('started', '')}; git {env.get('git_sha', '?')}; python {versions.get('python', '?')}, "
             f"torch {versions.get('torch', '?')} (CUDA {versions.get('cuda', '-')}), "
             f"triton {versions.get('triton', '?')}"
             f". Wall {suite.get('wall_s', 0):.0f} s of a {suite['total_cap_s']:.0f} s cap. Command: "
             f"`bash bench/gpu_suite.sh {' '.join(suite.get('argv', []))}`.", "", "## Stages", ""]
    lines += _table(["#", "stage", "status", "wall s", "cap s", "commands"], [
        [i + 1, f"{s['key']}: {s['title']}", s["status"], s["wall_s"], s["nominal_cap_s"],
         ", ".join(f"{c['name']} {c['status']}" + (f" ({c['wall_s']} s)" if "wall_s" in c else "")
                   for c in s["commands"])] for i, s in enumerate(results["stages"])])
    lines += ["", f"{len(results['stages']) + 1}. summary: this file (results.json holds every number).", "",
              "## Checks", ""]
    counts = {k: sum(c["status"] == k for c in results["checks"]) for k in ("PASS", "FAIL", "SKIPPED")}
    lines += [", ".join(f"{n} {k}" for k, n in counts.items()), ""]
    lines += _table(["stage", "check", "status", "value", "target", "note"],
                    [[c["stage"], c["name"], f"**{c['status']}**" if c["status"] == "FAIL" else c["status"],
                      c["value"], c["target"], c["reason"]] for c in results["checks"]])
    lines += ["", "## Numbers", ""]
    for section in (_ceilings, _dp_step, _ops, _layers, _train, _loaders, _features, _finetune, _distributed, _gan):
        try:
            part = section(data)
        except Exception as e:  # partial data from a command cut short must not cost the summary
            part = [f"({section.__name__[1:]}: not rendered, {type(e).__name__}: {e})"]
        if part:
            lines += part + [""]
    return "\n".join(lines) + "\n"


def _ceilings(data):
    c = (data.get("env") or {}).get("ceilings")
    if not c:
        return []
    return ["### Device ceilings (bench/gpu_env.py)", "",
            f"{c['matmul']['dtype']} matmul {c['matmul']['n']}³: {c['matmul']['tflops']:.3g} TFLOP/s; "
            f"device copy: {c['copy']['gb_per_s']:.4g} GB/s (bytes read + written)."]


def _dp_step(data):
    out = []
    for dtype in ("bfloat16", "float32"):
        d = data.get(f"dp_step_{dtype}") or {}
        if not d.get("rows"):
            continue
        m = d["meta"]
        out += [f"### DP step, UNet {m['preset']}, {m['batch']} images × K={m['k']} ({m['rows']} rows), {dtype} "
                f"(bench/dp_step.py)", ""]
        out += _table(["method", "median ms", "× non-private", "peak MB", "mem × non-private", "× np-compiled",
                       "mem × np-compiled", "vs best Opacus", "first step s"],
                      [[r["method"], "error: " + r["error"]] if "error" in r else
                       [r["method"], _f(r.get("median_ms"), ".1f"), _f(r.get("time_ratio")),
                        _f(r.get("peak_mem_mb"), ".0f"),
                        _f(r.get("mem_ratio")), _f(r.get("time_ratio_vs_compiled")), _f(r.get("mem_ratio_vs_compiled")),
                        _f(r.get("speedup_vs_best_opacus")), _f(r.get("first_step_s"), ".1f")] for r in d["rows"]])
        out.append("")
    return out


def _ops(data):
    pairs = op_speedups(data.get("kernels_csv", []))
    if not pairs:
        return []
    return ["### Triton ops vs torch reference (pytest bench/, batch from PRIVIMAGE_BENCH_BATCHES)", ""] + _table(
        ["op", "shape", "dtype", "torch ms", "triton ms", "speed-up"],
        [[p["op"], p["shape"], p["dtype"], _f(p["torch_ms"], ".3f"), _f(p["triton_ms"], ".3f"),
          _f(p["speedup"], ".2f", "×")] for p in pairs])


def _layers(data):
    d = data.get("layer_strategies") or {}
    if not d.get("layers"):
        return []
    m = d["meta"]
    names = ["fused", "ghost", "materialise", "clipped-fused", "clipped-torch"]

    def cell(r):
        if "median_ms" in r:
            mem = f", {r['peak_mb']:.0f} MB" if r.get("peak_mb") is not None else ""
            return f"{r['median_ms']:.3g} ms{mem}"
        return "skipped" if "skipped" in r else "error"

    rows = [[l["name"] + (f" (×{l['count']})" if l["count"] > 1 else ""), l["kind"], "×".join(map(str, l["a"][1:])),
             *[cell(l["strategies"].get(n, {"skipped": ""})) for n in names], l.get("fastest_norm")]
            for l in d["layers"]]
    totals = {n: sum(l["strategies"].get(n, {}).get("median_ms", 0) * l["count"] for l in d["layers"]) for n in names}
    return [f"### Per-layer strategies, UNet {m['preset']}, {m['samples']} samples × K={m['k']}, {m['dtype']} "
            f"(bench/layer_strategies.py; time, peak memory)", ""] + _table(
        ["layer", "kind", "input", *names, "fastest norm"], rows) + [
        "", "Sum over all layers (× count), ms: " + ", ".join(f"{n} {v:.1f}" for n, v in totals.items())]


def _train(data):
    rows = []
    for mode in ("eager", "compiled"):
        for r in (data.get(f"train_step_{mode}") or {}).get("results", []):
            if "pretrain" in r:
                rows.append([r["preset"], mode, r["batch"], "pretrain", _f(r["pretrain"]["median_ms"], ".1f"),
                             _f(r["pretrain"]["images_per_s"], ",.0f"), "1.00", _f(r.get("compile_s"), ".1f")])
            for k, v in r.items():
                if k.startswith("dp_k"):
                    rows.append([r["preset"], mode, r["batch"], f"DP fine-tune K={k[4:]}", _f(v["median_ms"], ".1f"),
                                 _f(v["images_per_s"], ",.0f"), _f(v["ratio_vs_pretrain"]),
                                 _f(v.get("compile_s"), ".1f")])
    if not rows:
        return []
    return ["### Training steps (bench/train_step.py; full steps with Adam and EMA, bf16 autocast on CUDA)", ""] + \
        _table(["preset", "mode", "images", "step", "median ms", "img/s", "× pretrain", "compile s"], rows)


def _loaders(data):
    rows = data.get("loaders_csv")
    if not rows:
        return []
    return ["### Subset loaders (bench/loaders.py)", ""] + _table(
        ["loader", "resolution", "images", "batch", "images/s", "setup s", "first epoch s"],
        [[r["loader"], r["resolution"], r["images"], r["batch"], f"{int(float(r['images_per_s'])):,}", r["setup_s"],
          r["first_epoch_s"]] for r in rows])


def _features(data):
    d = data.get("evaluate_features")
    if not d:
        return []
    return ["### FID features, bf16 vs fp32 (bench/evaluate.py --features-check)", "",
            f"{d['images_per_set']} images per set: FID fp32 {d['float32']['fid']:.3f} "
            f"({d['float32']['images_per_s']:,.0f} img/s), bf16 {d['bfloat16']['fid']:.3f} "
            f"({d['bfloat16']['images_per_s']:,.0f} img/s); relative difference {d['fid_rel_diff']:.3%}, feature "
            f"relative error {d['feature_rel_err']:.2e}."]


def _finetune(data):
    d = data.get("finetune_projection")
    if not d or not d.get("steps"):
        return []
    m = d["meta"]
    out = [f"### Fine-tune, config {m['config']} ({m['images']} random images, physical {m['physical_batch_size']} "
           f"× K={m['num_noise']}, expected batch {m['expected_batch_size']:.0f}; bench/finetune_projection.py)", ""]
    out += _table(["step", "images", "seconds", "img/s"],
                  [[s["step"], s["images"], _f(s["seconds"]), _f(s["images_per_s"], ",.0f")] for s in d["steps"]])
    out += ["", f"Projection: {m['planned_steps']} steps × ({d['median_step_s']:.2f} s + the log's ε "
            f"{d['epsilon_s']:.2f} s) = {d['projected_finetune_s'] / 60:.1f} min."]
    if "projected_pretrain_s" in d:
        p = d["pretrain"]
        out.append(f"Pre-training: {p['steps']:,} steps × {p['step_ms']:.1f} ms (batch {p['batch']}, measured at "
                   f"{p['measured_batch']}) = {d['projected_pretrain_s'] / 3600:.2f} h.")
    return out


def _distributed(data):
    d = data.get("distributed") or {}
    over, proj = d.get("overhead"), d.get("projection") or {}
    if not over and not proj.get("rows"):
        return []
    out = ["### Distributed DP step (bench/distributed.py)", ""]
    if over:
        out.append(f"UNet {over['preset']}, {over['images']} images × K={over['k']}: plain {over['plain_ms']:.1f} ms, "
                   f"through a 1-rank {over['backend']} group {over['distributed_ms']:.1f} ms "
                   f"({over['ratio']:.3f}×); {over['bytes_all_reduced'] / 2 ** 20:.2f} MiB all-reduced per step.")
    if proj.get("rows"):
        out += ["", f"PROJECTION (not a measurement) of the {proj['preset']} fine-tune ({proj['steps']} steps): "
                "steps × (T₁/W + the all-reduce at the NCCL bus bandwidth).", ""]
        out += _table(["T₁ s", "GPUs", "bus GB/s", "all-reduce ms", "step s", "hours"],
                      [[_f(r["T1_s"], ".2f"), r["gpus"], _f(r["busbw_GBs"], ".0f"), _f(r["allreduce_ms"], ".3f"),
                        _f(r["step_s"], ".3f"), _f(r["hours"], ".3f")] for r in proj["rows"]])
    return out


def _gan(data):
    d = data.get("train_step_gan") or {}
    steps, sampling = d.get("discriminator_step") or [], d.get("sampling") or []
    if not steps and not sampling:
        return []
    out = ["### PRIVIMAGE+G (bench/train_step.py --gan)", ""]
    if steps:
        out += _table(["D preset", "pairs", "non-private ms", "DP ms", "DP / non-private"],
                      [[r.get("preset"), r.get("batch"), _f(r["non_private"]["median_ms"], ".1f"),
                        _f(r["dp"]["median_ms"], ".1f"), _f(r["dp_over_non_private"], ".2f", "×")] for r in steps])
    if sampling:
        out += [""] + _table(["setting", "GAN img/s", "diffusion img/s", "sampler steps", "GAN / diffusion",
                              "FLOP ratio"],
                             [[r.get("setting"), _f(r["gan_images_per_s"], ",.1f"),
                               _f(r["diffusion_images_per_s"], ",.2f"), r.get("sampler_steps"),
                               _f(r["gan_over_diffusion"], ".0f", "×"), _f(r.get("flop_ratio"), ".0f", "×")]
                              for r in sampling])
    return out
