"""The aarch64 machine (vmm/machine_aarch64.py) driven through the hypervisor seam by a scripted
fake backend: a FakeVm/FakeVcpu pair implementing vmm/hypervisor/base.py whose "guest" is a list
of exits (MMIO to the UART and boot timer, PSCI calls, WFI). Everything of the machine runs for
real here (memory, Image/initrd/DTB placement, devices on the MMIO bus, vCPU threads, pause and
kick, snapshot files, restore, rollback); the backend is the fake, so nothing here shows that
Hypervisor.framework behaves like it (that is hvf.py's part, never run on a Mac).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_ignition.vmm import machine_aarch64
from pytest_ignition.vmm import snapshot as snap
from pytest_ignition.vmm.arch.aarch64 import layout as L
from pytest_ignition.vmm.arch.aarch64 import machine as ma
from pytest_ignition.vmm.hypervisor.arm64_exits import GuestFault
from pytest_ignition.vmm.hypervisor.base import Exit, HypervisorVcpu, HypervisorVm

MIB = 1 << 20
GRANULE = 16 * 1024


class FakeVm(HypervisorVm):
    granule = GRANULE
    name = "fake"

    def __init__(self, programs: dict[int, list[Any]] | None = None) -> None:
        self.programs = programs or {}
        self.events: list[Any] = []
        self.maps: list[tuple[int, int, int]] = []
        self.vcpus: list[FakeVcpu] = []
        self.irqs: list[tuple[int, bool]] = []
        self.violations: list[str] = []
        self.dirty: set[int] = set()
        self.tracking = False
        self.destroyed = False
        self.release = threading.Event()  # ends a "stuck" step

    def map(self, gpa, host_addr, size, *, writable=True):
        assert gpa % GRANULE == host_addr % GRANULE == size % GRANULE == 0
        self.maps.append((gpa, host_addr, size))
        self.events.append("map")

    def unmap(self, gpa, size):
        pass

    def create_interrupt_controller(self, vcpus):
        if self.vcpus:
            self.violations.append("interrupt controller after a vCPU")
        self.events.append(("ic", vcpus))

    def set_irq(self, intid, level):
        self.irqs.append((intid, level))

    def create_vcpu(self, index):
        v = FakeVcpu(self, index)
        self.vcpus.append(v)
        self.events.append(("vcpu", index))
        return v

    def kick(self, vcpus):
        for v in vcpus:
            v.kicked.set()

    def start_dirty_tracking(self):
        self.tracking = True
        self.events.append("track")

    def take_dirty(self):
        d, self.dirty = self.dirty, set()
        return d

    def save_interrupt_controller(self):
        return b"GIC-STATE"

    def restore_interrupt_controller(self, blob):
        self.events.append(("ic-restore", blob))

    def state_to_plain(self, vcpu_states, ic_blob):
        return {"hypervisor": "fake", "vcpus": list(vcpu_states), "ic": ic_blob.hex()}

    def state_from_plain(self, d):
        if d.get("hypervisor") != "fake":
            raise ValueError("not a fake state")
        return d["vcpus"], bytes.fromhex(d["ic"])

    def destroy(self):
        self.destroyed = True

    # the "guest" writing RAM: host memory plus what dirty tracking would record
    def guest_write(self, gpa: int, data: bytes) -> None:
        base, host, size = self.maps[0]
        assert base <= gpa and gpa + len(data) <= base + size
        ctypes.memmove(host + gpa - base, data, len(data))
        if self.tracking:
            self.dirty.add(gpa - gpa % GRANULE)


class FakeVcpu(HypervisorVcpu):
    def __init__(self, vm: FakeVm, index: int) -> None:
        self.vm, self.index = vm, index
        self.owner = threading.get_ident()
        self.program = list(vm.programs.get(index, []))
        self.regs: dict[str, int] = {}
        self.reads: list[int] = []
        self.kicked = threading.Event()
        self.runs = 0

    def _own(self, what: str) -> None:
        if threading.get_ident() != self.owner:
            self.vm.violations.append(f"vcpu{self.index}.{what} off its thread")

    def run(self):
        self._own("run")
        self.runs += 1
        if self.program:
            step = self.program.pop(0)
            return step(self) if callable(step) else step
        if self.kicked.wait(0.2):  # an idle guest in WFI until kicked
            self.kicked.clear()
            return Exit("canceled")
        return Exit("wfi")

    def complete_mmio_read(self, value):
        self._own("complete_mmio_read")
        self.reads.append(value)

    def get_reg(self, reg):
        return self.regs.get(str(reg), 0)

    def set_reg(self, reg, value):
        self.regs[str(reg)] = value

    def set_boot_registers(self, pc, x0):
        self._own("set_boot_registers")
        self.regs.update(pc=pc, x0=x0)
        self.vm.events.append(("boot", self.index, pc, x0))

    def save_state(self):
        self._own("save_state")
        return {"regs": dict(self.regs), "index": self.index}

    def restore_state(self, state):
        self._own("restore_state")
        self.regs = dict(state["regs"])
        self.vm.events.append(("vcpu-restore", self.index))

    def after_interrupt_controller_restore(self, state):
        self._own("after_interrupt_controller_restore")
        self.vm.events.append(("icc", self.index))

    def destroy(self):
        self._own("destroy")
        self.vm.events.append(("destroy", self.index))


def arm64_image(size: int = 8192, image_size: int = 1 * MIB) -> bytes:
    hdr = bytearray(64)
    hdr[8:16] = (0).to_bytes(8, "little")  # text_offset
    hdr[16:24] = image_size.to_bytes(8, "little")
    hdr[24:32] = (0b1010).to_bytes(8, "little")  # 4K pages, anywhere
    hdr[56:60] = b"ARM\x64"
    return bytes(hdr) + bytes((i * 31) & 0xFF for i in range(size - 64))


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    k, i = tmp_path / "Image", tmp_path / "initrd"
    k.write_bytes(arm64_image())
    i.write_bytes(b"07070100" * 512)
    return str(k), str(i)


def uart_out(text: bytes) -> list[Exit]:
    return [Exit("mmio", L.UART_ADDR, 1, True, b) for b in text]


def make(vm: FakeVm, files, tmp_path: Path, **kw) -> tuple[ma.Aarch64Machine, bytearray]:
    out = bytearray()
    kw.setdefault("mem_size", 64 * MIB)
    spec = ma.Aarch64Spec(
        kernel=files[0], initrd=files[1], console_out=out.extend, hypervisor="fake", **kw
    )
    return ma.Aarch64Machine.create(spec, lambda: vm), out


def test_boot_places_the_kernel_and_runs_the_guest_to_power_off(files, tmp_path) -> None:
    program = [
        *uart_out(b"hi\n"),
        Exit("mmio", L.UART_ADDR + 5, 1, False),  # LSR
        Exit("mmio", 0x0700_0000, 4, False),  # no device there
        Exit("mmio", L.BOOT_TIMER_ADDR, 1, True, 123),
        Exit("psci-off"),
    ]
    vm = FakeVm({0: program})
    m, out = make(vm, files, tmp_path, boot_timer=True, vsock=str(tmp_path / "v.sock"))
    try:
        # the hypervisor's order: memory, the interrupt controller, then the vCPU
        assert vm.events[:3] == ["map", ("ic", 1), ("vcpu", 0)]
        assert vm.maps[0][0] == L.DRAM_START and vm.maps[0][2] == 64 * MIB
        kernel = Path(files[0]).read_bytes()
        assert m.mem.read(L.DRAM_START, len(kernel)) == kernel  # 2 MiB-aligned base + 0
        fa = L.fdt_addr(64 * MIB)
        dtb = m.mem.read(fa, 8192)
        assert dtb[:4] == bytes.fromhex("d00dfeed")
        assert b"ignition.boot_timer=0x9030000" in dtb and b"reboot=" not in dtb
        assert b"virtio,mmio" in dtb  # the vsock transport (and rng)
        initrd = Path(files[1]).read_bytes()
        ia = L.initrd_addr(64 * MIB, len(initrd), L.DRAM_START + 1 * MIB)
        assert m.mem.read(ia, len(initrd)) == initrd
        assert ("boot", 0, L.DRAM_START, fa) in vm.events
        assert not vm.tracking  # dirty tracking starts with the first snapshot
        m.start()
        assert m.wait(10) == 0
        assert m.stop_reason.kind == "shutdown"
        assert bytes(out) == b"hi\n"
        assert vm.vcpus[0].reads == [0x60, 0]  # LSR: THR empty + idle; nothing: zero
        assert m.boot_timer.boot_time_us is not None
        assert m.status()["boot_time_us"] == m.boot_timer.boot_time_us
        assert m.status()["virtio"][0] == {"addr": "0xa000000", "irq": 48, "type": "VirtioVsock"}
    finally:
        m.close()
    assert ("destroy", 0) in vm.events and vm.destroyed
    assert vm.violations == []  # every vCPU call came from the vCPU's own thread


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_pause_kicks_and_parks_every_vcpu(files, tmp_path) -> None:
    vm = FakeVm({1: [Exit("psci-cpu-off")]})
    m, _ = make(vm, files, tmp_path, cpus=2)
    try:
        m.start()
        wait_for(lambda: vm.vcpus[0].runs > 0, "vcpu0 to enter the guest")
        m.pause()
        assert m.state == "paused" and all(t.parked.is_set() for t in m.threads)
        runs = vm.vcpus[0].runs
        time.sleep(0.3)
        assert vm.vcpus[0].runs == runs  # parked: not entering the guest
        m.resume()
        assert m.state == "running"
        wait_for(lambda: vm.vcpus[0].runs > runs, "vcpu0 to run again")
        assert vm.vcpus[1].runs == 0  # powered off (never CPU_ON'd): never entered
        assert m.shutdown(5) == 0
    finally:
        m.close()
    assert vm.violations == []


def test_a_vcpu_that_ignores_kicks_fails_the_pause_with_a_deadline(files, tmp_path, monkeypatch):
    monkeypatch.setattr(ma, "PAUSE_TIMEOUT_S", 0.5)
    vm = FakeVm({0: [lambda v: (v.vm.release.wait(10), Exit("none"))[1]]})
    m, _ = make(vm, files, tmp_path)
    try:
        m.start()
        wait_for(lambda: vm.vcpus[0].runs > 0, "vcpu0 to enter the guest")
        t0 = time.monotonic()
        with pytest.raises(ma.MachineError, match="vcpu0 did not stop running within 0.5 s"):
            m.pause()
        assert time.monotonic() - t0 < 3
        assert m.state == "running"  # not half-paused: it goes on running
    finally:
        vm.release.set()
        m.close()


def test_psci_cpu_on_starts_the_secondary_at_its_entry(files, tmp_path) -> None:
    on = Exit("psci-cpu-on", detail={"target": L.mpidr(1), "entry": 0x8030_0000, "context": 42})
    vm = FakeVm({0: [on], 1: [Exit("psci-reset")]})
    m, _ = make(vm, files, tmp_path, cpus=2)
    try:
        assert not m.threads[1].powered_on
        m.start()
        assert m.wait(10) == 0 and m.stop_reason.kind == "reset"
        assert ("boot", 1, 0x8030_0000, 42) in vm.events
    finally:
        m.close()
    assert vm.violations == []


def test_a_guest_fault_stops_the_vm_with_status_1(files, tmp_path) -> None:
    def fault(v):
        raise GuestFault("vCPU 0: unhandled exception, ESR 0xf2000000")

    vm = FakeVm({0: [fault]})
    m, _ = make(vm, files, tmp_path)
    try:
        m.start()
        assert m.wait(10) == 1
        assert m.stop_reason.kind == "error" and "ESR 0xf2000000" in m.stop_reason.detail
    finally:
        m.close()


def test_snapshot_rollback_and_restore(files, tmp_path) -> None:
    vm = FakeVm()
    m, _ = make(vm, files, tmp_path, vsock=str(tmp_path / "v.sock"))
    try:
        m.start()
        before = m.mem.read(L.DRAM_START + 5 * GRANULE, 64)
        path = m.snapshot(tmp_path / "store", "s1")
        assert m.state == "running" and vm.tracking
        st = snap.read_state(path / snap.STATE_FILE)
        assert (st["arch"], st["hypervisor"]) == ("aarch64", "fake")
        assert st["vm"]["ic"] == b"GIC-STATE".hex() and st["vcpus"] == [{"mpidr": 0}]
        assert os.path.getsize(path / snap.MEMORY_FILE) == 64 * MIB
        # the guest writes one granule, the VMM another (e.g. a virtqueue's used ring)
        vm.guest_write(L.DRAM_START + 5 * GRANULE + 10, b"guest")
        m.mem.write(L.DRAM_START + 9 * GRANULE + 1, b"vmm")
        assert m.mem.read(L.DRAM_START + 5 * GRANULE, 64) != before
        vm.events.clear()
        info = m.rollback()
        assert info["granules"] == 2
        assert m.mem.read(L.DRAM_START + 5 * GRANULE, 64) == before
        assert m.mem.read(L.DRAM_START + 9 * GRANULE + 1, 3) == bytes(3)
        order = [e for e in vm.events if isinstance(e, tuple)]
        assert order == [("vcpu-restore", 0), ("ic-restore", b"GIC-STATE"), ("icc", 0)]
        assert m.state == "running"
        fresh, _ = make(FakeVm(), files, tmp_path)
        with fresh, pytest.raises(ma.MachineError, match="no snapshot"):
            fresh.rollback()
    finally:
        m.close()
    (tmp_path / "v.sock").unlink(missing_ok=True)

    vm2 = FakeVm()
    m2 = ma.Aarch64Machine.restore(
        path, lambda: vm2, start=False, hypervisor_name="fake", expected={"mem_size": 64 * MIB}
    )
    try:
        assert vm2.events[:3] == ["map", ("ic", 1), ("vcpu", 0)]
        assert [e for e in vm2.events if isinstance(e, tuple)][2:] == [
            ("vcpu-restore", 0), ("ic-restore", b"GIC-STATE"), ("icc", 0),
        ]  # fmt: skip
        assert vm2.tracking  # a restore is a rollback base
        assert m2.mem.read(L.DRAM_START + 5 * GRANULE, 64) == before
        assert m2.cmdline == m.cmdline == "console=ttyS0 panic=-1 quiet"
        m2.start()
        assert m2.status()["rollback_base"] == str(path)
    finally:
        m2.close()
    assert vm2.violations == [] and vm.violations == []


def _replace_memory_file(path: Path, fill: int = 0xEE) -> None:
    """Put a different file of the same size at ``path`` (a store replacing its entry)."""
    size = os.path.getsize(path)
    new = path.with_name("replacement.bin")
    with open(new, "wb") as f:
        f.truncate(size)
        f.write(bytes([fill]) * (32 * GRANULE))  # the granules the tests look at
    os.replace(new, path)


def _held_file(m: ma.Aarch64Machine) -> tuple[int, int]:
    st = os.fstat(m.mem.backing_fd)
    return st.st_dev, st.st_ino


def _copy_back_calls(m: ma.Aarch64Machine, monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    real = m.mem.copy_back

    def spy(region, first, count):
        assert region is m.mem.regions[0]
        calls.append((first, count))
        real(region, first, count)

    monkeypatch.setattr(m.mem, "copy_back", spy)
    return calls


PER_GRANULE = GRANULE // 4096  # 4 KiB pages in a granule


def test_rollback_copies_back_exactly_the_dirty_granules_through_the_fd_it_holds(
    files, tmp_path, monkeypatch
) -> None:
    vm = FakeVm()
    m, _ = make(vm, files, tmp_path)
    try:
        m.start()
        path = m.snapshot(tmp_path / "store", "s1")
        mem_file = path / snap.MEMORY_FILE
        st = os.stat(mem_file)
        assert _held_file(m) == (st.st_dev, st.st_ino)  # the base file, opened once
        assert m.mem.regions[0].file_offset == 0
        base = m.mem.read(L.DRAM_START, 32 * GRANULE)
        # the store replaces the snapshot's file: rollback must still read the base's bytes
        _replace_memory_file(mem_file)
        for g in (2, 3, 4, 7):  # the guest: one run of three granules, one alone
            vm.guest_write(L.DRAM_START + g * GRANULE + 100, b"\x11" * 200)
        m.mem.write(L.DRAM_START + 10 * GRANULE + 5, b"vmm")  # the VMM (a used ring)
        # granule 12 changes with no dirty record: rollback must leave it as it is in RAM
        host = vm.maps[0][1]
        ctypes.memmove(host + 12 * GRANULE, b"\x22" * 64, 64)
        calls = _copy_back_calls(m, monkeypatch)
        info = m.rollback()
        assert info["granules"] == 5 and info["pages"] == 5 * PER_GRANULE
        assert calls == [
            (2 * PER_GRANULE, 3 * PER_GRANULE),
            (7 * PER_GRANULE, PER_GRANULE),
            (10 * PER_GRANULE, PER_GRANULE),
        ]
        expected = bytearray(base)
        expected[12 * GRANULE : 12 * GRANULE + 64] = b"\x22" * 64
        assert m.mem.read(L.DRAM_START, 32 * GRANULE) == bytes(expected)
        # the next rollback has nothing to copy
        calls.clear()
        assert m.rollback()["granules"] == 0 and calls == []
        fd_link = os.readlink(f"/proc/self/fd/{m.mem.backing_fd}")
        fd = m.mem.backing_fd
    finally:
        m.close()
    assert not os.path.exists(f"/proc/self/fd/{fd}") or os.readlink(f"/proc/self/fd/{fd}") != (
        fd_link
    )  # closed with the machine
    assert vm.violations == []


def test_a_new_snapshot_moves_the_held_file_to_the_new_base(files, tmp_path) -> None:
    vm = FakeVm()
    m, _ = make(vm, files, tmp_path)
    try:
        m.start()
        p1 = m.snapshot(tmp_path / "store", "s1")
        first = m.mem.backing_fd
        vm.guest_write(L.DRAM_START + 3 * GRANULE, b"second base")
        p2 = m.snapshot(tmp_path / "store", "s1")  # the same name: a new file at that path
        assert p1 == p2
        st = os.stat(p2 / snap.MEMORY_FILE)
        assert _held_file(m) == (st.st_dev, st.st_ino)
        assert not os.path.exists(f"/proc/self/fd/{first}") or first == m.mem.backing_fd
        vm.guest_write(L.DRAM_START + 3 * GRANULE, b"after both")
        m.rollback()
        assert m.mem.read(L.DRAM_START + 3 * GRANULE, 11) == b"second base"
    finally:
        m.close()


def test_a_restored_vm_rolls_back_from_the_file_it_was_mapped_from(
    files, tmp_path, monkeypatch
) -> None:
    m, _ = make(FakeVm(), files, tmp_path)
    try:
        m.mem.write(L.DRAM_START + 6 * GRANULE, b"in the snapshot")
        path = m.snapshot(tmp_path / "store", "s1")
    finally:
        m.close()
    mem_file = path / snap.MEMORY_FILE
    base = mem_file.read_bytes()[: 32 * GRANULE]
    vm2 = FakeVm()
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(ma.os, "open", lambda p, *a: opened.append(str(p)) or real_open(p, *a))
    m2 = ma.Aarch64Machine.restore(path, lambda: vm2, start=False, hypervisor_name="fake")
    try:
        assert opened.count(str(mem_file)) == 1  # mapped and held: one open
        st = os.stat(mem_file)
        assert _held_file(m2) == (st.st_dev, st.st_ino)
        _replace_memory_file(mem_file)
        m2.start()
        vm2.guest_write(L.DRAM_START + 6 * GRANULE, b"a test's write")
        vm2.guest_write(L.DRAM_START + 7 * GRANULE + 9, b"another")
        calls = _copy_back_calls(m2, monkeypatch)
        assert m2.rollback()["granules"] == 2
        assert calls == [(6 * PER_GRANULE, 2 * PER_GRANULE)]  # adjacent: one read
        assert opened.count(str(mem_file)) == 1  # rollback reopens nothing
        assert m2.mem.read(L.DRAM_START, 32 * GRANULE) == base
        assert m2.mem.read(L.DRAM_START + 6 * GRANULE, 15) == b"in the snapshot"
    finally:
        m2.close()
    assert vm2.violations == []


def test_rollback_without_a_base_memory_file_says_so(files, tmp_path) -> None:
    vm = FakeVm()
    m, _ = make(vm, files, tmp_path)
    try:
        m.snapshot(tmp_path / "store", "s1")
        m.mem.set_backing(-1)  # as if the base file had never been opened
        vm.guest_write(L.DRAM_START, b"x")
        with pytest.raises(ma.MachineError, match="no rollback base memory file"):
            m.rollback()
    finally:
        m.close()


def test_a_base_memory_file_of_the_wrong_size_is_refused(files, tmp_path) -> None:
    m, _ = make(FakeVm(), files, tmp_path)
    try:
        bad = tmp_path / "short.bin"
        bad.write_bytes(bytes(GRANULE))
        with pytest.raises(ma.MachineError, match="is 16384 bytes, guest RAM is"):
            m._set_rollback_base(bad, {})
        assert m.mem.backing_fd == -1 and m._base_state is None  # nothing changed
    finally:
        m.close()


def test_snapshots_of_other_machines_are_refused(files, tmp_path) -> None:
    vm = FakeVm()
    m, _ = make(vm, files, tmp_path)
    try:
        path = m.snapshot(tmp_path / "store", "s1")
    finally:
        m.close()
    with pytest.raises(
        snap.SnapshotError, match="aarch64 VM on fake; this VMM restores aarch64 on hvf"
    ):
        ma.Aarch64Machine.restore(path, FakeVm, hypervisor_name="hvf")
    with pytest.raises(snap.ConfigMismatch):
        ma.Aarch64Machine.restore(
            path, FakeVm, hypervisor_name="fake", expected={"mem_size": 128 * MIB}
        )


def test_snapshots_record_arch_and_hypervisor_and_x86_refuses_this_one(files, tmp_path) -> None:
    from pytest_ignition.vmm.machine import Machine

    vm = FakeVm()
    m, _ = make(vm, files, tmp_path)
    try:
        path = m.snapshot(tmp_path / "store", "s1")
    finally:
        m.close()
    st = snap.Snapshot.load(path).state
    assert (st["arch"], st["hypervisor"]) == ("aarch64", vm.name)
    # the x86 machine says what the snapshot is before it opens /dev/kvm
    with pytest.raises(snap.SnapshotError) as e:
        Machine.restore(path)
    assert f"a snapshot of an aarch64 VM on {vm.name}; this VMM restores x86_64 on kvm" in str(
        e.value
    )


def test_check_machine_takes_an_untagged_snapshot_for_x86_on_kvm() -> None:
    snap.check_machine({}, "x86_64", "kvm", "old")
    snap.check_machine({"arch": "x86_64", "hypervisor": "kvm"}, "x86_64", "kvm", "new")
    with pytest.raises(snap.SnapshotError, match="old: a snapshot of an x86_64 VM on kvm; this"):
        snap.check_machine({}, "aarch64", "kvm", "old")
    with pytest.raises(
        snap.SnapshotError, match="aarch64 VM on kvm; this VMM restores aarch64 on hvf"
    ):
        snap.check_machine({"arch": "aarch64", "hypervisor": "kvm"}, "aarch64", "hvf", "s")


def test_memory_must_fill_whole_granules(files, tmp_path) -> None:
    with pytest.raises(ma.MachineError, match="16 KiB granule"):
        make(FakeVm(), files, tmp_path, mem_size=64 * MIB + 4096)


def test_kernel_command_line() -> None:
    assert ma.kernel_cmdline("console=ttyS0 reboot=k panic=-1 quiet", True) == (
        "console=ttyS0 panic=-1 quiet ignition.boot_timer=0x9030000"
    )
    assert ma.kernel_cmdline(None, False) == ma.DEFAULT_CMDLINE


def test_split_hypervisor() -> None:
    assert machine_aarch64.split_hypervisor(["boot", "--hypervisor", "hvf", "--kernel", "K"]) == (
        "hvf", ["boot", "--kernel", "K"],
    )  # fmt: skip
    assert machine_aarch64.split_hypervisor(["restore", "--hypervisor=x"]) == ("x", ["restore"])


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_the_process_refuses_to_run_off_macos_in_one_line(files, tmp_path) -> None:
    cmd = [sys.executable, "-m", "pytest_ignition.vmm.machine_aarch64"]
    res = subprocess.run(
        [*cmd, "boot", "--hypervisor", "hvf", "--kernel", files[0], "--mem", "64M",
         "--console", "none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "Hypervisor.framework exists only on macOS" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([*cmd, "boot", "--hypervisor", "xen"], capture_output=True, text=True)
    assert res.returncode == 2 and "one of kvm, hvf" in res.stderr


def test_a_guest_powering_off_during_a_pause_ends_both_at_once(files, tmp_path) -> None:
    """The vCPU that stops the VM must not wait for the pause that waits for it."""

    def off_when_kicked(v):
        assert v.kicked.wait(10), "never kicked"
        return Exit("psci-off")

    vm = FakeVm({0: [off_when_kicked]})
    m, _ = make(vm, files, tmp_path)
    try:
        m.start()
        wait_for(lambda: vm.vcpus[0].runs > 0, "vcpu0 to enter the guest")
        t0 = time.monotonic()
        with pytest.raises(ma.MachineError, match="stopped while pausing"):
            m.pause()
        assert time.monotonic() - t0 < 3
        assert m.wait(5) == 0 and m.stop_reason.kind == "shutdown"
    finally:
        m.close()
