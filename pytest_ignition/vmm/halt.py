"""Telling a guest that halted for good from an idle one (x86).

An x86 Linux guest without a power-off device (the default guest has no ACPI) turns
``poweroff`` into a halt: ``kernel_halt()`` prints ``reboot: System halted`` and every CPU ends
in ``stop_this_cpu()``, ``cli; hlt`` forever. With KVM's in-kernel LAPIC that HLT never reaches
the VMM (KVM blocks the vCPU itself), so the VMM would keep running a guest that can never run
again. Firecracker has the same gap (its guests are told to ``reboot``); QEMU's microvm too.

The machine's halt watch (:meth:`.machine.Machine._watch_halt`) pauses an idle VM now and then
and reads each vCPU's run state. A vCPU that is halted (``KVM_MP_STATE_HALTED``; KVM reports a
pending PV unhalt kick as runnable) with RFLAGS.IF clear wakes only for an NMI, SMI or INIT.
Nothing in this VMM raises those, and the only other sources are the other vCPUs: when every
vCPU is halted with interrupts disabled (or is an AP still waiting for its SIPI) and none has
an NMI, SMI, INIT or event pending, the guest has stopped itself for good, and the VMM ends it
(exit status 3, see ``__main__``).
Idle Linux halts with interrupts enabled (``sti; hlt``), an offlined CPU halts with them
disabled but CPU 0 cannot be offlined here, and PV spinlock waits are woken by a kick that KVM
reports as runnable: none of these match. A guest that crafts the state on purpose only ends
its own VM, which it can do anyway (reboot).

This module is the decision and the reading of one vCPU; no thread, so it is unit-tested
without a VM (``tests/vmm/test_halt.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .hypervisor import kvm

RFLAGS_IF = 1 << 9


@dataclass(frozen=True)
class VcpuRunState:
    """What decides whether a paused vCPU can ever run again."""

    mp_state: int
    interrupts_enabled: bool  # RFLAGS.IF
    wake_pending: bool  # an NMI, SMI, latched INIT or an event being injected

    @property
    def halted_for_good(self) -> bool:
        return (
            self.mp_state == kvm.KVM_MP_STATE_HALTED
            and not self.interrupts_enabled
            and not self.wake_pending
        )


# An AP that was never started (or got INIT) waits for a SIPI, which only another vCPU sends.
_WAITING_FOR_SIPI = frozenset({kvm.KVM_MP_STATE_UNINITIALIZED, kvm.KVM_MP_STATE_INIT_RECEIVED})


def all_halted_for_good(states: Sequence[VcpuRunState]) -> bool:
    """True when at least one vCPU is halted with nothing that could wake it and every other
    is too, or waits for a SIPI that no vCPU is left to send (an AP the guest never started:
    ``maxcpus=1``, or a halt before SMP bring-up)."""
    halted = [s.halted_for_good for s in states]
    return any(halted) and all(
        h or (s.mp_state in _WAITING_FOR_SIPI and not s.wake_pending)
        for h, s in zip(halted, states, strict=True)
    )


def read_run_state(vcpu: Any) -> VcpuRunState:
    """The run state of one vCPU that is outside KVM_RUN (paused)."""
    ev = kvm._from_bytes("struct kvm_vcpu_events", vcpu.get_vcpu_events(), "vcpu_events")
    wake = bool(
        ev.nmi.pending
        or ev.nmi.injected
        or ev.smi.pending
        or ev.smi.latched_init
        or ev.interrupt.injected
        or ev.exception.injected
        or ev.exception.pending
    )
    return VcpuRunState(
        mp_state=vcpu.get_mp_state(),
        interrupts_enabled=bool(vcpu.get_regs().rflags & RFLAGS_IF),
        wake_pending=wake,
    )
