"""The x86_64 vCPU and VM state bundles: everything KVM holds for a paused x86 vCPU
(:func:`save_vcpu_state` / :func:`restore_vcpu_state`, :class:`VcpuRegisterLoad` for a state
loaded many times) and for the VM's in-kernel PIC/IOAPIC/PIT and kvmclock
(:func:`save_vm_state` / :func:`restore_vm_state`), as plain data, loaded in the order KVM
needs; the TSC rules (:func:`use_host_tsc_rate`, :func:`timer_msrs`). Over the raw ioctls of
``vmm/hypervisor/kvm.py``; it opens nothing itself.
"""

from __future__ import annotations

import errno as _errno
import logging
from typing import Any

from ...hypervisor.kvm import (
    KVM_CAP_TSC_CONTROL,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_SET_CLOCK,
    KVM_SET_DEBUGREGS,
    KVM_SET_IRQCHIP,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_PIT2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_XCRS,
    KVM_SET_XSAVE,
    KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
    ClockData,
    KvmError,
    Vcpu,
    Vm,
    _clock_cdata,
    _from_bytes,
    _ioctl,
    _msrs_cdata,
    _regs_cdata,
    _sregs_cdata,
    _xsave_cdata,
    ffi,
)
from .cpuid import CpuidEntry

log = logging.getLogger(__name__)


VCPU_STATE_VERSION = 1
_APIC_TPR = 0x80  # the task-priority register's offset in kvm_lapic_state.regs


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """Read every MSR of ``indices`` that KVM can read, skipping (not stopping at) the rest."""
    todo = list(indices)
    out: dict[int, int] = {}
    while todo:
        got = vcpu.get_msrs(todo, strict=False)
        out.update(got)
        n = len(got)
        if n == len(todo):
            break
        log.debug("vcpu%d: MSR %#x is not readable; skipped", vcpu.index, todo[n])
        todo = todo[n + 1 :]
    return out


def _lapic_or_none(vcpu: Vcpu) -> bytes | None:
    try:
        return vcpu.get_lapic()
    except KvmError as e:
        if e.errno in (_errno.EINVAL, _errno.ENXIO):
            return None  # no in-kernel irqchip, so no LAPIC to save
        raise


def save_vcpu_state(vcpu: Vcpu, msr_indices: list[int]) -> dict[str, Any]:
    """Everything KVM holds for a (paused) vCPU, as plain data: ints, dicts, lists, bytes.

    ``msr_indices`` is normally ``System.msr_index_list()``. The vCPU must be outside
    KVM_RUN with any pending I/O completed (``VcpuRunner.pause`` guarantees both).
    """
    return {
        "version": VCPU_STATE_VERSION,
        "cpuid": [e.to_dict() for e in vcpu.get_cpuid2()],
        "tsc_khz": vcpu.get_tsc_khz(),
        "mp_state": vcpu.get_mp_state(),
        "regs": vcpu.get_regs().to_dict(),
        "sregs": vcpu.get_sregs().to_dict(),
        "xsave": vcpu.get_xsave(),
        "xcrs": vcpu.get_xcrs(),
        "debugregs": vcpu.get_debugregs(),
        "lapic": _lapic_or_none(vcpu),
        "msrs": readable_msrs(vcpu, msr_indices),
        "vcpu_events": vcpu.get_vcpu_events(),
    }


def restore_vcpu_state(vcpu: Vcpu, state: dict[str, Any]) -> None:
    """Load :func:`save_vcpu_state` output into a fresh vCPU, in the order KVM needs:
    CPUID first (it shapes what the other setters accept), the LAPIC before MSRs such as
    TSC_DEADLINE, and events last (they may reference state set before them)."""
    if state.get("version") != VCPU_STATE_VERSION:
        raise ValueError(f"vCPU state version {state.get('version')!r}, need {VCPU_STATE_VERSION}")
    vcpu.set_cpuid2([CpuidEntry.from_dict(e) for e in state["cpuid"]])
    host_khz = use_host_tsc_rate(vcpu)
    khz = int(state["tsc_khz"])
    if khz and host_khz and not within_tsc_tolerance(khz, host_khz):
        # Another rate needs TSC scaling in hardware: without it KVM would leave this vCPU's
        # TSC multiplier unset (see use_host_tsc_rate), which is far worse than a guest
        # whose TSC runs at the host's rate.
        if vcpu.vm is not None and vcpu.vm.check_extension(KVM_CAP_TSC_CONTROL):
            try:
                vcpu.set_tsc_khz(khz)
            except KvmError as e:
                log.warning("vcpu%d: cannot set TSC to %d kHz (%s)", vcpu.index, khz, e)
        else:
            log.warning(
                "vcpu%d: the snapshot's TSC ran at %d kHz, this host's at %d kHz and KVM cannot "
                "scale it: the guest's TSC runs at the host's rate",
                vcpu.index,
                khz,
                host_khz,
            )
    restore_vcpu_registers(vcpu, state)


TSC_TOLERANCE_PPM = 250  # KVM's tsc_tolerance_ppm default: closer rates need no scaling


def within_tsc_tolerance(khz: int, host_khz: int) -> bool:
    return abs(khz - host_khz) * 1_000_000 <= host_khz * TSC_TOLERANCE_PPM


def use_host_tsc_rate(vcpu: Vcpu) -> int:
    """Put a new vCPU's TSC on the host's *current* TSC rate; returns that rate in kHz (0 if
    KVM would not say).

    KVM gives a new vCPU the rate it read when it initialised (``max_tsc_khz``). When the host
    kernel refines its TSC calibration later (``tsc: Refined TSC clocksource calibration``,
    after a built-in KVM started: the nested harness host), the two can differ by more than
    KVM's 250 ppm tolerance; without TSC scaling in hardware KVM then never sets the vCPU's TSC
    multiplier, so its own view of the guest TSC stands still (``MSR_IA32_TSC`` reads 0) while
    the guest's advances, and every TSC-deadline timer fires the host's uptime late: guests
    that boot in 40 s instead of 3 s and take a minute for ``sleep 1``. ``KVM_SET_TSC_KHZ(0)``
    asks for the host's current rate, which is always within tolerance."""
    try:
        vcpu.set_tsc_khz(0)
    except KvmError as e:  # an old KVM, or a host whose TSC calibration failed
        log.debug("vcpu%d: KVM_SET_TSC_KHZ(0) failed (%s)", vcpu.index, e)
    try:
        return vcpu.get_tsc_khz()
    except KvmError:
        return 0


def set_msrs_each(vcpu: Vcpu, msrs: dict[int, int]) -> list[int]:
    """Write ``msrs``; KVM stops at the first it refuses, so the rest are retried one by one
    (one refused MSR must not drop the ones after it). Returns the refused indices."""
    n = vcpu.set_msrs(msrs, strict=False)
    return [
        index
        for index, value in list(msrs.items())[n:]
        if vcpu.set_msrs({index: value}, strict=False) != 1
    ]


MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
_APIC_LVTT = 0x320
_LVTT_TSC_DEADLINE = 2 << 17


def _tsc_deadline_mode(lapic: bytes | None) -> bool:
    if lapic is None or len(lapic) < _APIC_LVTT + 4:
        return False
    lvtt = int.from_bytes(lapic[_APIC_LVTT : _APIC_LVTT + 4], "little")
    return lvtt & (3 << 17) == _LVTT_TSC_DEADLINE


def timer_msrs(msrs: dict[int, int], lapic: bytes | None) -> tuple[dict[int, int], dict[int, int]]:
    """Split saved MSRs into (everything else, the TSC deadline): KVM arms the LAPIC timer
    when TSC_DEADLINE is written, for ``deadline - the guest TSC at that moment``, and does
    not re-arm it when the TSC is written later, so the deadline must go last. A deadline
    saved as 0 while the timer is in TSC-deadline mode becomes the saved TSC, so the restored
    vCPU takes one (at worst spurious) timer interrupt at once and the guest reprograms its
    next event; Firecracker does the same (a timer that expired around the save must not be
    lost: a guest idle in HLT would then wait for a tick that never comes)."""
    rest = dict(msrs)
    deadline = {}
    if MSR_IA32_TSC_DEADLINE in rest:
        d = rest.pop(MSR_IA32_TSC_DEADLINE)
        if d == 0 and _tsc_deadline_mode(lapic) and MSR_IA32_TSC in rest:
            d = rest[MSR_IA32_TSC]
        deadline[MSR_IA32_TSC_DEADLINE] = d
    return rest, deadline


def restore_vcpu_registers(vcpu: Vcpu, state: dict[str, Any], during: str = "restore") -> None:
    """The part of :func:`restore_vcpu_state` after CPUID and TSC frequency (see
    :class:`VcpuRegisterLoad`); alone it reloads a vCPU that already ran (KVM refuses CPUID
    changes after KVM_RUN). ``during`` names the operation in the log line for a refused MSR."""
    VcpuRegisterLoad(state).apply(vcpu, during)


class VcpuRegisterLoad:
    """A saved vCPU state's register ioctls with their arguments built once, for a state that
    is loaded many times (the rollback base): :meth:`apply` only makes the ioctls.

    KVM's order: mp_state, regs, sregs, xsave, xcrs, debugregs, the LAPIC before the MSRs,
    the TSC deadline after the TSC (:func:`timer_msrs`), events. Last, a vCPU with kvmclock
    enabled is told it was stopped (``KVM_KVMCLOCK_CTRL``): the guest then resets its
    RCU-stall, soft-lockup and hung-task timers on its next clock read instead of reporting the
    time it spent saved as a stall. The arguments are inputs only (KVM does not write them), so
    one instance serves any number of loads."""

    def __init__(self, state: dict[str, Any]):
        self.mp_state = ffi.new("struct kvm_mp_state *", {"mp_state": int(state["mp_state"])})
        self.regs = _regs_cdata(state["regs"])
        self.sregs = _sregs_cdata(state["sregs"])
        self._xsave_buf, self.xsave = _xsave_cdata(state["xsave"])
        self.xcrs = _from_bytes("struct kvm_xcrs", state["xcrs"], "xcrs")
        self.debugregs = _from_bytes("struct kvm_debugregs", state["debugregs"], "debugregs")
        lapic = state["lapic"]
        self.lapic = (
            None if lapic is None else _from_bytes("struct kvm_lapic_state", lapic, "lapic")
        )
        msrs, deadline = timer_msrs({int(k): int(v) for k, v in state["msrs"].items()}, lapic)
        # One KVM_SET_MSRS: KVM writes the entries in array order, so the deadline last in
        # the array is written after the TSC (one vCPU ioctl is ~6-10 us on this host).
        self.msr_items = list(msrs.items()) + list(deadline.items())
        self._msrs_buf, self.msrs = _msrs_cdata(self.msr_items)
        self.events = _from_bytes("struct kvm_vcpu_events", state["vcpu_events"], "vcpu_events")
        self.kvmclock = bool(msrs.get(MSR_KVM_SYSTEM_TIME_NEW, 0) & 1)
        # Staged sregs are loaded after the LAPIC, and their CR8 then sets the TPR to CR8 << 4:
        # the same TPR only when its low nibble (the priority sub-class) is zero.
        self._sregs_after_lapic_ok = lapic is None or not lapic[_APIC_TPR] & 0x0F

    def apply(self, vcpu: Vcpu, during: str = "restore", *, stage: bool = False) -> None:
        """Load the state. ``stage`` (the vCPU runs next, from its own thread): regs, events
        and, where that is the same, sregs are left in ``kvm_run`` for that KVM_RUN to load
        (:meth:`Vcpu.stage`), which saves up to three vCPU ioctls."""
        fd = vcpu.fd
        parts = vcpu.sync_parts if stage else 0
        _ioctl(fd, KVM_SET_MP_STATE, self.mp_state)
        if parts & KVM_SYNC_X86_REGS:
            vcpu.stage(KVM_SYNC_X86_REGS, self.regs)
        else:
            _ioctl(fd, KVM_SET_REGS, self.regs)
        # Staged sregs would be loaded after the LAPIC and MSRs: only when their APIC base is
        # the vCPU's (kvm_run.apic_base, as of its last exit), so that it changes no LAPIC mode.
        if (
            parts & KVM_SYNC_X86_SREGS
            and self._sregs_after_lapic_ok
            and vcpu.kvm_run.apic_base == self.sregs.apic_base
        ):
            vcpu.stage(KVM_SYNC_X86_SREGS, self.sregs)
        else:
            _ioctl(fd, KVM_SET_SREGS, self.sregs)
        _ioctl(fd, KVM_SET_XSAVE, self.xsave)
        _ioctl(fd, KVM_SET_XCRS, self.xcrs)
        _ioctl(fd, KVM_SET_DEBUGREGS, self.debugregs)
        if self.lapic is not None:
            _ioctl(fd, KVM_SET_LAPIC, self.lapic)
        items = self.msr_items
        n = _ioctl(fd, KVM_SET_MSRS, self.msrs) if items else 0
        if n < len(items):
            # KVM stops at the first MSR it refuses: the rest one by one (see set_msrs_each)
            refused = [items[n][0]] + set_msrs_each(vcpu, dict(items[n + 1 :]))
            for index in refused:
                log.warning("vcpu%d: KVM refused MSR %#x on %s", vcpu.index, index, during)
        if parts & KVM_SYNC_X86_EVENTS:
            vcpu.stage(KVM_SYNC_X86_EVENTS, self.events)
        else:
            _ioctl(fd, KVM_SET_VCPU_EVENTS, self.events)
        if self.kvmclock:
            try:
                vcpu.kvmclock_ctrl()
            except KvmError as e:
                log.debug("vcpu%d: KVM_KVMCLOCK_CTRL failed (%s)", vcpu.index, e)


VM_STATE_VERSION = 1


def save_vm_state(vm: Vm) -> dict[str, Any]:
    """The in-kernel devices' state (PIC master/slave, IOAPIC, PIT) and kvmclock, as plain
    data. The VM must have been created with ``create_irqchip`` and ``create_pit2``."""
    return {
        "version": VM_STATE_VERSION,
        "irqchips": [
            vm.get_irqchip(c)
            for c in (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)
        ],
        "pit2": vm.get_pit2(),
        "clock": vm.get_clock().to_dict(),
    }


class VmStateLoad:
    """:func:`save_vm_state` output as its ioctl arguments, built once for a state loaded many
    times (the rollback base): PIC master, PIC slave, IOAPIC, PIT, then kvmclock (without
    ``KVM_CLOCK_REALTIME``: see ``Vm.set_clock``). The arguments are inputs only."""

    def __init__(self, state: dict[str, Any]):
        if state.get("version") != VM_STATE_VERSION:
            raise ValueError(f"VM state version {state.get('version')!r}, need {VM_STATE_VERSION}")
        self.irqchips = [_from_bytes("struct kvm_irqchip", c, "irqchip") for c in state["irqchips"]]
        self.pit2 = _from_bytes("struct kvm_pit_state2", state["pit2"], "pit_state2")
        self.clock = _clock_cdata(ClockData.from_dict(state["clock"]))

    def apply(self, vm: Vm) -> None:
        fd = vm.fd
        for chip in self.irqchips:
            _ioctl(fd, KVM_SET_IRQCHIP, chip)
        _ioctl(fd, KVM_SET_PIT2, self.pit2)
        _ioctl(fd, KVM_SET_CLOCK, self.clock)


def restore_vm_state(vm: Vm, state: dict[str, Any]) -> None:
    """Load :func:`save_vm_state` output into a VM that has its irqchip and PIT created."""
    VmStateLoad(state).apply(vm)
