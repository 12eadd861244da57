"""The PIO and MMIO buses: which device answers which guest address.

A device follows the contract in docs/architecture.md: ``read(offset, data)`` fills the
``bytearray`` ``data`` in place, ``write(offset, data)`` consumes ``bytes``; ``offset`` is
relative to the base the device was inserted at. The bus never lets a device exception
escape to the vCPU loop: it logs it (rate-limited) and treats the access as handled, with
all-ones for reads, because a guest-triggered bug in one device must not kill the VMM.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def read(self, offset: int, data: bytearray) -> None: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(ValueError):
    """A device range that is empty, out of bounds, or overlaps another device."""


class BusRange:
    """One device's window; ``end`` is precomputed because every exit compares against it."""

    __slots__ = ("base", "length", "end", "device")

    def __init__(self, base: int, length: int, device: BusDevice):
        self.base = base
        self.length = length
        self.end = base + length
        self.device = device

    def __repr__(self) -> str:
        return f"BusRange({self.base:#x}+{self.length:#x}, {self.device!r})"


class RateLimitedLog:
    """Log at most ``burst`` messages per ``period`` seconds per key; counts what it drops."""

    def __init__(self, logger: logging.Logger, burst: int = 10, period: float = 1.0):
        self.logger = logger
        self.burst = burst
        self.period = period
        self._state: dict[str, tuple[float, int, int]] = {}
        self._lock = threading.Lock()

    def __call__(
        self, level: int, key: str, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return  # e.g. DEBUG for port 0x80 writes, which Linux makes constantly
        now = time.monotonic()
        with self._lock:
            start, count, dropped = self._state.get(key, (now, 0, 0))
            if now - start >= self.period:
                if dropped:
                    self.logger.log(level, "%s: %d similar messages suppressed", key, dropped)
                start, count, dropped = now, 0, 0
            if count >= self.burst:
                self._state[key] = (start, count, dropped + 1)
                return
            self._state[key] = (start, count + 1, dropped)
        self.logger.log(level, msg, *args, exc_info=exc_info)


class Bus:
    """An address space (PIO or MMIO) of non-overlapping device ranges.

    Lookups are a bisect over the sorted bases; insertion is rare (machine setup) and takes
    a lock so that a device added while vCPUs run is seen atomically.
    """

    def __init__(self, name: str, limit: int = 1 << 64):
        self.name = name
        self.limit = limit
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()
        self._ratelog = RateLimitedLog(log)
        self.unhandled = 0  # accesses to addresses no device covers
        self.device_errors = 0  # device exceptions swallowed

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        with self._lock:
            i = bisect.bisect_right(self._bases, base)
            if i > 0 and self._ranges[i - 1].end > base:
                other = self._ranges[i - 1]
                raise BusError(
                    f"{self.name}: {base:#x}+{length:#x} overlaps {other.device!r} at "
                    f"{other.base:#x}+{other.length:#x}"
                )
            if i < len(self._ranges) and self._ranges[i].base < base + length:
                other = self._ranges[i]
                raise BusError(
                    f"{self.name}: {base:#x}+{length:#x} overlaps {other.device!r} at "
                    f"{other.base:#x}+{other.length:#x}"
                )
            ranges = self._ranges[:i] + [BusRange(base, length, device)] + self._ranges[i:]
            # publish new lists in one assignment each: readers never see a half-updated list
            self._ranges = ranges
            self._bases = [r.base for r in ranges]

    def remove(self, base: int) -> BusDevice:
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise BusError(f"{self.name}: no device at {base:#x}")
            dev = self._ranges[i].device
            ranges = self._ranges[:i] + self._ranges[i + 1 :]
            self._ranges = ranges
            self._bases = [r.base for r in ranges]
            return dev

    def devices(self) -> list[BusRange]:
        return list(self._ranges)

    def find(self, addr: int, size: int = 1) -> BusRange | None:
        """The range wholly containing ``[addr, addr + size)``, or None."""
        ranges = self._ranges
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = ranges[i]
        if addr + size <= r.end:
            return r
        return None

    def read(self, addr: int, data: bytearray) -> bool:
        """Fill ``data`` from the device at ``addr``; False (data untouched) if none covers it."""
        r = self.find(addr, len(data) or 1)
        if r is None:
            self.unhandled += 1
            return False
        try:
            r.device.read(addr - r.base, data)
        except Exception:
            self.device_errors += 1
            self._ratelog(
                logging.ERROR,
                f"{self.name}-read-{type(r.device).__name__}",
                "%s: %r raised on read at %#x (%d bytes); returning all-ones",
                self.name,
                r.device,
                addr,
                len(data),
                exc_info=True,
            )
            data[:] = b"\xff" * len(data)
        return True

    def write(self, addr: int, data: bytes) -> bool:
        """Hand ``data`` to the device at ``addr``; False if none covers it."""
        r = self.find(addr, len(data) or 1)
        if r is None:
            self.unhandled += 1
            return False
        try:
            r.device.write(addr - r.base, data if type(data) is bytes else bytes(data))
        except Exception:
            self.device_errors += 1
            self._ratelog(
                logging.ERROR,
                f"{self.name}-write-{type(r.device).__name__}",
                "%s: %r raised on write at %#x (%d bytes); ignored",
                self.name,
                r.device,
                addr,
                len(data),
                exc_info=True,
            )
        return True
