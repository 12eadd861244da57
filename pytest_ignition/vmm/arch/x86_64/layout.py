"""Fixed guest-physical addresses of the x86_64 boot layout (Firecracker-compatible).

Everything the VMM writes before the first instruction lives below 1 MiB except the kernel
(from 1 MiB) and the initrd (top of low RAM). See docs/architecture.md.
"""

from __future__ import annotations

from ...memory import FOUR_GIB, MMIO_START

GDT_ADDR = 0x500  # null, code, data, TSS descriptors
IDT_ADDR = 0x520  # an empty IDT (limit 7): any exception before the kernel's own IDT triple-faults
PVH_INFO_ADDR = 0x6000  # struct hvm_start_info (PVH boot only)
PVH_MODLIST_ADDR = 0x6040  # one hvm_modlist_entry for the initrd
PVH_MEMMAP_ADDR = 0x7000  # hvm_memmap_table_entry[] (PVH boot only; the zero page is unused then)
ZERO_PAGE_ADDR = 0x7000  # struct boot_params
BOOT_STACK_POINTER = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # up to four page directories: 0xb000..0xefff
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # the page-table/zero-page area below and the EBDA above bound it
EBDA_START = 0x9FC00  # MP floating pointer + config table; RAM below 640 KiB ends here
BIOS_END = 0x100000
HIMEM_START = 0x100000  # where a relocatable bzImage's protected-mode kernel goes

# VMX needs a three-page TSS for real-mode emulation and a one-page identity map, inside the
# 32-bit space but outside RAM and clear of every device: the top of the MMIO gap, above the
# LAPIC page (the addresses QEMU uses too).
KVM_TSS_ADDR = 0xFEFF_D000
KVM_IDENTITY_MAP_ADDR = 0xFEFF_C000

BOOT_TIMER_ADDR = MMIO_START
VIRTIO_MMIO_BASE = MMIO_START + 0x1000
VIRTIO_MMIO_SLOT = 0x1000
VIRTIO_IRQ_BASE = 5
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

__all__ = [
    "BIOS_END",
    "BOOT_STACK_POINTER",
    "BOOT_TIMER_ADDR",
    "CMDLINE_ADDR",
    "CMDLINE_MAX",
    "EBDA_START",
    "FOUR_GIB",
    "GDT_ADDR",
    "HIMEM_START",
    "IDT_ADDR",
    "IOAPIC_ADDR",
    "KVM_IDENTITY_MAP_ADDR",
    "KVM_TSS_ADDR",
    "LAPIC_ADDR",
    "MMIO_START",
    "PD_ADDR",
    "PDPT_ADDR",
    "PML4_ADDR",
    "PVH_INFO_ADDR",
    "PVH_MEMMAP_ADDR",
    "PVH_MODLIST_ADDR",
    "VIRTIO_IRQ_BASE",
    "VIRTIO_MMIO_BASE",
    "VIRTIO_MMIO_SLOT",
    "ZERO_PAGE_ADDR",
]
