"""The VMM's event loop: timers run on the loop thread, in order, without a thread each."""

from __future__ import annotations

import threading
import time

from pytest_ignition.vmm.eventloop import EventLoop


def test_call_later_runs_on_the_loop_in_due_order():
    loop = EventLoop("test-loop")
    loop.start()
    try:
        got: list[tuple[str, str, float]] = []
        done = threading.Event()
        t0 = time.monotonic()

        def note(name: str) -> None:
            got.append((name, threading.current_thread().name, time.monotonic() - t0))
            if len(got) == 3:
                done.set()

        threads = threading.active_count()
        loop.call_later(0.2, lambda: note("late"))
        loop.call_later(0.05, lambda: note("early"))
        loop.call_soon_threadsafe(lambda: note("now"))
        assert threading.active_count() == threads  # no timer thread
        assert done.wait(10)
        assert [g[0] for g in got] == ["now", "early", "late"]
        assert all(g[1] == "test-loop" for g in got)
        assert got[1][2] >= 0.05 and got[2][2] >= 0.2
    finally:
        loop.stop()
