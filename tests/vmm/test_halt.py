"""The halt watch's decision (:mod:`pytest_ignition.vmm.halt`) and its reading of real vCPUs.

The decision is plain data; the vCPU reading and the machine-level watch run on this machine's
KVM with CPL3 guests (no guest kernel: a Linux ``poweroff`` in the nested harness is
``tests/nested/test_vmm_boot.py``). The CLI tests of a guest that halts for good are in
``test_machine_cli.py``.
"""

from __future__ import annotations

import time

import pytest
from test_snapshot import counter_loop, cpl3_machine

from pytest_ignition.vmm import halt, kvm
from pytest_ignition.vmm import machine as machine_mod

HALTED = kvm.KVM_MP_STATE_HALTED
RUNNABLE = kvm.KVM_MP_STATE_RUNNABLE
WAIT_SIPI = kvm.KVM_MP_STATE_UNINITIALIZED


def st(mp: int, if_: bool = False, wake: bool = False) -> halt.VcpuRunState:
    return halt.VcpuRunState(mp, if_, wake)


@pytest.mark.parametrize(
    "states, final",
    [
        ([st(HALTED)], True),  # Linux's stop_this_cpu(): cli; hlt
        ([st(HALTED), st(HALTED)], True),
        ([st(HALTED), st(WAIT_SIPI)], True),  # an AP never started
        ([st(HALTED), st(kvm.KVM_MP_STATE_INIT_RECEIVED)], True),
        ([], False),
        ([st(WAIT_SIPI)], False),  # nobody halted: not a guest that stopped itself
        ([st(HALTED, if_=True)], False),  # idle: sti; hlt
        ([st(HALTED, wake=True)], False),  # an NMI/SMI/INIT on its way
        ([st(RUNNABLE)], False),  # running, or a PV unhalt kick pending
        ([st(HALTED), st(RUNNABLE)], False),  # the other vCPU may still wake it
        ([st(HALTED), st(HALTED, if_=True)], False),
        ([st(HALTED), st(WAIT_SIPI, wake=True)], False),
        ([st(HALTED), st(kvm.KVM_MP_STATE_SIPI_RECEIVED)], False),  # about to run
    ],
)
def test_decision(states, final):
    assert halt.all_halted_for_good(states) is final


@pytest.mark.kvm
def test_read_run_state_of_real_vcpus(tmp_path, kvm_system):
    m = cpl3_machine(tmp_path, [counter_loop(0x18_0000)] * 2)
    try:
        a, b = (r.vcpu for r in m.runners)
        s = halt.read_run_state(a)
        assert (s.mp_state, s.interrupts_enabled, s.wake_pending) == (RUNNABLE, False, False)
        a.set_mp_state(HALTED)
        b.set_mp_state(HALTED)
        assert halt.all_halted_for_good([halt.read_run_state(a), halt.read_run_state(b)])
        regs = b.get_regs()
        regs.rflags |= halt.RFLAGS_IF
        b.set_regs(regs)
        assert halt.read_run_state(b).interrupts_enabled
        assert not halt.all_halted_for_good([halt.read_run_state(a), halt.read_run_state(b)])
        # an NMI pending on a halted vCPU wakes it: not for good
        ev = kvm._from_bytes("struct kvm_vcpu_events", a.get_vcpu_events(), "vcpu_events")
        ev.nmi.pending = 1
        ev.flags = 1  # KVM_VCPUEVENT_VALID_NMI_PENDING
        a.set_vcpu_events(bytes(kvm.ffi.buffer(ev)))
        s = halt.read_run_state(a)
        assert s.mp_state == HALTED and not s.interrupts_enabled and s.wake_pending
    finally:
        m.close()


@pytest.mark.kvm
def test_watch_ends_a_halted_machine_and_leaves_a_busy_one(tmp_path, kvm_system, monkeypatch):
    """Two machines under a fast watch: a vCPU entering KVM halted with IF=0 (what a guest's
    cli; hlt leaves) ends its machine with status 3; a CPL3 loop that never exits to the VMM
    (so the watch pauses and reads it every time) keeps running and counting."""
    monkeypatch.setattr(machine_mod, "HALT_CHECK_S", 0.05)
    data = 0x18_0000
    (tmp_path / "busy").mkdir()
    (tmp_path / "halted").mkdir()
    busy = cpl3_machine(tmp_path / "busy", [counter_loop(data)])
    halted = cpl3_machine(tmp_path / "halted", [b"\xeb\xfe"])  # never runs: halted first
    try:
        halted.runners[0].vcpu.set_mp_state(HALTED)
        busy.start()
        halted.start()
        t0 = time.monotonic()
        assert halted.wait(10.0) == machine_mod.EXIT_HALTED
        assert time.monotonic() - t0 < 5
        assert halted.stop_reason.kind == "halted"
        assert halted.status()["exit_status"] == machine_mod.EXIT_HALTED
        first = busy.mem.read_u64(data)
        time.sleep(1.0)  # ~20 halt checks
        assert busy.state == "running" and busy.stop_reason is None
        assert busy.mem.read_u64(data) > first
    finally:
        busy.close()
        halted.close()
