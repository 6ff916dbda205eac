"""Progress bars for long work (training, sampling, feature extraction): tqdm, with the project's defaults.

:func:`progress_bar` returns a plain ``tqdm.tqdm`` (bars, rates, ETA, nesting with ``position=``, notebooks
and ``tqdm.contrib.logging`` work as users know them). This adapter exists for two defaults that every bar in
the project shares, so they live in one place:

- it writes to the ``sys.stderr`` of the moment the bar is made, so a redirection made later
  (``contextlib.redirect_stderr``, pytest's capture) takes the bars too;
- off a terminal (CI logs, files) it redraws at most every ``log_interval`` seconds instead of every 0.2 s:
  each redraw there is a new line in the log, and a training run would otherwise flood it.

Show values with ``bar.set_postfix(loss=..., refresh=False)`` (``refresh=False``: the next redraw shows them;
a refresh per step would defeat the interval). A resumed loop passes ``initial=`` the steps already done.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["close_all", "progress_bar"]


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 enabled: bool = True, log_interval: float = 10.0, **kwargs) -> tqdm:
    """A tqdm bar on stderr: redrawn every 0.2 s on a terminal, every ``log_interval`` s elsewhere.

    ``enabled=False`` gives a silent bar (tqdm's ``disable``). Other keyword arguments go to tqdm
    (``position=``, ``leave=`` for nested bars, ``file=`` to write elsewhere).

    Example:
        >>> import io
        >>> bar = progress_bar(3, desc="demo", file=io.StringIO())
        >>> for _ in range(3):
        ...     bar.update()
        >>> bar.close()
        >>> bar.n
        3
    """
    file = kwargs.pop("file", None) or sys.stderr
    on_terminal = bool(getattr(file, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, disable=not enabled,
                mininterval=0.2 if on_terminal else log_interval, dynamic_ncols=on_terminal, **kwargs)


def close_all() -> None:
    """Close every open bar (tqdm's own registry), so an error printed next is the last line on stderr.

    A bar left open by an exception is otherwise closed, and redrawn, only when the traceback that holds it is
    dropped: after the command line's one-line error, which it would push off the last line.
    """
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
