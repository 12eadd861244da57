"""A flattened device tree (DTB, version 17) writer and the aarch64 machine's tree.

:class:`FdtWriter` emits the binary format of the devicetree specification (header, memory
reservation block, structure block of BEGIN_NODE/PROP/END_NODE tokens, strings block), big
endian throughout. :func:`machine_fdt` describes this VMM's machine (see :mod:`.layout`):
memory, cpus with the PSCI enable method, ``psci`` over HVC (KVM implements PSCI in-kernel),
the GICv3 distributor and redistributors, the armv8 timer PPIs, an ns16550a UART, the
virtio-mmio devices and ``chosen`` (bootargs, initrd, stdout-path). Pure Python; the tests
decode its output with ``dtc -I dtb -O dts``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from . import layout as L

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE, FDT_END_NODE, FDT_PROP, FDT_END = 1, 2, 3, 9
FDT_VERSION, FDT_LAST_COMP_VERSION = 17, 16
HEADER_SIZE = 40

_NODE_NAME = re.compile(r"^[A-Za-z0-9,._+-]{1,31}(@[A-Za-z0-9,._+-]+)?$")
_PROP_NAME = re.compile(r"^[A-Za-z0-9,._+?#-]{1,31}$")

# interrupt specifier cells for "arm,gic-v3": <type number flags>
GIC_SPI, GIC_PPI = 0, 1
IRQ_EDGE_RISING, IRQ_LEVEL_HIGH = 1, 4
GIC_PHANDLE = 1


class FdtError(ValueError):
    """A malformed tree: bad names, unbalanced nodes, or too big."""


class FdtWriter:
    """Builds one DTB. Nodes nest with :meth:`node` (a context manager) or begin/end."""

    def __init__(self, max_size: int = L.FDT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._struct = bytearray()
        self._strings = bytearray()
        self._string_offsets: dict[str, int] = {}
        self._reserve: list[tuple[int, int]] = []
        self._depth = 0
        self._done = False

    # -- structure --------------------------------------------------------------------------

    def _token(self, tok: int) -> None:
        self._struct += struct.pack(">I", tok)

    def _pad(self) -> None:
        self._struct += b"\0" * (-len(self._struct) % 4)

    def begin_node(self, name: str) -> None:
        if self._done:
            raise FdtError("the tree is finished")
        if self._depth == 0 and name != "":
            raise FdtError("the first node is the root, named ''")
        if self._depth > 0 and not _NODE_NAME.match(name):
            raise FdtError(f"bad node name {name!r}")
        if self._depth == 0 and self._struct:
            raise FdtError("a tree has one root node")
        self._token(FDT_BEGIN_NODE)
        self._struct += name.encode() + b"\0"
        self._pad()
        self._depth += 1

    def end_node(self) -> None:
        if self._depth == 0:
            raise FdtError("end_node without a node")
        self._token(FDT_END_NODE)
        self._depth -= 1

    @contextmanager
    def node(self, name: str) -> Iterator[None]:
        self.begin_node(name)
        yield
        self.end_node()

    def reserve(self, address: int, size: int) -> None:
        """A memory reservation entry (memory the OS must not use)."""
        self._reserve.append((address, size))

    # -- properties -------------------------------------------------------------------------

    def _name_offset(self, name: str) -> int:
        if name not in self._string_offsets:
            self._string_offsets[name] = len(self._strings)
            self._strings += name.encode() + b"\0"
        return self._string_offsets[name]

    def prop(self, name: str, value: bytes = b"") -> None:
        if self._depth == 0:
            raise FdtError(f"property {name!r} outside a node")
        if not _PROP_NAME.match(name):
            raise FdtError(f"bad property name {name!r}")
        self._token(FDT_PROP)
        self._struct += struct.pack(">II", len(value), self._name_offset(name))
        self._struct += value
        self._pad()

    def prop_u32(self, name: str, *values: int) -> None:
        self.prop(name, b"".join(struct.pack(">I", v) for v in values))

    def prop_u64(self, name: str, *values: int) -> None:
        self.prop(name, b"".join(struct.pack(">Q", v) for v in values))

    def prop_str(self, name: str, *values: str) -> None:
        """A string, or with several values a string list."""
        for v in values:
            if "\0" in v:
                raise FdtError(f"property {name!r}: a NUL inside a string")
        self.prop(name, b"".join(v.encode() + b"\0" for v in values))

    def prop_reg(self, name: str, *pairs: tuple[int, int]) -> None:
        """(address, size) pairs in 2+2 cells, as under a root with #address-cells = 2."""
        self.prop_u64(name, *(x for pair in pairs for x in pair))

    # -- the blob ---------------------------------------------------------------------------

    def finish(self, boot_cpuid: int = 0) -> bytes:
        if self._depth != 0:
            raise FdtError(f"{self._depth} node(s) left open")
        if not self._struct:
            raise FdtError("an empty tree")
        self._token(FDT_END)
        self._done = True
        rsv = b"".join(struct.pack(">QQ", a, s) for a, s in self._reserve) + b"\0" * 16
        off_rsv = HEADER_SIZE  # 8-aligned
        off_struct = off_rsv + len(rsv)
        off_strings = off_struct + len(self._struct)
        total = off_strings + len(self._strings)
        header = struct.pack(
            ">10I",
            FDT_MAGIC,
            total,
            off_struct,
            off_strings,
            off_rsv,
            FDT_VERSION,
            FDT_LAST_COMP_VERSION,
            boot_cpuid,
            len(self._strings),
            len(self._struct),
        )
        blob = header + rsv + bytes(self._struct) + bytes(self._strings)
        if len(blob) > self.max_size:
            raise FdtError(f"device tree of {len(blob)} bytes exceeds {self.max_size}")
        return blob


@dataclass(frozen=True)
class VirtioNode:
    """One virtio-mmio transport: its MMIO address and SPI (see :func:`layout.virtio_slot`)."""

    addr: int
    spi: int
    size: int = L.VIRTIO_MMIO_SLOT


def _irq(kind: int, number: int, flags: int) -> tuple[int, int, int]:
    return kind, number, flags


def machine_fdt(
    mem_size: int,
    vcpus: int,
    cmdline: str,
    *,
    initrd: tuple[int, int] | None = None,
    virtio: Sequence[VirtioNode] = (),
    uart_spi: int | None = L.UART_SPI,
) -> bytes:
    """The device tree of the aarch64 machine.

    ``initrd`` is (start, end) in guest-physical addresses; ``uart_spi`` None leaves the
    UART without an interrupt (the 8250 driver polls it then).
    """
    if not 0 < mem_size <= L.DRAM_MAX:
        raise FdtError(f"memory size {mem_size} out of range")
    redist = L.redist_size(vcpus)
    w = FdtWriter()
    with w.node(""):
        w.prop_u32("#address-cells", 2)
        w.prop_u32("#size-cells", 2)
        w.prop_str("compatible", "linux,dummy-virt")
        w.prop_str("model", "pytest-ignition aarch64")
        w.prop_u32("interrupt-parent", GIC_PHANDLE)
        with w.node("chosen"):
            w.prop_str("bootargs", cmdline)
            w.prop_str("stdout-path", f"/uart@{L.UART_ADDR:x}")
            if initrd is not None:
                start, end = initrd
                if not L.DRAM_START <= start <= end <= L.DRAM_START + mem_size:
                    raise FdtError(f"initrd {start:#x}-{end:#x} is not inside RAM")
                w.prop_u64("linux,initrd-start", start)
                w.prop_u64("linux,initrd-end", end)
        with w.node(f"memory@{L.DRAM_START:x}"):
            w.prop_str("device_type", "memory")
            w.prop_reg("reg", (L.DRAM_START, mem_size))
        with w.node("cpus"):
            w.prop_u32("#address-cells", 1)
            w.prop_u32("#size-cells", 0)
            for i in range(vcpus):
                with w.node(f"cpu@{L.mpidr(i):x}"):
                    w.prop_str("device_type", "cpu")
                    w.prop_str("compatible", "arm,arm-v8")
                    w.prop_str("enable-method", "psci")
                    w.prop_u32("reg", L.mpidr(i))
        with w.node("psci"):
            w.prop_str("compatible", "arm,psci-0.2")
            w.prop_str("method", "hvc")
        with w.node(f"intc@{L.GIC_DIST_ADDR:x}"):
            w.prop_str("compatible", "arm,gic-v3")
            w.prop_u32("#interrupt-cells", 3)
            w.prop("interrupt-controller")
            w.prop_u32("#address-cells", 2)  # for ITS children (none today), as on QEMU virt
            w.prop_u32("#size-cells", 2)
            w.prop("ranges")
            w.prop_reg("reg", (L.GIC_DIST_ADDR, L.GIC_DIST_SIZE), (L.GIC_REDIST_ADDR, redist))
            w.prop_u32("#redistributor-regions", 1)
            w.prop_u32("phandle", GIC_PHANDLE)
            w.prop_u32("interrupts", *_irq(GIC_PPI, L.GIC_MAINTENANCE_PPI, IRQ_LEVEL_HIGH))
        with w.node("timer"):
            w.prop_str("compatible", "arm,armv8-timer")
            w.prop("always-on")
            cells = [c for ppi in L.TIMER_PPIS for c in _irq(GIC_PPI, ppi, IRQ_LEVEL_HIGH)]
            w.prop_u32("interrupts", *cells)
        with w.node(f"uart@{L.UART_ADDR:x}"):
            w.prop_str("compatible", "ns16550a")
            w.prop_reg("reg", (L.UART_ADDR, L.UART_SIZE))
            w.prop_u32("clock-frequency", L.UART_CLOCK_HZ)
            if uart_spi is not None:
                w.prop_u32("interrupts", *_irq(GIC_SPI, uart_spi, IRQ_LEVEL_HIGH))
        seen: set[int] = set()
        for dev in virtio:
            if dev.addr in seen:
                raise FdtError(f"two virtio devices at {dev.addr:#x}")
            seen.add(dev.addr)
            if not 0 <= dev.spi < L.GIC_NR_IRQS - L.SPI_BASE_INTID:
                raise FdtError(f"SPI {dev.spi} out of range")
            with w.node(f"virtio_mmio@{dev.addr:x}"):
                w.prop_str("compatible", "virtio,mmio")
                w.prop_reg("reg", (dev.addr, dev.size))
                w.prop_u32("interrupts", *_irq(GIC_SPI, dev.spi, IRQ_EDGE_RISING))
                w.prop("dma-coherent")
    return w.finish()
