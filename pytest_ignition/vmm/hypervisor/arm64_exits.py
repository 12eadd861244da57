"""arm64 exit logic for a hypervisor that hands exceptions to userspace (Hypervisor.framework):
ESR_EL2 decoding of data aborts, PSCI over HVC/SMC, the virtual-timer mask protocol and WFI's
sleep deadline. Pure Python, no framework: unit-tested on any host (tests/unit/test_hvf.py).

Semantics follow QEMU ``target/arm/hvf/hvf.c`` and libkrun ``src/hvf``: after a data abort, an SMC,
a WFI/WFE or a system-register trap the PC is advanced by 4; after an HVC it is not (the exit's
ELR already points past the HVC). KVM/arm64 does PSCI and the timer in the kernel and reports MMIO
decoded, so the KVM path needs none of this; the values here (PSCI ids, CNTV_CTL bits) are the
architecture's, shared by both.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DataAbort",
    "GuestFault",
    "PsciResult",
    "Vtimer",
    "decode_data_abort",
    "mmio_read_result",
    "mmio_write_value",
    "pc_advance",
    "psci_call",
    "wfi_ticks",
]

# Exception classes, ESR_EL2[31:26] (Arm ARM D17.2.37).
EC_WFX = 0x01
EC_HVC64 = 0x16
EC_SMC64 = 0x17
EC_SYSREG = 0x18
EC_IABT_LOWER = 0x20
EC_DABT_LOWER = 0x24
EC_BRK64 = 0x3C

INSN_SIZE = 4
XZR = 31  # register number 31 in a load/store's Rt is the zero register
# PSTATE at a kernel's entry (boot, or PSCI CPU_ON): EL1h (SP_EL1), D, A, I and F masked.
PSTATE_EL1H_DAIF_MASKED = 0x3C5


class GuestFault(Exception):
    """The guest did something the VMM does not emulate (logged; the VM is stopped)."""


def exception_class(esr: int) -> int:
    return (esr >> 26) & 0x3F


def pc_advance(ec: int) -> int:
    """Bytes to add to the PC after handling an exception of class ``ec``."""
    if ec == EC_HVC64:
        return 0  # preferred return address is already past the HVC
    if ec in (EC_DABT_LOWER, EC_SMC64, EC_WFX, EC_SYSREG):
        return INSN_SIZE
    raise GuestFault(f"exception class {ec:#x} is not resumable by the VMM")


@dataclass(frozen=True)
class DataAbort:
    """A decoded data abort on an unmapped (MMIO) address."""

    size: int  # bytes: 1, 2, 4 or 8
    srt: int  # transfer register, 31 = XZR
    write: bool
    sign_extend: bool  # SSE: loads sign-extend to the register width
    sixty_four: bool  # SF: the register is X (64-bit), else W (32-bit)


def decode_data_abort(esr: int) -> DataAbort:
    """Decode ESR_EL2 of a lower-EL data abort (EC 0x24). Raises :class:`GuestFault` when the
    syndrome is not valid (ISV=0: e.g. a load/store pair or a writeback form on MMIO, which the
    VMM cannot emulate without decoding the instruction) or it is a cache-maintenance op."""
    ec = exception_class(esr)
    if ec != EC_DABT_LOWER:
        raise GuestFault(f"not a data abort (EC {ec:#x})")
    if not esr & (1 << 24):
        raise GuestFault(f"MMIO access without a valid syndrome (ESR {esr:#x}); not emulated")
    if esr & (1 << 8):
        raise GuestFault(f"cache maintenance on MMIO (ESR {esr:#x})")
    if esr & (1 << 7):
        raise GuestFault(f"stage-1 page-table walk fault on MMIO (ESR {esr:#x})")
    return DataAbort(
        size=1 << ((esr >> 22) & 0x3),
        srt=(esr >> 16) & 0x1F,
        write=bool(esr & (1 << 6)),
        sign_extend=bool(esr & (1 << 21)),
        sixty_four=bool(esr & (1 << 15)),
    )


def mmio_write_value(abort: DataAbort, reg_value: int) -> int:
    """The value a store writes: X[SRT] truncated to the access size (XZR stores 0)."""
    if abort.srt == XZR:
        return 0
    return reg_value & ((1 << (8 * abort.size)) - 1)


def mmio_read_result(abort: DataAbort, data: int) -> int | None:
    """The register value after a load that read ``data`` from the device, or None for XZR
    (the result is discarded). Sign-extends when SSE is set; a W register gets its upper half 0."""
    if abort.srt == XZR:
        return None
    bits = 8 * abort.size
    data &= (1 << bits) - 1
    width = 64 if abort.sixty_four else 32
    if abort.sign_extend and data >> (bits - 1):
        data -= 1 << bits
    return data & ((1 << width) - 1)


# PSCI (Arm DEN0022): function ids of 0.2/1.0 and return codes.
PSCI_VERSION = 0x8400_0000
PSCI_CPU_SUSPEND_64 = 0xC400_0001
PSCI_CPU_OFF = 0x8400_0002
PSCI_CPU_ON_32 = 0x8400_0003
PSCI_CPU_ON_64 = 0xC400_0003
PSCI_AFFINITY_INFO_32 = 0x8400_0004
PSCI_AFFINITY_INFO_64 = 0xC400_0004
PSCI_MIGRATE_INFO_TYPE = 0x8400_0006
PSCI_SYSTEM_OFF = 0x8400_0008
PSCI_SYSTEM_RESET = 0x8400_0009
PSCI_FEATURES = 0x8400_000A

PSCI_SUCCESS = 0
PSCI_NOT_SUPPORTED = -1
PSCI_INVALID_PARAMETERS = -2
PSCI_ALREADY_ON = -4
PSCI_VERSION_1_0 = 0x0001_0000
AFFINITY_ON, AFFINITY_OFF = 0, 1
MIGRATE_NOT_REQUIRED = 2  # "Trusted OS not present or does not require migration"

_SUPPORTED = frozenset(
    {
        PSCI_VERSION,
        PSCI_CPU_OFF,
        PSCI_CPU_ON_32,
        PSCI_CPU_ON_64,
        PSCI_AFFINITY_INFO_32,
        PSCI_AFFINITY_INFO_64,
        PSCI_MIGRATE_INFO_TYPE,
        PSCI_SYSTEM_OFF,
        PSCI_SYSTEM_RESET,
        PSCI_FEATURES,
    }
)


@dataclass(frozen=True)
class PsciResult:
    """What a PSCI call returns in x0 and what the VMM must do. ``action``: None, "off" (this
    vCPU stops), "cpu-on" (start ``target`` at ``entry`` with x0=``context``), "system-off",
    "system-reset"."""

    x0: int  # as the guest sees it (64-bit two's complement)
    action: str | None = None
    target: int = 0
    entry: int = 0
    context: int = 0


def _ret(code: int) -> int:
    return code & 0xFFFF_FFFF_FFFF_FFFF


def psci_call(x0: int, x1: int, x2: int, x3: int, cpus_on: dict[int, bool]) -> PsciResult:
    """Handle one PSCI call (function id ``x0``, arguments ``x1``-``x3``). ``cpus_on`` maps each
    vCPU's MPIDR affinity (Aff0-Aff3 bits) to whether it is running. Unknown ids return
    NOT_SUPPORTED, as the spec requires (the guest probes with them)."""
    fn = x0 & 0xFFFF_FFFF
    if fn == PSCI_VERSION:
        return PsciResult(PSCI_VERSION_1_0)
    if fn == PSCI_FEATURES:
        return PsciResult(PSCI_SUCCESS if (x1 & 0xFFFF_FFFF) in _SUPPORTED else _ret(-1))
    if fn == PSCI_MIGRATE_INFO_TYPE:
        return PsciResult(MIGRATE_NOT_REQUIRED)
    if fn == PSCI_CPU_OFF:
        return PsciResult(PSCI_SUCCESS, "off")
    if fn == PSCI_SYSTEM_OFF:
        return PsciResult(PSCI_SUCCESS, "system-off")
    if fn == PSCI_SYSTEM_RESET:
        return PsciResult(PSCI_SUCCESS, "system-reset")
    if fn in (PSCI_CPU_ON_32, PSCI_CPU_ON_64):
        target = x1 & 0xFF_00FF_FFFF
        if target not in cpus_on:
            return PsciResult(_ret(PSCI_INVALID_PARAMETERS))
        if cpus_on[target]:
            return PsciResult(_ret(PSCI_ALREADY_ON))
        if fn == PSCI_CPU_ON_32:
            x2, x3 = x2 & 0xFFFF_FFFF, x3 & 0xFFFF_FFFF
        return PsciResult(PSCI_SUCCESS, "cpu-on", target=target, entry=x2, context=x3)
    if fn in (PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64):
        if x2 != 0:  # lowest affinity level: only level 0 (one vCPU) is supported
            return PsciResult(_ret(PSCI_INVALID_PARAMETERS))
        target = x1 & 0xFF_00FF_FFFF
        if target not in cpus_on:
            return PsciResult(_ret(PSCI_INVALID_PARAMETERS))
        return PsciResult(AFFINITY_ON if cpus_on[target] else AFFINITY_OFF)
    return PsciResult(_ret(PSCI_NOT_SUPPORTED))


# CNTV_CTL_EL0 bits.
CNTV_ENABLE = 1 << 0
CNTV_IMASK = 1 << 1
CNTV_ISTATUS = 1 << 2
VTIMER_PPI_INTID = 27  # virtual timer PPI 11 = INTID 27 (layout.TIMER_PPIS[2] + 16)


def timer_firing(ctl: int) -> bool:
    """The timer's output line: enabled, condition met, not masked by the guest."""
    return bool(ctl & CNTV_ENABLE and ctl & CNTV_ISTATUS and not ctl & CNTV_IMASK)


class Vtimer:
    """The vtimer mask protocol (Hypervisor.framework ``hv_vcpu_set_vtimer_mask`` docs; QEMU
    ``hvf_sync_vtimer``). A VTIMER_ACTIVATED exit masks the timer in the framework: the VMM raises
    the PPI and keeps the mask until the guest's timer condition clears (on a later exit CNTV_CTL
    no longer shows a firing timer), then lowers the line and unmasks, so one expiry is delivered
    once and a re-armed timer can exit again."""

    def __init__(self) -> None:
        self.masked = False  # mirror of the framework's mask
        self.line = False  # level of the virtual-timer PPI we drive

    def activated(self) -> list[tuple[str, bool]]:
        """A VTIMER_ACTIVATED exit: the framework has masked the timer. Returns actions."""
        self.masked = True
        self.line = True
        return [("irq", True)]

    def sync(self, ctl: int) -> list[tuple[str, bool]]:
        """On every other exit, with the guest's current CNTV_CTL_EL0: unmask once it is quiet."""
        if not self.masked or timer_firing(ctl):
            return []
        self.masked = False
        self.line = False
        return [("irq", False), ("mask", False)]


def wfi_ticks(ctl: int, cval: int, now: int) -> int | None:
    """How many counter ticks a WFI may sleep: until the virtual timer's deadline CNTV_CVAL (0 if
    it has passed), or None when no timer can wake the vCPU (disabled or masked by the guest): then
    only an interrupt, i.e. a kick, ends the sleep (the caller still bounds each wait)."""
    if not ctl & CNTV_ENABLE or ctl & CNTV_IMASK:
        return None
    return max(0, cval - now)
