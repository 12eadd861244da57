"""Tiny 64-bit guests whose code runs at CPL3 with IOPL=3, for testing the VMM on any KVM.

On PVM (this project's CI machines) CPL0 guest code is emulated at ~1 us per instruction
but CPL3 runs natively, and with IOPL=3 user code can still do port I/O, which exits to the
VMM (PVM drops IOPL, so the TSS carries an I/O bitmap allowing every port; see
:func:`build_tss`). So these guests never run at CPL0: the vCPU starts directly in long mode at CPL3, with
identity page tables (2 MiB user pages over the low 4 GiB, the MMIO gap included so MMIO
accesses reach the VMM), a GDT with user code/data segments, and a TSS (VM entry wants one).

There is no IDT: any exception triple-faults, which the run loop reports as
``triple_fault``. A guest ends by writing its result byte to :data:`EXIT_PORT`
(``out 0xf4, al``, as with QEMU's isa-debug-exit), which stops the vCPU.

Guest physical layout (all below 1 MiB except the code and stack):
``0x500`` GDT, ``0x1000`` TSS with an all-ports I/O bitmap (to ``0x3069``), ``0x9000`` PML4, ``0xa000`` PDPT, ``0xb000``-``0xefff`` four page
directories, ``CODE_ADDR`` the test's bytes, ``STACK_TOP`` the user stack (grows down),
``DATA_ADDR`` a scratch page the tests may use.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

from pytest_ignition.vmm import kvm
from pytest_ignition.vmm.devices.bus import Bus
from pytest_ignition.vmm.memory import GuestMemory
from pytest_ignition.vmm.vcpu import StopReason, VcpuRunner

GDT_ADDR = 0x500
TSS_ADDR = 0x1000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four consecutive page directories: 4 GiB of 2 MiB pages
CODE_ADDR = 0x10_0000
DATA_ADDR = 0x18_0000
STACK_TOP = 0x1F_F000

EXIT_PORT = 0xF4

TSS_IOMAP_OFFSET = 0x68
TSS_LIMIT = TSS_IOMAP_OFFSET + 0x10000 // 8  # inclusive limit: covers the bitmap's 0xff tail

SEL_KCODE = 0x08
SEL_KDATA = 0x10
SEL_UDATA = 0x18 | 3
SEL_UCODE = 0x20 | 3
SEL_TSS = 0x28

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_IOPL3 = 3 << 12

PTE_P, PTE_RW, PTE_US, PTE_PS = 1, 2, 4, 0x80


def _gdt_entry(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack(
        "<HHBBBB",
        limit & 0xFFFF,
        base & 0xFFFF,
        (base >> 16) & 0xFF,
        access,
        ((limit >> 16) & 0xF) | (flags << 4),
        (base >> 24) & 0xFF,
    )


def build_tss() -> bytes:
    """A 64-bit TSS whose I/O permission bitmap allows every port.

    IOPL=3 alone is not enough everywhere: PVM keeps the guest's IOPL at 0, and then the
    CPU consults this bitmap (a clear bit allows the port), so it must cover all 64Ki ports.
    """
    head = bytearray(TSS_IOMAP_OFFSET)
    struct.pack_into("<H", head, 0x66, TSS_IOMAP_OFFSET)
    return bytes(head) + b"\0" * (0x10000 // 8) + b"\xff"  # trailing all-ones byte required


def build_gdt() -> bytes:
    """null, kernel code64, kernel data, user data, user code64, 64-bit TSS (two slots)."""
    tss_limit = TSS_LIMIT
    tss_low = _gdt_entry(TSS_ADDR, tss_limit, 0x89, 0x0)  # present, type 9 (available TSS)
    tss_high = struct.pack("<II", TSS_ADDR >> 32, 0)
    return b"".join(
        [
            b"\0" * 8,
            _gdt_entry(0, 0xFFFFF, 0x9B, 0xA),  # 0x08 ring-0 code, L=1 G=1
            _gdt_entry(0, 0xFFFFF, 0x93, 0xC),  # 0x10 ring-0 data
            _gdt_entry(0, 0xFFFFF, 0xF3, 0xC),  # 0x18 ring-3 data
            _gdt_entry(0, 0xFFFFF, 0xFB, 0xA),  # 0x20 ring-3 code, L=1
            tss_low,
            tss_high,
        ]
    )


def write_page_tables(mem: GuestMemory) -> None:
    """Identity-map [0, 4 GiB) with user-accessible, writable 2 MiB pages."""
    mem.write_u64(PML4_ADDR, PDPT_ADDR | PTE_P | PTE_RW | PTE_US)
    for i in range(4):
        mem.write_u64(PDPT_ADDR + 8 * i, (PD_ADDR + 0x1000 * i) | PTE_P | PTE_RW | PTE_US)
    entries = bytearray()
    for j in range(4 * 512):
        entries += struct.pack("<Q", (j << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS)
    mem.write(PD_ADDR, bytes(entries))


def segment(selector: int, *, code: bool, dpl: int) -> kvm.Segment:
    return kvm.Segment(
        base=0,
        limit=0xFFFFFFFF,
        selector=selector,
        type=0xB if code else 0x3,  # execute/read accessed | read/write accessed
        present=1,
        dpl=dpl,
        db=0 if code else 1,
        s=1,
        l=1 if code else 0,
        g=1,
    )


def cpl3_sregs(base: kvm.Sregs) -> kvm.Sregs:
    """Long mode, paging on, CS/SS/DS/... = the ring-3 selectors."""
    s = base
    s.cs = segment(SEL_UCODE, code=True, dpl=3)
    data = segment(SEL_UDATA, code=False, dpl=3)
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.tr = kvm.Segment(base=TSS_ADDR, limit=TSS_LIMIT, selector=SEL_TSS, type=0xB, present=1)
    s.ldt = kvm.Segment(selector=0, type=0x2, present=1, limit=0xFFFF)
    s.gdt = kvm.DTable(GDT_ADDR, len(build_gdt()) - 1)
    s.idt = kvm.DTable(0, 0)
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    s.cr3 = PML4_ADDR
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    s.efer = EFER_SCE | EFER_LME | EFER_LMA
    return s


class ExitPort:
    """PIO device at :data:`EXIT_PORT`: a write records the byte and stops the vCPU."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.runner: VcpuRunner | None = None

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = b"\0" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(int.from_bytes(data, "little"))
        if self.runner is not None:
            self.runner.request_stop(StopReason("requested", f"exit port {data.hex()}"))


class Cpl3Guest:
    """A one-vCPU VM with ``code`` at :data:`CODE_ADDR`, ready to :meth:`run`.

    ``pio``/``mmio`` are the buses the run loop dispatches to; tests insert devices first.
    """

    def __init__(
        self,
        system: kvm.System,
        code: bytes,
        *,
        mem_size: int = 4 << 20,
        irqchip: bool = False,
        log_dirty: bool = False,
    ):
        if len(code) > DATA_ADDR - CODE_ADDR:
            raise ValueError("code too large")
        self.system = system
        self.runner: VcpuRunner | None = None
        self.vm = system.create_vm()
        self.mem = GuestMemory.anonymous(mem_size)
        try:
            if irqchip:  # KVM's PIC + IOAPIC (+ PIT), as a real machine has
                self.vm.set_tss_addr(0xFFFB_D000)
                self.vm.create_irqchip()
                self.vm.create_pit2()
            for slot, region in enumerate(self.mem.regions):
                self.vm.set_user_memory_region(
                    slot, region.gpa, region.size, region.host_addr, log_dirty=log_dirty
                )
            self.mem.write(GDT_ADDR, build_gdt())
            self.mem.write(TSS_ADDR, build_tss())
            write_page_tables(self.mem)
            self.mem.write(CODE_ADDR, code)
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(system.supported_cpuid())
            self.vcpu.set_sregs(cpl3_sregs(self.vcpu.get_sregs()))
            self.vcpu.set_regs(kvm.Regs(rip=CODE_ADDR, rsp=STACK_TOP, rflags=0x2 | RFLAGS_IOPL3))
        except BaseException:
            self.close()
            raise
        self.pio = Bus("pio", 0x10000)
        self.mmio = Bus("mmio")
        self.exit_port = ExitPort()
        self.pio.insert(self.exit_port, EXIT_PORT, 1)
        self.stopped = threading.Event()

    def start(self, on_stop: Callable[[StopReason], None] | None = None) -> VcpuRunner:
        def stopped(reason: StopReason) -> None:
            if on_stop is not None:
                on_stop(reason)
            self.stopped.set()

        self.runner = VcpuRunner(self.vcpu, self.pio, self.mmio, stopped)
        self.exit_port.runner = self.runner
        self.runner.start()
        return self.runner

    def run(self, timeout: float = 10.0) -> StopReason:
        """Run until the vCPU stops; a guest still running after ``timeout`` is stopped."""
        runner = self.start()
        if not self.stopped.wait(timeout):
            runner.stop()
            raise TimeoutError(f"CPL3 guest still running after {timeout}s (rip stuck?)")
        runner.join(5)
        assert runner.stop_reason is not None
        return runner.stop_reason

    def close(self) -> None:
        if self.runner is not None and self.runner.running:
            self.runner.stop()
        self.vm.close()
        self.mem.close()


def timed_setup(system: kvm.System, mem_size: int) -> float:
    """Seconds for KVM_CREATE_VM + one memory slot of ``mem_size`` + a vCPU in long mode."""
    t0 = time.perf_counter()
    g = Cpl3Guest(system, b"\xeb\xfe", mem_size=mem_size)
    dt = time.perf_counter() - t0
    g.close()
    return dt


def measure_pio_exits(system: kvm.System, n: int = 10_000) -> list[int]:
    """Nanoseconds between consecutive ``out`` exits of a guest looping ``n`` times over
    ``out dx, al``, as seen by a device on the run loop's bus: one full PIO exit round trip
    (KVM exit, Python dispatch, device call, KVM_RUN re-entry) per sample."""
    code = b"".join(
        [
            b"\xb9" + struct.pack("<I", n),  # mov ecx, n
            b"\x66\xba\x00\x05",  # mov dx, 0x500
            b"\xee",  # again: out dx, al
            b"\xe2\xfd",  # loop again
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    stamps: list[int] = []

    class Stamp:
        def read(self, offset: int, data: bytearray) -> None:
            pass

        def write(self, offset: int, data: bytes) -> None:
            stamps.append(time.perf_counter_ns())

    g = Cpl3Guest(system, code)
    try:
        g.pio.insert(Stamp(), 0x500, 1)
        g.run(timeout=600)
    finally:
        g.close()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
