"""The accountant cross-check table and the time of a calibration, written to ``bench/results/accounting.md``.

For every point of the foundation issue's grid (σ ∈ {0.6, 1, 2, 5}, q ∈ {0.001, 0.01, 0.1}, steps ∈ {1, 100,
10000}, δ = 1e-5) it prints our ε (the PRV upper bound, or the RDP fallback where PRV cannot represent the
composition), Google dp-accounting's PLD ε (an independent near-tight accountant) and its RDP ε (a looser
bound), each with the relative difference to ours and the time our accountant took. Then it times
``calibrate_noise_multiplier`` for ε = 1, q = 0.01, 10 000 steps: the number users wait for in an ε sweep.

The same comparison is asserted in ``tests/engine/test_accounting.py``; this script only records it.

Run: ``python bench/accounting.py`` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from pathlib import Path

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from privimage.engine import calibrate_noise_multiplier, compute_epsilon  # noqa: E402
DELTA = 1e-5


def independent_epsilons(sigma: float, q: float, steps: int) -> tuple[float, float]:
    """(PLD ε, RDP ε) from dp-accounting for ``steps`` Poisson-subsampled Gaussian releases."""
    event = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    accountants = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4),
                   rdp_privacy_accountant.RdpAccountant())
    return tuple(a.compose(event).get_epsilon(DELTA) for a in accountants)


def main() -> None:
    lines = ["| σ | q | steps | ours (upper) | accountant | PLD | ours/PLD − 1 | RDP | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sigma, q, steps in itertools.product([0.6, 1.0, 2.0, 5.0], [0.001, 0.01, 0.1], [1, 100, 10000]):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
        seconds = time.perf_counter() - start
        pld, rdp = independent_epsilons(sigma, q, steps)
        lines.append(f"| {sigma} | {q} | {steps} | {ours.upper:.4f} | {ours.accountant} | {pld:.4f} | "
                     f"{ours.upper / pld - 1:+.2%} | {rdp:.4f} | {seconds:.2f} |")
        print(lines[-1], flush=True)

    start = time.perf_counter()
    sigma = calibrate_noise_multiplier(target_epsilon=1.0, sample_rate=0.01, steps=10_000, delta=DELTA)
    seconds = time.perf_counter() - start
    check = compute_epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=10_000, delta=DELTA)
    pld, _ = independent_epsilons(sigma, 0.01, 10_000)
    calibration = (f"calibrate_noise_multiplier(target_epsilon=1, sample_rate=0.01, steps=10000, delta=1e-5): "
                   f"σ = {sigma:.4f} in {seconds:.1f} s; our upper bound at σ: {check.upper:.4f} "
                   f"(estimate {check.estimate:.4f}); dp-accounting PLD at σ: {pld:.4f}")
    print(calibration)

    env = harness.environment()
    versions = harness.package_versions(["prv-accountant", "dp-accounting"])
    header = [f"# Accountant cross-check (δ = {DELTA})", "",
              f"{env['date']}, git {env['git_sha']}; {env['device']}, prv-accountant {versions['prv-accountant']}, "
              f"dp-accounting {versions['dp-accounting']}. "
              "Ours: the PRV upper bound (eps_error 0.01), or the RDP bound where PRV cannot represent the "
              "composition (accountant column). Seconds: our accountant only.", ""]
    path = harness.write_atomic(harness.results_dir() / "accounting.md",
                                "\n".join(header + lines + ["", calibration, ""]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
