"""The set-up of a module fixture that runs the CLI in the test process (a whole ``privimage run``, a sweep),
once for its module."""

import contextlib
import json
from pathlib import Path

import pytest

from threads import one_torch_thread


@contextlib.contextmanager
def module_cli(tmp: Path):
    """torch on one thread and the classifier cache in ``tmp/cache`` inside the block, both undone afterwards
    however it ends; yields that cache folder. A module fixture needs this: it runs outside the function-scoped
    ``one_torch_thread`` and ``monkeypatch`` fixtures."""
    with one_torch_thread(), pytest.MonkeyPatch.context() as m:
        m.setenv("PRIVIMAGE_CACHE_DIR", str(tmp / "cache"))
        yield tmp / "cache"


def run_once(tmp: Path, config: dict) -> tuple[Path, Path, Path]:
    """``privimage run`` of ``config`` (written to ``tmp/config.json``) in this process, into ``tmp/one``, inside
    :func:`module_cli`: (the run directory, the config file, the cache), for a test comparing other runs with it."""
    from privimage.cli import main

    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    with module_cli(tmp) as cache:
        assert main(["run", "--config", str(path), "--out", str(tmp / "one")]) == 0
    (run,) = (tmp / "one").iterdir()
    return run, path, cache
