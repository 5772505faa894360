"""One progress bar per stage: tqdm on a terminal, a plain line every 10% otherwise.

A log file or a `ray job logs` stream shows carriage-return redraws as one endless line, so
when stderr is not a terminal the bar becomes a few readable lines:

    train: 50/125 steps (40%) loss 1.2031, 41 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

LINE_EVERY = 0.1  # fraction of the total between two plain lines


class _Lines:
    """tqdm's `update` / `set_postfix_str` / `n` for a stream that is not a terminal."""

    def __init__(self, stage: str, total: int | None, unit: str) -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.n, self.postfix, self.started = 0, "", time.time()
        self._next = 0.0

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.total and self.n / self.total >= self._next:
            self._line()
            while self._next <= self.n / self.total:
                self._next += LINE_EVERY

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def _line(self) -> None:
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        total = f"/{self.total}" if self.total else ""
        extra = f" {self.postfix}," if self.postfix else ""
        print(f"{self.stage}: {self.n}{total} {self.unit}{share}{extra} {time.time() - self.started:.0f} s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.total or self.n < self.total:
            self._line()


@contextmanager
def progress(stage: str, *, total: int | None, unit: str) -> Iterator[tqdm | _Lines]:
    """A bar for `stage` counting `unit`s up to `total` (None: unknown)."""
    if sys.stderr.isatty():
        bar = tqdm(total=total, desc=stage, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True)
    else:
        bar = _Lines(stage, total, unit)
    try:
        yield bar
    finally:
        bar.close()
