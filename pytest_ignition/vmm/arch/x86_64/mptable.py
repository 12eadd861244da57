"""The Intel MultiProcessor table (spec 1.4): how a guest without ACPI finds its CPUs,
the IOAPIC and the ISA interrupt routing.

Layout at the EBDA (0x9fc00): the 16-byte floating pointer, then the configuration table
(header, one processor entry per vCPU, the ISA bus, the IOAPIC, IRQs 0-23 routed 1:1 to
IOAPIC pins, LINT0 = ExtINT and LINT1 = NMI). Both structures checksum to zero.
"""

from __future__ import annotations

import struct

from ...memory import GuestMemory
from . import layout

MAX_CPUS = 254  # the IOAPIC takes APIC id num_cpus, and 0xff is broadcast
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
NUM_IRQS = 24
MPC_SPEC = 4  # revision 1.4

CPU_ENABLED = 0x1
CPU_BOOTPROCESSOR = 0x2
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
# Family 6 model 1 stepping 3, FPU + APIC: what the kernel only prints.
DEFAULT_CPU_SIGNATURE = (6 << 8) | (1 << 4) | 3
DEFAULT_FEATURE_FLAGS = (1 << 0) | (1 << 9)

FLOATING_SIZE = 16
HEADER_SIZE = 44


def _checksum_byte(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def mptable_size(num_cpus: int) -> int:
    return FLOATING_SIZE + HEADER_SIZE + 20 * num_cpus + 8 + 8 + 8 * NUM_IRQS + 8 * 2


def build_mptable(
    num_cpus: int,
    base: int = layout.EBDA_START,
    cpu_signature: int = DEFAULT_CPU_SIGNATURE,
    feature_flags: int = DEFAULT_FEATURE_FLAGS,
) -> bytes:
    """The floating pointer followed by the configuration table, to be written at ``base``."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"MP table supports 1 to {MAX_CPUS} vCPUs, not {num_cpus}")
    ioapic_id = num_cpus
    entries = bytearray()
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += struct.pack(
            "<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION, flags, cpu_signature, feature_flags
        )
    entries += struct.pack("<BB6s", MP_BUS, 0, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR)
    for irq in range(NUM_IRQS):
        # Polarity/trigger 0: "conforms to the bus", i.e. ISA edge/active-high.
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, 0, irq, ioapic_id, irq)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, 0, 0, 0xFF, 1)
    count = num_cpus + 2 + NUM_IRQS + 2
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            HEADER_SIZE + len(entries),
            MPC_SPEC,
            0,
            b"IGNITION",
            b"000000000000",
            0,
            0,
            count,
            layout.LAPIC_ADDR,
            0,
            0,
            0,
        )
    )
    table = header + entries
    table[7] = _checksum_byte(table)
    config_addr = base + FLOATING_SIZE
    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", config_addr, 1, MPC_SPEC, 0, 0))
    floating[10] = _checksum_byte(floating)
    out = bytes(floating + table)
    assert len(out) == mptable_size(num_cpus)
    return out


def write_mptable(mem: GuestMemory, num_cpus: int, **kw: int) -> int:
    table = build_mptable(num_cpus, layout.EBDA_START, **kw)
    if layout.EBDA_START + len(table) > layout.BIOS_END:
        raise ValueError("MP table does not fit below 1 MiB")
    mem.write(layout.EBDA_START, table)
    return layout.EBDA_START
