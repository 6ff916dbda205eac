"""The set-up of a module fixture that runs the CLI in the test process (a whole ``privimage run``, a sweep),
once for its module."""

import contextlib
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
