"""The evaluation reports as files: ``report.json`` beside the Markdown ``report.md`` (publishable), and
``report-private.json`` beside ``report-private.md`` (private).

Both render the same structure (metrics with their kind and :class:`~privimage.evaluate.privacy.Coverage`,
privacy, samples, notes, figures, versions); the private one adds what must not be published and says so in
its title.
"""

from __future__ import annotations

from pathlib import Path

from privimage.io import atomic_write, save_json

__all__ = ["privacy_markdown", "render_markdown", "write_report"]

TEST_MODE_WARNING = ("**NOT PRIVATE: this run used the non-secure test mode (`finetune.secure_noise = false`): the "
                     "sampling, the DP noise and the diffusion randomness came from the public seed. The ε below "
                     "holds only for secret randomness; this run has none.**")


def _fmt(v, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def privacy_markdown(p: dict) -> list[str]:
    """Who spent what on the sensitive data, one row per release, and the total."""
    gen, ev, total = p["generator"], p["evaluation"], p["total"]
    lines = [TEST_MODE_WARNING, ""] if p.get("secure_randomness") is False else []
    if gen and gen.get("large_delta"):  # delta >= 1/n, allowed for an experiment (privimage.preflight)
        lines += [f"**{gen['large_delta']}**", ""]
    lines += ["| release | ε | δ | on |", "|---|---|---|---|"]
    if gen:
        ledger = ", ".join(f"{k}: {n}" for k, n in gen["ledger"].items())
        lines.append(f"| training (budget.json ledger: {ledger}; budget ε {_fmt(gen['epsilon_budget'])}) | "
                     f"{_fmt(gen['epsilon_spent'])} | {gen['delta']:g} | sensitive training data |")
    else:
        lines.append("| training (no budget.json in the run directory) | unknown | unknown | sensitive training data |")
    for r in ev["releases"]:
        lines.append(f"| evaluation: {r.get('what', 'release')}, {r.get('created', '')} ({r.get('mechanism', '')}) | "
                     f"{_fmt(float(r['epsilon']))} | 0 | {r.get('data', '')} |")
    if total:
        lines.append(f"| **total** | **{_fmt(total['epsilon'])}** | **{total['delta']:g}** | |")
    else:
        lines.append(f"| **total** | unknown (evaluation alone: {_fmt(ev['epsilon'])}) | unknown | |")
    lines += ["", f"Composition: {p['composition']}. Evaluation releases are recorded in `{ev['ledger_file']}`."]
    if p.get("not_private"):
        lines += ["", "Not covered by ε:", ""] + [f"- {n}" for n in p["not_private"]]
    return lines


def _metric_row(name: str, v: dict) -> str:
    if name.endswith("fid"):
        value, n = _fmt(v["value"]), f"{v['num_samples']} generated vs {v['num_reference']} real"
    elif name.endswith("inception_score"):
        value, n = f"{_fmt(v['mean'])} ± {_fmt(v['std'], 2)}", f"{v['num_samples']} ({v['splits']} splits)"
    elif name.endswith("precision_recall"):
        value = f"precision {_fmt(v['precision'], 3)}, recall {_fmt(v['recall'], 3)} (k={v['k']})"
        n = f"{v['num_generated']} generated vs {v['num_real']} real"
    else:
        value = f"{100 * v['accuracy']:.2f}%" + (f" ± {100 * v['std']:.2f}" if "std" in v else "")
        n = f"train {v['num_train']} synthetic, test {v['num_test']} real"
        name = f"{name} ({v['protocol']})"
    return f"| {name} | {v['kind']} | {value} | {n} | {v.get('coverage', '')} |"


def render_markdown(report: dict, *, private: bool = False) -> str:
    """A report dict as tables: metrics (kind, coverage), privacy, samples, notes, figures, provenance."""
    m = report["metrics"]
    title = (f"# PRIVATE diagnostics of `{report['run_dir']}`: do not publish" if private else
             f"# Evaluation of `{report['run_dir']}`")
    lines = [title, "", f"Created {report['created']}, config hash `{report['config_hash']}`.", ""]
    if private:
        lines += ["Everything here is computed from the sensitive data without noise (or shows sensitive images) "
                  "and is NOT covered by ε. The publishable report is `release/report.md`.", ""]
    lines += ["## Metrics", "", "| metric | kind | value | images | computed on |", "|---|---|---|---|---|"]
    lines += [_metric_row(name, v) for name, v in m.items()]
    if "feature_network" in report:
        fn = report["feature_network"]
        lines += ["", f"Feature network: **{fn['kind']}** (`{fn['name']}`, fingerprint `{fn['fingerprint']}`)."]
    ca = m.get("classification_accuracy")
    if ca and ca.get("per_classifier"):
        lines += ["", "| classifier | selected epoch | test accuracy |", "|---|---|---|"]
        lines += [f"| {a['arch']} | {a['selected_epoch']} | {100 * a['accuracy']:.2f}% |" for a in ca["per_classifier"]]
    lines += ["", "## Privacy", ""] + privacy_markdown(report["privacy"])
    if "diagnostics" in report:
        lines += ["", "## Training diagnostics", ""] + [f"- {k}: {v}" for k, v in report["diagnostics"].items()]
    s = report.get("samples")
    if s:
        lines += ["", "## Samples", "", f"{s['num']} images of shape {tuple(s['shape'])}; per class: "
                  + ", ".join(f"{c}: {n}" for c, n in s["per_class"].items()) + "."]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in report["figures"]]
    v = report["versions"]
    lines += ["", "## Versions", "", ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    if "timings" in report:
        lines += ["Timings: " + ", ".join(f"{k} {t:.1f}" for k, t in report["timings"].items()), ""]
    return "\n".join(lines)


def write_report(report: dict, path: Path, *, private: bool) -> None:
    """``report`` as JSON at ``path`` and as Markdown beside it (``.md``), each written atomically."""
    save_json(report, path)
    with atomic_write(path.with_suffix(".md"), "w") as f:
        f.write(render_markdown(report, private=private))
