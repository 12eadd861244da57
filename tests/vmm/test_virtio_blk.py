"""virtio-blk: requests through the transport over a copy-on-write image (no vCPU)."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.blk import (
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.memory import GuestMemory

MEM = 16 << 20
SECTORS = 2048  # 1 MiB image


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "base.img"
    p.write_bytes(os.urandom(SECTORS * 512))
    return p


class BlkRig:
    def __init__(self, image, **kw):
        self.mem = GuestMemory.anonymous(MEM)
        self.dev = VirtioBlk(image, **kw)
        self.irqs = 0
        self.t = mmio.MmioTransport(self.dev, self.mem, self._irq)
        self.d = Driver(self.t, self.mem, Arena(0x10_0000, MEM))
        assert self.d.init() & mmio.DRIVER_OK
        self.q = self.d.queues[0]
        self.hdr = self.d.arena.alloc(16)
        self.status = self.d.arena.alloc(1)
        self.data = self.d.arena.alloc(256 * 1024, 4096)

    def _irq(self):
        self.irqs += 1

    def request(self, rtype, sector, payload=b"", read_len=0, indirect=False):
        self.mem.write(self.hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(self.status, b"\xee")
        bufs = [(self.hdr, 16, False)]
        if payload:
            self.mem.write(self.data, payload)
            bufs.append((self.data, len(payload), False))
        if read_len:
            bufs.append((self.data, read_len, True))
        bufs.append((self.status, 1, True))
        if indirect:
            head = self.q.post_indirect(self.d.arena.alloc(16 * len(bufs), 16), bufs)
        else:
            head = self.q.post(bufs)
        self.d.notify(0)
        used = self.q.take_used()
        assert [u[0] for u in used] == [head]
        status = self.mem.read_u8(self.status)
        return status, self.mem.read(self.data, read_len) if read_len else b"", used[0][1]

    def close(self):
        self.dev.close()
        self.mem.close()


@pytest.fixture
def rig(image):
    r = BlkRig(image)
    yield r
    r.close()


def test_config_capacity(rig):
    capacity, _, seg_max = struct.unpack("<QII", rig.d.config(0, 16))
    assert capacity == SECTORS
    assert seg_max == 254
    assert not rig.dev.acked_features & VIRTIO_BLK_F_RO


def test_read_write_flush_round_trip_base_untouched(rig, image):
    before = sha(image)
    base = image.read_bytes()
    status, data, used = rig.request(VIRTIO_BLK_T_IN, 10, read_len=4096)
    assert status == VIRTIO_BLK_S_OK
    assert data == base[10 * 512 : 10 * 512 + 4096]
    assert used == 4097

    payload = os.urandom(3 * 512)  # unaligned to the 4 KiB overlay blocks
    status, _, _ = rig.request(VIRTIO_BLK_T_OUT, 13, payload=payload)
    assert status == VIRTIO_BLK_S_OK
    status, data, _ = rig.request(VIRTIO_BLK_T_IN, 10, read_len=8192, indirect=True)
    assert status == VIRTIO_BLK_S_OK
    expect = bytearray(base[10 * 512 : 10 * 512 + 8192])
    expect[3 * 512 : 6 * 512] = payload
    assert data == bytes(expect)
    assert rig.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    assert sha(image) == before
    assert rig.irqs >= 4


def test_last_sector_ok_and_out_of_range_ioerr(rig, image):
    base = image.read_bytes()
    status, data, _ = rig.request(VIRTIO_BLK_T_IN, SECTORS - 1, read_len=512)
    assert status == VIRTIO_BLK_S_OK and data == base[-512:]
    for sector, n in ((SECTORS, 512), (SECTORS - 1, 1024), (2**64 - 1, 512), (2**63, 4096)):
        assert rig.request(VIRTIO_BLK_T_IN, sector, read_len=n)[0] == VIRTIO_BLK_S_IOERR
        assert rig.request(VIRTIO_BLK_T_OUT, sector, payload=bytes(n))[0] == VIRTIO_BLK_S_IOERR
    # Not a multiple of the sector size.
    assert rig.request(VIRTIO_BLK_T_IN, 0, read_len=100)[0] == VIRTIO_BLK_S_IOERR
    assert rig.request(99, 0)[0] == VIRTIO_BLK_S_UNSUPP


def test_get_id(rig):
    status, data, _ = rig.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    assert status == VIRTIO_BLK_S_OK
    assert data.rstrip(b"\0") == b"base.img"


def test_read_only(image):
    r = BlkRig(image, read_only=True)
    try:
        assert r.dev.acked_features & VIRTIO_BLK_F_RO
        assert r.request(VIRTIO_BLK_T_OUT, 0, payload=bytes(512))[0] == VIRTIO_BLK_S_IOERR
        assert r.request(VIRTIO_BLK_T_IN, 0, read_len=512)[0] == VIRTIO_BLK_S_OK
        assert r.dev.overlay == {}
    finally:
        r.close()


def test_revert_and_clear_overlay(rig, image, tmp_path):
    base = image.read_bytes()
    rig.request(VIRTIO_BLK_T_OUT, 0, payload=b"A" * 4096)
    saved = rig.dev.state()
    rig.request(VIRTIO_BLK_T_OUT, 0, payload=b"B" * 512)
    rig.request(VIRTIO_BLK_T_OUT, 100, payload=b"C" * 512)
    assert rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"B" * 512
    rig.dev.revert_to(saved)
    assert rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"A" * 512
    assert rig.request(VIRTIO_BLK_T_IN, 100, read_len=512)[1] == base[100 * 512 : 101 * 512]
    path = tmp_path / "overlay"
    rig.dev.save_overlay(path)
    rig.dev.clear_overlay()
    assert rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == base[:512]
    rig.dev.load_overlay(path)
    assert rig.request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"A" * 512


def test_state_rebuilds_device(rig, image):
    rig.request(VIRTIO_BLK_T_OUT, 8, payload=b"Z" * 1024)
    state = rig.t.state()
    dev2 = VirtioBlk(image)
    t2 = mmio.MmioTransport(dev2, rig.mem, lambda: None)
    t2.set_state(state)
    rig.d.t = t2
    status, data, _ = rig.request(VIRTIO_BLK_T_IN, 8, read_len=1024)
    assert status == VIRTIO_BLK_S_OK and data == b"Z" * 1024
    dev2.close()


def test_indirect_table_needs_only_8_byte_alignment(rig, image):
    # Linux kmallocs indirect tables: 8-byte aligned, not 16 (found booting a real guest).
    base = image.read_bytes()
    rig.mem.write(rig.hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2))
    bufs = [(rig.hdr, 16, False), (rig.data, 512, True), (rig.status, 1, True)]
    table = rig.d.arena.alloc(16 * len(bufs) + 8, 16) + 8
    head = rig.q.post_indirect(table, bufs)
    rig.d.notify(0)
    assert [u[0] for u in rig.q.take_used()] == [head]
    assert rig.mem.read_u8(rig.status) == VIRTIO_BLK_S_OK
    assert rig.mem.read(rig.data, 512) == base[2 * 512 : 3 * 512]


# --------------------------------------------------------------------------- the overlay on disk


def test_overlay_lives_in_a_sparse_unlinked_file_not_ram(image, tmp_path):
    odir = tmp_path / "ov"
    odir.mkdir()
    r = BlkRig(image, overlay_dir=str(odir))
    try:
        before = sha(image)
        payload = os.urandom(256 * 1024)
        for sector in range(0, SECTORS, 512):  # the whole 1 MiB disk, 256 KiB at a time
            assert r.request(VIRTIO_BLK_T_OUT, sector, payload=payload)[0] == VIRTIO_BLK_S_OK
        assert r.dev.overlay_bytes == SECTORS * 512
        st = os.fstat(r.dev._store.fd)
        assert st.st_nlink == 0  # unlinked: nothing is left behind if the VMM dies
        assert st.st_blocks * 512 >= SECTORS * 512  # the data is on disk
        assert all(isinstance(v, int) for v in r.dev.overlay.values())  # RAM holds an index
        assert os.listdir(odir) == []
        assert r.request(VIRTIO_BLK_T_IN, 512, read_len=4096)[1] == payload[:4096]
        assert sha(image) == before
    finally:
        r.close()


def test_overlay_cap_gives_the_guest_an_io_error(image, caplog):
    r = BlkRig(image, max_overlay=16 * 4096)
    try:
        base = image.read_bytes()
        assert r.request(VIRTIO_BLK_T_OUT, 0, payload=b"a" * (16 * 4096))[0] == VIRTIO_BLK_S_OK
        # rewriting blocks already in the overlay needs no new room
        assert r.request(VIRTIO_BLK_T_OUT, 8, payload=b"b" * 4096)[0] == VIRTIO_BLK_S_OK
        with caplog.at_level("WARNING"):
            assert r.request(VIRTIO_BLK_T_OUT, 200, payload=b"c" * 512)[0] == VIRTIO_BLK_S_IOERR
        assert "reached its cap" in caplog.text
        assert r.dev.overlay_full_errors == 1 and r.dev.overlay_bytes == 16 * 4096
        status, data, _ = r.request(VIRTIO_BLK_T_IN, 200, read_len=512)
        assert status == VIRTIO_BLK_S_OK and data == base[200 * 512 : 201 * 512]
    finally:
        r.close()


def test_rewrites_after_a_saved_state_stay_bounded_and_revert_frees(image):
    r = BlkRig(image)
    try:
        r.request(VIRTIO_BLK_T_OUT, 0, payload=b"A" * 4096)
        saved = r.dev.state()
        for i in range(200):  # the same block again and again: one new slot, then in place
            r.request(VIRTIO_BLK_T_OUT, 0, payload=bytes([i]) * 4096)
        assert r.dev.overlay_bytes == 2 * 4096
        r.dev.revert_to(saved)
        assert r.dev.overlay_bytes == 4096
        assert os.fstat(r.dev._store.fd).st_size == 4096  # the reverted slot is freed on disk
        assert r.request(VIRTIO_BLK_T_IN, 0, read_len=512)[1] == b"A" * 512
    finally:
        r.close()
