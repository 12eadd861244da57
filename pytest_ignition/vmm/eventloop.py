"""One thread per VM that waits on device backends' file descriptors (console stdin, vsock
Unix sockets, eventfds) and runs their callbacks.

Callbacks run on the loop thread only; other threads hand work to it with
:meth:`EventLoop.call_soon_threadsafe`, which wakes the loop through an eventfd. An exception
in a callback is logged and the loop keeps running: a backend bug must not stall the VM.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import time
from collections.abc import Callable

from .threads import VmmThread

log = logging.getLogger(__name__)

Callback = Callable[[], object]


class EventLoop:
    """A ``selectors`` loop on its own daemon thread.

    ``add_reader``/``remove_reader`` (and the writer pair) may be called from any thread (they are forwarded to the
    loop thread when called elsewhere), so devices can register backends from vCPU threads.
    """

    def __init__(self, name: str = "vmm-events"):
        self.name = name
        self._sel = selectors.DefaultSelector()
        # An eventfd on Linux; a pipe where there is none (macOS: the aarch64 machine on
        # Hypervisor.framework), whose write end is _wake_w.
        self._wake_w: int | None = None
        if hasattr(os, "eventfd"):
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self._wake_fd, self._wake_w = os.pipe()
            os.set_blocking(self._wake_fd, False)
            os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._pending: collections.deque[Callback] = collections.deque()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._thread: VmmThread | None = None
        self._stopping = False
        self._closed = False
        self.wakeups = 0  # select() returns (diagnostics: see vmm.probe)
        self._timers: list[tuple[float, int, Callback]] = []  # (due, seq, fn): a heap
        self._seq = itertools.count()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._thread = VmmThread(self._run, self.name)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the loop thread and close the selector; registered fds are not closed."""
        self._stopping = True
        self._wake()
        t = self._thread
        if t is not None and not t.is_current():
            t.join(timeout)
        if t is None or not t.is_alive():
            self._close()

    def __enter__(self) -> EventLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and self._thread.is_current()

    # -- API ------------------------------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callback) -> None:
        """Run ``fn()`` on the loop thread as soon as possible."""
        self._pending.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callback) -> None:
        """Run ``fn()`` on the loop thread after ``delay`` seconds (from any thread; a timer
        on the loop, not a thread per timer)."""
        due = time.monotonic() + max(0.0, delay)
        self._in_loop(lambda: heapq.heappush(self._timers, (due, next(self._seq), fn)))

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""
        self._in_loop(lambda: self._set(self._readers, fd, callback))

    def remove_reader(self, fd: int) -> None:
        self._in_loop(lambda: self._set(self._readers, fd, None))

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is writable (remove it once
        the backlog is flushed, or the loop spins)."""
        self._in_loop(lambda: self._set(self._writers, fd, callback))

    def remove_writer(self, fd: int) -> None:
        self._in_loop(lambda: self._set(self._writers, fd, None))

    # -- internals ------------------------------------------------------------------------
    def _in_loop(self, fn: Callback) -> None:
        if self._thread is None or self.in_loop_thread():
            fn()
        else:
            self.call_soon_threadsafe(fn)

    def _set(self, table: dict[int, Callback], fd: int, callback: Callback | None) -> None:
        if callback is None:
            table.pop(fd, None)
        else:
            table[fd] = callback
        if self._closed:
            return
        mask = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        if fd in self._sel.get_map():
            # Always re-register: the fd number may have been closed and reused, in which
            # case epoll forgot the old file but the selector's map did not, and a plain
            # modify() with an unchanged mask makes no system call at all.
            self._unregister(fd)
        if mask:
            try:
                self._sel.register(fd, mask, fd)
            except OSError as e:  # closed before the loop got to it
                log.warning("%s: cannot watch fd %d (%s); dropped", self.name, fd, e)
                self._readers.pop(fd, None)
                self._writers.pop(fd, None)

    def _unregister(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def _wake(self) -> None:
        try:
            if self._wake_w is None:
                os.eventfd_write(self._wake_fd, 1)
            else:
                os.write(self._wake_w, b"\0")
        except (OSError, ValueError):
            pass  # closed, or the counter is saturated: the loop is awake anyway

    def _drain_wake(self) -> None:
        try:
            if self._wake_w is None:
                os.eventfd_read(self._wake_fd)
            else:
                os.read(self._wake_fd, 4096)
        except BlockingIOError:
            pass

    def _run_pending(self) -> None:
        while self._pending:
            fn = self._pending.popleft()
            self._call(fn)

    def _call(self, fn: Callback) -> None:
        try:
            fn()
        except Exception:
            log.exception("%s: callback %r raised; the loop keeps running", self.name, fn)

    def _run_timers(self) -> float | None:
        """Run the timers that are due; the seconds until the next one (None: no timer)."""
        while self._timers:
            due = self._timers[0][0]
            left = due - time.monotonic()
            if left > 0:
                return left
            _, _, fn = heapq.heappop(self._timers)
            self._call(fn)
        return None

    def _run(self) -> None:
        while not self._stopping:
            self._run_pending()
            timeout = self._run_timers()
            if self._pending:
                timeout = 0
            try:
                events = self._sel.select(timeout)
            except OSError as e:
                # a registered fd was closed behind our back: drop the dead ones and go on
                log.error("%s: select failed (%s); pruning closed fds", self.name, e)
                self._prune()
                continue
            self.wakeups += 1
            for key, mask in events:
                if key.data is None:
                    self._drain_wake()
                    continue
                fd = key.fd
                # look the callbacks up now: an earlier callback may have removed them
                if mask & selectors.EVENT_READ and fd in self._readers:
                    self._call(self._readers[fd])
                if mask & selectors.EVENT_WRITE and fd in self._writers:
                    self._call(self._writers[fd])
        self._run_pending()

    def _prune(self) -> None:
        for fd in set(self._readers) | set(self._writers):
            try:
                os.fstat(fd)
            except OSError:
                log.warning("%s: fd %d was closed while registered; removing it", self.name, fd)
                self._readers.pop(fd, None)
                self._writers.pop(fd, None)
                self._unregister(fd)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sel.close()
        os.close(self._wake_fd)
        if self._wake_w is not None:
            os.close(self._wake_w)
