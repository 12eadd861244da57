"""The MSR values a vCPU starts with, and the LAPIC LVT setup for LINT0/LINT1."""

from __future__ import annotations

import struct

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WB = 6


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) pairs for KVM_SET_MSRS before the first instruction."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]


# struct kvm_lapic_state is the 1 KiB register page; LVT entries are 32-bit at these offsets.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def set_lint(lapic_regs: bytes | bytearray) -> bytes:
    """LINT0 = ExtINT (the PIC's output), LINT1 = NMI, in a copy of the LAPIC register page."""
    regs = bytearray(lapic_regs)
    if len(regs) < 0x400:
        raise ValueError(f"LAPIC state is {len(regs)} bytes, expected 1024")
    for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (v,) = struct.unpack_from("<I", regs, off)
        struct.pack_into("<I", regs, off, _set_delivery_mode(v, mode))
    return bytes(regs)
