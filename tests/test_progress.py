"""Progress bars show on a terminal and stay out of logs."""

from __future__ import annotations

import io
import sys

from privatune.common.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_and_silent_in_a_log(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress_bar(range(5), "local DP steps")) == list(range(5))
    assert "local DP steps" in terminal.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress_bar(range(5), "local DP steps")) == list(range(5))
    assert log.getvalue() == ""
