"""Progress of a long sweep: a bar with rate and ETA on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts units of work (patients, bytes) against an optional total.

    On a terminal the bar is redrawn in place at most ten times a second; elsewhere (CI, a log
    file) one plain line is written every ``interval`` seconds, so logs stay readable.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "patients",
        stream: TextIO | None = None,
        interval: float = 10.0,
        tty: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if not self.tty else 0.1
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._maybe_draw()

    def set(self, value: int) -> None:
        self.done = value
        self._maybe_draw()

    def _maybe_draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        shown = self._count(self.done)
        if self.total:
            frac = min(1.0, self.done / self.total)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            head = f"{shown}/{self._count(self.total)} ({frac:4.0%})"
            tail = f"{self._rate(rate)}, ETA {_duration(eta)}"
        else:
            frac = 0.0
            head = shown
            tail = f"{self._rate(rate)}, {_duration(elapsed)} elapsed"
        if self.tty:
            width = 28
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled) if self.total else ""
            text = (
                f"\r{self.label} [{bar}] {head} {tail}" if bar else f"\r{self.label} {head} {tail}"
            )
            self.stream.write(text + "\033[K")
            self._drawn = True
        else:
            self.stream.write(f"{self.label}: {head}, {tail}\n")
        self.stream.flush()

    def _count(self, n: int) -> str:
        if self.unit == "bytes":
            return f"{n / 1e6:.1f} MB"
        return f"{n:,} {self.unit}" if self.total is None else f"{n:,}"

    def _rate(self, rate: float) -> str:
        if self.unit == "bytes":
            return f"{rate / 1e6:.1f} MB/s"
        return f"{rate:.1f} {self.unit}/s"

    def close(self) -> None:
        self._maybe_draw(force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
