"""The arm64 part of the KVM layer: vCPU init, ONE_REG access, the in-kernel vGICv3, SPIs.

Owns the arm64-only ioctls and structs (``linux/kvm.h`` and ``arch/arm64/include/uapi/asm/
kvm.h`` of Linux 6.1) and the register-id encoding. The VM/vCPU file descriptors come from
:mod:`.kvm` (``Vm.fd``, ``Vcpu.fd``: ``KVM_CREATE_VM``, memory slots, ``KVM_RUN`` and the dirty
log are the same ioctls on both architectures); failures raise its :class:`~.kvm.KvmError`.

Bring-up order on arm64 (verified with a throwaway VMM in the nested arm64 harness):
``KVM_CREATE_VM(0)`` → memory slots → ``KVM_CREATE_VCPU`` for every vCPU → per vCPU
``KVM_ARM_PREFERRED_TARGET`` + ``KVM_ARM_VCPU_INIT`` with ``PSCI_0_2`` (secondaries also
``POWER_OFF``: PSCI CPU_ON starts them) → :meth:`VgicV3.create` (distributor and redistributor
addresses) → :meth:`VgicV3.init` after all vCPUs exist → PC and x0 by ``KVM_SET_ONE_REG`` →
``KVM_RUN``. PSCI calls are handled in the kernel; userspace sees ``KVM_EXIT_SYSTEM_EVENT``
for SYSTEM_OFF/RESET and ``KVM_EXIT_MMIO`` for devices. A snapshot saves every id of
``KVM_GET_REG_LIST`` per vCPU (timer registers included) and the vGIC's register groups; vCPU
registers (MPIDR first) are restored before the redistributors.

Uses cffi in ABI mode: the cdef (:mod:`._kvm_arm64_cdef`) pre-parsed into :mod:`._kvm_arm64_ffi`
(``python -m pytest_ignition.vmm._kvm_ffi_build`` regenerates it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ._kvm_arm64_cdef import CDEF as _CDEF
from .hypervisor.kvm import KvmError


def _load_ffi() -> Any:
    """The pre-parsed declarations of :mod:`._kvm_arm64_ffi` when they match the cdef, else
    the cdef parsed here (pycparser: seconds under the nested TCG harness)."""
    import zlib

    try:
        from . import _kvm_arm64_ffi

        if _kvm_arm64_ffi.CDEF_CRC32 == zlib.crc32(_CDEF.encode()):
            return _kvm_arm64_ffi.ffi
    except (ImportError, AttributeError):
        pass
    import cffi

    parsed = cffi.FFI()
    parsed.cdef(_CDEF)
    return parsed


ffi = _load_ffi()
_libc = ffi.dlopen(None)

KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, ctype: str) -> int:
    return (direction << 30) | (ffi.sizeof(ctype) << 16) | (KVMIO << 8) | nr


KVM_IRQ_LINE = _ioc(_IOC_WRITE, 0x61, "struct kvm_irq_level")
KVM_GET_ONE_REG = _ioc(_IOC_WRITE, 0xAB, "struct kvm_one_reg")
KVM_SET_ONE_REG = _ioc(_IOC_WRITE, 0xAC, "struct kvm_one_reg")
KVM_ARM_VCPU_INIT = _ioc(_IOC_WRITE, 0xAE, "struct kvm_vcpu_init")
KVM_ARM_PREFERRED_TARGET = _ioc(_IOC_READ, 0xAF, "struct kvm_vcpu_init")
KVM_GET_REG_LIST = _ioc(_IOC_READ | _IOC_WRITE, 0xB0, "struct kvm_reg_list")
KVM_CREATE_DEVICE = _ioc(_IOC_READ | _IOC_WRITE, 0xE0, "struct kvm_create_device")
KVM_SET_DEVICE_ATTR = _ioc(_IOC_WRITE, 0xE1, "struct kvm_device_attr")
KVM_GET_DEVICE_ATTR = _ioc(_IOC_WRITE, 0xE2, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR = _ioc(_IOC_WRITE, 0xE3, "struct kvm_device_attr")

IOCTL_NAMES = {
    v: k
    for k, v in list(globals().items())
    if k.startswith("KVM_") and isinstance(v, int) and v > 0xFFFF
}

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_ONE_REG = 70
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_ARM_PMU_V3 = 126
KVM_CAP_ARM_VM_IPA_SIZE = 165

# vCPU features (kvm_vcpu_init.features[0] bits)
KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3

# exits
KVM_EXIT_MMIO = 6
KVM_EXIT_SYSTEM_EVENT = 24
KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_CRASH = 1, 2, 3

# register ids: arch | size | coprocessor group | index
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U32 = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_SIZE_U128 = 0x0040_0000_0000_0000
KVM_REG_SIZE_MASK = 0x00F0_0000_0000_0000
KVM_REG_SIZE_SHIFT = 52
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16

# struct kvm_regs: user_pt_regs {x[31], sp, pc, pstate}, sp_el1, elr_el1, spsr[5], then the
# 16-byte aligned user_fpsimd_state {vregs[32], fpsr, fpcr}.
_CORE_U64 = {f"x{i}": 8 * i for i in range(31)} | {
    "sp": 248,
    "pc": 256,
    "pstate": 264,
    "sp_el1": 272,
    "elr_el1": 280,
}
_FP_BASE = 336


def core_reg(name: str) -> int:
    """The ONE_REG id of a ``struct kvm_regs`` field: ``x0``..``x30``, ``sp``, ``pc``, ``pstate``,
    ``sp_el1``, ``elr_el1``, ``spsr0``..``spsr4``, ``v0``..``v31`` (128 bit), ``fpsr``, ``fpcr``."""
    if name in _CORE_U64:
        off, size = _CORE_U64[name], KVM_REG_SIZE_U64
    elif name.startswith("spsr") and name[4:].isdigit() and int(name[4:]) < 5:
        off, size = 288 + 8 * int(name[4:]), KVM_REG_SIZE_U64
    elif name.startswith("v") and name[1:].isdigit() and int(name[1:]) < 32:
        off, size = _FP_BASE + 16 * int(name[1:]), KVM_REG_SIZE_U128
    elif name in ("fpsr", "fpcr"):
        off, size = _FP_BASE + 512 + (4 if name == "fpcr" else 0), KVM_REG_SIZE_U32
    else:
        raise ValueError(f"no core register {name!r}")
    return KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | (off // 4)


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The ONE_REG id of a system register (``ARM64_SYS_REG`` of the uapi)."""
    for v, bits in ((op0, 2), (op1, 3), (crn, 4), (crm, 4), (op2, 3)):
        if not 0 <= v < 1 << bits:
            raise ValueError(f"system register field {v} out of range")
    enc = op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | enc


MPIDR_EL1 = sys_reg(3, 0, 0, 0, 5)
# The uapi's virtual timer ids, CVAL and CNT swapped on purpose (a historical ABI accident).
KVM_REG_ARM_TIMER_CTL = sys_reg(3, 3, 14, 3, 1)
KVM_REG_ARM_TIMER_CNT = sys_reg(3, 3, 14, 3, 2)
KVM_REG_ARM_TIMER_CVAL = sys_reg(3, 3, 14, 0, 2)


def reg_size(reg_id: int) -> int:
    """Bytes of a register's value, from its id."""
    return 1 << ((reg_id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)


# vGIC (KVM_DEV_TYPE_ARM_VGIC_V3 device attributes)
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_DIST_REGS = 1
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_GRP_REDIST_REGS = 5
KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS = 6
KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO = 7
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT = 32

# KVM_IRQ_LINE's irq field: type << 24 | vcpu << 16 | number
KVM_ARM_IRQ_TYPE_CPU, KVM_ARM_IRQ_TYPE_SPI, KVM_ARM_IRQ_TYPE_PPI = 0, 1, 2


def _ioctl(fd: int, request: int, arg: Any) -> int:
    ret = _libc.ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(IOCTL_NAMES.get(request, hex(request)), ffi.errno)
    return ret


@dataclass
class VcpuInit:
    """``struct kvm_vcpu_init``: the target CPU type and feature bits."""

    target: int
    features: list[int] = field(default_factory=lambda: [0] * 7)

    def with_feature(self, bit: int) -> VcpuInit:
        f = list(self.features)
        f[bit // 32] |= 1 << (bit % 32)
        return VcpuInit(self.target, f)


def preferred_target(vm_fd: int) -> VcpuInit:
    """The host's preferred vCPU target (``KVM_ARM_PREFERRED_TARGET`` on the VM fd)."""
    obj = ffi.new("struct kvm_vcpu_init *")
    _ioctl(vm_fd, KVM_ARM_PREFERRED_TARGET, obj)
    return VcpuInit(obj.target, list(obj.features))


def vcpu_init(vcpu_fd: int, init: VcpuInit) -> None:
    obj = ffi.new("struct kvm_vcpu_init *", {"target": init.target, "features": init.features})
    _ioctl(vcpu_fd, KVM_ARM_VCPU_INIT, obj)


def boot_vcpu_init(vm_fd: int, index: int) -> VcpuInit:
    """PSCI 0.2 for every vCPU; secondaries start powered off (the guest's PSCI CPU_ON)."""
    init = preferred_target(vm_fd).with_feature(KVM_ARM_VCPU_PSCI_0_2)
    return init.with_feature(KVM_ARM_VCPU_POWER_OFF) if index else init


def get_one_reg(vcpu_fd: int, reg_id: int) -> int:
    buf = ffi.new("uint8_t[]", reg_size(reg_id))
    reg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", buf))})
    _ioctl(vcpu_fd, KVM_GET_ONE_REG, reg)
    return int.from_bytes(bytes(ffi.buffer(buf)), "little")


def set_one_reg(vcpu_fd: int, reg_id: int, value: int) -> None:
    size = reg_size(reg_id)
    buf = ffi.new("uint8_t[]", value.to_bytes(size, "little"))
    reg = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", buf))})
    _ioctl(vcpu_fd, KVM_SET_ONE_REG, reg)


def reg_list(vcpu_fd: int) -> list[int]:
    """Every register id of an initialised vCPU (``KVM_GET_REG_LIST``: what a snapshot saves)."""
    probe = ffi.new("struct kvm_reg_list *", {"n": 0})
    try:
        _ioctl(vcpu_fd, KVM_GET_REG_LIST, probe)
    except KvmError as e:
        if e.errno != 7:  # E2BIG: n now holds the count
            raise
    n = probe.n
    lst = ffi.new("struct kvm_reg_list *", {"n": n, "reg": n})
    _ioctl(vcpu_fd, KVM_GET_REG_LIST, lst)
    return [lst.reg[i] for i in range(lst.n)]


def set_boot_regs(vcpu_fd: int, entry: int, fdt_addr: int) -> None:
    """PC = kernel entry, x0 = device tree; KVM_ARM_VCPU_INIT left PSTATE at EL1h, DAIF set."""
    set_one_reg(vcpu_fd, core_reg("pc"), entry)
    set_one_reg(vcpu_fd, core_reg("x0"), fdt_addr)
    for x in ("x1", "x2", "x3"):
        set_one_reg(vcpu_fd, core_reg(x), 0)


def spi_irq(spi: int) -> int:
    """KVM_IRQ_LINE's ``irq`` for shared peripheral interrupt ``spi`` (INTID 32 + spi)."""
    if not 0 <= spi < 988:
        raise ValueError(f"SPI {spi} out of range")
    return KVM_ARM_IRQ_TYPE_SPI << 24 | (32 + spi)


def irq_line(vm_fd: int, spi: int, level: bool) -> None:
    """Raise or lower an SPI of the in-kernel vGIC (an edge: raise, then lower)."""
    obj = ffi.new("struct kvm_irq_level *", {"irq": spi_irq(spi), "level": int(level)})
    _ioctl(vm_fd, KVM_IRQ_LINE, obj)


def redist_attr(mpidr: int, offset: int) -> int:
    """The attribute of a redistributor (or CPU sysreg) register of the vCPU with ``mpidr``."""
    return mpidr << KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT | offset


class VgicV3:
    """The in-kernel GICv3 (``KVM_CREATE_DEVICE`` type 7) and its attributes.

    No vGICv2 under an emulated GICv3 host (no GICV region): always v3.
    """

    def __init__(self, vm_fd: int) -> None:
        dev = ffi.new("struct kvm_create_device *", {"type": KVM_DEV_TYPE_ARM_VGIC_V3})
        _ioctl(vm_fd, KVM_CREATE_DEVICE, dev)
        self.fd = dev.fd

    @classmethod
    def create(cls, vm_fd: int, dist: int, redist: int, nr_irqs: int = 128) -> VgicV3:
        """The vGIC with its distributor and redistributor region at those addresses."""
        gic = cls(vm_fd)
        gic.set_attr_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, dist)
        gic.set_attr_u64(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, redist)
        gic.set_attr_u32(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, nr_irqs)
        return gic

    def init(self) -> None:
        """After every vCPU exists and before the first KVM_RUN."""
        self._attr(KVM_SET_DEVICE_ATTR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, None)

    def _attr(self, request: int, group: int, attr: int, buf: Any) -> None:
        addr = 0 if buf is None else int(ffi.cast("uintptr_t", buf))
        a = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr, "addr": addr})
        _ioctl(self.fd, request, a)

    def set_attr_u64(self, group: int, attr: int, value: int) -> None:
        self._attr(KVM_SET_DEVICE_ATTR, group, attr, ffi.new("uint64_t *", value))

    def set_attr_u32(self, group: int, attr: int, value: int) -> None:
        self._attr(KVM_SET_DEVICE_ATTR, group, attr, ffi.new("uint32_t *", value))

    def get_attr_u32(self, group: int, attr: int) -> int:
        buf = ffi.new("uint32_t *")
        self._attr(KVM_GET_DEVICE_ATTR, group, attr, buf)
        return int(buf[0])

    def get_attr_u64(self, group: int, attr: int) -> int:
        buf = ffi.new("uint64_t *")
        self._attr(KVM_GET_DEVICE_ATTR, group, attr, buf)
        return int(buf[0])

    def has_attr(self, group: int, attr: int) -> bool:
        """Whether KVM knows the attribute (``KVM_HAS_DEVICE_ATTR``; ENXIO means no)."""
        try:
            self._attr(KVM_HAS_DEVICE_ATTR, group, attr, None)
        except KvmError as e:
            if e.errno in (6, 22):  # ENXIO, EINVAL
                return False
            raise
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
