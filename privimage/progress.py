"""A dependency-free progress bar for long work (training, sampling, feature extraction).

Writes one carriage-return-updated line to stderr when stderr is a terminal, and a plain line every
``log_every`` seconds otherwise (CI logs, files), so long runs are visible in both without flooding.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

#: Default ``stream``: the ``sys.stderr`` of the moment a bar is made, not of import time, so a redirection
#: made later (``contextlib.redirect_stderr``, pytest's capture) moves the bars too.
STDERR = object()


class Progress:
    """Wrap an iterable (or call :meth:`update`) and show count, rate, ETA and custom fields.

    Example:
        >>> bar = Progress(total=3, desc="demo", stream=None)
        >>> for _ in bar(range(3)):
        ...     bar.set(loss=0.5)
        >>> bar.count
        3
    """

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it",
                 stream=STDERR, log_every: float = 10.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is STDERR else stream
        self.log_every = log_every
        self.count = 0
        self.fields: dict[str, object] = {}
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._tty = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, iterable: Iterable[T]) -> Iterator[T]:
        for item in iterable:
            yield item
            self.update()
        self.close()

    def set(self, **fields: object) -> None:
        """Show these values (e.g. ``loss=0.1, eps=2.3``) on the bar from now on."""
        self.fields.update(fields)

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self._last_draw >= (0.2 if self._tty else self.log_every):
            self._draw(now)

    def close(self) -> None:
        self._draw(time.perf_counter(), final=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count}/{self.total}" if self.total else f"{self.count}"
        eta = ""
        if self.total and rate > 0:
            eta = f" eta {_fmt_seconds((self.total - self.count) / rate)}"
        extra = "".join(f" {k}={_fmt_value(v)}" for k, v in self.fields.items())
        return f"{self.desc}: {done} {self.unit} [{_fmt_seconds(elapsed)}, {rate:.2f} {self.unit}/s{eta}]{extra}"

    def _draw(self, now: float, final: bool = False) -> None:
        self._last_draw = now
        if self.stream is None:
            return
        if self._tty:
            self.stream.write("\r" + self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def _fmt_seconds(s: float) -> str:
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
