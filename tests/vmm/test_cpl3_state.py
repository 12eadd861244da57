"""vCPU state through the KVM layer's getters and setters: a CPL3 guest paused mid-loop,
its state saved as plain data, loaded into a brand-new VM, continues where it was."""

from __future__ import annotations

import pickle
import struct

import cpl3
import pytest

from pytest_ignition.vmm import kvm

pytestmark = pytest.mark.kvm

LSTAR = 0xC000_0082
N = 0x7FFF_FFFF  # far more iterations than the test lets it run

CODE = b"".join(
    [
        b"\x48\xbf" + struct.pack("<Q", cpl3.DATA_ADDR),  # mov rdi, DATA_ADDR
        b"\x31\xdb",  # xor ebx, ebx
        # loop:
        b"\x48\xff\xc3",  # inc rbx
        b"\x48\x89\x1f",  # mov [rdi], rbx
        b"\x48\x81\xfb" + struct.pack("<I", N),  # cmp rbx, N
        b"\x75\xf1",  # jne loop
        b"\xe6\xf4",  # out 0xf4, al
    ]
)


def paused_with_progress(g: cpl3.Cpl3Guest, floor: int) -> int:
    """Resume/pause until rbx passed ``floor``; returns rbx (no timing assumptions)."""
    runner = g.runner
    assert runner is not None
    for _ in range(2000):
        assert runner.pause(timeout=5)
        rbx = g.vcpu.get_regs().rbx
        if rbx > floor:
            return rbx
        runner.resume()
        runner.join(0.005)
    raise AssertionError("guest made no progress")


def test_vcpu_state_moves_to_a_new_vm(kvm_system):
    msr_list = kvm_system.msr_index_list()
    g1 = cpl3.Cpl3Guest(kvm_system, CODE, irqchip=True)
    g1.vcpu.set_msrs({LSTAR: 0xFFFF_FFFF_8100_0000})
    g1.start()
    try:
        saved_rbx = paused_with_progress(g1, 0)
        state = pickle.loads(pickle.dumps(kvm.save_vcpu_state(g1.vcpu, msr_list)))
        size = g1.mem.regions[0].size
        ram = g1.mem.read(0, size)
        assert state["regs"]["rbx"] == saved_rbx
        assert state["sregs"]["cs"]["selector"] == cpl3.SEL_UCODE
        assert state["msrs"]  # something beyond the registers came along
        assert state["lapic"] is not None and len(state["lapic"]) == 1024
    finally:
        g1.close()

    # different code and no LSTAR: everything must come from the saved state
    g2 = cpl3.Cpl3Guest(kvm_system, b"\xf4", irqchip=True)
    try:
        g2.mem.write(0, ram)
        kvm.restore_vcpu_state(g2.vcpu, state)
        assert g2.vcpu.get_regs().to_dict() == state["regs"]
        assert g2.vcpu.get_sregs().to_dict() == state["sregs"]
        assert g2.vcpu.get_msrs([LSTAR]) == {LSTAR: 0xFFFF_FFFF_8100_0000}
        g2.start()
        rbx = paused_with_progress(g2, saved_rbx)
        assert rbx > saved_rbx
        in_memory = g2.mem.read_u64(cpl3.DATA_ADDR)
        assert in_memory in (rbx, rbx - 1)  # paused after or between inc and store
        assert g2.runner is not None
        reason = g2.runner.stop(timeout=5)
        assert reason is not None and reason.kind == "requested"
    finally:
        g2.close()


def test_restore_rejects_unknown_versions(kvm_system):
    g = cpl3.Cpl3Guest(kvm_system, b"\xeb\xfe")  # no irqchip: no LAPIC to save
    try:
        state = kvm.save_vcpu_state(g.vcpu, kvm_system.msr_index_list())
        assert state["lapic"] is None
        state["version"] = 99
        with pytest.raises(ValueError, match="version 99"):
            kvm.restore_vcpu_state(g.vcpu, state)
    finally:
        g.close()
