"""Progress of long work (data_prep's shards, evaluate, pretrained export): tqdm's bar where the stream is a
terminal, else plain lines (count, rate, ETA) at most every `every` seconds and at the end, as training's
LineProgress does, so `capsdist-shards ... > log` or `capsdist-evaluate ... 2> log` shows that it is alive and
when it will finish."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Progress:
    """`with Progress(total, initial) as bar: bar.update(n)`: a bar on a terminal, plain lines elsewhere.

    ``total`` None: the count is not known ahead (lines say the count and rate, no ETA); ``label`` starts each line
    (``evaluate: ...``); ``stream`` is stdout unless given (stderr where stdout carries the result)."""

    def __init__(
        self,
        total: int | None,
        initial: int = 0,
        unit: str = "samples",
        every: float = 10.0,
        label: str = "",
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.done, self.unit, self.every = total, initial, unit, every
        self.start_count, self.started = initial, time.monotonic()
        self.last, self.shown = self.started, initial
        self.prefix, self.stream = f"{label}: " if label else "", stream or sys.stdout
        terminal = self.stream.isatty()
        bar = {"desc": label or None, "file": self.stream, "disable": None}
        self.bar = tqdm(total=total, initial=initial, unit=unit.rstrip("s"), **bar) if terminal else None

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        """`n` more done: advance the bar, or print a line if `every` seconds passed since the last one."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every or (self.total is not None and self.done >= self.total):
            self.line()

    def line(self) -> None:
        """One line: done/total (percent), rate since the start, time left at that rate (without a total: the
        count and the rate)."""
        now = time.monotonic()
        self.last, self.shown = now, self.done
        rate = (self.done - self.start_count) / max(now - self.started, 1e-9)
        counts, eta = f"{self.done} {self.unit}", ""
        if self.total is not None:
            counts = f"{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f", ETA {_clock(left) if left != float('inf') else '?'}"
        print(f"{self.prefix}{counts}, {rate:,.0f} {self.unit}/s{eta}", file=self.stream, flush=True)

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        """Close the bar; without one, a last line for what the lines have not shown yet (work that ended early)."""
        if self.bar is not None:
            self.bar.close()
        elif kind is None and self.done != self.shown:
            self.line()
