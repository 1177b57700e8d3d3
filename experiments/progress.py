"""Progress bars that suit where they are shown: a live bar on a terminal, a periodic line in a log file.

tqdm redraws its bar with carriage returns many times a second; written to a file (a Flower
log, a CI log, ``make demo > log``) that is one line per update, megabytes per run. Off a
terminal, the same bar is printed as a plain line at most every ``LOG_INTERVAL_S`` seconds and
once at the end (issue 13).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one newline-terminated line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """tqdm off a terminal: ``set_postfix`` waits for the next periodic line instead of forcing a redraw
    (its default ``refresh=True`` would print a line per step, whatever ``mininterval`` says)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def progress_bar(total: int, desc: str, unit: str, stream: TextIO | None = None, **options: Any) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr): live on a terminal, periodic lines elsewhere."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, **options)
    return _LogBar(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,
        ncols=100,
        ascii=True,
        **options,
    )
