"""Identity-mapped page tables for the 64-bit entry: PML4 at 0x9000, one PDPT, 2 MiB pages.

The kernel builds its own tables early; these only have to cover what it touches before
that (itself, the zero page, the command line, the initrd), so the low 4 GiB by default.
"""

from __future__ import annotations

import struct

from ...memory import GuestMemory
from . import layout

PRESENT = 0x1
WRITABLE = 0x2
PAGE_SIZE_2M = 0x80  # PS bit in a page-directory entry
GIB = 1 << 30


def build_page_tables(gib: int = 4) -> dict[int, bytes]:
    """{gpa: 4 KiB page} for a PML4 -> PDPT -> ``gib`` page directories of 2 MiB pages."""
    if not 1 <= gib <= 4:
        raise ValueError(f"identity map covers 1 to 4 GiB, not {gib}")
    pml4 = bytearray(4096)
    struct.pack_into("<Q", pml4, 0, layout.PDPT_ADDR | PRESENT | WRITABLE)
    pdpt = bytearray(4096)
    pages = {layout.PML4_ADDR: bytes(pml4)}
    for g in range(gib):
        pd_addr = layout.PD_ADDR + g * 4096
        struct.pack_into("<Q", pdpt, 8 * g, pd_addr | PRESENT | WRITABLE)
        pd = struct.pack(
            "<512Q",
            *(((g * GIB) + (i << 21)) | PRESENT | WRITABLE | PAGE_SIZE_2M for i in range(512)),
        )
        pages[pd_addr] = pd
    pages[layout.PDPT_ADDR] = bytes(pdpt)
    return pages


def write_page_tables(mem: GuestMemory, gib: int = 4) -> int:
    """Write the tables and return CR3."""
    for gpa, page in build_page_tables(gib).items():
        mem.write(gpa, page)
    return layout.PML4_ADDR


def translate(mem: GuestMemory, cr3: int, vaddr: int) -> int | None:
    """Walk the tables in guest memory (4-level, 2 MiB or 4 KiB leaves); None if unmapped."""
    table = cr3 & ~0xFFF
    for shift in (39, 30, 21, 12):
        entry = mem.read_u64(table + 8 * ((vaddr >> shift) & 0x1FF))
        if not entry & PRESENT:
            return None
        frame = entry & 0x000F_FFFF_FFFF_F000
        if shift in (30, 21) and entry & PAGE_SIZE_2M:
            mask = (1 << shift) - 1
            return (frame & ~mask) | (vaddr & mask)
        table = frame
    return table | (vaddr & 0xFFF)
