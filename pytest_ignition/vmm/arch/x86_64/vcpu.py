"""Configuring a new x86_64 KVM vCPU for boot (a restored vCPU gets its saved state instead,
:mod:`.state`). One call per vCPU, right after ``KVM_CREATE_VCPU`` and before its first
``KVM_RUN``, in this order:

1. the TSC rate (:func:`.state.use_host_tsc_rate`: it must be set before the vCPU first runs);
2. CPUID, normalised for this vCPU (:func:`.cpuid.normalise`; TSC-deadline advertised only
   when KVM has the capability: :func:`tsc_deadline_timer`);
3. the boot MSRs (:func:`.msrs.boot_msrs`; one refused MSR is logged, not fatal);
4. the LAPIC: LINT0 = ExtINT, LINT1 = NMI (:func:`.msrs.set_lint`);
5. the FPU (x87 control word and MXCSR at their defaults, :func:`.regs.boot_fpu`);
6. for vCPU 0 only, the entry registers and segments of the boot layout (:mod:`.boot`); the
   others wait for INIT/SIPI from it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...hypervisor import kvm
from . import cpuid, msrs
from . import state as x86_state

if TYPE_CHECKING:
    from .boot import BootSetup

log = logging.getLogger(__name__)

KVM_CAP_TSC_DEADLINE_TIMER = 72


def tsc_deadline_timer(system: kvm.System) -> bool:
    """Whether KVM emulates the LAPIC's TSC-deadline mode (CPUID may then advertise it)."""
    try:
        cap = getattr(kvm, "KVM_CAP_TSC_DEADLINE_TIMER", KVM_CAP_TSC_DEADLINE_TIMER)
        return bool(system.check_extension(cap))
    except kvm.KvmError:
        return False


def configure_for_boot(
    vcpu: kvm.Vcpu,
    index: int,
    num_cpus: int,
    supported_cpuid: Any,
    setup: BootSetup,
    *,
    tsc_deadline: bool,
) -> None:
    """Steps 1-6 of the module docstring for vCPU ``index`` of ``num_cpus``; ``supported_cpuid``
    is ``System.supported_cpuid()``, ``setup`` the :func:`.boot.prepare` result."""
    x86_state.use_host_tsc_rate(vcpu)  # before KVM_RUN: see its docstring
    table = cpuid.normalise(supported_cpuid, index, num_cpus, tsc_deadline=tsc_deadline)
    vcpu.set_cpuid2(table)
    set_boot_msrs(vcpu)
    vcpu.set_lapic(msrs.set_lint(vcpu.get_lapic()))
    vcpu.set_fpu(kvm.fpu_bytes(**setup.fpu))
    if index == 0:
        set_boot_registers(vcpu, setup)


def set_boot_msrs(vcpu: kvm.Vcpu) -> None:
    wanted = dict(msrs.boot_msrs())
    for index in x86_state.set_msrs_each(vcpu, wanted):
        log.warning("vcpu%d: KVM refused MSR %#x = %#x", vcpu.index, index, wanted[index])


def set_boot_registers(vcpu: kvm.Vcpu, setup: BootSetup) -> None:
    """vCPU 0's entry state: general registers, then segments, GDT/IDT and control registers."""
    regs = kvm.Regs(**setup.regs)
    vcpu.set_regs(regs)
    s = vcpu.get_sregs()
    b = setup.sregs
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        setattr(s, name, kvm.Segment(**getattr(b, name).asdict()))
    s.gdt = kvm.DTable(b.gdt_base, b.gdt_limit)
    s.idt = kvm.DTable(b.idt_base, b.idt_limit)
    s.cr0, s.cr3, s.cr4, s.efer = b.cr0, b.cr3, b.cr4, b.efer
    vcpu.set_sregs(s)
