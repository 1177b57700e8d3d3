"""Progress bars off a terminal: a few plain lines, not one carriage-return redraw per update (issue 13)."""

from __future__ import annotations

import io

from experiments.progress import progress_bar


def test_a_bar_written_to_a_log_is_a_few_whole_lines() -> None:
    # prepare: a log file (not a terminal)
    log = io.StringIO()

    # execute: a thousand quick updates, then the end
    bar = progress_bar(1000, "slice", "step", stream=log)
    for step in range(1000):
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # as `gem3d train` does at every step
        bar.update(1)
    bar.close()

    # assert: no carriage return, every line whole, few lines, and the last one says it finished
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 1 <= len(lines) <= 3
    assert "1000/1000" in lines[-1]
