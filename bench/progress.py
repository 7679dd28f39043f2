"""A one-line progress indicator on stderr: step k of n, elapsed, an estimate of what is left.

On a terminal the line is rewritten in place; in a log (CI, `| tee`) each step gets its own line.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, planned: list[float]) -> None:
        self.planned = planned  # seconds each step is expected to take, in order
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._label = ""

    def begin(self, label: str) -> None:
        self._label = label
        self._show(label + " ...")

    def end(self, outcome: str) -> None:
        self.done += 1
        self._show(f"{self._label}  {outcome}", final=not self.tty)

    def note(self, text: str) -> None:
        self._show(f"{self._label}  {text}")

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def _show(self, text: str, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        planned_done = sum(self.planned[: self.done]) or 1e-9
        # Scale what is left by how the finished steps compared with their plan.
        pace = elapsed / planned_done if self.done else 1.0
        left = sum(self.planned[self.done :]) * pace
        line = f"[{self.done:>3}/{len(self.planned)}  {_clock(elapsed)}  ~{_clock(left)} left]  {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:160])
        elif final:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
