"""Kernel tests: the interpreter switch.

The interpreter is switched on per test (``TRITON_INTERPRET=1`` through monkeypatch), never for the whole
process: privimage.kernels reads the variable at each call, so other areas' tests in the same pytest run keep
their torch paths. Shapes are tiny on purpose: Triton's interpreter runs each program instance in Python.
"""

import pytest
import torch

from privimage.kernels import dispatch


@pytest.fixture
def interpret(monkeypatch):
    """Run this test's Triton kernels in Triton's CPU interpreter."""
    if not dispatch.HAVE_TRITON:
        pytest.skip("triton is not installed (the `test` extra installs it)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.backend("test", torch.zeros(1)) == dispatch.TRITON
