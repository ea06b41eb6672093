"""The live one-line progress display of ``flexc run`` and ``flexc simulate``."""
from __future__ import annotations

import math
import sys
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """The live one-line display: rewritten in place on a terminal every ``every`` seconds; elsewhere (logs,
    pipes) a new line every ``every_pipe`` seconds."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 1.0, every_pipe: float = 10.0):
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every = every if self.tty else every_pipe
        self._last = -math.inf
        self._width = 0

    def update(self, line: str, now: float, force: bool = False) -> None:
        if not force and now - self._last < self.every:
            return
        self._last = now
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
