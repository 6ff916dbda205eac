"""The command-line fuzzer, long: ``tests/privimage/test_fuzz_cli.py`` with many examples and the real accountant.

The test file holds the properties (any config file, data spec or command line either runs ``--dry-run`` or
exits 2 with one line; no traceback; nothing written). CI runs it with few examples and a stand-in accountant;
this script runs it with ``--examples`` per property, fresh random inputs and the real PRV accountant, and
records the outcome counts, the time and the versions in ``bench/results/fuzz_cli.{json,md}``.

Run: ``python bench/fuzz_cli.py --examples 3000`` (exit code: pytest's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="examples per property (default: %(default)s)")
    parser.add_argument("--stand-in-accountant", action="store_true", help="as CI does (faster)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outcomes.json"
        env = {**os.environ, "PRIVIMAGE_FUZZ_EXAMPLES": str(args.examples), "PRIVIMAGE_FUZZ_REPORT": str(report),
               "PRIVIMAGE_FUZZ_REAL_ACCOUNTANT": "0" if args.stand_in_accountant else "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/privimage/test_fuzz_cli.py"]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        outcomes = json.loads(report.read_text()) if report.is_file() else {}
    import hypothesis
    import torch

    from privimage import __version__

    result = {"command": f"python bench/fuzz_cli.py --examples {args.examples}"
                         + (" --stand-in-accountant" if args.stand_in_accountant else ""),
              "date": datetime.date.today().isoformat(), "examples_per_property": args.examples, "properties": 3,
              "accountant": "stand-in" if args.stand_in_accountant else "prv (real)", "passed": proc.returncode == 0,
              "seconds": round(seconds, 1), "outcomes": outcomes, "pytest_summary": proc.stdout.strip().splitlines()[-1],
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
              "versions": {"privimage": __version__, "torch": torch.__version__, "hypothesis": hypothesis.__version__},
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuzz_cli.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Command-line fuzzer (`tests/privimage/test_fuzz_cli.py`, long run)", "",
             f"`{result['command']}` on {result['date']} ({result['machine']}; torch {torch.__version__}, hypothesis "
             f"{hypothesis.__version__}; commit {result['git']}), accountant: {result['accountant']}.", "",
             f"Result: **{'passed' if result['passed'] else 'FAILED'}** ({result['pytest_summary']}), "
             f"{result['seconds']:.0f} s.", "", "| outcome | inputs |", "|---|---|"]
    lines += [f"| {k.strip()} | {v} |" for k, v in sorted(outcomes.items())]
    lines += ["", ("Every input ran its `--dry-run` (exit 0) or was refused with one line (exit 2, \"checked\": "
                   "by privimage's own checks, \"argparse\": by the command line's parser); none gave a traceback, "
                   "wrote a run directory or changed a file." if result["passed"] else
                   "A counterexample was found: see the pytest output of the command above."), ""]
    (RESULTS / "fuzz_cli.md").write_text("\n".join(lines))
    if proc.returncode:
        print(proc.stdout[-5000:], proc.stderr[-2000:], file=sys.stderr)
    print(json.dumps(result, indent=2))
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
