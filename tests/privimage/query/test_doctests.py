"""The query package's docstring examples run (so they cannot drift from the code)."""

import doctest

import privimage.query.semantic


def test_query_docstring_examples():
    result = doctest.testmod(privimage.query.semantic, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
