"""The data package's docstring examples run (so they cannot drift from the code)."""

import doctest

import privimage.data


def test_data_docstring_examples():
    result = doctest.testmod(privimage.data, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
