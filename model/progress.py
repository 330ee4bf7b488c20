"""Progress for long work: tqdm's bar on a terminal; in a log (a file, a pipe, CI), a plain line every few
seconds and one at the end instead of a bar's every frame (which a log keeps as one ever longer line of
carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import IO

LOG_EVERY_SECONDS = 10.0


class LogProgress:
    """The part of tqdm's interface the project uses (``update``, ``set_postfix``, ``n``, ``close``, ``with``),
    written as lines: ``training: 3/10 epoch (loss=0.4321) 12s``."""

    def __init__(self, total: float | None, desc: str, unit: str, file: IO[str], every: float = LOG_EVERY_SECONDS,
                 unit_scale: bool = False, clock=time.monotonic):
        self.total, self.desc, self.unit, self.file, self.every = total, desc, unit, file, every
        self.unit_scale = unit_scale
        self.n = 0
        self._postfix = ""
        self._clock = clock
        self._started = self._last = clock()
        self._closed = False

    def _amount(self, value: float) -> str:
        if not self.unit_scale:
            return f"{value:g}"
        for prefix in ("", "k", "M", "G"):
            if abs(value) < 1000 or prefix == "G":
                return f"{value:.1f}{prefix}" if prefix else f"{value:g}"
            value /= 1000.0
        return f"{value:g}"

    def _line(self) -> str:
        done = self._amount(self.n) + (f"/{self._amount(self.total)}" if self.total is not None else "")
        postfix = f" ({self._postfix})" if self._postfix else ""
        return f"{self.desc}: {done} {self.unit}{postfix} {self._clock() - self._started:.0f}s"

    def _write(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self._last = self._clock()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._clock() - self._last >= self.every:
            self._write()

    def set_postfix(self, **values) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: float | None, desc: str, unit: str, disable: bool = False, file: IO[str] | None = None,
             **options):
    """A progress bar on a terminal (tqdm, ``options`` passed on), lines every few seconds elsewhere, or nothing
    when ``disable``."""
    if disable:
        return _Silent()
    file = file if file is not None else sys.stderr
    if getattr(file, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=file, **options)
    return LogProgress(total, desc, unit, file, unit_scale=options.get("unit_scale", False))
