"""In-place rollback of a live VM on this machine's KVM: exactly the dirtied pages come back
from the snapshot's memory file (pages the vCPU wrote, found through KVM's dirty log, and
pages the VMM's own devices wrote), vCPU and device state and the disk overlay revert, and
the guest runs again from the snapshot."""

from __future__ import annotations

import struct

import pytest
from test_snapshot import cpl3_machine, data_page, dirty_pages

from pytest_ignition.vmm import snapshot as snap
from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver

pytestmark = pytest.mark.kvm

FIRST = 0x0100_0000  # the pages the guest dirties start at 16 MiB
MiB = 1 << 20
CHUNK = 16 * MiB


def assert_memory_equals_file(mem, path, *, except_pages: dict[int, bytes] | None = None):
    """Guest RAM equals the snapshot's memory file, but for ``except_pages`` (gpa page number ->
    the bytes expected at its start instead)."""
    except_pages = except_pages or {}
    with open(path, "rb") as f:
        file_off = 0
        for r in mem.regions:
            for off in range(0, r.size, CHUNK):
                n = min(CHUNK, r.size - off)
                want = bytearray(f.read(n))
                for page, data in except_pages.items():
                    rel = page * 4096 - r.gpa - off
                    if 0 <= rel < n:
                        want[rel : rel + len(data)] = data
                got = r.mm[off : off + n]
                if got != want:
                    bad = next(i for i in range(n) if got[i] != want[i])
                    raise AssertionError(f"guest byte {r.gpa + off + bad:#x} differs from {path}")
            file_off += r.size


@pytest.mark.parametrize("n", [1, 1000, 10_000, 100_000])
def test_rollback_reverts_exactly_the_dirty_pages(tmp_path, kvm_system, n):
    mem_size = 512 * MiB if n > 1000 else 64 * MiB
    m = cpl3_machine(tmp_path, [dirty_pages(FIRST, n)], mem_size=mem_size)
    try:
        # A page the guest reads but never writes, with recognisable contents.
        witness = FIRST - 0x1000
        m.mem.write(witness, b"witness")
        path = m.snapshot(tmp_path / "store", "base")
        memfile = path / snap.MEMORY_FILE
        regs0 = m.runners[0].vcpu.get_regs().to_dict()
        for round_ in range(2):
            m.done.event.clear()
            m.resume() if round_ else m.start()
            assert m.done.event.wait(120), "guest never finished dirtying its pages"
            m.pause()
            for i in (0, n // 2, n - 1):
                assert m.mem.read_u8(FIRST + i * 4096) == 0xAB
            # A host write that bypasses the VMM's dirty tracking: if rollback dropped any page
            # outside the dirty set, this one would revert too. It must survive.
            sneaky = (FIRST >> 12) + n + 7
            m.mem.regions[0].mm[sneaky * 4096 : sneaky * 4096 + 6] = b"sneaky"
            info = m.rollback(resume=False)
            assert info["pages"] == n  # exactly the guest's pages: no more, no fewer
            assert info["ranges"] == 1  # adjacent pages: one copy
            assert m.state == "paused"
            assert m.runners[0].vcpu.get_regs().to_dict() == regs0
            assert m.mem.read_u8(FIRST) == 0 and m.mem.read_u8(FIRST + (n - 1) * 4096) == 0
            assert_memory_equals_file(m.mem, memfile, except_pages={sneaky: b"sneaky"})
            m.mem.regions[0].mm[sneaky * 4096 : sneaky * 4096 + 6] = bytes(6)  # tidy up
            assert m.mem.read(witness, 7) == b"witness"
        # the memory file itself was never written
        assert memfile.stat().st_blocks * 512 < 16 * MiB
        assert snap.Snapshot.load(path).state["vcpus"][0]["regs"] == regs0
    finally:
        m.close()


def test_rollback_of_a_restored_vm_and_a_running_one(tmp_path, kvm_system):
    from pytest_ignition.vmm.machine import Machine, MachineError

    m = cpl3_machine(tmp_path, [dirty_pages(FIRST, 50)])
    try:
        with pytest.raises(MachineError, match="no snapshot to roll back to"):
            m.rollback()
        path = m.snapshot(tmp_path / "store", "base")
    finally:
        m.close()
    r = Machine.restore(path, start=False, system=kvm_system)
    try:
        r.pio.insert(_TickPort(), 0xF4, 1)  # the guest reports there when done
        r.start()
        for _ in range(3):
            while r.mem.read_u8(FIRST + 49 * 4096) != 0xAB:
                r.runners[0].join(0.001)
            info = r.rollback()  # running: paused, rolled back, resumed
            assert info["pages"] == 50
            assert r.state == "running"
        r.pause()
    finally:
        r.close()


class _TickPort:
    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_vmm_written_pages_and_device_state_revert(tmp_path, kvm_system):
    """virtio-rng fills and a direct GuestMemory.write are VMM writes that KVM's dirty log
    never sees; rollback reverts them too, with the virtqueue's position."""
    m = cpl3_machine(tmp_path, [b"\xeb\xfe"], rng=True)
    try:
        (_, _, transport) = m.virtio_devices[0]
        arena = Arena(0x30_0000, 0x38_0000)
        d = Driver(transport, m.mem, arena)
        assert d.init() & mmio.DRIVER_OK
        q = d.queues[0]
        path = m.snapshot(tmp_path / "store", "rng")
        before = transport.state()
        m.start()
        buf = 0x50_0000
        head = q.post([(buf, 3 * 4096, True)])
        d.notify(0)
        assert q.take_used() == [(head, 3 * 4096)]
        assert m.mem.read(buf, 4096).count(0) < 100  # random bytes arrived
        m.mem.write(data_page(3), b"written by a device model")
        assert transport.state() != before
        info = m.rollback(resume=False)
        # 3 buffer pages + the direct write + the rings the driver and device touched
        assert info["pages"] >= 4
        assert m.mem.read(buf, 3 * 4096) == bytes(3 * 4096)
        assert m.mem.read(data_page(3), 25) == bytes(25)
        assert transport.state() == before
        assert_memory_equals_file(m.mem, path / snap.MEMORY_FILE)
        # the device works on from the restored queue position
        q.avail_idx, q.last_used, q.next_desc = 0, 0, 0
        m.resume()
        head = q.post([(buf, 64, True)])
        d.notify(0)
        assert q.take_used() == [(head, 64)]
    finally:
        m.close()


def test_disk_overlay_reverts(tmp_path, kvm_system):
    img = tmp_path / "disk.img"
    img.write_bytes(b"base" * 1024 * 16)  # 64 KiB
    m = cpl3_machine(tmp_path, [b"\xeb\xfe"], disks=[str(img)])
    try:
        (_, _, transport) = m.virtio_devices[0]
        d = Driver(transport, m.mem, Arena(0x30_0000, 0x38_0000))
        assert d.init() & mmio.DRIVER_OK
        q = d.queues[0]

        def write_sector(sector: int, data: bytes) -> None:
            hdr, body, status = 0x40_0000, 0x40_1000, 0x40_2000
            m.mem.write(hdr, struct.pack("<IIQ", 1, 0, sector))  # VIRTIO_BLK_T_OUT
            m.mem.write(body, data)
            head = q.post([(hdr, 16, False), (body, len(data), False), (status, 1, True)])
            d.notify(0)
            assert [h for h, _ in q.take_used()] == [head]
            assert m.mem.read_u8(status) == 0

        write_sector(0, b"A" * 512)
        path = m.snapshot(tmp_path / "store", "disk")
        overlay_at_snapshot = dict(transport.device.overlay)
        assert overlay_at_snapshot  # the first write is part of the snapshot
        write_sector(1, b"B" * 512)
        write_sector(0, b"C" * 512)
        m.rollback(resume=False)
        assert transport.device.overlay == overlay_at_snapshot
        assert transport.device.read_bytes(0, 1024) == b"A" * 512 + (b"base" * 128)
        assert img.read_bytes() == b"base" * 1024 * 16  # the image was never written
    finally:
        m.close()
    # the overlay travels with the snapshot file set, checked by its sha256
    from pytest_ignition.vmm.machine import Machine

    r = Machine.restore(path, start=False, system=kvm_system)
    try:
        assert r.virtio_devices[0][2].device.overlay == overlay_at_snapshot
    finally:
        r.close()
    ov = path / "disk0.overlay"
    ov.write_bytes(ov.read_bytes()[:-1] + b"\x00")
    with pytest.raises(snap.SnapshotError, match="disk0.overlay"):
        Machine.restore(path, start=False, system=kvm_system)


def test_failed_snapshot_does_not_lose_dirty_pages(tmp_path, kvm_system, monkeypatch):
    """Taking a snapshot reads (and so clears) KVM's dirty log; if the snapshot then fails,
    a rollback to the previous base must still revert those pages."""
    m = cpl3_machine(tmp_path, [dirty_pages(FIRST, 30)])
    try:
        path = m.snapshot(tmp_path / "store", "base")
        m.start()
        assert m.done.event.wait(60)
        m.pause()

        def boom(p, state):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(snap, "write_state", boom)
        with pytest.raises(OSError):
            m.snapshot(tmp_path / "store", "base")
        monkeypatch.undo()
        assert m.status()["rollback_base"] == str(path)
        info = m.rollback(resume=False)
        assert info["pages"] == 30
        assert_memory_equals_file(m.mem, path / snap.MEMORY_FILE)
    finally:
        m.close()


def test_snapshot_over_its_own_base_then_rollback(tmp_path, kvm_system):
    """A VM re-snapshotted under the name it was based on rolls back to the new contents."""
    m = cpl3_machine(tmp_path, [dirty_pages(FIRST, 20)])
    try:
        m.snapshot(tmp_path / "store", "base")
        m.start()
        assert m.done.event.wait(60)
        path = m.snapshot(tmp_path / "store", "base")  # replaces the file RAM is mapped from
        m.pause()
        for i in range(20):
            m.mem.write(FIRST + i * 4096, b"\xcd")
        info = m.rollback(resume=False)
        assert info["pages"] >= 20
        assert all(m.mem.read_u8(FIRST + i * 4096) == 0xAB for i in range(20))
        assert_memory_equals_file(m.mem, path / snap.MEMORY_FILE)
    finally:
        m.close()


def test_two_vcpu_rollback(tmp_path, kvm_system):
    from test_snapshot import counter_loop, pause_with_progress

    m = cpl3_machine(tmp_path, [counter_loop(data_page(0)), counter_loop(data_page(1))])
    try:
        m.start()
        first = pause_with_progress(m, [100, 100])
        path = m.snapshot(tmp_path / "store", "two")
        regs = [r.vcpu.get_regs().to_dict() for r in m.runners]
        m.resume()
        pause_with_progress(m, first)
        info = m.rollback(resume=False)
        assert info["pages"] == 2  # each counter's page
        assert [r.vcpu.get_regs().to_dict() for r in m.runners] == regs
        assert_memory_equals_file(m.mem, path / snap.MEMORY_FILE)
        m.resume()
        again = pause_with_progress(m, first)
        assert all(a > f for a, f in zip(again, first, strict=True))
    finally:
        m.close()


def test_restore_without_rollback_logs_no_dirty_pages(tmp_path, kvm_system):
    """``rollback=False`` (CLI ``restore --no-rollback``): no KVM dirty log, rollback refused
    with a clear error; a snapshot of it is complete and turns the log on, then rollback works."""
    from pytest_ignition.vmm.machine import Machine, MachineError

    m = cpl3_machine(tmp_path, [dirty_pages(FIRST, 50)])
    try:
        path = m.snapshot(tmp_path / "store", "base")
    finally:
        m.close()
    r = Machine.restore(path, start=False, system=kvm_system, rollback=False)
    try:
        r.pio.insert(_TickPort(), 0xF4, 1)
        r.start()
        while r.mem.read_u8(FIRST + 49 * 4096) != 0xAB:
            r.runners[0].join(0.001)
        with pytest.raises(MachineError, match="without dirty-page logging"):
            r.rollback()
        again = r.snapshot(tmp_path / "store", "again")
        assert r.mem.read_u8(FIRST + 49 * 4096) == 0xAB
        info = r.rollback()
        assert info["pages"] <= 50
        assert snap.Snapshot.load(again).state["vcpus"]
    finally:
        r.close()
    # the second snapshot holds the guest's pages (written whole, not as a delta)
    r2 = Machine.restore(again, start=False, system=kvm_system)
    try:
        assert r2.mem.read_u8(FIRST + 49 * 4096) == 0xAB
    finally:
        r2.close()
