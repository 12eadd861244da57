"""Snapshots of the bundled VMM directly on this machine's KVM: CPL3 guests (which run
natively even on PVM) snapshotted mid-loop, restored in a new VM and in a new process,
snapshotted again, with two vCPUs; and every way a snapshot can be unusable.

The helpers here (:func:`cpl3_machine`, the counter programs) are shared with
``test_rollback.py``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import cpl3
import pytest

from pytest_ignition.vmm import kvm
from pytest_ignition.vmm import snapshot as snap

sys.path.insert(0, str(Path(__file__).parent))
from test_x86_boot import synthetic_bzimage  # noqa: E402

pytestmark = pytest.mark.kvm

VMM = [sys.executable, "-m", "pytest_ignition.vmm"]
PTE_A, PTE_D = 0x20, 0x40
DONE_PORT = 0xF4  # cpl3.EXIT_PORT: here it only records that the guest got there
KVM_MP_STATE_RUNNABLE = 0


def counter_loop(data_addr: int) -> bytes:
    """rbx counts up forever; each value is also stored at ``data_addr``."""
    return b"".join(
        [
            b"\x48\xbf" + struct.pack("<Q", data_addr),  # mov rdi, data_addr
            b"\x31\xdb",  # xor ebx, ebx
            b"\x48\xff\xc3",  # loop: inc rbx
            b"\x48\x89\x1f",  # mov [rdi], rbx
            b"\xeb\xf8",  # jmp loop
        ]
    )


def dirty_pages(first: int, n: int, value: int = 0xAB) -> bytes:
    """Write ``value`` to the first byte of ``n`` consecutive pages from ``first``, report on
    DONE_PORT, then spin."""
    return b"".join(
        [
            b"\x48\xbf" + struct.pack("<Q", first),  # mov rdi, first
            b"\x48\xc7\xc1" + struct.pack("<I", n),  # mov rcx, n
            b"\xc6\x07" + bytes([value]),  # again: mov byte [rdi], value
            b"\x48\x81\xc7\x00\x10\x00\x00",  # add rdi, 4096
            b"\x48\xff\xc9",  # dec rcx
            b"\x75\xf1",  # jnz again
            b"\xe6\xf4",  # out DONE_PORT, al
            b"\xeb\xfe",  # jmp $
        ]
    )


class Done:
    """PIO device at DONE_PORT: sets an event (the guest keeps spinning)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1
        self.event.set()


def write_page_tables(mem) -> None:
    """cpl3's identity map, with accessed/dirty bits preset so that the CPU's page walks do
    not dirty the page-table pages (the rollback tests count dirty pages exactly)."""
    p, rw, us, ps = cpl3.PTE_P, cpl3.PTE_RW, cpl3.PTE_US, cpl3.PTE_PS
    mem.write_u64(cpl3.PML4_ADDR, cpl3.PDPT_ADDR | p | rw | us | PTE_A)
    for i in range(4):
        mem.write_u64(cpl3.PDPT_ADDR + 8 * i, (cpl3.PD_ADDR + 0x1000 * i) | p | rw | us | PTE_A)
    entries = b"".join(
        struct.pack("<Q", (j << 21) | p | rw | us | ps | PTE_A | PTE_D) for j in range(4 * 512)
    )
    mem.write(cpl3.PD_ADDR, entries)


def kernel_file(tmp_path: Path) -> Path:
    k = tmp_path / "kernel.bz"
    if not k.exists():
        k.write_bytes(synthetic_bzimage(payload=bytes(0x200) + b"\xf4" * 64, init_size=0x10000))
    return k


def cpl3_machine(tmp_path: Path, programs: list[bytes], *, mem_size: int = 64 << 20, **spec):
    """A :class:`Machine` (created, not started) whose vCPU ``i`` runs ``programs[i]`` at CPL3
    from ``CODE_ADDR + i * 4 KiB`` with its stack below ``STACK_TOP - i * 4 KiB``. The kernel
    is a synthetic bzImage whose code never runs: the vCPUs are re-aimed before start."""
    from pytest_ignition.vmm.machine import Machine, MachineSpec

    spec.setdefault("rng", False)
    m = Machine.create(
        MachineSpec(
            kernel=str(kernel_file(tmp_path)),
            mem_size=mem_size,
            cpus=len(programs),
            **spec,
        )
    )
    try:
        m.done = Done()
        m.pio.insert(m.done, DONE_PORT, 1)
        mem = m.mem
        mem.write(cpl3.GDT_ADDR, cpl3.build_gdt())
        mem.write(cpl3.TSS_ADDR, cpl3.build_tss())
        write_page_tables(mem)
        for i, code in enumerate(programs):
            addr = cpl3.CODE_ADDR + i * 0x1000
            mem.write(addr, code)
            vcpu = m.runners[i].vcpu
            vcpu.set_sregs(cpl3.cpl3_sregs(vcpu.get_sregs()))
            rsp = cpl3.STACK_TOP - i * 0x1000
            vcpu.set_regs(kvm.Regs(rip=addr, rsp=rsp, rflags=0x2 | cpl3.RFLAGS_IOPL3))
            if i:
                vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)  # an AP would wait for INIT/SIPI
    except BaseException:
        m.close()
        raise
    return m


def pause_with_progress(m, floors: list[int]) -> list[int]:
    """Let the machine run until every vCPU's rbx passed its floor; leaves it paused."""
    for _ in range(4000):
        m.pause()
        values = [r.vcpu.get_regs().rbx for r in m.runners]
        if all(v > f for v, f in zip(values, floors, strict=True)):
            return values
        m.resume()
        m.runners[0].join(0.002)
    raise AssertionError(f"no progress past {floors}")


def data_page(i: int) -> int:
    return cpl3.DATA_ADDR + i * 0x1000


# -- snapshot mid-loop, restore in a new VM ---------------------------------------------
def test_snapshot_mid_loop_restores_in_a_new_vm(tmp_path, kvm_system):
    from pytest_ignition.vmm.machine import Machine

    store = tmp_path / "store"
    m = cpl3_machine(tmp_path, [counter_loop(data_page(0))])
    try:
        m.start()
        (rbx,) = pause_with_progress(m, [1000])
        path = m.snapshot(store, "mid")
        assert m.state == "paused"
        ram = m.mem.read(0, m.mem.size)
        regs = m.runners[0].vcpu.get_regs().to_dict()
    finally:
        m.close()
    assert regs["rbx"] == rbx
    assert m.mem is None  # closed: nothing of the source VM survives

    s = snap.Snapshot.load(path)
    assert s.state["vcpus"][0]["regs"] == regs
    assert s.memory_path.stat().st_size == 64 << 20
    assert s.memory_path.stat().st_blocks * 512 < 8 << 20  # sparse: zero chunks are holes

    r = Machine.restore(path, start=False, system=kvm_system)
    try:
        assert r.restore_time_us is not None and r.restore_time_us > 0
        assert r.runners[0].vcpu.get_regs().to_dict() == regs
        assert r.mem.read(0, r.mem.size) == ram  # every byte, through the lazy mapping
        r.start()
        (after,) = pause_with_progress(r, [rbx])
        assert after > rbx  # the counter continues from where it was
        assert r.mem.read_u64(data_page(0)) in (after, after - 1)
    finally:
        r.close()
    # the memory file was mapped privately: the restored guest's writes never reached it
    assert snap.Snapshot.load(path).memory_path.read_bytes() == ram


def test_two_vcpu_round_trip_and_snapshot_of_a_restored_vm(tmp_path, kvm_system):
    from pytest_ignition.vmm.machine import Machine

    store = snap.SnapshotStore(tmp_path / "store")
    progs = [counter_loop(data_page(0)), counter_loop(data_page(1))]
    m = cpl3_machine(tmp_path, progs)
    try:
        m.start()
        first = pause_with_progress(m, [100, 100])
        m.snapshot(store, "two")
    finally:
        m.close()

    r = Machine.restore(store.path("two"), start=False, system=kvm_system)
    try:
        assert [x.vcpu.get_regs().rbx for x in r.runners] == first
        r.start()
        second = pause_with_progress(r, first)
        r.snapshot(store, "two-again")  # a restored VM snapshotted again
        assert r.state == "paused"
        # written as the old memory file plus the changed pages: still every byte right
        assert store.load("two-again").memory_path.read_bytes() == r.mem.read(0, r.mem.size)
        r.resume()
        third = pause_with_progress(r, second)
    finally:
        r.close()
    s2 = store.load("two-again")
    assert [v["regs"]["rbx"] for v in s2.state["vcpus"]] == second
    assert s2.state["fingerprint"] == store.load("two").state["fingerprint"]

    r2 = Machine.restore(store.path("two-again"), start=False, system=kvm_system)
    try:
        mem_words = [r2.mem.read_u64(data_page(i)) for i in range(2)]
        for i in range(2):
            assert mem_words[i] in (second[i], second[i] - 1)
        r2.start()
        fourth = pause_with_progress(r2, second)
        assert all(f > s for f, s in zip(fourth, second, strict=True))
    finally:
        r2.close()
    assert all(t > s for t, s in zip(third, second, strict=True))


# -- a new process ------------------------------------------------------------------------
def _control(path: Path, cmd: str, **kw) -> dict:
    from pytest_ignition.vmm.control import request

    return request(path, cmd, timeout=60, **kw)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"VMM exited {proc.returncode}: {proc.stderr.read().decode()}")
        threading.Event().wait(0.05)
    raise AssertionError("control socket never appeared")


@pytest.mark.parametrize("cpus", [1, 2])
def test_restore_in_a_new_process_continues(tmp_path, kvm_system, cpus):
    store = tmp_path / "store"
    m = cpl3_machine(tmp_path, [counter_loop(data_page(i)) for i in range(cpus)])
    try:
        m.start()
        before = pause_with_progress(m, [1000] * cpus)
        m.snapshot(store, "base")
    finally:
        m.close()

    ctl = tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [*VMM, "restore", "--store", str(store), "--name", "base"]
        + ["--control", str(ctl), "--console", "none"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(ctl, proc)
        st = _control(ctl, "status")
        assert st["ok"] and st["state"] == "running" and st["restore_time_us"] > 0
        assert st["cpus"] == cpus
        for _ in range(200):  # let the restored guest count on, then take its picture
            threading.Event().wait(0.01)
            assert _control(ctl, "pause")["ok"]
            reply = _control(ctl, "snapshot", name="later")
            assert reply["ok"], reply
            later = snap.SnapshotStore(store).load("later")
            after = [v["regs"]["rbx"] for v in later.state["vcpus"]]
            if all(x > y for x, y in zip(after, before, strict=True)):
                break
            assert _control(ctl, "resume")["ok"]
        assert _control(ctl, "shutdown")["ok"]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert "Restore-time = " in err and " us " in err
    base = snap.SnapshotStore(store).load("base")
    # every counter continued in the new process
    assert all(x > y for x, y in zip(after, before, strict=True))
    a = base.memory_path.read_bytes()
    b = later.memory_path.read_bytes()
    pages = [data_page(i) for i in range(cpus)]
    start = 0
    for page in pages:  # everything but the counters' words is equal
        assert a[start:page] == b[start:page]
        start = page + 8
    assert a[start:] == b[start:]
    for page, value in zip(pages, after, strict=True):
        assert struct.unpack_from("<Q", b, page)[0] in (value, value - 1)


# -- unusable snapshots ----------------------------------------------------------------------
@pytest.fixture
def taken(tmp_path, kvm_system):
    """A small snapshot in ``tmp_path/store`` named ``s`` (the guest never ran)."""
    m = cpl3_machine(tmp_path, [counter_loop(data_page(0))], mem_size=32 << 20)
    try:
        m.snapshot(tmp_path / "store", "s")
    finally:
        m.close()
    return snap.SnapshotStore(tmp_path / "store")


def _restore_error(store: snap.SnapshotStore, name: str = "s", **kw) -> str:
    from pytest_ignition.vmm.machine import Machine

    with pytest.raises(snap.SnapshotError) as ei:
        Machine.restore(store.path(name), start=False, **kw)
    return str(ei.value)


def test_corrupt_state_file(taken):
    f = taken.path("s") / snap.STATE_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    msg = _restore_error(taken)
    assert str(f) in msg and "corrupt" in msg


def test_truncated_state_and_memory_files(taken):
    f = taken.path("s") / snap.STATE_FILE
    good = f.read_bytes()
    f.write_bytes(good[:-100])
    msg = _restore_error(taken)
    assert str(f) in msg and "truncated" in msg
    f.write_bytes(good[:20])
    assert "truncated" in _restore_error(taken)
    f.write_bytes(good)
    mem = taken.path("s") / snap.MEMORY_FILE
    os.truncate(mem, 4096)
    msg = _restore_error(taken)
    assert str(mem) in msg and "truncated" in msg


def test_version_mismatch_and_foreign_file(taken):
    f = taken.path("s") / snap.STATE_FILE
    data = bytearray(f.read_bytes())
    struct.pack_into("<I", data, 8, snap.FORMAT_VERSION + 1)
    f.write_bytes(bytes(data))
    msg = _restore_error(taken)
    assert str(f) in msg and f"version {snap.FORMAT_VERSION + 1}" in msg
    f.write_bytes(b"\x7fELF" + bytes(100))
    assert "bad magic" in _restore_error(taken)
    f.unlink()
    assert "does not exist" in _restore_error(taken)
    assert "no such snapshot" in _restore_error(taken, "nope")


def test_other_configuration_is_refused(taken, tmp_path):
    s = taken.load("s")
    other_kernel = tmp_path / "other.bz"
    other_kernel.write_bytes(synthetic_bzimage(payload=b"\x90" * 300))
    fp = dict(s.state["fingerprint"])
    for change, needle in (
        ({"kernel": snap.file_identity(other_kernel)}, "kernel"),
        ({"mem_size": 64 << 20}, "mem_size"),
        ({"cpus": 2}, "cpus"),
    ):
        msg = _restore_error(taken, expected={**fp, **change})
        assert "another configuration" in msg and needle in msg and str(s.state_path) in msg
    # the identical configuration is accepted
    from pytest_ignition.vmm.machine import Machine

    Machine.restore(s, expected=fp, start=False).close()


def test_failed_write_leaves_the_old_snapshot(taken, tmp_path, monkeypatch):
    old = taken.load("s")

    def boom(path, state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap, "write_state", boom)
    m = cpl3_machine(tmp_path, [counter_loop(data_page(0))], mem_size=32 << 20)
    try:
        with pytest.raises(OSError, match="No space"):
            m.snapshot(taken.root, "s")
    finally:
        m.close()
    assert taken.load("s").id == old.id
    assert [p.name for p in taken.root.iterdir()] == ["s"]  # no temporary left behind


def test_state_file_round_trip_and_names(tmp_path):
    state = {"b": b"\x00\xff", "msrs": {0x10: 5}, "t": (1, 2), "nested": {"$b": 1}}
    f = tmp_path / "st"
    snap.write_state(f, state)
    back = snap.read_state(f)
    assert back == {"b": b"\x00\xff", "msrs": {0x10: 5}, "t": [1, 2], "nested": {"$b": 1}}
    raw = f.read_bytes()
    assert raw[:8] == snap.MAGIC and json.loads(raw[snap.HEADER.size :])
    for bad in ("", ".hidden", "a/b", "../x", "x" * 200):
        with pytest.raises(snap.SnapshotError, match="bad snapshot name"):
            snap.check_name(bad)


# -- devices across a restore ----------------------------------------------------------------
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "connection-open"])
def test_restore_posts_the_vsock_transport_reset_only_if_a_connection_was_open(
    tmp_path, kvm_system, busy
):
    """The guest's vsock driver had an event buffer posted when the snapshot was taken. With a
    connection open then, the restored VM fills it with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (the
    guest drops it, the agent listens again); from an idle snapshot the guest has nothing to
    drop, so nothing is posted and host connections need not wait for the guest."""
    import socket
    import time

    from pytest_ignition.vmm.devices.virtio import mmio
    from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
    from pytest_ignition.vmm.machine import Machine

    m = cpl3_machine(tmp_path, [b"\xeb\xfe"], vsock=str(tmp_path / "v1.sock"))
    client = None
    try:
        (_, _, transport) = m.virtio_devices[0]
        dev = transport.device
        assert type(dev).__name__ == "VirtioVsock"
        d = Driver(transport, m.mem, Arena(0x30_0000, 0x38_0000))
        assert d.init() & mmio.DRIVER_OK
        evt = d.queues[2]
        buf = 0x40_0000
        m.mem.write(buf, b"\xff" * 8)
        head = evt.post([(buf, 8, True)])
        if busy:  # a host client asks for guest port 52: the device is making a connection
            m.loop.start()  # the device serves its socket on the loop (the vCPU need not run)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(tmp_path / "v1.sock"))
            client.sendall(b"CONNECT 52\n")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with dev.lock:
                    if not dev.idle():
                        break
                time.sleep(0.005)
            with dev.lock:
                assert not dev.idle(), "the device never took the CONNECT"
        path = m.snapshot(tmp_path / "store", "vsock")
        assert evt.take_used() == []  # nothing happened to it before the restore
    finally:
        if client is not None:
            client.close()
        m.close()
    r = Machine.restore(path, vsock=str(tmp_path / "v2.sock"), system=kvm_system)
    try:
        assert (tmp_path / "v2.sock").exists()
        deadline = time.monotonic() + (10 if busy else 0.5)
        while r.mem.read_u16(evt.used + 2) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        evt.mem = r.mem
        if busy:
            assert evt.take_used() == [(head, 4)]
            assert r.mem.read(buf, 8) == b"\0\0\0\0\xff\xff\xff\xff"  # 0 = TRANSPORT_RESET
        else:
            assert evt.take_used() == []
            assert r.mem.read(buf, 8) == b"\xff" * 8
            (_, _, t2) = r.virtio_devices[0]
            with t2.device.lock:
                assert not t2.device.deferred and not t2.device._reset_unhandled
    finally:
        r.close()


def test_two_restores_draw_different_random_bytes(tmp_path, kvm_system):
    """virtio-rng serves each restored VM from the host's CSPRNG: two restores of one snapshot
    fill the same guest buffer with different bytes."""
    from pytest_ignition.vmm.devices.virtio import mmio
    from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
    from pytest_ignition.vmm.machine import Machine

    m = cpl3_machine(tmp_path, [b"\xeb\xfe"], rng=True)
    try:
        (_, _, t) = m.virtio_devices[0]
        d = Driver(t, m.mem, Arena(0x30_0000, 0x38_0000))
        assert d.init() & mmio.DRIVER_OK
        q = d.queues[0]
        path = m.snapshot(tmp_path / "store", "rng")
    finally:
        m.close()
    fills = []
    for _ in range(2):
        r = Machine.restore(path, start=False, system=kvm_system)
        try:
            (_, _, t) = r.virtio_devices[0]
            q.mem = r.mem
            d2 = Driver(t, r.mem, Arena(0x30_0000, 0x38_0000))
            q.avail_idx = q.last_used = q.next_desc = 0
            head = q.post([(0x50_0000, 64, True)])
            d2.notify(0)
            assert q.take_used() == [(head, 64)]
            fills.append(r.mem.read(0x50_0000, 64))
        finally:
            r.close()
    assert fills[0] != fills[1] and bytes(64) not in fills


@pytest.mark.parametrize("anonymous", [False, True])
def test_memory_file_is_exact_and_sparse(tmp_path, anonymous):
    from pytest_ignition.vmm.memory import GuestMemory

    mem = GuestMemory.anonymous(64 << 20)
    try:
        marks = {0: b"first", 5 << 20: b"middle", (64 << 20) - 3: b"end"}
        for gpa, data in marks.items():
            mem.write(gpa, data)
        mem.read(32 << 20, 4096)  # read-only touch: resident zero page, still a hole
        f = tmp_path / "memory.bin"
        written = snap.write_memory(f, mem, anonymous=anonymous)
        assert written == 3 * snap.ZERO_CHUNK  # three non-zero 1 MiB chunks
        assert f.read_bytes() == mem.read(0, mem.size)
        assert f.stat().st_blocks * 512 <= 4 * snap.ZERO_CHUNK
    finally:
        mem.close()
