"""Docstring examples are run, so they cannot drift from the code (Opacus runs its doctests in CI)."""

import doctest
import importlib

import pytest

MODULES = [
    "privimage.engine.accounting",
    "privimage.engine.auditing",
    "privimage.engine.budget",
    "privimage.engine.dp_sgd",
    "privimage.engine.optimizer",
    "privimage.engine.sampling",
    "privimage.kernels.dispatch",
    "privimage.progress",
    "privimage.query.semantic",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples to run"
    assert result.failed == 0
