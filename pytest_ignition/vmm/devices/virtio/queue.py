"""The split virtqueue (virtio 1.x, section 2.7): popping descriptor chains, adding used elements.

Everything read from the rings is guest-controlled. A chain is accepted only when every
descriptor index is inside the table, every buffer lies wholly inside guest RAM, the chain is
no longer than the table (so loops end), readable buffers precede writable ones and the total
length fits a u32. Anything else raises :class:`QueueError`; the device completes that head
with length 0 and keeps serving. Guest memory is only touched through ``GuestMemory``.

Ordering against the driver on another CPU (virtio 1.x 2.7.7, 2.7.13; :mod:`..barrier`): the
avail idx is read before the ring entry and descriptors it covers (``rmb``), a used element is
written before the used idx that publishes it (``wmb``), and the used idx is visible before the
driver's ``flags`` are read to decide on an interrupt (``mb``). On x86-64 only the last is a
fence; on arm64 all three are.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import asdict, dataclass, field

from pytest_ignition.vmm import barrier
from pytest_ignition.vmm.devices.virtio.ratelimit import GuestLog
from pytest_ignition.vmm.memory import GuestMemory, GuestMemoryError

log = GuestLog(logging.getLogger(__name__))

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
MAX_INDIRECT = 1024  # descriptors in one indirect table; Linux never needs more
MAX_CHAIN_BYTES = 0xFFFF_FFFF  # used.len is a u32

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class QueueError(Exception):
    """A malformed chain. ``head`` is the chain's head index, or None if the head itself was bad."""

    def __init__(self, message: str, head: int | None = None):
        super().__init__(message)
        self.head = head


@dataclass
class QueueState:
    """Everything needed to rebuild a queue; plain data for snapshots."""

    max_size: int
    size: int = 0
    ready: bool = False
    desc_table: int = 0
    avail_ring: int = 0
    used_ring: int = 0
    next_avail: int = 0
    next_used: int = 0


@dataclass
class DescriptorChain:
    """One popped chain: guest-physical (addr, len) buffers, checked to lie inside RAM."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0

    def read(self, mem: GuestMemory, offset: int = 0, length: int | None = None) -> bytes:
        """Up to ``length`` bytes of the readable part starting at ``offset`` (short if it ends)."""
        out = bytearray()
        want = self.readable_len if length is None else length
        for addr, n in self.readable:
            if want <= 0:
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, want)
            out += mem.read(addr + offset, take)
            want -= take
            offset = 0
        return bytes(out)

    def write(self, mem: GuestMemory, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` over the writable part from ``offset``; returns bytes written."""
        data = memoryview(data)
        done = 0
        for addr, n in self.writable:
            if done >= len(data):
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(data) - done)
            mem.write(addr + offset, data[done : done + take])
            done += take
            offset = 0
        return done


class Queue:
    """One split virtqueue. The transport fills in the state; devices pop and complete chains."""

    def __init__(self, max_size: int):
        self.state = QueueState(max_size=max_size)
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated

    # -- configuration (from the transport) --------------------------------------------------
    def reset(self) -> None:
        self.state = QueueState(max_size=self.state.max_size)

    def validate(self, mem: GuestMemory) -> str | None:
        """Why the configured rings cannot be used, or None if they can."""
        s = self.state
        if not (s.size and s.size <= s.max_size and s.size & (s.size - 1) == 0):
            return f"bad queue size {s.size}"
        if s.desc_table % 16 or s.avail_ring % 2 or s.used_ring % 4:
            return "misaligned ring address"
        # avail: flags, idx, ring[size], used_event; used: flags, idx, ring[size], avail_event
        for name, addr, length in (
            ("descriptor table", s.desc_table, DESC_SIZE * s.size),
            ("available ring", s.avail_ring, 6 + 2 * s.size),
            ("used ring", s.used_ring, 6 + 8 * s.size),
        ):
            if not mem.check(addr, length):
                return f"{name} {addr:#x}+{length:#x} is outside guest RAM"
        return None

    # -- device side ---------------------------------------------------------------------
    def pending(self, mem: GuestMemory) -> int:
        """Chains the driver has made available that we have not popped (0 if the idx is garbage)."""
        s = self.state
        avail_idx = mem.read_u16(s.avail_ring + 2)
        n = (avail_idx - s.next_avail) & 0xFFFF
        if n > s.size:
            log.warning(
                "virtqueue: avail idx %d is %d ahead of %d; ignored", avail_idx, n, s.next_avail
            )
            return 0
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None. Raises QueueError (the slot is consumed) if it is bad."""
        s = self.state
        if not s.ready:
            return None
        try:
            if self.pending(mem) == 0:
                return None
            barrier.rmb()  # the avail idx before the ring slot and descriptors it covers
            slot = s.avail_ring + 4 + 2 * (s.next_avail % s.size)
            head = mem.read_u16(slot)
        except GuestMemoryError as e:  # the rings were checked at ready; defensive
            s.ready = False  # stop here rather than fail on every later pop
            raise QueueError(f"rings unreadable, queue stopped: {e}") from e
        s.next_avail = (s.next_avail + 1) & 0xFFFF
        if head >= s.size:
            raise QueueError(f"head index {head} >= queue size {s.size}")
        try:
            return self._walk(mem, head)
        except GuestMemoryError as e:
            raise QueueError(str(e), head) from e

    def pop_valid(
        self, mem: GuestMemory, glog: GuestLog, what: str, *, publish: bool = True
    ) -> tuple[DescriptorChain | None, int]:
        """Like :meth:`pop`, but a bad chain is logged on ``glog`` (prefixed ``what``) and
        completed with length 0, and popping goes on. Returns the next good chain (or None)
        and how many bad ones were completed on the way (they count as used)."""
        bad = 0
        while True:
            try:
                return self.pop(mem), bad
            except QueueError as e:
                glog.warning("%s: %s", what, e)
                if e.head is not None:
                    self.add_used(mem, e.head, 0, publish=publish)
                    bad += 1

    def undo_pop(self) -> None:
        """Give back the last popped chain (a device that found nothing to put in it)."""
        self.state.next_avail = (self.state.next_avail - 1) & 0xFFFF

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        s = self.state
        chain = DescriptorChain(head)
        total = 0
        table, table_len = s.desc_table, s.size
        index = head
        steps = 0
        in_indirect = False
        while True:
            steps += 1
            if steps > table_len:
                raise QueueError("descriptor chain loops or is longer than its table", head)
            addr, length, flags, nxt = _DESC.unpack(mem.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect or in_indirect or flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("indirect descriptor not allowed here", head)
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise QueueError(f"bad indirect table length {length}", head)
                # No alignment rule for indirect tables: Linux kmallocs them (8-byte aligned).
                if not mem.check(addr, length):
                    raise QueueError(f"indirect table {addr:#x}+{length:#x} not in RAM", head)
                table, table_len = addr, length // DESC_SIZE
                index, steps, in_indirect = 0, 0, True
                continue
            if length:
                if not mem.check(addr, length):
                    raise QueueError(f"buffer {addr:#x}+{length:#x} is outside guest RAM", head)
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError("chain longer than 4 GiB", head)
                if flags & VIRTQ_DESC_F_WRITE:
                    chain.writable.append((addr, length))
                    chain.writable_len += length
                elif chain.writable:
                    raise QueueError("readable buffer after a writable one", head)
                else:
                    chain.readable.append((addr, length))
                    chain.readable_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise QueueError(f"next index {nxt} >= table size {table_len}", head)
            index = nxt

    def add_used(self, mem: GuestMemory, head: int, length: int, *, publish: bool = True) -> None:
        """Complete ``head`` having written ``length`` bytes; the element is visible before idx.
        With ``publish=False`` the used idx is left for a later :meth:`publish_used` (batching)."""
        s = self.state
        slot = s.used_ring + 4 + 8 * (s.next_used % s.size)
        mem.write(slot, _USED_ELEM.pack(head, length & 0xFFFF_FFFF))
        s.next_used = (s.next_used + 1) & 0xFFFF
        if publish:
            barrier.wmb()  # the element before the idx that publishes it
            mem.write_u16(s.used_ring + 2, s.next_used)

    def publish_used(self, mem: GuestMemory) -> None:
        """Make every element added so far visible to the driver."""
        barrier.wmb()
        mem.write_u16(self.state.used_ring + 2, self.state.next_used)

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """False when the driver asked for no interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        barrier.mb()  # the used idx written before, visible before the driver's flags are read
        try:
            return not mem.read_u16(self.state.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError:
            return True

    # -- snapshots -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {**asdict(self.state), "indirect": self.indirect}

    @classmethod
    def from_dict(cls, d: dict) -> Queue:
        q = cls(int(d["max_size"]))
        q.indirect = bool(d.get("indirect", False))
        q.state = QueueState(**{k: d[k] for k in QueueState.__dataclass_fields__})
        return q
