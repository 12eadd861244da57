"""General-purpose and FPU register values for the kernel's first instruction."""

from __future__ import annotations

from . import layout

RFLAGS_RESERVED = 0x2  # bit 1 is always set
FPU_FCW = 0x37F  # x87 default control word (all exceptions masked, extended precision)
MXCSR_DEFAULT = 0x1F80


def boot_regs(entry: int, *, pvh: bool, boot_info: int) -> dict[str, int]:
    """``kvm_regs`` fields: 64-bit entry takes the zero page in RSI, PVH takes start_info in RBX."""
    regs = {"rip": entry, "rflags": RFLAGS_RESERVED}
    if pvh:
        regs["rbx"] = boot_info
    else:
        regs["rsp"] = layout.BOOT_STACK_POINTER
        regs["rbp"] = layout.BOOT_STACK_POINTER
        regs["rsi"] = boot_info
    return regs


def boot_fpu() -> dict[str, int]:
    return {"fcw": FPU_FCW, "mxcsr": MXCSR_DEFAULT}
