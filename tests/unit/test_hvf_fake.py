"""HvfVm/HvfVcpu's exit dispatch against a fake framework: a Python object with the hv_* functions
that replays scripted exits and records calls. It checks what the backend does with each exit (PC,
registers, masks, protections); whether Hypervisor.framework behaves like the fake is NOT tested
here (nothing of the backend has run on a Mac)."""

from __future__ import annotations

import cffi
import pytest

from pytest_ignition.vmm.hypervisor import arm64_exits as ax
from pytest_ignition.vmm.hypervisor import hvf


def dabt(*, sas: int, srt: int, wnr: bool, sse: bool = False) -> int:
    """ESR_EL2 of a lower-EL data abort with a valid syndrome, 64-bit register (as test_hvf.py)."""
    return (
        ax.EC_DABT_LOWER << 26
        | 1 << 25
        | 1 << 24
        | sas << 22
        | int(sse) << 21
        | srt << 16
        | 1 << 15
        | int(wnr) << 6
    )


class FakeHv:
    def __init__(self, ffi: cffi.FFI) -> None:
        self.ffi = ffi
        self.exit = ffi.new("hv_vcpu_exit_t *")
        self.regs: dict[int, int] = {hvf.HV_REG_PC: 0x1000}
        self.sys: dict[int, int] = {}
        self.script: list[tuple[int, int, int]] = []  # (reason, esr, pa)
        self.calls: list[tuple] = []
        self.mask = False
        self.offset = 0

    # VM
    def hv_vm_config_create(self):
        return self.ffi.NULL

    def hv_vm_config_set_ipa_size(self, cfg, bits):
        return 0

    def hv_vm_create(self, cfg):
        return 0

    def hv_vm_map(self, ptr, gpa, size, flags):
        self.calls.append(("map", gpa, size, flags))
        return 0

    def hv_vm_protect(self, gpa, size, flags):
        self.calls.append(("protect", gpa, size, flags))
        return 0

    def mach_timebase_info(self, tb):
        tb.numer, tb.denom = 125, 3  # Apple silicon's 24 MHz counter
        return 0

    def mach_absolute_time(self):
        return 10_000

    # vCPU
    def hv_vcpu_create(self, vid, exitp, cfg):
        vid[0] = 7
        exitp[0] = self.exit
        return 0

    def hv_vcpu_run(self, vid):
        reason, esr, pa = self.script.pop(0)
        self.exit.reason = reason
        self.exit.exception.syndrome = esr
        self.exit.exception.physical_address = pa
        return 0

    def hv_vcpu_get_reg(self, vid, reg, out):
        out[0] = self.regs.get(reg, 0)
        return 0

    def hv_vcpu_set_reg(self, vid, reg, value):
        self.regs[reg] = value
        return 0

    def hv_vcpu_get_sys_reg(self, vid, reg, out):
        out[0] = self.sys.get(reg, 0)
        return 0

    def hv_vcpu_set_sys_reg(self, vid, reg, value):
        self.sys[reg] = value
        return 0

    def hv_vcpu_set_vtimer_mask(self, vid, masked):
        self.calls.append(("mask", bool(masked)))
        self.mask = bool(masked)
        return 0

    def hv_vcpu_get_vtimer_offset(self, vid, out):
        out[0] = self.offset
        return 0

    def hv_vcpu_set_pending_interrupt(self, vid, kind, pending):
        self.calls.append(("pending", kind, bool(pending)))
        return 0


class FakeShim:
    """The SIMD shim's three functions (hvf_simd.CDEF), over a dict of Q registers."""

    def __init__(self, ffi: cffi.FFI) -> None:
        self.ffi = ffi
        self.q: dict[tuple[int, int], bytes] = {}
        self.fences = 0

    def ign_hvf_get_simd_fp_reg(self, vid, reg, out):
        if not 0 <= reg < 32:
            return 0xFAE94003
        self.ffi.memmove(out, self.q.get((vid, reg), bytes(16)), 16)
        return 0

    def ign_hvf_set_simd_fp_reg(self, vid, reg, in16):
        if not 0 <= reg < 32:
            return 0xFAE94003
        self.q[(vid, reg)] = bytes(self.ffi.buffer(in16, 16))
        return 0

    def ign_fence(self):
        self.fences += 1


@pytest.fixture
def fake(monkeypatch):
    ffi = cffi.FFI()
    ffi.cdef(hvf.CDEF)
    ffi.cdef(hvf.LIBSYSTEM_CDEF)
    hv = FakeHv(ffi)
    hv.shim = FakeShim(ffi)
    monkeypatch.setattr(hvf, "load", lambda system=None: (ffi, hv, hv))
    monkeypatch.setattr(hvf.hvf_simd, "load", lambda ffi, cache_dir: hv.shim)
    vm = hvf.HvfVm()
    return hv, vm, vm.create_vcpu(0)


EXC = hvf.HV_EXIT_REASON_EXCEPTION
PC = hvf.HV_REG_PC


def test_mmio_write_and_read(fake) -> None:
    hv, vm, cpu = fake
    hv.regs[5] = 0xAA_BBCC_DD11
    hv.script.append((EXC, dabt(sas=2, srt=5, wnr=True), 0x0900_0000))
    e = cpu.run()
    assert (e.kind, e.address, e.size, e.write, e.data) == (
        "mmio",
        0x0900_0000,
        4,
        True,
        0xBBCC_DD11,
    )
    assert hv.regs[PC] == 0x1004
    hv.script.append((EXC, dabt(sas=0, srt=2, wnr=False, sse=True), 0x0900_0005))
    e = cpu.run()
    assert (e.kind, e.write, e.size) == ("mmio", False, 1)
    cpu.complete_mmio_read(0x80)
    assert hv.regs[2] == 0xFFFF_FFFF_FFFF_FF80 and hv.regs[PC] == 0x1008
    with pytest.raises(RuntimeError):
        cpu.complete_mmio_read(0)


def test_hvc_psci_keeps_pc_smc_advances(fake) -> None:
    hv, vm, cpu = fake
    hv.regs[0] = ax.PSCI_VERSION
    hv.script.append((EXC, ax.EC_HVC64 << 26, 0))
    assert cpu.run().kind == "none"
    assert hv.regs[0] == 0x10000 and hv.regs[PC] == 0x1000
    hv.regs[0] = ax.PSCI_VERSION
    hv.script.append((EXC, ax.EC_SMC64 << 26, 0))
    cpu.run()
    assert hv.regs[PC] == 0x1004
    hv.regs[0] = ax.PSCI_SYSTEM_OFF
    hv.script.append((EXC, ax.EC_HVC64 << 26, 0))
    assert cpu.run().kind == "psci-off"


def test_secondary_cpu_on(fake) -> None:
    hv, vm, cpu = fake
    vm.cpus_on[0x100] = False
    hv.regs.update({0: ax.PSCI_CPU_ON_64, 1: 0x100, 2: 0x8020_0000, 3: 9})
    hv.script.append((EXC, ax.EC_HVC64 << 26, 0))
    e = cpu.run()
    assert e.kind == "psci-cpu-on" and e.detail == {
        "target": 0x100,
        "entry": 0x8020_0000,
        "context": 9,
    }
    assert vm.cpus_on[0x100] is True


def test_vtimer_exit_then_unmask_when_quiet(fake) -> None:
    hv, vm, cpu = fake
    ctl = hvf.SYS_REGS["CNTV_CTL_EL0"]
    hv.script.append((hvf.HV_EXIT_REASON_VTIMER_ACTIVATED, 0, 0))
    assert cpu.run().kind == "none" and cpu.vtimer.masked
    hv.sys[ctl] = ax.CNTV_ENABLE | ax.CNTV_ISTATUS  # still firing
    hv.regs[0] = ax.PSCI_VERSION
    hv.script.append((EXC, ax.EC_HVC64 << 26, 0))
    cpu.run()
    assert ("mask", False) not in hv.calls
    assert ("pending", hvf.HV_INTERRUPT_TYPE_IRQ, True) in hv.calls  # no hv_gic: line presented
    hv.sys[ctl] = ax.CNTV_ENABLE | ax.CNTV_ISTATUS | ax.CNTV_IMASK  # guest masked it in its ISR
    hv.regs[0] = ax.PSCI_VERSION
    hv.script.append((EXC, ax.EC_HVC64 << 26, 0))
    cpu.run()
    assert hv.calls[-1] == ("mask", False) and not cpu.vtimer.line


def test_wfi_with_a_passed_deadline_does_not_sleep(fake) -> None:
    hv, vm, cpu = fake
    hv.sys[hvf.SYS_REGS["CNTV_CTL_EL0"]] = ax.CNTV_ENABLE
    hv.sys[hvf.SYS_REGS["CNTV_CVAL_EL0"]] = 5_000  # counter is at 10_000
    hv.script.append((EXC, ax.EC_WFX << 26, 0))
    assert cpu.run().kind == "wfi" and hv.regs[PC] == 0x1004


def test_dirty_tracking_by_write_protect_faults(fake) -> None:
    hv, vm, cpu = fake
    vm.map(0x8000_0000, 0x10_0000_0000, 4 * hvf.GRANULE)
    with pytest.raises(ValueError, match="16 KiB"):
        vm.map(0x9000_1000, 0x10_1000_0000, 4096)
    vm.start_dirty_tracking()
    ro = hvf.HV_MEMORY_READ | hvf.HV_MEMORY_EXEC
    assert ("protect", 0x8000_0000, 4 * hvf.GRANULE, ro) in hv.calls
    hv.script.append((EXC, dabt(sas=3, srt=1, wnr=True), 0x8000_4010))
    assert cpu.run().kind == "none" and hv.regs[PC] == 0x1000  # the store is retried
    assert hv.calls[-1] == ("protect", 0x8000_4000, hvf.GRANULE, ro | hvf.HV_MEMORY_WRITE)
    assert vm.take_dirty() == {0x8000_4000}
    assert hv.calls[-1] == ("protect", 0x8000_4000, hvf.GRANULE, ro)  # armed again
    assert vm.take_dirty() == set()


def test_canceled_and_fatal_exits(fake) -> None:
    hv, vm, cpu = fake
    hv.script.append((hvf.HV_EXIT_REASON_CANCELED, 0, 0))
    assert cpu.run().kind == "canceled"
    hv.script.append((EXC, ax.EC_BRK64 << 26, 0))
    with pytest.raises(ax.GuestFault, match="unhandled exception"):
        cpu.run()


def test_vcpu_mpidr_is_the_device_trees(fake) -> None:
    """PSCI CPU_ON targets and hv_gic's redistributor affinities are matched against MPIDR: it
    must be the value the FDT's cpu@N reg says (layout.mpidr), for every vCPU."""
    from pytest_ignition.vmm.arch.aarch64 import layout

    hv, vm, cpu0 = fake
    cpus = [cpu0, *(vm.create_vcpu(i) for i in (1, 17))]
    for c in cpus:
        assert c.mpidr == layout.mpidr(c.index)
    assert hv.sys[hvf.SYS_REGS["MPIDR_EL1"]] == layout.mpidr(17) == 0x101
    assert vm.cpus_on == {0: True, 1: False, 0x101: False}


def test_boot_registers(fake) -> None:
    hv, vm, cpu = fake
    hv.regs[2] = 99
    cpu.set_boot_registers(0x8020_0000, 0xBFE0_0000)
    assert hv.regs[PC] == 0x8020_0000 and hv.regs[0] == 0xBFE0_0000 and hv.regs[2] == 0
    assert hv.regs[hvf.HV_REG_CPSR] == 0x3C5  # EL1h, DAIF masked


def test_simd_and_fp_registers_survive_save_and_restore(fake) -> None:
    """save_state reads Q0-Q31 through the shim and FPCR/FPSR as core registers; the state goes
    through JSON and restore_state writes every one back (the framework is the fake here)."""
    import json

    hv, vm, cpu = fake
    for n in range(32):
        hv.shim.q[(cpu.id, n)] = bytes([n]) * 8 + bytes([0xA5 ^ n]) * 8
    hv.regs[hvf.HV_REG_FPCR], hv.regs[hvf.HV_REG_FPSR] = 0x0340_0000, 0x0800_009F
    hv.hv_gic_get_icc_reg = lambda vid, reg, out: 0
    hv.hv_vcpu_get_vtimer_mask = lambda vid, out: 0
    st = cpu.save_state()
    assert st.simd[9] == bytes([9]) * 8 + bytes([0xA5 ^ 9]) * 8
    d = json.loads(json.dumps(hvf.HvfState([st], counter_at_save=0, gic_blob=b"").to_dict()))
    back = hvf.HvfState.from_dict(d).vcpus[0]
    hv.shim.q.clear()
    hv.regs.clear()
    hv.hv_vcpu_set_vtimer_offset = lambda vid, off: 0
    cpu.restore_state(back, counter_at_save=hv.mach_absolute_time())
    assert [hv.shim.q[(cpu.id, n)] for n in range(32)] == st.simd
    assert (hv.regs[hvf.HV_REG_FPCR], hv.regs[hvf.HV_REG_FPSR]) == (0x0340_0000, 0x0800_009F)
    with pytest.raises(ValueError, match="16"):
        cpu.set_q(0, b"short")
    with pytest.raises(hvf.HvfError, match="HV_BAD_ARGUMENT"):
        cpu.get_q(32)


def test_an_spi_wakes_vcpus_sleeping_in_wfi(fake) -> None:
    hv, vm, cpu = fake
    hv.hv_gic_set_spi = lambda intid, level: 0
    cpu.wake.clear()
    vm.set_irq(48, False)
    assert not cpu.wake.is_set()
    vm.set_irq(48, True)
    assert cpu.wake.is_set()
