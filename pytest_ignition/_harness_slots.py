"""How many nested harness hosts run at once on this machine.

Each harness host is a QEMU TCG process with ``-smp 2``; on a 2-core machine two of them already
use every core, and a third or a seventh only makes every guest inside slower, until the VMM's
boot and agent deadlines expire (seen: seven hosts at once, a restore's agent not answering
within 150 s). So :func:`run` of :mod:`pytest_ignition.nested` first takes one of
``IGNITION_NESTED_SLOTS`` slots (default: one per two host CPUs, at least one; ``0`` = no
limit): an exclusive ``flock`` on ``<cache>/locks/nested-slot-<i>.lock``, which the kernel
drops when the process ends, however it ends. A run that finds every slot taken says so on
stderr and waits, up to ``IGNITION_NESTED_SLOT_WAIT`` seconds (default 7200), then fails with
an error naming both variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SLOTS_ENV = "IGNITION_NESTED_SLOTS"
WAIT_ENV = "IGNITION_NESTED_SLOT_WAIT"
DEFAULT_WAIT_S = 7200.0
POLL_S = 0.5
REPORT_EVERY_S = 60.0


class SlotTimeout(Exception):
    """No harness slot became free in time."""


def slot_count() -> int:
    raw = os.environ.get(SLOTS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{SLOTS_ENV}={raw!r} is not a whole number") from None
        if n < 0:
            raise ValueError(f"{SLOTS_ENV}={raw!r} must not be negative")
        return n
    return max(1, (os.cpu_count() or 1) // 2)


def wait_limit() -> float:
    raw = os.environ.get(WAIT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={raw!r} is not a number of seconds") from None


def _try(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def slot(
    lock_dir: Path,
    *,
    say: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[int | None]:
    """Hold one harness slot for the body; yields its index (None when unlimited)."""
    n = slot_count()
    if n == 0:
        yield None
        return
    limit = wait_limit()
    if say is None:

        def say(msg: str) -> None:
            print(f"pytest_ignition.nested: {msg}", file=sys.stderr, flush=True)

    lock_dir.mkdir(parents=True, exist_ok=True)
    start = clock()
    reported = None
    while True:
        for i in range(n):
            fd = _try(lock_dir / f"nested-slot-{i}.lock")
            if fd is not None:
                if reported is not None:
                    say(f"got harness slot {i} after {clock() - start:.0f} s")
                try:
                    yield i
                finally:
                    os.close(fd)
                return
        waited = clock() - start
        if waited >= limit:
            raise SlotTimeout(
                f"all {n} nested harness slot(s) stayed busy for {waited:.0f} s "
                f"(other harness runs on this machine; raise {SLOTS_ENV} to run more at once, "
                f"or {WAIT_ENV} to wait longer)"
            )
        if reported is None or clock() - reported >= REPORT_EVERY_S:
            say(
                f"waiting for a nested harness slot: all {n} busy ({SLOTS_ENV}={n}); "
                f"waited {waited:.0f} s of at most {limit:.0f} s"
            )
            reported = clock()
        sleep(POLL_S)
