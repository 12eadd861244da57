"""A driver-side model of virtio-mmio + split virtqueues, for tests and tools (never the VMM).

It plays the guest: negotiates features through an :class:`MmioTransport`'s registers, lays
out rings in guest memory from a bump allocator, posts descriptor chains (well-formed with
:meth:`DriverQueue.post`, or arbitrary raw descriptors with :meth:`DriverQueue.post_raw`)
and collects used elements. It trusts nothing it does not write itself, so it can be pointed
at a device under hostile-input tests.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pytest_ignition.vmm.memory import GuestMemory


class Arena:
    """Bump allocator over a range of guest RAM."""

    def __init__(self, start: int, end: int):
        self.start, self.next, self.end = start, start, end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("driver arena exhausted")
        self.next = addr + size
        return addr

    def reset(self) -> None:
        self.next = self.start


@dataclass
class DriverQueue:
    mem: GuestMemory
    index: int
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0
    next_desc: int = 0
    completed: list[tuple[int, int]] = field(default_factory=list)

    def write_desc(
        self, i: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None
    ) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def post(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain ``(gpa, length, device_writable)`` buffers in fresh descriptors; returns the head."""
        n = len(buffers)
        ids = [(self.next_desc + i) % self.size for i in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        for i, (addr, length, writable) in enumerate(buffers):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < n else 0
            )
            self.write_desc(ids[i], addr, length, flags, ids[i + 1] if i + 1 < n else 0)
        self.publish(ids[0])
        return ids[0]

    def post_indirect(self, table: int, buffers: list[tuple[int, int, bool]]) -> int:
        """Put the chain in an indirect table at ``table`` behind one descriptor."""
        n = len(buffers)
        for i, (addr, length, writable) in enumerate(buffers):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < n else 0
            )
            self.write_desc(i, addr, length, flags, i + 1 if i + 1 < n else 0, table=table)
        head = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.size
        self.write_desc(head, table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0)
        self.publish(head)
        return head

    def post_raw(self, descriptors: dict[int, tuple[int, int, int, int]], heads: list[int]) -> None:
        """Write arbitrary ``{index: (addr, len, flags, next)}`` and publish arbitrary heads."""
        for i, (addr, length, flags, nxt) in descriptors.items():
            self.write_desc(i % self.size, addr, length, flags, nxt)
        for head in heads:
            self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head & 0xFFFF)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write a (possibly garbage) avail idx; the model follows it."""
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def take_used(self) -> list[tuple[int, int]]:
        """New (id, len) used elements since the last call."""
        idx = self.mem.read_u16(self.used + 2)
        out = []
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.completed += out
        return out


class Driver:
    """Drives one :class:`mmio.MmioTransport` the way Linux's virtio_mmio + a driver would."""

    def __init__(self, transport: mmio.MmioTransport, mem: GuestMemory, arena: Arena):
        self.t = transport
        self.mem = mem
        self.arena = arena
        self.queues: list[DriverQueue] = []

    def read(self, offset: int) -> int:
        data = bytearray(4)
        self.t.read(offset, data)
        return struct.unpack("<I", data)[0]

    def write(self, offset: int, value: int) -> None:
        self.t.write(offset, struct.pack("<I", value & 0xFFFF_FFFF))

    def config(self, offset: int, length: int) -> bytes:
        data = bytearray(length)
        self.t.read(mmio.CONFIG + offset, data)
        return bytes(data)

    def device_features(self) -> int:
        self.write(mmio.DEVICE_FEATURES_SEL, 0)
        lo = self.read(mmio.DEVICE_FEATURES)
        self.write(mmio.DEVICE_FEATURES_SEL, 1)
        return lo | self.read(mmio.DEVICE_FEATURES) << 32

    def init(self, features: int | None = None, queue_size: int | None = None) -> int:
        """Reset, negotiate ``features`` (default: all offered), set up every queue, DRIVER_OK.
        Returns the status register afterwards."""
        self.write(mmio.STATUS, 0)
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE)
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
        offered = self.device_features()
        acked = offered if features is None else features & offered
        for page in (0, 1):
            self.write(mmio.DRIVER_FEATURES_SEL, page)
            self.write(mmio.DRIVER_FEATURES, acked >> (32 * page))
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
        if not self.read(mmio.STATUS) & mmio.FEATURES_OK:
            return self.read(mmio.STATUS)
        self.queues = []
        i = 0
        while True:
            self.write(mmio.QUEUE_SEL, i)
            num_max = self.read(mmio.QUEUE_NUM_MAX)
            if num_max == 0:
                break
            size = min(num_max, queue_size or num_max)
            self.queues.append(self.setup_queue(i, size))
            i += 1
        self.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
        return self.read(mmio.STATUS)

    def setup_queue(self, index: int, size: int) -> DriverQueue:
        desc = self.arena.alloc(16 * size, 16)
        avail = self.arena.alloc(6 + 2 * size, 2)
        used = self.arena.alloc(6 + 8 * size, 4)
        for addr, n in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
            self.mem.write(addr, bytes(n))
        self.write(mmio.QUEUE_SEL, index)
        self.write(mmio.QUEUE_NUM, size)
        for low, addr in (
            (mmio.QUEUE_DESC_LOW, desc),
            (mmio.QUEUE_AVAIL_LOW, avail),
            (mmio.QUEUE_USED_LOW, used),
        ):
            self.write(low, addr)
            self.write(low + 4, addr >> 32)
        self.write(mmio.QUEUE_READY, 1)
        return DriverQueue(self.mem, index, size, desc, avail, used)

    def notify(self, index: int) -> None:
        self.write(mmio.QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        status = self.read(mmio.INTERRUPT_STATUS)
        self.write(mmio.INTERRUPT_ACK, status)
        return status
