"""The progress bar writes where stderr points when the bar is made (not where it pointed at import)."""

import contextlib
import io

from privimage.progress import Progress


def test_bar_follows_stderr_redirected_after_import():
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        bar = Progress(total=2, desc="work", unit="img", log_every=0.0)
        for _ in bar(range(2)):
            bar.set(loss=0.25)
    lines = captured.getvalue().splitlines()
    assert lines, "nothing reached the redirected stderr"
    assert lines[-1].startswith("work: 2/2 img [") and lines[-1].endswith("loss=0.25")


def test_stream_none_is_silent(capsys):
    bar = Progress(total=1, stream=None, log_every=0.0)
    list(bar(range(1)))
    assert capsys.readouterr().err == ""
