"""Progress of long work outside Lightning (the default world, statistics): a tqdm bar on a terminal, lines in a log.

A bar redraws itself with carriage returns: in a batch job's log it is one ever-growing line that ``grep``/``less``
show as its last state at best. Where the stream is not a terminal, :func:`progress_bar` prints a plain line every
tenth of the work instead.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import IO, Any

from tqdm.auto import tqdm


class LineProgress:
    """The part of tqdm's interface this project uses (``update``, ``set_postfix_str``, ``close``, ``with``), as lines:
    one every ``every`` of ``total`` and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 0.1, file: IO[str] | None = None):
        self.total, self.desc, self.unit, self.file = int(total), desc, unit, file
        self.n, self.postfix = 0, ""
        self._step = max(1, round(every * self.total))
        self._next = self._step
        self._start = time.monotonic()
        self._shown = 0  # n of the last line

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or self.n >= self.total:
            self._line()
            self._next = (self.n // self._step + 1) * self._step

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if self.n != self._shown:
            self._line()  # stopped between two lines: where it stopped

    def _line(self) -> None:
        if self.n == self._shown:
            return
        self._shown = self.n
        took = time.monotonic() - self._start
        left = took / self.n * (self.total - self.n) if self.n else float("nan")
        pct = 100 * self.n / self.total if self.total else 100.0
        postfix = f", {self.postfix}" if self.postfix else ""
        eta = f", {timedelta(seconds=round(left))} left" if self.n < self.total and left == left else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%){postfix} | {timedelta(seconds=round(took))} elapsed{eta}",
            file=self.file or sys.stderr,
            flush=True,
        )

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str, disable: bool = False, file: IO[str] | None = None) -> Any:
    """A tqdm bar on ``file`` (stderr) when it is a terminal, else a :class:`LineProgress`; a silent bar when ``disable``."""
    stream = file or sys.stderr
    if disable or stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=stream)
    return LineProgress(total, desc, unit, file=stream)
