"""The bundled VMM's aarch64 machine: guest-physical layout (:mod:`.layout`), arm64 ``Image``
loading rules (:mod:`.image`) and the flattened device tree the guest boots with (:mod:`.fdt`).

The KVM side (vCPU init with PSCI 0.2, ONE_REG, the in-kernel vGICv3) is
:mod:`pytest_ignition.vmm.kvm_arm64`.
"""
