"""How long work speaks, the one way every room does it: a bar on a terminal, log lines elsewhere.

- On a terminal (stderr is a TTY) a :class:`Progress` is a tqdm bar.
- Anywhere else (a file, a pipe, a CI or Kubernetes log) it writes a line when the work
  starts, then one at least every ``interval`` seconds from a timer thread (whether or not
  the count moved: a slow first step still shows the run is alive), and one when it ends::

      [12:00:15] pretrain: 120/400 steps (30%), 2.41 steps/s, elapsed 00:49, ETA 01:56, loss 0.693

  The interval is 15 s, or ``MODLOC_PROGRESS_SECONDS`` from the environment.

:func:`announce` prints one line, on stderr with the same time stamp, of what is about to
happen (the plan that training and export print before they start, the demo's stages).
Both write to stderr, so that stdout keeps a verb's result (and ``--json``) clean; both
are silenced by ``enabled=False``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

INTERVAL_SECONDS = 15.0
INTERVAL_VARIABLE = "MODLOC_PROGRESS_SECONDS"

T = TypeVar("T")


def log_interval() -> float:
    """Seconds between two log lines: ``MODLOC_PROGRESS_SECONDS``, else 15."""
    text = os.environ.get(INTERVAL_VARIABLE, "")
    try:
        seconds = float(text) if text else INTERVAL_SECONDS
    except ValueError:
        raise ValueError(f"{INTERVAL_VARIABLE}={text!r}: expected seconds, e.g. 15") from None
    if seconds <= 0:
        raise ValueError(f"{INTERVAL_VARIABLE}={text!r}: expected seconds > 0")
    return seconds


def _stamp() -> str:
    return time.strftime("[%H:%M:%S]")


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def announce(message: str, enabled: bool | None = True, stream: TextIO | None = None) -> None:
    """One time-stamped line on stderr (``enabled`` False: nothing); beside a running bar
    on a terminal it is written above the bar."""
    if enabled is False:
        return
    tqdm.write(f"{_stamp()} {message}", file=stream or sys.stderr)


class Progress:
    """The progress of one piece of work (module doc): a bar on a terminal, log lines
    elsewhere, nothing with ``enabled=False``.

    Args:
        description: what is being done (``"pretrain"``, ``"infer"``), the line's prefix.
        total: the count at the end, if known (then the line has a percentage and an ETA).
        unit: what is counted (``"step"``, ``"video"``, ``"B"``).
        enabled: False shows nothing; True or None (the default of the callers'
            ``progress`` arguments) shows the bar or the lines.
        initial: the count already done (a resumed run): the rate and ETA count from it.
        unit_scale: counts in k/M/G (bytes).
        position: the bar's line (one per torchrun rank; None: below any bar still open).
        interval: seconds between log lines (default :func:`log_interval`).

    Use it as a context manager (or call :meth:`close`): the timer thread stops and the
    last line says whether the work finished or stopped.
    """

    def __init__(self, description: str, total: float | None = None, unit: str = "it", *,
                 enabled: bool | None = True, initial: int = 0, unit_scale: bool = False,
                 position: int | None = None, interval: float | None = None,
                 stream: TextIO | None = None):
        self.description, self.total, self.unit, self.unit_scale = description, total, unit, unit_scale
        self.count = self.initial = initial
        self.started = time.monotonic()
        self.postfix: dict[str, str] = {}
        self._stream = stream or sys.stderr
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.closed = enabled is False
        if self.closed:
            return
        if _is_terminal(self._stream):
            self._bar = tqdm(total=total, initial=initial, unit=unit, desc=description,
                             unit_scale=unit_scale, position=position, file=self._stream,
                             dynamic_ncols=True)
            return
        self.interval = log_interval() if interval is None else interval
        self._write(self.line("started"))
        self._ticker = threading.Thread(target=self._tick, name=f"progress-{description}", daemon=True)
        self._ticker.start()

    # --- counting -----------------------------------------------------------------

    def update(self, n: float = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)

    def set_total(self, total: float | None) -> None:
        """The count at the end, once it is known (after a first pass, say)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def set_postfix(self, **values) -> None:
        """Values shown after the counts (``loss``, ``windows``), kept until replaced."""
        self.postfix.update({key: str(value) for key, value in values.items()})
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, counting one per item."""
        for item in items:
            yield item
            self.update()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Units per second since the start (the count before it, ``initial``, left out)."""
        return (self.count - self.initial) / max(self.elapsed, 1e-9)

    # --- the log line -------------------------------------------------------------

    def line(self, state: str | None = None) -> str:
        """``description: count/total unit (pct), rate, elapsed, ETA, postfix``."""
        count = self._amount(self.count)
        if self.total:
            counts = (f"{count}/{self._amount(self.total)} {self.unit} "
                      f"({100 * self.count / self.total:.0f}%)")
        else:
            counts = f"{count} {self.unit}"
        parts = [counts]
        if state == "started":
            parts.append("started")
        else:
            rate = self.rate
            parts.append(f"{self._amount(rate)} {self.unit}/s" if rate else f"0 {self.unit}/s")
            parts.append(f"elapsed {tqdm.format_interval(self.elapsed)}")
            if state is None:
                if self.total and rate:
                    eta = tqdm.format_interval(max(self.total - self.count, 0) / rate)
                else:
                    eta = "unknown"
                parts.append(f"ETA {eta}")
            else:
                parts.append(state)
        parts.extend(f"{key} {value}" for key, value in self.postfix.items())
        return f"{self.description}: {', '.join(parts)}"

    def _amount(self, value: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(value)
        return f"{value:,.0f}" if value >= 100 or float(value).is_integer() else f"{value:.3g}"

    def _write(self, text: str) -> None:
        try:
            print(f"{_stamp()} {text}", file=self._stream, flush=True)
        except (OSError, ValueError):  # the reader went away (a closed pipe): stop speaking
            self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._write(self.line())

    # --- the end ------------------------------------------------------------------

    def close(self, state: str = "done") -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            return
        self._stop.set()
        self._ticker.join()
        self._write(self.line(state))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("done" if exc_type is None else "stopped")


__all__ = ["INTERVAL_SECONDS", "INTERVAL_VARIABLE", "Progress", "announce", "log_interval"]
