"""Log lines that may repeat: the first at once, then at most one per interval, with a count.

Server layer (layer 2 of docs/architecture.md), used by the cluster and
supervisor layers too. What an attacker, a scanner or an outage can repeat
(refused handshakes at capacity, protocol errors, NATS reconnect attempts,
bus gaps) must not fill an operator's disk: every such event is counted in
``/metrics`` where it has a counter, and logged through a
:class:`RepeatedLog`, which writes the first occurrence, then at most one
line per ``interval`` saying how many were left out since the last one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RepeatedLog"]


class RepeatedLog:
    """One kind of log line, rate-limited: ``log(message, *args)`` as ``logger.log`` takes them.

    The first call logs; later calls within ``interval`` seconds of the last
    line logged are only counted, and the next line logged ends with
    ``(N more like it in the last S s)``. :meth:`flush` logs that count
    alone, for a caller that knows the repetition has ended (an outage that
    healed).
    """

    __slots__ = ("_last", "_suppressed", "interval", "level", "logger")

    def __init__(
        self, logger: logging.Logger, level: int = logging.WARNING, *, interval: float = 10.0
    ) -> None:
        if not interval >= 0:
            raise ValueError("interval must be >= 0 seconds")
        self.logger = logger
        self.level = level
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    @property
    def suppressed(self) -> int:
        """Calls counted but not logged since the last line."""
        return self._suppressed

    def __call__(self, message: str, *args: Any, exc_info: bool = False) -> bool:
        """Log now, or count; ``True`` if a line was written (``exc_info``: with the traceback)."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return False
        if self._suppressed:
            message += " (%d more like it in the last %.0fs)"
            args = (*args, self._suppressed, now - self._last)
        self._last = now
        self._suppressed = 0
        self.logger.log(self.level, message, *args, exc_info=exc_info)
        return True

    def flush(self, message: str = "%d more like the last line were not logged") -> None:
        """Log how many calls were only counted (if any), and start afresh."""
        if self._suppressed:
            self.logger.log(self.level, message, self._suppressed)
        self._suppressed = 0
        self._last = -float("inf")
