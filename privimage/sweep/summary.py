"""The sweep's summary: each point's numbers, the privacy of publishing them together, sweep.md and sweep.png.

Privacy of a sweep. Every private point is its own (ε, δ) release on the SAME sensitive data: its query and
its fine-tune, with its own noise. Publishing several points publishes all their releases, so the guarantee
of what is published is their composition, computed here with the project's accountant
(:func:`privimage.engine.compose_epsilon` over every point's mechanisms, heterogeneous composition at the
sweep's δ); the evaluations' own releases (:mod:`privimage.evaluate.privacy`, pure ε) add by basic
composition. The non-private reference (``inf``) is left out of the composition and labelled apart: it has no
guarantee at all. No point is picked as "best": choosing by a metric on sensitive data would itself be a
release that no accountant here counts.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

from privimage.sweep.plan import Point, SweepDir

__all__ = ["compose_points", "point_summary", "write_summary"]

METRICS = (("fid", "FID"), ("proxy_fid", "proxy FID"), ("classification_accuracy", "CA"))


def point_summary(sweep: SweepDir, point: Point) -> dict:
    """What sweep.json says of ``point``: its plan, its ledger's ε, its metrics (from the publishable report)."""
    run = sweep.run(point)
    entry = {"name": point.name, **point.to_json(), "run_dir": point.name}
    plan = run.load_plan() if run.plan_path.is_file() else None
    if plan:
        entry.update({k: plan.get(k) for k in ("query_noise_multiplier", "finetune_noise_multiplier",
                                               "finetune_steps", "finetune_sample_rate")})
    if run.budget_path.is_file():
        budget = run.load_budget()
        spent = _composed(tuple(_mechanisms(budget, budget.spent)), budget.delta)
        entry["epsilon_spent"] = spent.upper if point.private else "inf"
        entry["accountant"] = spent.accountant
    entry["status"] = "done" if run.timings_path.is_file() else "started" if run.budget_path.is_file() else "planned"
    entry["metrics"] = _metrics(run.public_report_path)
    return entry


def _metrics(report_path: Path) -> dict:
    if not report_path.is_file():
        return {}
    metrics = json.loads(report_path.read_text()).get("metrics", {})
    out = {}
    for key, _ in METRICS:
        m = metrics.get(key)
        if isinstance(m, dict):
            value = m.get("value", m.get("accuracy"))
            if isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def compose_points(sweep: SweepDir, points: list[Point], *, delta: float, planned: dict | None = None) -> dict:
    """The privacy of publishing every private point of ``points``: all their mechanisms composed.

    Counts are each point's ledger (``budget.json``: what was spent); ``planned`` (point name -> PrivacyBudget,
    before any directory exists) gives the planned counts instead (``--dry-run``).
    """
    from privimage.evaluate.privacy import load_evaluation_ledger

    mechanisms, per_point, evaluation = [], {}, 0.0
    for point in points:
        if not point.private:
            continue
        if planned is not None:
            budget = planned[point.name]
            counts = {name: m.count for name, m in budget.plan.items()}
        else:
            run = sweep.run(point)
            if not run.budget_path.is_file():
                continue
            budget = run.load_budget()
            counts = dict(budget.spent)
            evaluation += sum(r["epsilon"] for r in load_evaluation_ledger(run.path))
        ms = _mechanisms(budget, counts)
        mechanisms += ms
        per_point[point.name] = _composed(tuple(ms), delta).upper
    report = _composed(tuple(mechanisms), delta)
    return {"delta": delta, "points": per_point, "composed_epsilon": report.upper, "accountant": report.accountant,
            "evaluation_epsilon": evaluation, "total_epsilon": report.upper + evaluation,
            "counts": "planned" if planned is not None else "spent (each point's budget.json)",
            "non_private_points": [p.name for p in points if not p.private]}


def _mechanisms(budget, counts: dict) -> list:
    from privimage.engine import Mechanism

    return [Mechanism(budget.plan[n].noise_multiplier, budget.plan[n].sample_rate, c) for n, c in sorted(counts.items())]


@functools.lru_cache(maxsize=256)
def _composed(mechanisms: tuple, delta: float):
    """:func:`privimage.engine.compose_epsilon`, once per distinct composition (the summary is redrawn after
    every point, and each composition costs the accountant seconds)."""
    from privimage.engine import compose_epsilon

    return compose_epsilon(list(mechanisms), delta=delta)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.4g} ± {np.std(values):.2g}" if len(values) > 1 else f"{values[0]:.4g}"


def write_summary(sweep: SweepDir, state: dict, points: list[Point], *, secure: bool) -> None:
    """sweep.md and sweep.png from ``state`` (sweep.json's content, with ``points``, ``pretraining``, ``privacy``)."""
    from privimage.io import atomic_write
    from privimage.privacy import NON_PRIVATE_NOTE
    from privimage.release import TEST_MODE

    entries = {e["name"]: e for e in state["points"]}
    eps_values = list(dict.fromkeys(p.epsilon for p in points))
    lines = [f"# ε sweep: {state['config']['name']}", "",
             f"Points: ε ∈ {{{', '.join(format(e, 'g') for e in eps_values)}}} × seeds {{{', '.join(map(str, state['seeds']))}}}; "
             f"devices {', '.join(state['devices'])}. Each point is a complete run directory "
             f"(`privimage run --epsilon E --seed S` alone would make the same).", ""]
    shard = state.get("shard")
    if shard:
        total = len(state["epsilons"]) * len(state["seeds"])
        lines += [f"**Shard {shard['index']}/{shard['count']}** of a sweep of {total} points (ε-major, then seed): this "
                  f"directory holds the points j with j % {shard['count']} == {shard['index']}: "
                  f"{', '.join(p.name for p in points)}. Its privacy composition covers these points only; publishing "
                  f"points of several shards spends the composition of all of them.", ""]
    if not secure:
        lines += [f"**{TEST_MODE}**", ""]
    if any(not p.private for p in points):
        lines += [f"**epsilon = inf: {NON_PRIVATE_NOTE}**", ""]
    lines += ["## Results (mean ± std over seeds)", "", "| ε | points done | " + " | ".join(n for _, n in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for eps in eps_values:
        group = [entries[p.name] for p in points if p.epsilon == eps]
        done = sum(e["status"] == "done" for e in group)
        cells = [_mean_std([e["metrics"][k] for e in group if k in e["metrics"]]) for k, _ in METRICS]
        label = format(eps, "g") if math.isfinite(eps) else "∞ (NON-PRIVATE)"
        lines.append(f"| {label} | {done}/{len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "No point is picked as best: choosing by a metric on sensitive data would be a release of its own.",
              "", "## Points", "", "| point | status | σ query | σ fine-tune | steps | ε spent | pre-training |",
              "|---|---|---|---|---|---|---|"]
    for p in points:
        e = entries[p.name]
        f = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "–")  # noqa: E731
        lines.append(f"| {p.name} | {e['status']} | {f(e.get('query_noise_multiplier'))} | "
                     f"{f(e.get('finetune_noise_multiplier'))} | {f(e.get('finetune_steps'))} | "
                     f"{f(e.get('epsilon_spent'))} | {e.get('pretrain', '–')} |")
    lines += ["", "## Shared work", "",
              "- query classifier: public data only, trained once per seed (cached);",
              "- the sensitive images' votes: counted once per seed, in memory only, never written; each point "
              "made its OWN noisy release with its own σ (its budget.json);"]
    for group in state.get("pretraining", []):
        lines.append(f"- pre-training `{group['key'][:12]}`: computed in {group['computed_in']}, shared read-only "
                     f"with {', '.join(group['shared_with']) or 'no other point'}")
    pv = state.get("privacy")
    lines += ["", "## Privacy", ""]
    if pv:
        lines += ["Each private point is its own (ε, δ) release on the same sensitive data. Publishing several "
                  "points spends their composition:", "",
                  "| point | ε alone |", "|---|---|"] + [f"| {n} | {v:.4g} |" for n, v in pv["points"].items()]
        lines += ["", f"- all private points together: ε = **{pv['composed_epsilon']:.4g}** at δ = {pv['delta']:g} "
                  f"({pv['accountant']} accountant, every point's mechanisms composed; counts: {pv['counts']})",
                  f"- evaluation releases: ε {pv['evaluation_epsilon']:.4g} (basic composition); total ε = "
                  f"**{pv['total_epsilon']:.4g}**"]
        if pv["non_private_points"]:
            lines.append(f"- not in the composition, and covered by no guarantee: {', '.join(pv['non_private_points'])} "
                         f"(NON-PRIVATE reference)")
    lines.append("")
    with atomic_write(sweep.md_path, "w") as fh:
        fh.write("\n".join(lines))
    _write_png(sweep, points, entries, eps_values)


def _write_png(sweep: SweepDir, points: list[Point], entries: dict, eps_values: list[float]) -> None:
    """Proxy FID (or FID) and CA against ε (mean, mean ± std over seeds), then one sample grid per ε."""
    from PIL import Image, ImageDraw

    from privimage.evaluate.plots import line_plot
    from privimage.io import atomic_write

    panels = []
    for key, name in METRICS:
        series = {}
        finite = [e for e in eps_values if math.isfinite(e)]
        values = [[entries[p.name]["metrics"][key] for p in points if p.epsilon == e and key in entries[p.name]["metrics"]]
                  for e in finite]
        keep = [i for i, v in enumerate(values) if v]
        if not keep and key != "classification_accuracy":
            continue
        xs = [finite[i] for i in keep]
        mean = [float(np.mean(values[i])) for i in keep]
        std = [float(np.std(values[i])) for i in keep]
        series[f"{name} mean"] = (xs, mean)
        series["mean - std"] = (xs, [m - s for m, s in zip(mean, std)])
        series["mean + std"] = (xs, [m + s for m, s in zip(mean, std)])
        ref = [entries[p.name]["metrics"][key] for p in points if not p.private and key in entries[p.name]["metrics"]]
        title = f"{name} vs epsilon" + (f" (NON-PRIVATE inf: {np.mean(ref):.4g})" if ref else "") + (
            "" if keep else " (no values: evaluation off)")
        panels.append(line_plot(series, title=title, xlabel="epsilon", ylabel=name, width=420, height=300))
    grids = []
    for eps in eps_values:
        first = next(p for p in points if p.epsilon == eps)
        path = sweep.run(first).grid_path
        if path.is_file():
            img = Image.open(path).convert("RGB")
            scale = max(1, 160 // max(img.size))
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
            canvas = Image.new("RGB", (img.width + 10, img.height + 24), "white")
            canvas.paste(img, (5, 22))
            ImageDraw.Draw(canvas).text((5, 4), first.label.replace(" (NON-PRIVATE reference)", " NON-PRIVATE") +
                                        f" seed {first.seed}", fill=(0, 0, 0))
            grids.append(np.asarray(canvas))
    rows = [_hstack(panels), _hstack(grids)]
    rows = [r for r in rows if r is not None]
    width = max(r.shape[1] for r in rows)
    image = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    with atomic_write(sweep.png_path) as fh:
        Image.fromarray(image).save(fh, format="PNG")


def _hstack(images: list[np.ndarray]) -> np.ndarray | None:
    if not images:
        return None
    height = max(i.shape[0] for i in images)
    return np.concatenate([np.pad(i, ((0, height - i.shape[0]), (0, 0), (0, 0)), constant_values=255) for i in images],
                          axis=1)
