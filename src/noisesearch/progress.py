"""The one progress display: a tqdm bar on a terminal, a plain line every few seconds otherwise
(log files get no carriage returns), in whole units.

    bar = progress_bar(total=1440, desc="best-of-n", unit="NFE", enabled=True)
    bar.update(18); bar.set(360); bar.close()      # close() completes the bar (100 %)
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

INTERVAL = 5.0  # seconds between plain lines


class Progress:
    """``update(n)`` / ``set(n)`` / ``set_postfix(**kw)`` / ``close()``; disabled: does nothing."""

    def __init__(self, total: float, desc: str = "", unit: str = "it", enabled: bool = True, file=None,
                 interval: float = INTERVAL, tty: bool | None = None, position: int | None = None):
        self.file = file if file is not None else sys.stderr
        self.total = max(0, int(round(total)))
        self.desc, self.unit, self.enabled, self.interval = desc, unit, enabled, interval
        self.n = 0
        self.postfix = ""
        self.bar = None
        self._t0 = self._last = time.monotonic()
        self._closed = False
        if not enabled:
            return
        if tty is None:
            tty = bool(getattr(self.file, "isatty", lambda: False)())
        if tty:
            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, file=self.file, dynamic_ncols=True,
                            position=position)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(complete=exc[0] is None)

    def set(self, n: float) -> None:
        """Set the count (whole units, never above the total nor backwards)."""
        n = min(int(n), self.total) if self.total else int(n)
        if n > self.n:
            self.update(n - self.n)

    def update(self, n: float = 1) -> None:
        if not self.enabled:
            return
        n = int(n)
        if self.total:
            n = min(n, self.total - self.n)
        if n <= 0:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def _line(self, done: bool = False) -> None:
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        of = f"/{self.total}" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        state = "done in" if done else "after"
        print(f"{self.desc}: {self.n}{of} {self.unit}{pct}{extra}, {state} {time.monotonic() - self._t0:.0f} s",
              file=self.file, flush=True)

    def close(self, complete: bool = True) -> None:
        """Finish (with ``complete``, the count goes to the total: an estimated total ends at 100 %)."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        if complete and self.total and self.n < self.total:
            if self.bar is not None:
                self.bar.update(self.total - self.n)
            self.n = self.total
        if self.bar is not None:
            self.bar.close()
        elif time.monotonic() - self._t0 >= self.interval:
            self._line(done=True)  # a short run prints nothing; a long one ends with a summary line


def progress_bar(total: float, desc: str = "", unit: str = "it", enabled: bool = True, **kw) -> Progress:
    return Progress(total, desc, unit, enabled, **kw)
