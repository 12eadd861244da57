"""The VMM's event loop where there is no eventfd (macOS, for the aarch64 machine on
Hypervisor.framework): it wakes through a pipe. Run here by hiding os.eventfd."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pytest_ignition.vmm.eventloop import EventLoop


def test_loop_without_eventfd_wakes_through_a_pipe(monkeypatch) -> None:
    monkeypatch.delattr(os, "eventfd")
    loop = EventLoop("pipe-loop")
    assert loop._wake_w is not None
    loop.start()
    try:
        ran = threading.Event()
        for _ in range(3):  # repeated wakes drain the pipe
            ran.clear()
            threading.Thread(target=loop.call_soon_threadsafe, args=(ran.set,)).start()
            assert ran.wait(5), "a callback handed over from another thread did not run"
        a, b = socket.socketpair()
        got: list[bytes] = []
        readable = threading.Event()

        def on_read() -> None:
            got.append(a.recv(16))
            readable.set()

        loop.add_reader(a.fileno(), on_read)
        b.send(b"ping")
        assert readable.wait(5) and got == [b"ping"]
        loop.remove_reader(a.fileno())
        a.close()
        b.close()
    finally:
        wake_r, wake_w = loop._wake_fd, loop._wake_w
        loop.stop()
    for fd in (wake_r, wake_w):
        with pytest.raises(OSError):
            os.fstat(fd)  # both ends closed
