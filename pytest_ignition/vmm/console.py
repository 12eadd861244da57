"""The serial console's host side, shared by both machines and the VMM process: where the
bytes the guest's UART sends go (:func:`writer`) and the event-loop reader that feeds the
bytes readable on an input fd to it (:func:`reader`). Plain callables; no device state."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

Output = Callable[[bytes], object]


def writer(out: BinaryIO | Output | None) -> Output | None:
    """``out`` as a callable: a binary file is written and flushed, and a write that fails (the
    console reader went away) is dropped, so that the guest keeps running."""
    if out is None or callable(out):
        return out
    f = out

    def write(data: bytes) -> None:
        try:
            f.write(data)
            f.flush()
        except (OSError, ValueError):
            pass  # the console reader went away; the guest keeps running

    return write


def reader(loop: Any, fd: int, feed: Callable[[bytes], object]) -> Callable[[], None]:
    """The callback for ``loop.add_reader(fd, ...)``: what ``fd`` has (4 KiB at most a call)
    goes to ``feed``; at EOF or a read error the reader is removed (the guest sees no more
    input)."""

    def on_input() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)  # EOF: the guest sees no more input
            return
        feed(data)

    return on_input
