"""Rate-limited logging for messages a guest can trigger at will.

A guest that loops on bad descriptors must not be able to fill the host's disk with log
lines. Each :class:`GuestLog` is a token bucket over one logger's INFO/WARNING messages:
``burst`` messages at once, ``rate`` per second after that; what is dropped is counted and
reported with the next message that gets through. ERROR (a VMM bug) always gets through.
"""

from __future__ import annotations

import logging
import threading
import time


class GuestLog:
    def __init__(self, logger: logging.Logger, rate: float = 10.0, burst: int = 100):
        self.logger = logger
        self.rate = rate
        self.burst = burst
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._tokens = float(self.burst)
            self._last = time.monotonic()
            self.suppressed = 0

    def _allow(self) -> int | None:
        """None if this message must be dropped, else how many were dropped before it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1:
                self.suppressed += 1
                return None
            self._tokens -= 1
            dropped, self.suppressed = self.suppressed, 0
            return dropped

    def _log(self, level: int, msg: str, args: tuple, exc_info: bool = False) -> None:
        if not self.logger.isEnabledFor(level):
            return
        dropped = self._allow()
        if dropped is None:
            return
        if dropped:
            msg = f"{msg} [{dropped} similar messages suppressed]"
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def info(self, msg: str, *args: object) -> None:
        self._log(logging.INFO, msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._log(logging.WARNING, msg, args)

    # Errors mean a bug in the VMM, not guest misbehaviour: never suppressed.
    def error(self, msg: str, *args: object) -> None:
        self.logger.error(msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        self.logger.exception(msg, *args)
