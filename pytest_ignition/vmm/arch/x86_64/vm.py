"""x86_64 VM-level setup on KVM: what a new VM needs around its memory slots, in two steps
because the order is KVM's and measured, not a matter of taste.

1. :func:`prepare` right after ``KVM_CREATE_VM``: the TSS pages and the identity-map page
   (VMX needs these three pages + one outside RAM before the first vCPU exists);
2. the machine adds its memory slots (``KVM_SET_USER_MEMORY_REGION``);
3. :func:`create_interrupt_controllers`: the in-kernel irqchip (PIC + IOAPIC + LAPICs) and
   the PIT. After the memory, as Firecracker does: a memory slot added after
   ``KVM_CREATE_IRQCHIP`` cost ~7 ms here (512 MiB; ~0.3 ms before it), on every boot and
   restore.

The vCPUs (:mod:`.vcpu`) come after both; the addresses are :mod:`.layout`'s.
"""

from __future__ import annotations

import logging

from ...hypervisor import kvm
from . import layout

log = logging.getLogger(__name__)


def prepare(vm: kvm.Vm) -> None:
    """Before the memory slots and the first vCPU: the TSS and identity-map addresses."""
    # VMX needs these three pages + one outside RAM before the first vCPU exists.
    vm.set_tss_addr(layout.KVM_TSS_ADDR)
    try:
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
    except kvm.KvmError as e:
        log.debug("identity map address not settable (%s); KVM's default is used", e)


def create_interrupt_controllers(vm: kvm.Vm) -> None:
    """After the memory slots (see the module docstring): the in-kernel PIC + IOAPIC + LAPICs,
    then the PIT (``KVM_CREATE_PIT2`` needs the irqchip)."""
    vm.create_irqchip()
    vm.create_pit2()
