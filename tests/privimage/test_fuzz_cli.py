"""Property: whatever a user types (config JSON of random types, values, nesting and keys; data specs; command
line flags), `privimage` either runs `--dry-run` (exit 0) or exits 2 with ONE line on stderr; never a
traceback, never a written run directory, never a changed file.

In CI the accountant's calibration is replaced by a stand-in (a σ calibration takes seconds; the property is
about input checking, and the accountant's own inputs are covered by its tests), with few examples, so the
file runs in well under a minute. ``bench/fuzz_cli.py`` runs the same properties with the real accountant and
many more examples (``PRIVIMAGE_FUZZ_EXAMPLES``, ``PRIVIMAGE_FUZZ_REAL_ACCOUNTANT=1``) and records the
outcome counts it writes to ``PRIVIMAGE_FUZZ_REPORT``.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from privimage.cli import main
from privimage.config import CONFIGS
from privimage.data.specs import SPLITS

EXAMPLES = int(os.environ.get("PRIVIMAGE_FUZZ_EXAMPLES", "60"))
REAL_ACCOUNTANT = os.environ.get("PRIVIMAGE_FUZZ_REAL_ACCOUNTANT", "") not in ("", "0")
OUTCOMES: Counter = Counter()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PRIVIMAGE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# ---- inputs ----------------------------------------------------------------------------------------------------

WORDS = ["embedded", "embeded", "cifar10", "imagenet32", "celeba", "folder", "fmnist", "cuda", "cuda:7", "auto",
         "cpu", "bk-mixed", "ghost", "ffcv", "test", "demo", "", " ", "../x", "a,b", "1e-5", "nan", "inf", "-1",
         "0", "true", "null", "\u00e9\u0000"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70),
                    st.sampled_from([0, -1, 1, 2, 64, 2 ** 31, 2 ** 70, 2.5, -0.0, 1e-320, 1e300, 1e-5, 0.5]),
                    st.floats(-4, 4), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(WORDS))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                    max_leaves=6)


def _defaults(section) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _value(default):
    """Mostly the preset's own value (so later checks are reached), else anything."""
    plain = json.loads(json.dumps(default)) if not isinstance(default, float) or math.isfinite(default) else 0
    return st.one_of(st.just(plain), junk)


BASE = CONFIGS["test"]
SECTIONS = {f.name: _defaults(getattr(BASE, f.name)) for f in dataclasses.fields(BASE)
            if dataclasses.is_dataclass(getattr(BASE, f.name))}
TOP = {k: v for k, v in _defaults(BASE).items() if k not in SECTIONS}

names = st.sampled_from([*SPLITS, "embeded", "Embedded", "cifar", "", "x:y"])
specs = st.builds(lambda name, split, pairs: name + (f":{split}" if split is not None else "")
                  + "".join(f",{k}={v}" for k, v in pairs),
                  names, st.one_of(st.none(), st.sampled_from(["public", "sensitive", "sensitive_test", "train",
                                                               "test", "val", "all", "", "nope"]), st.text(max_size=4)),
                  st.lists(st.tuples(st.sampled_from(["root", "size", "resolution", "seed", "attribute",
                                                      "skip_corrupt", "colour", ""]),
                                     st.one_of(st.sampled_from(["0", "1", "8", "64", "-3", "x", "", "true",
                                                                "/nonexistent", "2e3", "99999999999"]),
                                               st.text(max_size=4))), max_size=3))


@st.composite
def configs(draw):
    """A config file's text: a partial config over a preset, with random keys, types, values and nesting."""
    if draw(st.integers(0, 19)) == 0:  # not JSON, or not an object
        return draw(st.one_of(st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
                              junk.map(lambda v: json.dumps(v))))
    d = {"base": draw(st.sampled_from(["test"] * 8 + ["demo", "tset", 3, None]))}
    for key in draw(st.lists(st.sampled_from([*TOP, *SECTIONS, "unknown", "epsilonn"]), max_size=4, unique=True)):
        if key in SECTIONS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from([*SECTIONS[key], "typo_key"]), max_size=3, unique=True))
            d[key] = {k: draw(specs if key == "data" and k in ("sensitive", "sensitive_test", "public") and
                              draw(st.booleans()) else _value(SECTIONS[key].get(k))) for k in keys}
        else:
            d[key] = draw(_value(TOP.get(key)) if key in TOP else junk)
    return json.dumps(d, allow_nan=True)


FLAGS = {
    "run": ["--config", "--epsilon", "--seed", "--device", "--sensitive-root", "--public-root", "--no-evaluate",
            "--allow-large-delta", "--resume", "--bogus"],
    "budget": ["--epsilon", "--delta", "--sample-rate", "--steps", "--query-sigma", "--query-fraction",
               "--num-examples", "--json", "--allow-large-delta"],
    "query": ["--sensitive", "--public", "--epsilon-query", "--delta", "--top-k", "--top-n", "--seed", "--run-dir"],
    "evaluate": ["--device", "--num-samples", "--ca-archs", "--selection-epsilon", "--ca-protocol", "--fid-split"],
    "sample": ["--num-samples", "--steps", "--guidance", "--batch-size", "--stochastic"],
    "finetune": ["--resume", "--sensitive-root"], "pretrain": ["--resume"], "export": []}
BOOLEAN_FLAGS = {"--no-evaluate", "--allow-large-delta", "--json", "--stochastic", "--resume"}
flag_values = st.one_of(st.sampled_from(["1", "0", "-1", "1e-5", "0.5", "inf", "nan", "1e400", "10", "3", "x",
                                         "", "test", "cuda", "cpu", "embedded:public,size=600", "run_dir",
                                         "dpimagebench", "resnet9,nope"]), st.text(max_size=5))


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = [command]
    if command in ("sample", "finetune", "pretrain", "export", "evaluate"):
        argv.append(draw(st.sampled_from(["run_dir", "missing", "afile", ".", "run_dir/sub"])))
    for flag in draw(st.lists(st.sampled_from(FLAGS[command]), max_size=5)) if FLAGS[command] else []:
        if command == "run" and flag == "--resume" or flag not in BOOLEAN_FLAGS:
            argv += [flag, draw(flag_values)]
        else:
            argv.append(flag)
    if command in ("run", "query") or draw(st.booleans()):
        argv.append("--dry-run")  # a valid `run`/`query` would really train: only its checks are fuzzed
    return argv


# ---- the property ------------------------------------------------------------------------------------------------


@pytest.fixture
def fuzz_env(monkeypatch, tmp_path):
    """A scratch working directory holding a fake run directory, a file, and the stand-in accountant."""
    from privimage.engine.accounting import EpsilonReport
    import privimage.preflight as preflight

    cwd = tmp_path / "cwd"
    (cwd / "run_dir").mkdir(parents=True)
    (cwd / "run_dir" / "config.json").write_text(json.dumps({"name": "test", "finetune": {"lr": "fast"}}))
    (cwd / "afile").write_text("not a folder")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PRIVIMAGE_CACHE_DIR", str(tmp_path / "cache"))
    if not REAL_ACCOUNTANT:
        def calibrate(*, target_epsilon, sample_rate, steps, delta, other_mechanisms=()):
            if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
                raise ValueError("stand-in accountant: out of range")
            return 1.0

        def compose(mechanisms, *, delta):
            eps = sum(m.count * m.sample_rate for m in mechanisms)
            return EpsilonReport(eps, eps, 0.0, delta, "stand-in")

        monkeypatch.setattr("privimage.engine.budget.calibrate_noise_multiplier", calibrate)
        monkeypatch.setattr("privimage.engine.budget.compose_epsilon", compose)
    preflight._planned.cache_clear()
    yield cwd
    preflight._planned.cache_clear()


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def check(argv: list[str], cwd: Path) -> None:
    """Run ``privimage ARGV`` in-process: exit 0, or exit 2 with one line; nothing written or changed."""
    before = _files(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert "Traceback" not in err.getvalue(), (argv, err.getvalue())
    if code == 0:
        OUTCOMES["ran (exit 0)"] += 1
    else:
        assert code == 2, (argv, code, err.getvalue())
        assert len(lines) == 1 and re.match(rf"privimage( {argv[0]})?: error: ", lines[0]), (argv, lines)
        OUTCOMES["refused (exit 2)"] += 1
        OUTCOMES[_kind(lines[0])] += 1
    assert _files(cwd) == before, (argv, "changed files")


def _kind(line: str) -> str:
    text = line.split(": error: ", 1)[1]
    return "  argparse" if text.startswith("argument ") or "the following arguments" in text else "  checked"


@FUZZ
@given(text=configs(), dry=st.booleans())
def test_any_config_file_runs_its_dry_run_or_is_one_line(fuzz_env, text, dry):
    (fuzz_env.parent / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    # without --dry-run, --out names a file: every check that passes still ends before anything is written
    argv = ["run", "--config", str(fuzz_env.parent / "config.json")] + (["--dry-run"] if dry else ["--out", "afile"])
    check(argv, fuzz_env)


@FUZZ
@given(spec=specs, which=st.sampled_from(["sensitive", "sensitive_test", "public"]))
def test_any_data_spec_is_checked_or_one_line(fuzz_env, spec, which):
    text = json.dumps({"base": "test", "data": {which: spec}})
    (fuzz_env.parent / "config.json").write_text(text)
    check(["run", "--config", str(fuzz_env.parent / "config.json"), "--dry-run"], fuzz_env)


@FUZZ
@given(argv=command_lines())
def test_any_command_line_runs_its_dry_run_or_is_one_line(fuzz_env, argv):
    check(argv, fuzz_env)


def teardown_module(module):
    report = os.environ.get("PRIVIMAGE_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(OUTCOMES), indent=2, sort_keys=True))
