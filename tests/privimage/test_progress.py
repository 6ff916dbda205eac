"""The progress bars: tqdm on the stderr of the moment a bar is made, redrawn rarely off a terminal."""

import contextlib
import io

from tqdm import tqdm

from privimage.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_follows_stderr_redirected_after_import():
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        bar = progress_bar(2, desc="work", unit="img", log_interval=0.0)
        for _ in range(2):
            bar.set_postfix(loss=0.25, refresh=False)
            bar.update()
        bar.close()
    assert isinstance(bar, tqdm)
    last = captured.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("work: 100%") and "2/2" in last and "img/s" in last and "loss=0.25" in last


def test_redraw_interval_is_short_on_a_terminal_and_long_in_logs():
    assert progress_bar(1, file=_Terminal()).mininterval == 0.2
    assert progress_bar(1, file=io.StringIO()).mininterval == 10.0
    assert progress_bar(1, file=io.StringIO(), log_interval=3.0).mininterval == 3.0


def test_resumed_bar_starts_at_initial_and_disabled_bar_is_silent(capsys):
    out = io.StringIO()
    bar = progress_bar(10, desc="resume", initial=7, file=out, log_interval=0.0)
    bar.update(3)
    bar.close()
    assert bar.n == 10 and "10/10" in out.getvalue()
    quiet = progress_bar(1, enabled=False)
    quiet.update()
    quiet.close()
    assert capsys.readouterr().err == ""
