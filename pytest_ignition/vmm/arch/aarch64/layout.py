"""Fixed guest-physical addresses of the aarch64 machine (QEMU ``virt``'s low map, Firecracker's
RAM base).

RAM starts at 2 GiB, so everything below is MMIO: the GICv3 distributor and one 128 KiB
redistributor frame pair per vCPU, the UART, the boot timer, and 4 KiB virtio-mmio slots. SPI
numbers follow QEMU virt (UART SPI 1, virtio from SPI 16), so a guest sees the same interrupt
wiring under both engines. The kernel goes at the start of RAM (a 2 MiB-aligned base plus the
Image's ``text_offset``), the device tree at the end of RAM, the initrd just below it.
"""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30

DRAM_START = 0x8000_0000
DRAM_MAX = 256 * GIB  # up to the 40-bit IPA space KVM gives a VM by default (type 0)

GIC_DIST_ADDR = 0x0800_0000
GIC_DIST_SIZE = 0x1_0000
GIC_REDIST_ADDR = 0x080A_0000
GIC_REDIST_SIZE = 0x2_0000  # RD_base + SGI_base frames (64 KiB each) per vCPU
UART_ADDR = 0x0900_0000
UART_SIZE = 0x1000
UART_CLOCK_HZ = 1_843_200
BOOT_TIMER_ADDR = 0x0903_0000  # announced to the guest as ignition.boot_timer=0x9030000
VIRTIO_MMIO_BASE = 0x0A00_0000
VIRTIO_MMIO_SLOT = 0x1000
VIRTIO_MMIO_SLOTS = 32
MMIO_END = DRAM_START

# The redistributors must end below the UART: at most this many vCPUs.
MAX_VCPUS = (UART_ADDR - GIC_REDIST_ADDR) // GIC_REDIST_SIZE

# Interrupt numbers: SPIs count from INTID 32; PPIs are per-CPU INTIDs 16-31.
SPI_BASE_INTID = 32
UART_SPI = 1
VIRTIO_SPI_BASE = 16
GIC_NR_IRQS = 128  # INTIDs 0-127 (SPIs 0-95), a multiple of 32 as the vGIC wants
# armv8 timer PPIs (secure phys, non-secure phys, virtual, hypervisor): INTID - 16
TIMER_PPIS = (13, 14, 11, 10)
GIC_MAINTENANCE_PPI = 9

FDT_MAX_SIZE = 2 * MIB  # booting.rst: the DTB must not exceed 2 MiB
FDT_ALIGN = 8
KERNEL_ALIGN = 2 * MIB
INITRD_ALIGN = 0x1000


def redist_size(vcpus: int) -> int:
    """The redistributor region for ``vcpus`` vCPUs."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"{vcpus} vCPUs: this machine takes 1..{MAX_VCPUS}")
    return vcpus * GIC_REDIST_SIZE


def virtio_slot(index: int) -> tuple[int, int]:
    """(MMIO address, SPI) of virtio-mmio slot ``index``."""
    if not 0 <= index < VIRTIO_MMIO_SLOTS:
        raise ValueError(f"virtio slot {index}: there are {VIRTIO_MMIO_SLOTS}")
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT, VIRTIO_SPI_BASE + index


def mpidr(index: int) -> int:
    """The MPIDR affinity KVM gives vCPU ``index`` (Aff0 = index % 16, Aff1 = index / 16).

    The device tree's ``cpu@N`` ``reg`` and the redistributor order must agree with it.
    """
    return ((index >> 4) & 0xFF) << 8 | (index & 0xF)


def fdt_addr(mem_size: int) -> int:
    """Where the device tree goes: the last 2 MiB of RAM (8-byte aligned by construction)."""
    if mem_size < 64 * MIB:
        raise ValueError(f"{mem_size} bytes of RAM: the aarch64 machine needs at least 64 MiB")
    return DRAM_START + mem_size - FDT_MAX_SIZE


def initrd_addr(mem_size: int, initrd_size: int, kernel_end: int) -> int:
    """The initrd's address: page-aligned, just below the device tree, above the kernel."""
    top = fdt_addr(mem_size)
    addr = (top - initrd_size) & ~(INITRD_ALIGN - 1)
    if addr < kernel_end:
        raise ValueError(
            f"an initrd of {initrd_size} bytes does not fit between the kernel (ends at "
            f"{kernel_end:#x}) and the device tree ({top:#x}): give the VM more memory"
        )
    return addr
