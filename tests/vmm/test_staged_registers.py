"""Registers staged in ``kvm_run`` (KVM_CAP_SYNC_REGS), as a rollback that resumes at once
loads them: the next KVM_RUN loads them, any read or write of them first loads them by ioctl,
and sregs are staged only when loading them after the LAPIC changes nothing."""

from __future__ import annotations

import pytest
from test_snapshot import cpl3_machine, dirty_pages

from pytest_ignition.vmm.arch.x86_64 import state as x86_state
from pytest_ignition.vmm.hypervisor import kvm

pytestmark = pytest.mark.kvm

FIRST = 0x0100_0000
ALL = kvm.KVM_SYNC_X86_REGS | kvm.KVM_SYNC_X86_SREGS | kvm.KVM_SYNC_X86_EVENTS


@pytest.fixture
def parked(tmp_path, kvm_system):
    """A CPL3 VM that dirtied its page once since its snapshot and is paused spinning, with
    the snapshot's vCPU state and a register load of it."""
    if kvm_system.check_extension(kvm.KVM_CAP_SYNC_REGS) & ALL != ALL:
        pytest.skip("this KVM cannot load regs, sregs and events from kvm_run")
    m = cpl3_machine(tmp_path, [dirty_pages(FIRST, 1)])
    try:
        m.snapshot(tmp_path / "store", "base")
        base = m._base_state["vcpus"][0]
        m.start()
        assert m.done.event.wait(30), "guest never reported"
        m.pause()
        yield m, base, x86_state.VcpuRegisterLoad(base)
    finally:
        m.close()


def test_a_read_loads_what_was_staged(parked):
    m, base, load = parked
    vcpu = m.runners[0].vcpu
    assert vcpu.get_regs().to_dict() != base["regs"]  # it ran on past the snapshot
    load.apply(vcpu, during="rollback", stage=True)
    assert vcpu.staged == ALL
    assert vcpu.get_regs().to_dict() == base["regs"]  # flushed by ioctl first
    assert vcpu.staged == 0
    assert vcpu.get_sregs().to_dict() == base["sregs"]
    assert vcpu.get_vcpu_events() == base["vcpu_events"]


def test_the_next_run_loads_what_was_staged(parked):
    m, _, load = parked
    vcpu = m.runners[0].vcpu
    load.apply(vcpu, during="rollback", stage=True)
    assert vcpu.staged == ALL
    m.done.event.clear()
    m.resume()
    # Without the staged RIP the guest would spin on at `jmp $` and never report again.
    assert m.done.event.wait(30), "the guest did not run again from the staged registers"
    m.pause()
    assert vcpu.staged == 0  # KVM_RUN took them


def test_without_stage_nothing_is_left_in_kvm_run(parked):
    m, base, load = parked
    vcpu = m.runners[0].vcpu
    load.apply(vcpu, during="rollback")
    assert vcpu.staged == 0
    assert vcpu.get_regs().to_dict() == base["regs"]


def test_sregs_go_by_ioctl_when_the_apic_base_differs(parked):
    """kvm_run.apic_base is the vCPU's as of its last exit; staged sregs with another base would
    change the LAPIC's mode after its state was loaded."""
    m, base, load = parked
    vcpu = m.runners[0].vcpu
    vcpu.kvm_run.apic_base = base["sregs"]["apic_base"] ^ (1 << 10)  # as if x2APIC changed
    load.apply(vcpu, during="rollback", stage=True)
    assert vcpu.staged == kvm.KVM_SYNC_X86_REGS | kvm.KVM_SYNC_X86_EVENTS
    assert vcpu.get_sregs().to_dict() == base["sregs"]


def test_sregs_go_by_ioctl_when_the_tpr_has_a_sub_class(parked):
    """Staged CR8 sets the TPR to CR8 << 4 after the LAPIC was loaded: not the same TPR when its
    low nibble is set."""
    m, base, _ = parked
    vcpu = m.runners[0].vcpu
    lapic = bytearray(base["lapic"])
    lapic[x86_state._APIC_TPR] = 0x21
    load = x86_state.VcpuRegisterLoad({**base, "lapic": bytes(lapic)})
    load.apply(vcpu, during="rollback", stage=True)
    assert vcpu.staged == kvm.KVM_SYNC_X86_REGS | kvm.KVM_SYNC_X86_EVENTS
    assert vcpu.get_lapic()[x86_state._APIC_TPR] == 0x21


def test_staging_a_part_kvm_cannot_load_is_refused(parked):
    m, _, load = parked
    vcpu = m.runners[0].vcpu
    with pytest.raises(kvm.KvmError, match="cannot load part"):
        vcpu.stage(1 << 5, load.regs)
    assert vcpu.staged == 0
