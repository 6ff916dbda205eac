"""What the evaluation spent on the sensitive data, and what each metric was computed on.

Two questions every number in a report must answer: which privacy releases it rests on (the training ledger
``budget.json``, the evaluation ledger ``evaluation_ledger.json``, composed here), and which data it was
computed on (its :class:`Coverage`): only numbers on DP outputs, held-out test data or data the user
declared public go into the publishable report; numbers computed on the sensitive training data without
noise go into the private report only. :class:`Reports` files every metric and note by that rule while
:func:`privimage.evaluate.report.evaluate_run` assembles the two reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from privimage.io import save_json
from privimage.preflight import large_delta_note
from privimage.rundir import RunDir

__all__ = ["COMPOSITION", "Coverage", "EVALUATION_LEDGER", "HELD_OUT", "NOISY_SELECTION", "PUBLIC_REFERENCE",
           "Reports", "SAMPLES", "SENSITIVE_TRAINING", "add_privacy", "generator_privacy",
           "load_evaluation_ledger", "privacy_summary", "read_json", "record_evaluation_release"]


@dataclass(frozen=True)
class Coverage:
    """What a metric was computed on (``data``), whether a report holding it may be published, and why."""

    data: str
    publishable: bool
    text: str


SAMPLES = Coverage("samples", True, "the synthetic samples alone: post-processing of the DP model, covered by ε")
HELD_OUT = Coverage("held_out", True, "synthetic samples against held-out real test images (not training data); "
                    "computed without noise, so ε says nothing about the test images")
PUBLIC_REFERENCE = Coverage("public_reference", True, "synthetic samples against reference data the user "
                            "declared public (given on the command line)")
NOISY_SELECTION = Coverage("held_out_noisy_selection", True, "classifiers trained on the synthetic samples, "
                           "tested on held-out real test images; their epochs were chosen on sensitive validation "
                           "data by Report Noisy Max, whose ε is added to the total")
SENSITIVE_TRAINING = Coverage("sensitive_training", False, "synthetic samples against the sensitive TRAINING "
                              "images, without noise: not covered by ε, private")


@dataclass
class Reports:
    """The publishable and the private report being assembled (each a dict with ``notes`` and ``metrics``).

    Every metric goes where its coverage allows (:meth:`add`); ``not_private`` collects the sentences the
    private report's privacy section must say about statistics that ε does not cover.
    """

    public: dict
    private: dict
    not_private: list[str] = field(default_factory=list)

    def holder(self, coverage: Coverage) -> dict:
        """The report a number of this coverage belongs in."""
        return self.public if coverage.publishable else self.private

    def add(self, name: str, metric: dict, coverage: Coverage) -> None:
        metric.update(coverage=coverage.text, computed_on=coverage.data)
        self.holder(coverage)["metrics"][name] = metric

    def note(self, text: str, coverage: Coverage = SAMPLES) -> None:
        self.holder(coverage)["notes"].append(text)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


EVALUATION_LEDGER = RunDir.EVALUATION_LEDGER
COMPOSITION = ("basic composition (Dwork & Roth 2014, Thm 3.16): the generator's (epsilon, delta) plus each "
               "pure epsilon-DP evaluation release on the same sensitive data gives (sum of epsilons, delta)")


def generator_privacy(run_dir: Path) -> dict | None:
    """What training spent, from ``budget.json`` (the engine's PrivacyBudget state); None if it is absent."""
    path = RunDir(run_dir).budget_path
    if not path.is_file():
        return None
    from privimage.engine import PrivacyBudget

    state = read_json(path)
    try:
        budget = PrivacyBudget.from_state_dict(state)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a PrivacyBudget state dict (missing {err}).") from err
    spent = budget.epsilon_spent()
    large_delta = large_delta_note(budget.delta, (RunDir(run_dir).load_plan() or {}).get("num_sensitive"))
    return {"epsilon_budget": budget.epsilon, "delta": budget.delta, "epsilon_spent": spent.upper,
            "epsilon_spent_estimate": spent.estimate, "accountant": spent.accountant, "ledger": dict(budget.spent),
            "plan": state.get("plan", {}), **({"large_delta": large_delta} if large_delta else {})}


def load_evaluation_ledger(run_dir: Path) -> list[dict]:
    """The evaluation releases recorded for ``run_dir`` so far (see :func:`privacy_summary`)."""
    path = run_dir / EVALUATION_LEDGER
    if not path.is_file():
        return []
    releases = read_json(path).get("releases")
    if not (isinstance(releases, list) and all(isinstance(r, dict) and isinstance(r.get("epsilon"), (int, float))
                                               and r["epsilon"] >= 0 for r in releases)):
        raise ValueError(f"{path} is not an evaluation ledger (expected {{\"releases\": [{{\"epsilon\": ...}}, ...]}});"
                         f" it records privacy already spent, so it is not ignored.")
    return releases


def record_evaluation_release(run_dir: Path, release: dict) -> list[dict]:
    """Append ``release`` to the run's evaluation ledger (atomically) and return all releases."""
    releases = [*load_evaluation_ledger(run_dir), release]
    save_json({"about": "privacy spent on sensitive data by `privimage evaluate`, one entry per release; "
                        "report.json adds these to the generator's epsilon (" + COMPOSITION + ")",
               "releases": releases}, run_dir / EVALUATION_LEDGER)
    return releases


def privacy_summary(generator: dict | None, releases: list[dict], not_private: list[str] | None = None, *,
                    secure: bool | None = None) -> dict:
    """The report's privacy section: what training spent, what evaluation spent, and their total.

    Why a separate evaluation ledger and not the engine's PrivacyBudget: the budget
    (:class:`privimage.engine.PrivacyBudget`) plans and composes subsampled *Gaussian* mechanisms (noise
    multiplier, sample rate, count) in one PRV/RDP accountant, and ``budget.json`` is the training run's
    resumable state. The DPImageBench selection is Report Noisy Max with *Laplace* noise, a pure ε-DP
    mechanism it cannot represent, and writing it into the training ledger after the fact would change the
    state a resumed fine-tune reads. So every evaluation that touches sensitive data appends an entry to
    ``evaluation_ledger.json`` beside ``budget.json`` (append-only: evaluating again releases again, and the
    ledger keeps the earlier releases, whose reports may have been read), and the total composes both by
    basic composition: (ε_gen, δ) followed by ε_i-DP releases is (ε_gen + Σ ε_i, δ)-DP (Dwork & Roth 2014,
    Thm 3.16). That bound is valid but loose; converting pure ε-DP to ε²/2-zCDP (Bun & Steinke 2016, Prop.
    1.4) and composing in the engine's accountant would be tighter, and needs an engine change.

    Args:
        generator: :func:`generator_privacy` (None when the run has no ``budget.json``: the total is unknown).
        releases: the evaluation ledger, each with ``epsilon`` (pure, δ = 0).
        not_private: statistics computed from sensitive training data *without* noise, said plainly (the
            private report's section; ``None`` for the publishable report, which holds no such statistic).
        secure: the run's ``finetune.secure_noise`` (``None``: unknown). ``False`` means the non-secure test
            mode: every secret draw came from the public seed, so NO privacy holds, whatever ε says.
    """
    evaluation_epsilon = float(sum(r["epsilon"] for r in releases))
    total = None
    if generator is not None:
        total = {"epsilon": generator["epsilon_spent"] + evaluation_epsilon, "delta": generator["delta"],
                 "within_budget": generator["epsilon_spent"] + evaluation_epsilon <= generator["epsilon_budget"]}
    return {"generator": generator,
            "evaluation": {"epsilon": evaluation_epsilon, "delta": 0.0, "releases": releases,
                           "ledger_file": EVALUATION_LEDGER},
            "total": total, "composition": COMPOSITION, "secure_randomness": secure,
            **({} if not_private is None else {"not_private": not_private})}


def add_privacy(reports: Reports, run_dir: Path, release: dict | None, *, secure: bool | None) -> None:
    """Record the evaluation's own ``release`` (if any) in the ledger FIRST, then write both reports'
    privacy sections and the notes they call for (non-secure test mode, unknown training ε, over budget)."""
    releases = record_evaluation_release(run_dir, release) if release else load_evaluation_ledger(run_dir)
    generator = generator_privacy(run_dir)
    privacy = reports.public["privacy"] = privacy_summary(generator, releases, secure=secure)
    reports.private["privacy"] = privacy_summary(generator, releases, reports.not_private, secure=secure)
    if secure is False:
        reports.note("NOT PRIVATE: the run used the non-secure test mode (finetune.secure_noise = false).")
    if privacy["generator"] is None:
        reports.note("No budget.json: the privacy spent by training, and so the total, is unknown.")
    elif not privacy["total"]["within_budget"]:
        reports.note(f"The total epsilon {privacy['total']['epsilon']:.4g} (training plus evaluation) exceeds the "
                     f"run's budget epsilon {privacy['generator']['epsilon_budget']:g}.")
