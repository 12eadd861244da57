"""The aarch64 machine on the real HVF backend classes (HvfVm/HvfVcpu, hvf.py) over a fake
Hypervisor.framework: a Python object with the hv_* functions (and the SIMD shim's) that keeps
per-vCPU registers, replays scripted exits per vCPU, records every call with the calling thread.

This runs the chain machine_aarch64 -> hypervisor seam -> hvf.py -> "framework" for real: ESR
decoding of the guest's UART and boot-timer accesses, PSCI over HVC, thread ownership of every
vCPU call, the GIC's creation order, snapshot state (HvfState v2 with Q0-Q31), restore order
(vCPU registers, then hv_gic_set_state, then the ICC registers), the vtimer offset shift, and dirty
tracking by write-protect faults for rollback. Whether Hypervisor.framework behaves like this fake
is NOT tested (nothing of it has run on a Mac).
"""

from __future__ import annotations

import base64
import ctypes
import threading
import time
from pathlib import Path

import cffi
import pytest

from pytest_ignition.vmm import snapshot as snap
from pytest_ignition.vmm.arch.aarch64 import layout as L
from pytest_ignition.vmm.arch.aarch64 import machine as ma
from pytest_ignition.vmm.hypervisor import arm64_exits as ax
from pytest_ignition.vmm.hypervisor import hvf

MIB = 1 << 20
EXC = hvf.HV_EXIT_REASON_EXCEPTION
X = hvf.HV_REG_X0
RX = hvf.HV_MEMORY_READ | hvf.HV_MEMORY_EXEC


def dabt(*, sas: int, srt: int, wnr: bool) -> int:
    return ax.EC_DABT_LOWER << 26 | 1 << 25 | 1 << 24 | sas << 22 | srt << 16 | 1 << 15 | wnr << 6


class FakeFramework:
    def __init__(self, ffi: cffi.FFI, programs: dict | None = None, counter: int = 10**9) -> None:
        self.ffi = ffi
        self.programs = programs or {}
        self.vcpus: dict[int, dict] = {}
        self.log: list[tuple] = []
        self.violations: list[str] = []
        self.counter = counter
        self.gic_state = b"opaque hv_gic state \x00\x01\x02"
        self.host = 0  # guest RAM's host address (hv_vm_map)
        self._lock = threading.Lock()

    def _rec(self, *entry) -> None:
        with self._lock:
            self.log.append(entry)

    def _v(self, vid: int, call: str) -> dict:
        v = self.vcpus[vid]
        if threading.get_ident() != v["owner"]:
            self.violations.append(f"{call} on vCPU {vid} off its thread")
        return v

    # VM
    def hv_vm_config_create(self):
        return self.ffi.NULL

    def hv_vm_config_set_ipa_size(self, cfg, bits):
        return 0

    def hv_vm_create(self, cfg):
        self._rec("vm_create")
        return 0

    def hv_vm_destroy(self):
        self._rec("vm_destroy")
        return 0

    def hv_vm_map(self, ptr, ipa, size, flags):
        self.host = int(self.ffi.cast("uintptr_t", ptr))
        self._rec("map", ipa, size, flags)
        return 0

    def hv_vm_unmap(self, ipa, size):
        return 0

    def hv_vm_protect(self, ipa, size, flags):
        self._rec("protect", ipa, size, flags)
        return 0

    # vCPUs
    def hv_vcpu_create(self, vid, exitp, cfg):
        index = len(self.vcpus)
        ident = 100 + index
        ex = self.ffi.new("hv_vcpu_exit_t *")
        self.vcpus[ident] = {
            "owner": threading.get_ident(), "exit": ex, "regs": {}, "sys": {}, "icc": {},
            "q": {}, "offset": 0, "mask": False, "kicked": threading.Event(),
            "script": list(self.programs.get(index, [])),
        }  # fmt: skip
        vid[0], exitp[0] = ident, ex
        self._rec("vcpu_create", ident)
        return 0

    def hv_vcpu_destroy(self, vid):
        self._v(vid, "destroy")
        self._rec("vcpu_destroy", vid)
        return 0

    def hv_vcpu_run(self, vid):
        v = self._v(vid, "run")
        ex = v["exit"]
        if v["script"]:
            reason, esr, pa, regs, *effect = v["script"].pop(0)
            v["regs"].update(regs)
            for fn in effect:
                fn(self)
            ex.reason, ex.exception.syndrome, ex.exception.physical_address = reason, esr, pa
            return 0
        v["kicked"].wait(0.2)  # an idle guest until hv_vcpus_exit
        v["kicked"].clear()
        ex.reason = hvf.HV_EXIT_REASON_CANCELED
        return 0

    def hv_vcpus_exit(self, arr, n):
        for i in range(n):
            self.vcpus[int(arr[i])]["kicked"].set()
        return 0

    def hv_vcpu_get_reg(self, vid, reg, out):
        out[0] = self._v(vid, "get_reg")["regs"].get(reg, 0)
        return 0

    def hv_vcpu_set_reg(self, vid, reg, value):
        self._v(vid, "set_reg")["regs"][reg] = value
        self._rec("set_reg", vid, reg, value)
        return 0

    def hv_vcpu_get_sys_reg(self, vid, reg, out):
        out[0] = self._v(vid, "get_sys_reg")["sys"].get(reg, 0)
        return 0

    def hv_vcpu_set_sys_reg(self, vid, reg, value):
        self._v(vid, "set_sys_reg")["sys"][reg] = value
        self._rec("set_sys_reg", vid, reg, value)
        return 0

    def hv_vcpu_set_pending_interrupt(self, vid, kind, pending):
        return 0

    def hv_vcpu_get_vtimer_mask(self, vid, out):
        out[0] = self._v(vid, "get_vtimer_mask")["mask"]
        return 0

    def hv_vcpu_set_vtimer_mask(self, vid, masked):
        self._v(vid, "set_vtimer_mask")["mask"] = bool(masked)
        return 0

    def hv_vcpu_get_vtimer_offset(self, vid, out):
        out[0] = self._v(vid, "get_vtimer_offset")["offset"]
        return 0

    def hv_vcpu_set_vtimer_offset(self, vid, off):
        self._v(vid, "set_vtimer_offset")["offset"] = off
        self._rec("vtimer_offset", vid, off)
        return 0

    # GIC
    def hv_gic_config_create(self):
        return self.ffi.NULL

    def hv_gic_config_set_distributor_base(self, cfg, base):
        self._rec("gicd", base)
        return 0

    def hv_gic_config_set_redistributor_base(self, cfg, base):
        self._rec("gicr", base)
        return 0

    def hv_gic_get_redistributor_size(self, out):
        out[0] = 0x20000
        return 0

    def hv_gic_create(self, cfg):
        self._rec("gic_create")
        return 0

    def hv_gic_set_spi(self, intid, level):
        self._rec("spi", intid, bool(level))
        return 0

    def hv_gic_get_icc_reg(self, vid, reg, out):
        out[0] = self._v(vid, "get_icc")["icc"].get(reg, 0)
        return 0

    def hv_gic_set_icc_reg(self, vid, reg, value):
        self._v(vid, "set_icc")["icc"][reg] = value
        self._rec("icc", vid, reg, value)
        return 0

    def hv_gic_state_create(self):
        return self.ffi.NULL

    def hv_gic_state_get_size(self, st, out):
        out[0] = len(self.gic_state)
        return 0

    def hv_gic_state_get_data(self, st, buf):
        self.ffi.memmove(buf, self.gic_state, len(self.gic_state))
        return 0

    def hv_gic_set_state(self, data, size):
        self._rec("gic_set_state", bytes(data[:size]) if isinstance(data, bytes) else size)
        return 0

    # libSystem
    def mach_absolute_time(self):
        return self.counter

    def mach_timebase_info(self, tb):
        tb.numer, tb.denom = 125, 3
        return 0

    # the SIMD shim (hvf_simd.CDEF)
    def ign_hvf_get_simd_fp_reg(self, vid, reg, out):
        self.ffi.memmove(out, self._v(vid, "get_q")["q"].get(reg, bytes(16)), 16)
        return 0

    def ign_hvf_set_simd_fp_reg(self, vid, reg, buf):
        self._v(vid, "set_q")["q"][reg] = bytes(self.ffi.buffer(buf, 16))
        return 0

    def ign_fence(self):
        pass

    # the guest's store into RAM (after the write-protect fault it is retried and lands)
    def guest_store(self, gpa: int, data: bytes) -> None:
        ctypes.memmove(self.host + gpa - L.DRAM_START, data, len(data))


@pytest.fixture
def frameworks(monkeypatch):
    ffi = cffi.FFI()
    ffi.cdef(hvf.CDEF)
    ffi.cdef(hvf.LIBSYSTEM_CDEF)
    current: list[FakeFramework] = []

    def new(programs=None, counter=10**9) -> FakeFramework:
        fw = FakeFramework(ffi, programs, counter)
        current.append(fw)
        return fw

    monkeypatch.setattr(hvf, "load", lambda system=None: (ffi, current[-1], current[-1]))
    monkeypatch.setattr(hvf.hvf_simd, "load", lambda ffi, cache_dir: current[-1])
    monkeypatch.setattr(ma, "_install_fence", lambda fence: None)
    return new


def arm64_image() -> bytes:
    hdr = bytearray(64)
    hdr[16:24] = (1 * MIB).to_bytes(8, "little")
    hdr[56:60] = b"ARM\x64"
    return bytes(hdr) + bytes(4096)


def spec(tmp_path: Path, out: bytearray, **kw) -> ma.Aarch64Spec:
    k = tmp_path / "Image"
    k.write_bytes(arm64_image())
    return ma.Aarch64Spec(kernel=str(k), mem_size=64 * MIB, console_out=out.extend, **kw)


def test_hvf_backend_boots_the_guest_program_to_power_off(frameworks, tmp_path) -> None:
    uart, bt = L.UART_ADDR, L.BOOT_TIMER_ADDR
    fw = frameworks({0: [
        (EXC, dabt(sas=0, srt=1, wnr=True), uart, {X + 1: ord("O")}),
        (EXC, dabt(sas=0, srt=1, wnr=True), uart, {X + 1: ord("K")}),
        (EXC, dabt(sas=0, srt=2, wnr=False), uart + 5, {}),  # LSR into x2
        (EXC, dabt(sas=0, srt=3, wnr=True), bt, {X + 3: 123}),
        (EXC, ax.EC_HVC64 << 26, 0, {X: ax.PSCI_SYSTEM_OFF}),
    ]})  # fmt: skip
    out = bytearray()
    m = ma.Aarch64Machine.create(spec(tmp_path, out, boot_timer=True), ma.hypervisor_factory("hvf"))
    try:
        names = [e[0] for e in fw.log]
        assert names.index("map") < names.index("gic_create") < names.index("vcpu_create")
        assert ("map", L.DRAM_START, 64 * MIB, RX | hvf.HV_MEMORY_WRITE) in fw.log
        assert ("gicd", L.GIC_DIST_ADDR) in fw.log and ("gicr", L.GIC_REDIST_ADDR) in fw.log
        load = L.DRAM_START
        assert ("set_reg", 100, hvf.HV_REG_PC, load) in fw.log
        assert ("set_reg", 100, hvf.HV_REG_CPSR, 0x3C5) in fw.log
        assert ("set_reg", 100, X, L.fdt_addr(64 * MIB)) in fw.log
        m.start()
        assert m.wait(10) == 0 and m.stop_reason.kind == "shutdown"
        regs = fw.vcpus[100]["regs"]
        assert bytes(out) == b"OK"
        assert regs[X + 2] == 0x60  # the UART's LSR, written by the backend into x2
        assert regs[hvf.HV_REG_PC] == load + 16  # four data aborts advanced, the HVC did not
        assert m.boot_timer.boot_time_us is not None
    finally:
        m.close()
    assert ("vcpu_destroy", 100) in fw.log and fw.log[-1] == ("vm_destroy",)
    assert fw.violations == []


def test_hvf_snapshot_restore_and_rollback(frameworks, tmp_path) -> None:
    fw = frameworks(counter=5_000_000)
    out = bytearray()
    m = ma.Aarch64Machine.create(spec(tmp_path, out), ma.hypervisor_factory("hvf"))
    try:
        v = fw.vcpus[100]
        v["q"].update({n: bytes([n]) * 16 for n in range(32)})
        v["regs"].update({hvf.HV_REG_FPCR: 0x0300_0000, hvf.HV_REG_FPSR: 0x11, X + 7: 77})
        v["icc"].update({hvf.ICC_REGS["ICC_PMR_EL1"]: 0xF0, hvf.ICC_REGS["ICC_IGRPEN1_EL1"]: 1})
        v["offset"] = 1_000
        m.start()
        path = m.snapshot(tmp_path / "store", "s1")
        assert m.state == "running"
        assert ("protect", L.DRAM_START, 64 * MIB, RX) in fw.log  # the rollback base is armed
    finally:
        m.close()
    st = snap.read_state(path / snap.STATE_FILE)
    state = hvf.HvfState.from_dict(st["vm"])
    assert (st["arch"], st["hypervisor"], state.format_version) == ("aarch64", "hvf", 2)
    assert state.counter_at_save == 5_000_000 and state.gic_blob == fw.gic_state
    assert state.vcpus[0].simd[31] == bytes([31]) * 16 and state.vcpus[0].regs["x7"] == 77
    assert base64.b64decode(st["vm"]["gic_blob"]) == fw.gic_state

    # a new process: the host counter moved on by 40_000 ticks
    gpa = L.DRAM_START + 3 * hvf.GRANULE + 8
    fw2 = frameworks(
        {0: [(EXC, dabt(sas=3, srt=1, wnr=True), gpa, {}, lambda f: f.guest_store(gpa, b"dirty!"))]},
        counter=5_040_000,
    )  # fmt: skip
    m2 = ma.Aarch64Machine.restore(path, ma.hypervisor_factory("hvf"), start=False)
    try:
        log = fw2.log
        gic_at = log.index(("gic_set_state", fw.gic_state))
        reg_writes = [i for i, e in enumerate(log) if e[0] in ("set_reg", "set_sys_reg")]
        icc_writes = [i for i, e in enumerate(log) if e[0] == "icc"]
        assert max(reg_writes) < gic_at < min(icc_writes)  # registers, hv_gic state, ICC
        v2 = fw2.vcpus[100]
        assert v2["q"] == {n: bytes([n]) * 16 for n in range(32)}
        assert (v2["regs"][hvf.HV_REG_FPCR], v2["regs"][hvf.HV_REG_FPSR]) == (0x0300_0000, 0x11)
        assert v2["icc"][hvf.ICC_REGS["ICC_PMR_EL1"]] == 0xF0
        assert v2["offset"] == 1_000 + 40_000  # the guest's counter continues where it stopped
        before = m2.mem.read(gpa, 6)
        m2.start()
        deadline = time.monotonic() + 10
        while v2["script"] or b"dirty!" != m2.mem.read(gpa, 6):
            assert time.monotonic() < deadline, "the guest's store never ran"
            time.sleep(0.01)
        granule = gpa - gpa % hvf.GRANULE
        assert ("protect", granule, hvf.GRANULE, RX | hvf.HV_MEMORY_WRITE) in fw2.log
        info = m2.rollback()
        assert info["granules"] == 1 and m2.mem.read(gpa, 6) == before
        assert fw2.log.count(("protect", granule, hvf.GRANULE, RX)) == 1  # armed again
    finally:
        m2.close()
    assert fw2.violations == [] and fw.violations == []
