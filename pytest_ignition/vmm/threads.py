"""The VMM's own long-lived threads (vCPU run loops, the event loop, the control server).

``threading.Thread.start()`` waits until the new thread has been scheduled and has run its
bootstrap; a restored VM starts three threads before its control socket appears, and on this
project's hosts those waits were ~1.6 ms of a ~10.7 ms fork-server restore (median of 40,
2026-12-03). :class:`VmmThread` starts its thread without waiting. Invariants: ``is_alive()``
is True from ``start()`` until the target returns (a thread that has not run yet *will* run);
``ident`` is None until the thread runs (so a caller that signals the thread must cope: the
vCPU kick also sets ``immediate_exit``, which a not-yet-running vCPU sees on its first
``KVM_RUN``); ``is_current()`` compares thread idents, never ``threading.current_thread()``
(inside, that is a dummy ``Thread`` carrying only the name). Threads end with the process,
like daemon threads.
"""

from __future__ import annotations

import _thread
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class VmmThread:
    def __init__(self, target: Callable[[], object], name: str) -> None:
        self._target = target
        self.name = name
        self.ident: int | None = None
        self._started = False
        self._done = threading.Event()

    def start(self) -> None:
        if self._started:
            raise RuntimeError(f"{self.name}: already started")
        self._started = True
        try:
            _thread.start_new_thread(self._main, ())
        except BaseException:
            self._done.set()
            raise

    def _main(self) -> None:
        self.ident = threading.get_ident()
        threading.current_thread().name = self.name  # a dummy Thread: names the log records
        try:
            self._target()
        except BaseException:  # what threading's excepthook would print, in the VMM's log
            log.exception("thread %s crashed", self.name)
        finally:
            self._done.set()

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()

    def join(self, timeout: float | None = None) -> None:
        if not self._started:
            raise RuntimeError(f"{self.name}: cannot join a thread that was never started")
        self._done.wait(timeout)

    def is_current(self) -> bool:
        return self.ident is not None and self.ident == threading.get_ident()
