"""Hostile guests against the virtqueue, virtio-blk, virtio-rng and the mmio transport (hypothesis).

Guest memory has RAM right up to the 32-bit MMIO gap at 0xd0000000 and again from 4 GiB, so
descriptors can point into the gap, straddle its edges, or run past the end of RAM. Each example:
hostile input, then the device must still complete a well-formed request correctly. "No
exception escapes" is checked strictly: the transport's last-resort handler logs at ERROR,
so any ERROR record fails the example.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.blk import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VirtioBlk,
)
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.devices.virtio.queue import MAX_INDIRECT, Queue, QueueError
from pytest_ignition.vmm.devices.virtio.rng import VirtioRng
from pytest_ignition.vmm.memory import FOUR_GIB, MMIO_START, GuestMemory, Region

HIGH = 2 << 20
LOW = 16 << 20  # RAM at 0 (rings, buffers)
EDGE = 1 << 20  # RAM just below the gap: [MMIO_START - EDGE, MMIO_START)
RINGS = 0x10_0000  # driver arena for rings and good buffers
SCRATCH = 0x40_0000  # hostile-but-valid buffers point here
QSIZE = 8

HOSTILE = settings(
    max_examples=int(os.environ.get("IGNITION_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

addresses = st.one_of(
    st.integers(SCRATCH, SCRATCH + 0x10000),
    st.integers(SCRATCH, SCRATCH + 0x10000),
    st.integers(MMIO_START - 0x2000, FOUR_GIB + 0x2000),  # around and inside the gap
    st.integers(FOUR_GIB + HIGH - 0x2000, FOUR_GIB + HIGH + 0x2000),  # end of RAM
    st.sampled_from(
        [0, MMIO_START - 1, MMIO_START, 0xFFFF_F000, FOUR_GIB - 1, FOUR_GIB, 2**63, 2**64 - 1]
    ),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.integers(0, 0x2000),
    st.sampled_from([0, 1, 16, 17, 512, 2**31, 2**32 - 1, MMIO_START, FOUR_GIB - SCRATCH]),
    st.integers(0, 2**32 - 1),
)
# Mostly plain NEXT/WRITE chains (so walks get deep and loop), sometimes INDIRECT or junk bits.
flags = st.one_of(st.sampled_from([0, 1, 1, 2, 3, 3, 3]), st.integers(0, 7), st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, QSIZE - 1), st.integers(0, 0xFFFF))
descriptor = st.tuples(addresses, lengths, flags, nexts)
descriptor_tables = st.dictionaries(
    st.integers(0, QSIZE - 1), descriptor, min_size=2, max_size=QSIZE
)
heads = st.lists(st.one_of(st.integers(0, QSIZE - 1), st.integers(0, 0xFFFF)), max_size=12)


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def no_errors_logged():
    h = _Errors()
    root = logging.getLogger()
    root.addHandler(h)
    try:
        yield
    finally:
        root.removeHandler(h)
    assert not h.records, [r.getMessage() + (r.exc_text or "") for r in h.records]


@pytest.fixture(scope="module")
def mem():
    # A guest's RAM edges without 3.25 GiB of mapping: low RAM, the last MiB before the MMIO
    # gap, and 2 MiB at 4 GiB. Everything else (including the gap) is not RAM.
    def anon(n):
        return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    m = GuestMemory(
        [
            Region(0, LOW, anon(LOW)),
            Region(MMIO_START - EDGE, EDGE, anon(EDGE)),
            Region(FOUR_GIB, HIGH, anon(HIGH)),
        ]
    )
    yield m
    m.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("blk") / "base.img"
    p.write_bytes(os.urandom(64 * 1024))
    return p


def make(device, mem):
    t = mmio.MmioTransport(device, mem, lambda: None)
    d = Driver(t, mem, Arena(RINGS, RINGS + 0x10000))
    assert d.init(queue_size=QSIZE) & mmio.DRIVER_OK
    return t, d


def blk_read_ok(d, mem, image, q=None) -> None:
    """A well-formed 1-sector read at sector 1, resynchronised to wherever the device is."""
    q = q or d.queues[0]
    dq = d.t.device.queues[0]
    q.avail_idx = dq.state.next_avail  # a driver that behaves again
    q.next_desc = 0
    hdr, data, status = 0x30_0000, 0x30_1000, 0x30_2000
    mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1))
    mem.write(data, b"\xaa" * 512)
    mem.write(status, b"\xee")
    head = q.post([(hdr, 16, False), (data, 512, True), (status, 1, True)])
    used_before = dq.state.next_used
    d.notify(0)
    assert dq.state.next_used == (used_before + 1) & 0xFFFF
    slot = q.used + 4 + 8 * (used_before % q.size)
    assert struct.unpack("<II", mem.read(slot, 8)) == (head, 513)
    assert mem.read_u16(q.used + 2) == dq.state.next_used
    assert mem.read_u8(status) == VIRTIO_BLK_S_OK
    assert mem.read(data, 512) == image.read_bytes()[512:1024]


def check_used_ring(d, mem):
    """Every used element the device wrote names a head inside the queue."""
    q = d.queues[0]
    dq = d.t.device.queues[0]
    for i in range(min(dq.state.next_used, q.size)):
        head, _ = struct.unpack("<II", mem.read(q.used + 4 + 8 * i, 8))
        assert head < q.size


@HOSTILE
@given(
    table=descriptor_tables,
    avail=heads,
    garbage_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    indirect=st.binary(max_size=256),
)
def test_blk_survives_hostile_chains(mem, image, table, avail, garbage_idx, indirect):
    dev = VirtioBlk(image)
    try:
        with no_errors_logged():
            t, d = make(dev, mem)
            mem.write(SCRATCH, indirect.ljust(256, b"\0"))  # what an INDIRECT table at SCRATCH says
            q = d.queues[0]
            q.post_raw(table, avail)
            if garbage_idx is not None:
                q.set_avail_idx(garbage_idx)
            d.notify(0)
            d.notify(0)
            check_used_ring(d, mem)
            blk_read_ok(d, mem, image)
    finally:
        dev.close()


@HOSTILE
@given(table=descriptor_tables, avail=heads)
def test_rng_survives_hostile_chains(mem, table, avail):
    with no_errors_logged():
        t, d = make(VirtioRng(), mem)
        q = d.queues[0]
        q.post_raw(table, avail)
        d.notify(0)
        check_used_ring(d, mem)
        dq = t.device.queues[0]
        q.avail_idx, q.next_desc = dq.state.next_avail, 0
        buf = 0x30_0000
        mem.write(buf, bytes(256))
        head = q.post([(buf, 256, True)])
        before = dq.state.next_used
        d.notify(0)
        assert struct.unpack("<II", mem.read(q.used + 4 + 8 * (before % q.size), 8)) == (head, 256)
        assert mem.read(buf, 256) != bytes(256)


@HOSTILE
@given(table=descriptor_tables, head=st.integers(0, QSIZE - 1), indirect_ok=st.booleans())
def test_popped_chains_are_inside_ram(mem, table, head, indirect_ok):
    """Whatever pop() returns lies wholly in RAM and is bounded; everything else is QueueError."""
    q = Queue(QSIZE)
    q.indirect = indirect_ok
    s = q.state
    s.size, s.desc_table, s.avail_ring, s.used_ring = QSIZE, 0x20_0000, 0x20_1000, 0x20_2000
    s.ready = True
    for i in range(QSIZE):
        a, n, f, nx = table.get(i, (0, 0, 0, 0))
        mem.write(s.desc_table + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    mem.write(s.avail_ring, struct.pack("<HHH", 0, 1, head))
    s.next_avail = 0
    try:
        chain = q.pop(mem)
    except QueueError:
        assert s.next_avail == 1
        return
    assert chain is not None and chain.head == head
    bufs = chain.readable + chain.writable
    assert len(bufs) <= QSIZE + MAX_INDIRECT
    for addr, n in bufs:
        assert n > 0 and mem.check(addr, n)
        assert not (addr < FOUR_GIB and addr + n > MMIO_START)


registers = st.sampled_from(
    [
        getattr(mmio, n)
        for n in dir(mmio)
        if n.isupper() and isinstance(getattr(mmio, n), int) and getattr(mmio, n) < 0x100
    ]
)
mmio_ops = st.lists(
    st.tuples(
        st.booleans(),  # write?
        st.one_of(registers, st.integers(0, 0x1100)),
        st.sampled_from([1, 2, 4, 4, 4, 8]),
        st.one_of(
            st.integers(0, 2**64 - 1),
            st.integers(0, 300),
            st.sampled_from([RINGS, MMIO_START, FOUR_GIB]),
        ),
    ),
    max_size=60,
)


@HOSTILE
@given(ops=mmio_ops, table=descriptor_tables, avail=heads)
def test_random_register_writes_then_device_still_works(mem, image, ops, table, avail):
    dev = VirtioBlk(image)
    try:
        with no_errors_logged():
            t = mmio.MmioTransport(dev, mem, lambda: None)
            d = Driver(t, mem, Arena(RINGS, RINGS + 0x10000))
            for i, (is_write, offset, size, value) in enumerate(ops):
                if i == len(ops) // 2 and t.device.queues[0].state.ready:
                    d.queues = []  # mid-way: notify whatever the registers set up
                    t.write(mmio.QUEUE_NOTIFY, b"\0\0\0\0")
                if is_write:
                    t.write(offset, (value & (2 ** (8 * size) - 1)).to_bytes(size, "little"))
                else:
                    t.read(offset, bytearray(size))
            assert d.init(queue_size=QSIZE) & mmio.DRIVER_OK
            d.queues[0].post_raw(table, avail)
            d.notify(0)
            blk_read_ok(d, mem, image)
    finally:
        dev.close()


NEXT, WRITE, INDIRECT = 1, 2, 4
GOOD = SCRATCH


@pytest.mark.parametrize(
    "table, message",
    [
        ({0: (GOOD, 16, NEXT, 1), 1: (GOOD, 16, NEXT, 0)}, "loops"),
        ({0: (GOOD, 16, NEXT, 0)}, "loops"),
        ({0: (GOOD, 16, NEXT, QSIZE)}, "next index"),
        ({0: (MMIO_START, 16, 0, 0)}, "outside guest RAM"),
        ({0: (MMIO_START - 8, 16, 0, 0)}, "outside guest RAM"),  # straddles into the gap
        ({0: (FOUR_GIB - 16, 32, 0, 0)}, "outside guest RAM"),
        ({0: (FOUR_GIB + HIGH - 8, 16, 0, 0)}, "outside guest RAM"),
        ({0: (GOOD, 2**32 - 1, 0, 0)}, "outside guest RAM"),
        ({0: (2**64 - 8, 16, 0, 0)}, "outside guest RAM"),
        ({0: (GOOD, 16, WRITE | NEXT, 1), 1: (GOOD, 16, 0, 0)}, "readable buffer after"),
        ({0: (GOOD, 32, INDIRECT | NEXT, 1), 1: (GOOD, 16, 0, 0)}, "indirect descriptor"),
        ({0: (GOOD, 20, INDIRECT, 0)}, "indirect table length"),
        ({0: (GOOD, 0, INDIRECT, 0)}, "indirect table length"),
        ({0: (GOOD, 16 * (MAX_INDIRECT + 1), INDIRECT, 0)}, "indirect table length"),
        ({0: (MMIO_START - 16, 32, INDIRECT, 0)}, "indirect table"),
    ],
)
def test_bad_chains_are_rejected(mem, table, message):
    q = Queue(QSIZE)
    q.indirect = True
    s = q.state
    s.size, s.desc_table, s.avail_ring, s.used_ring = QSIZE, 0x20_0000, 0x20_1000, 0x20_2000
    s.ready = True
    mem.write(s.desc_table, bytes(16 * QSIZE))
    for i, (a, n, f, nx) in table.items():
        mem.write(s.desc_table + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    mem.write(GOOD, bytes(64))  # an indirect table of zeros: one zero-length descriptor
    mem.write(s.avail_ring, struct.pack("<HHH", 0, 1, 0))
    with pytest.raises(QueueError, match=message) as e:
        q.pop(mem)
    assert e.value.head == 0
    assert q.pop(mem) is None  # consumed; nothing else pending


def test_good_chains_direct_indirect_zero_length_and_high_ram(mem):
    q = Queue(QSIZE)
    q.indirect = True
    s = q.state
    s.size, s.desc_table, s.avail_ring, s.used_ring = QSIZE, 0x20_0000, 0x20_1000, 0x20_2000
    s.ready = True
    table = {
        0: (GOOD, 16, NEXT, 1),
        1: (GOOD + 64, 0, NEXT, 2),  # zero-length: allowed, contributes nothing
        2: (FOUR_GIB + 4096, 100, WRITE | NEXT, 4),  # RAM above the gap
        4: (MMIO_START - 16, 16, WRITE, 0),  # the last bytes below the gap
        3: (GOOD + 256, 32, INDIRECT, 0),
    }
    for i, (a, n, f, nx) in table.items():
        mem.write(s.desc_table + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    mem.write(
        GOOD + 256,
        struct.pack("<QIHH", GOOD, 8, NEXT, 1) + struct.pack("<QIHH", GOOD + 8, 8, WRITE, 0),
    )
    mem.write(s.avail_ring, struct.pack("<HHHH", 0, 2, 0, 3))
    c = q.pop(mem)
    assert (c.head, c.readable) == (0, [(GOOD, 16)])
    assert c.writable == [(FOUR_GIB + 4096, 100), (MMIO_START - 16, 16)]
    c = q.pop(mem)
    assert (c.head, c.readable, c.writable) == (3, [(GOOD, 8)], [(GOOD + 8, 8)])
    q.indirect = False  # not negotiated: the same chain is rejected
    mem.write_u16(s.avail_ring + 4 + 2 * 2, 3)
    mem.write_u16(s.avail_ring + 2, 3)
    with pytest.raises(QueueError, match="indirect"):
        q.pop(mem)


def test_garbage_avail_idx_is_ignored_until_sane(mem):
    q = Queue(QSIZE)
    s = q.state
    s.size, s.desc_table, s.avail_ring, s.used_ring = QSIZE, 0x20_0000, 0x20_1000, 0x20_2000
    s.ready = True
    mem.write(s.desc_table, struct.pack("<QIHH", GOOD, 16, 0, 0))
    mem.write(s.avail_ring, struct.pack("<HHH", 0, 0x8000, 0))
    assert q.pop(mem) is None and s.next_avail == 0
    mem.write_u16(s.avail_ring + 2, 1)
    assert q.pop(mem).readable == [(GOOD, 16)]
