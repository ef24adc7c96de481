"""Progress of a long data_prep job: tqdm's bar on a terminal, else plain lines on stdout (count, rate, ETA) at
most every `every` seconds and at the end, as training's LineProgress does, so `capsdist-shards ... > log` shows
that it is alive and when it will finish."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm import tqdm


def _clock(seconds: float) -> str:
    """Seconds as h:mm:ss."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Progress:
    """`with Progress(total, initial) as bar: bar.update(n)`: a bar on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, initial: int = 0, unit: str = "samples", every: float = 10.0) -> None:
        self.total, self.done, self.unit, self.every = total, initial, unit, every
        self.start_count, self.started = initial, time.monotonic()
        self.last = self.started
        terminal = sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=initial, unit=unit.rstrip("s"), disable=None) if terminal else None

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        """`n` more done: advance the bar, or print a line if `every` seconds passed since the last one."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every or self.done >= self.total:
            self.line()

    def line(self) -> None:
        """One line: done/total (percent), rate since the start, time left at that rate."""
        now = time.monotonic()
        self.last = now
        rate = (self.done - self.start_count) / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = _clock(left) if left != float("inf") else "?"
        counts = f"{self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
        print(f"{counts}, {rate:,.0f} {self.unit}/s, ETA {eta}", flush=True)

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.close()
