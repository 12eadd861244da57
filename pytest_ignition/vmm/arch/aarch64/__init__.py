"""The bundled VMM's aarch64 machine (:mod:`.machine`, on any backend of ``vmm/hypervisor/``):
guest-physical layout (:mod:`.layout`), arm64 ``Image`` loading rules (:mod:`.image`), the
flattened device tree the guest boots with (:mod:`.fdt`) and the vGICv3's snapshot state on KVM
(:mod:`.vgic`).

The raw KVM ioctls (vCPU init with PSCI 0.2, ONE_REG, the in-kernel vGICv3) are
:mod:`pytest_ignition.vmm.kvm_arm64`; the KVM backend over them is
:mod:`pytest_ignition.vmm.hypervisor.kvm_aarch64`.
"""
