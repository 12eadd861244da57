"""The boot GDT at 0x500 and the segment / control-register state for the first instruction.

Two entry modes:
- 64-bit (bzImage, ELF e_entry): long mode, CR0 PE|PG, CR4 PAE, EFER LME|LMA, CR3 at the
  identity map, CS a 64-bit code segment;
- PVH: 32-bit protected mode, flat segments, paging off (CR0 PE only), as the PVH ABI says.

Descriptors are built from Firecracker-style 16-bit flag words (type/S/DPL/P in bits 0-7,
AVL/L/DB/G in bits 12-15); :func:`segment_from_descriptor` derives the KVM view of each one
so that the GDT in memory and the hidden segment state agree. :class:`Segment` is the one
plain-data ``struct kvm_segment`` of the VMM (``kvm.Segment`` is this class).
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

from ...memory import GuestMemory
from . import layout

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18

# (flags, base, limit) per GDT slot.
GDT_LONG = [(0, 0, 0), (0xA09B, 0, 0xFFFFF), (0xC093, 0, 0xFFFFF), (0x808B, 0, 0xFFFFF)]
GDT_PVH = [(0, 0, 0), (0xC09B, 0, 0xFFFFFFFF), (0xC093, 0, 0xFFFFFFFF), (0x008B, 0, 0x67)]


@dataclass
class Segment:
    """The fields of ``struct kvm_segment``."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the KVM field name
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def asdict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class BootSregs:
    """What the VMM puts into ``kvm_sregs`` before the first KVM_RUN."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    cr0: int
    cr3: int
    cr4: int
    efer: int


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode one 8-byte segment descriptor."""
    return (
        ((base & 0xFF00_0000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0x000F_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0x0000_FFFF)
    )


def segment_from_descriptor(index: int, descriptor: int) -> Segment:
    """Decode a descriptor into the hidden segment state KVM expects."""
    base = ((descriptor >> 16) & 0xFF_FFFF) | ((descriptor >> 32) & 0xFF00_0000)
    limit = (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF_0000)
    g = (descriptor >> 55) & 1
    present = (descriptor >> 47) & 1
    return Segment(
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=index * 8,
        type=(descriptor >> 40) & 0xF,
        present=present,
        dpl=(descriptor >> 45) & 3,
        db=(descriptor >> 54) & 1,
        s=(descriptor >> 44) & 1,
        l=(descriptor >> 53) & 1,
        g=g,
        avl=(descriptor >> 52) & 1,
        unusable=0 if present else 1,
    )


def build_gdt(pvh: bool = False) -> list[int]:
    return [gdt_entry(*e) for e in (GDT_PVH if pvh else GDT_LONG)]


def write_gdt(mem: GuestMemory, pvh: bool = False) -> list[int]:
    """Write the GDT at 0x500 and an empty IDT at 0x520; return the descriptors."""
    gdt = build_gdt(pvh)
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write(layout.IDT_ADDR, bytes(8))
    return gdt


def boot_sregs(pvh: bool = False, cr3: int = layout.PML4_ADDR) -> BootSregs:
    """Segment and control registers for the kernel's first instruction."""
    gdt = build_gdt(pvh)
    code = segment_from_descriptor(1, gdt[1])
    data = segment_from_descriptor(2, gdt[2])
    tss = segment_from_descriptor(3, gdt[3])
    if pvh:
        # The PVH ABI: a busy 32-bit TSS is what VMX insists on for TR in protected mode.
        tss.type = 0xB
        cr0, cr3_value, cr4, efer = CR0_PE | CR0_ET, 0, 0, 0
    else:
        cr0, cr3_value, cr4, efer = CR0_PE | CR0_ET | CR0_PG, cr3, CR4_PAE, EFER_LME | EFER_LMA
    return BootSregs(
        cs=code,
        ds=Segment(**data.asdict()),
        es=Segment(**data.asdict()),
        fs=Segment(**data.asdict()),
        gs=Segment(**data.asdict()),
        ss=Segment(**data.asdict()),
        tr=tss,
        gdt_base=layout.GDT_ADDR,
        gdt_limit=len(gdt) * 8 - 1,
        idt_base=layout.IDT_ADDR,
        idt_limit=7,
        cr0=cr0,
        cr3=cr3_value,
        cr4=cr4,
        efer=efer,
    )
