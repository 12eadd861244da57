"""The boot information handed to the kernel: the e820 map, the zero page, PVH start info.

- 64-bit boot protocol: ``struct boot_params`` (4 KiB, at 0x7000) with the setup header
  copied from the bzImage (or a synthetic one for an ELF kernel), the command line and
  initrd pointers, and the e820 table.
- PVH: ``struct hvm_start_info`` (at 0x6000), a module list entry for the initrd and the
  memory map as ``hvm_memmap_table_entry`` records (at 0x7000).
"""

from __future__ import annotations

import struct

from ...memory import GuestMemory
from . import layout

E820_RAM = 1
E820_RESERVED = 2
E820_MAX_ENTRIES_ZEROPAGE = 128

ZERO_PAGE_SIZE = 4096
# Offsets inside struct boot_params (arch/x86/include/uapi/asm/bootparam.h).
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
# Offsets of setup-header fields, relative to the start of boot_params.
HDR_BOOT_FLAG = 0x1FE
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_KERNEL_ALIGNMENT = 0x230
HDR_CMDLINE_SIZE = 0x238

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
TYPE_OF_LOADER_UNDEFINED = 0xFF

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_SIZE = 56
HVM_MODLIST_ENTRY_SIZE = 32
HVM_MEMMAP_ENTRY_SIZE = 24


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: RAM below the EBDA, the BIOS area reserved, RAM from
    1 MiB to the MMIO gap (or the end of RAM), and RAM above 4 GiB."""
    entries: list[tuple[int, int, int]] = []
    low = mem.regions[0]
    low_end = min(low.end, layout.MMIO_START)
    if low_end < layout.BIOS_END:
        raise ValueError(f"guest RAM ({low_end:#x} bytes) must extend past 1 MiB")
    entries.append((0, layout.EBDA_START, E820_RAM))
    entries.append((layout.EBDA_START, layout.BIOS_END - layout.EBDA_START, E820_RESERVED))
    entries.append((layout.BIOS_END, low_end - layout.BIOS_END, E820_RAM))
    for r in mem.regions[1:]:
        entries.append((r.gpa, r.size, E820_RAM))
    return entries


def synthetic_setup_header() -> bytes:
    """A setup header for kernels without one (ELF vmlinux entered at its 64-bit entry)."""
    zp = bytearray(ZERO_PAGE_SIZE)
    struct.pack_into("<H", zp, HDR_BOOT_FLAG, 0xAA55)
    zp[HDR_MAGIC : HDR_MAGIC + 4] = b"HdrS"
    struct.pack_into("<H", zp, HDR_VERSION, 0x020C)
    zp[HDR_LOADFLAGS] = LOADED_HIGH
    struct.pack_into("<I", zp, HDR_KERNEL_ALIGNMENT, 0x0100_0000)
    struct.pack_into("<I", zp, HDR_CMDLINE_SIZE, 2047)
    return bytes(zp[BP_SETUP_HEADER:0x26C])


def build_zero_page(
    setup_header: bytes | None,
    *,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    e820: list[tuple[int, int, int]],
) -> bytes:
    """struct boot_params for the 64-bit entry; ``setup_header`` is the raw bytes from 0x1f1."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ValueError(
            f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}"
        )
    hdr = setup_header if setup_header is not None else synthetic_setup_header()
    if BP_SETUP_HEADER + len(hdr) > BP_E820_TABLE - 0x40:
        raise ValueError(f"setup header of {len(hdr)} bytes is too long")
    zp = bytearray(ZERO_PAGE_SIZE)
    zp[BP_SETUP_HEADER : BP_SETUP_HEADER + len(hdr)] = hdr
    zp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    zp[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    # The heap is only used by the real-mode setup code, which the 64-bit entry skips;
    # the value is the conventional end of a 0x8000-byte setup segment minus the stack.
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, cmdline_addr)
    ramdisk_image, ramdisk_size = initrd if initrd else (0, 0)
    if ramdisk_image >= layout.FOUR_GIB or ramdisk_size >= layout.FOUR_GIB:
        raise ValueError("initrd must sit below 4 GiB")
    struct.pack_into("<II", zp, HDR_RAMDISK_IMAGE, ramdisk_image, ramdisk_size)
    zp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, addr, size, kind)
    return bytes(zp)


def write_zero_page(mem: GuestMemory, zero_page: bytes) -> int:
    mem.write(layout.ZERO_PAGE_ADDR, zero_page)
    return layout.ZERO_PAGE_ADDR


def parse_e820(zero_page: bytes) -> list[tuple[int, int, int]]:
    """The e820 table stored in a zero page (tests and diagnostics)."""
    n = zero_page[BP_E820_ENTRIES]
    return [struct.unpack_from("<QQI", zero_page, BP_E820_TABLE + 20 * i) for i in range(n)]


def write_pvh_start_info(
    mem: GuestMemory,
    *,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    e820: list[tuple[int, int, int]],
) -> int:
    """Write hvm_start_info (version 1, with a memory map) and return its address (for RBX)."""
    memmap = bytearray()
    for addr, size, kind in e820:
        memmap += struct.pack("<QQII", addr, size, kind, 0)
    if len(memmap) > layout.PML4_ADDR - layout.PVH_MEMMAP_ADDR:
        raise ValueError("PVH memory map does not fit below the page tables")
    nr_modules = 0
    if initrd:
        mem.write(layout.PVH_MODLIST_ADDR, struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0))
        nr_modules = 1
    info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,  # version 1: memmap_paddr/memmap_entries are valid
        0,
        nr_modules,
        layout.PVH_MODLIST_ADDR if nr_modules else 0,
        cmdline_addr,
        0,  # no ACPI RSDP: the kernel finds the MP table
        layout.PVH_MEMMAP_ADDR,
        len(e820),
        0,
    )
    assert len(info) == HVM_START_INFO_SIZE
    mem.write(layout.PVH_MEMMAP_ADDR, bytes(memmap))
    mem.write(layout.PVH_INFO_ADDR, info)
    return layout.PVH_INFO_ADDR
