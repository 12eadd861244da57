"""Assembling a microVM: guest memory, the KVM VM and vCPUs, buses, devices, threads.

:class:`Machine` owns one VM from creation to teardown:

- memory: :class:`GuestMemory` with one KVM slot per region (dirty logging optional);
- the VM: TSS and identity-map pages, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT;
- boot layout: kernel, initrd, command line, zero page / PVH info, MP table, page tables
  (:mod:`.x86_64.boot`); the command line gets one ``virtio_mmio.device=4K@0x<addr>:<irq>``
  per virtio device;
- vCPUs: normalised CPUID, boot MSRs, LAPIC LINT0 = ExtINT / LINT1 = NMI, and for vCPU 0
  the entry registers; one :class:`VcpuRunner` thread each;
- devices: PIO bus (8250 UART at 0x3f8 on IRQ 4, i8042 at 0x60/0x64), MMIO bus (the boot
  timer at 0xd0000000 when asked, virtio-mmio slots from 0xd0001000 on IRQs 5+ through
  irqfds); backends run on an :class:`EventLoop` thread.

Lifecycle: ``created`` -> ``running`` <-> ``paused`` -> ``stopped``. The first vCPU to stop
(guest reboot via i8042, triple fault, SYSTEM_EVENT, an error, or :meth:`shutdown`) stops
the others; :meth:`wait` returns the exit status: 0 for a guest power-off/reboot or a
requested shutdown, 1 for anything that means the VM broke (KVM internal error, failed
entry, crash).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import kvm
from .devices.bus import Bus
from .eventloop import EventLoop
from .memory import GuestMemory
from .vcpu import StopReason, VcpuRunner
from .x86_64 import boot, cpuid, layout, mptable, msrs

log = logging.getLogger(__name__)

MiB = 1 << 20
FALLBACK_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
UART_PORT = 0x3F8
UART_IRQ = 4
I8042_PORT = 0x60
I8042_LEN = 5
KVM_CAP_TSC_DEADLINE_TIMER = 72  # 0x60..0x64: data port, and the command/status port at 0x64

# Stop reasons that end the VM the way its guest or owner intended.
CLEAN_STOPS = frozenset({"requested", "shutdown", "reset", "triple_fault", "halt"})


class MachineError(Exception):
    """The VM cannot be built (bad spec, kernel, KVM capability); the message says what."""


def default_cmdline() -> str:
    try:
        from pytest_ignition.guest import DEFAULT_CMDLINE
    except ImportError:
        return FALLBACK_CMDLINE
    return DEFAULT_CMDLINE


@dataclass
class MachineSpec:
    """What to boot and with which devices."""

    kernel: str
    initrd: str | None = None
    mem_size: int = 512 * MiB
    cpus: int = 1
    cmdline: str | None = None  # None: pytest_ignition.guest.DEFAULT_CMDLINE
    vsock: str | None = None  # Unix socket path (Firecracker convention)
    vsock_cid: int = 3
    disks: list[str] = field(default_factory=list)
    disk_read_only: bool = False
    rng: bool = True
    boot_timer: bool = False
    log_dirty: bool = False
    # time.monotonic_ns() when the VM was launched (the boot timer measures from it);
    # None: when the Machine is constructed.
    launch_ns: int | None = None
    kvm_device: str = kvm.KVM_DEVICE
    # The serial console: bytes the guest writes go to ``console_out`` (a binary file or a
    # callable); bytes readable on ``console_in`` (an fd) go to the guest.
    console_out: BinaryIO | Callable[[bytes], object] | None = None
    console_in: int | None = None

    def __post_init__(self) -> None:
        if self.mem_size < 16 * MiB or self.mem_size % 4096:
            raise MachineError(f"memory size {self.mem_size} must be >= 16 MiB and page-aligned")
        if not 1 <= self.cpus <= mptable.MAX_CPUS:
            raise MachineError(f"--cpus {self.cpus}: must be 1..{mptable.MAX_CPUS}")


class _Irqfd:
    """An eventfd routed to a GSI: a write raises the (edge-triggered) interrupt."""

    def __init__(self, vm: kvm.Vm, gsi: int):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.gsi = gsi
        vm.register_irqfd(self.fd, gsi)

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except (BlockingIOError, OSError, ValueError):
            pass  # counter saturated (the interrupt is pending anyway) or already closed

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Machine:
    """One microVM. Build with :meth:`create` (idle) or :meth:`boot` (created and started)."""

    def __init__(self, spec: MachineSpec, system: kvm.System | None = None):
        self.spec = spec
        self.state = "created"
        self.created_at = time.monotonic()
        self.created_ns = time.monotonic_ns()
        self.started_at: float | None = None
        self.stop_reason: StopReason | None = None
        self.exit_status: int | None = None
        self.virtio_devices: list[tuple[int, int, Any]] = []  # (addr, irq, transport)
        self.cmdline = ""
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._irqfds: list[_Irqfd] = []
        self._closers: list[Callable[[], object]] = []
        self.runners: list[VcpuRunner] = []
        self.boot_timer = None
        self.uart = None
        self.i8042 = None
        self._own_system = system is None
        self.system = system or kvm.System(spec.kvm_device)
        self.vm: kvm.Vm | None = None
        self.mem: GuestMemory | None = None
        self.loop = EventLoop("vmm-events")
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, spec: MachineSpec, system: kvm.System | None = None) -> Machine:
        return cls(spec, system)

    @classmethod
    def boot(cls, spec: MachineSpec, system: kvm.System | None = None) -> Machine:
        m = cls(spec, system)
        try:
            m.start()
        except BaseException:
            m.close()
            raise
        return m

    def _build(self) -> None:
        spec = self.spec
        vm = self.vm = self.system.create_vm()
        # VMX needs these three pages + one outside RAM before the first vCPU exists.
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        try:
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        except kvm.KvmError as e:
            log.debug("identity map address not settable (%s); KVM's default is used", e)
        vm.create_irqchip()
        vm.create_pit2()

        try:
            mem = self.mem = GuestMemory.anonymous(spec.mem_size)
        except OSError as e:
            raise MachineError(
                f"cannot map {spec.mem_size >> 20} MiB of guest memory: {e.strerror or e}"
            ) from None
        for slot, r in enumerate(mem.regions):
            vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr, log_dirty=spec.log_dirty)

        self.pio = Bus("pio", 1 << 16)
        self.mmio = Bus("mmio")
        self._add_legacy_devices()
        self._add_virtio_devices()

        base = spec.cmdline if spec.cmdline is not None else default_cmdline()
        parts = [base.strip()] if base.strip() else []
        parts += [f"virtio_mmio.device=4K@{addr:#x}:{irq}" for addr, irq, _ in self.virtio_devices]
        self.cmdline = " ".join(parts)
        self.boot_setup = boot.prepare(
            mem,
            spec.kernel,
            cmdline=self.cmdline,
            initrd_path=spec.initrd,
            num_cpus=spec.cpus,
        )
        self._create_vcpus()

    def _add_legacy_devices(self) -> None:
        from .devices import legacy

        spec = self.spec
        out = spec.console_out
        if out is not None and not callable(out):
            f = out

            def out(data: bytes) -> None:
                try:
                    f.write(data)
                    f.flush()
                except (OSError, ValueError):
                    pass  # the console reader went away; the guest keeps running

        vm = self.vm
        self.uart = legacy.Serial8250(out, irq=lambda level: vm.irq_line(UART_IRQ, level))
        self.pio.insert(self.uart, UART_PORT, 8)
        if spec.console_in is not None:
            fd = spec.console_in

            def on_input() -> None:
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    self.loop.remove_reader(fd)  # EOF: the guest sees no more input
                    return
                self.uart.feed(data)

            try:
                self.loop.add_reader(fd, on_input)
            except PermissionError:
                # epoll refuses regular files and /dev/null: there is no interactive input.
                log.debug("console input fd %d cannot be polled; the console is output-only", fd)
        self.i8042 = legacy.I8042(self._guest_reset)
        self.pio.insert(self.i8042, I8042_PORT, I8042_LEN)
        if spec.boot_timer:
            start_ns = spec.launch_ns if spec.launch_ns is not None else self.created_ns
            self.boot_timer = legacy.BootTimer(start_ns)
            self.mmio.insert(self.boot_timer, layout.BOOT_TIMER_ADDR, 0x1000)

    def _add_virtio_devices(self) -> None:
        spec = self.spec
        devices: list[Any] = []
        if spec.vsock:
            try:
                from .devices.virtio.vsock import VirtioVsock
            except ImportError as e:
                raise MachineError(f"virtio-vsock is not available in this build: {e}") from None
            try:
                vsock = VirtioVsock(spec.vsock, self.loop, guest_cid=spec.vsock_cid)
            except OSError as e:
                raise MachineError(f"vsock socket {spec.vsock!r}: {e.strerror or e}") from None
            except ValueError as e:
                raise MachineError(f"vsock: {e}") from None
            devices.append(vsock)
            self._closers.append(vsock.close)
        for path in spec.disks:
            from .devices.virtio.blk import VirtioBlk

            try:
                devices.append(VirtioBlk(path, read_only=spec.disk_read_only))
            except OSError as e:
                raise MachineError(f"disk {path!r}: {e.strerror or e}") from None
        if spec.rng:
            from .devices.virtio.rng import VirtioRng

            devices.append(VirtioRng())
        for dev in devices:
            self.add_virtio(dev)

    def add_virtio(self, device: Any) -> tuple[int, int]:
        """Put a virtio device in the next MMIO slot with the next IRQ; returns (addr, irq)."""
        from .devices.virtio.mmio import MmioTransport

        n = len(self.virtio_devices)
        addr = layout.VIRTIO_MMIO_BASE + n * layout.VIRTIO_MMIO_SLOT
        irq = layout.VIRTIO_IRQ_BASE + n
        if irq >= mptable.NUM_IRQS:
            raise MachineError(f"too many virtio devices: IRQ {irq} is past the IOAPIC's 24 pins")
        irqfd = _Irqfd(self.vm, irq)
        self._irqfds.append(irqfd)
        transport = MmioTransport(device, self.mem, irqfd.trigger)
        self.mmio.insert(transport, addr, layout.VIRTIO_MMIO_SLOT)
        self.virtio_devices.append((addr, irq, transport))
        closer = getattr(device, "close", None)
        if closer is not None and closer not in self._closers:
            self._closers.append(closer)
        return addr, irq

    def _create_vcpus(self) -> None:
        spec = self.spec
        supported = [
            cpuid.CpuidEntry(**dataclasses.asdict(e)) for e in self.system.supported_cpuid()
        ]
        try:
            cap = getattr(kvm, "KVM_CAP_TSC_DEADLINE_TIMER", KVM_CAP_TSC_DEADLINE_TIMER)
            tsc_deadline = bool(self.system.check_extension(cap))
        except kvm.KvmError:
            tsc_deadline = False
        setup = self.boot_setup
        for i in range(spec.cpus):
            vcpu = self.vm.create_vcpu(i)
            table = cpuid.normalise(supported, i, spec.cpus, tsc_deadline=tsc_deadline)
            vcpu.set_cpuid2([kvm.CpuidEntry(**dataclasses.asdict(e)) for e in table])
            self._set_msrs(vcpu)
            vcpu.set_lapic(msrs.set_lint(vcpu.get_lapic()))
            vcpu.set_fpu(kvm.fpu_bytes(**setup.fpu))
            if i == 0:
                self._set_boot_registers(vcpu)
            runner = VcpuRunner(vcpu, self.pio, self.mmio, self._on_vcpu_stop)
            self.runners.append(runner)

    def _set_msrs(self, vcpu: kvm.Vcpu) -> None:
        wanted = dict(msrs.boot_msrs())
        n = vcpu.set_msrs(wanted, strict=False)
        if n < len(wanted):
            # KVM stops at the first MSR it refuses: set the rest one at a time, say which.
            for index, value in list(wanted.items())[n:]:
                if vcpu.set_msrs({index: value}, strict=False) != 1:
                    log.warning("vcpu%d: KVM refused MSR %#x = %#x", vcpu.index, index, value)

    def _set_boot_registers(self, vcpu: kvm.Vcpu) -> None:
        setup = self.boot_setup
        regs = kvm.Regs(**setup.regs)
        vcpu.set_regs(regs)
        s = vcpu.get_sregs()
        b = setup.sregs
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
            setattr(s, name, kvm.Segment(**getattr(b, name).asdict()))
        s.gdt = kvm.DTable(b.gdt_base, b.gdt_limit)
        s.idt = kvm.DTable(b.idt_base, b.idt_limit)
        s.cr0, s.cr3, s.cr4, s.efer = b.cr0, b.cr3, b.cr4, b.efer
        vcpu.set_sregs(s)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self.state != "created":
                raise MachineError(f"cannot start a machine that is {self.state}")
            self.state = "running"
            self.started_at = time.monotonic()
        self.loop.start()
        for r in self.runners:
            r.start()

    def pause(self) -> None:
        with self._lock:
            if self.state != "running":
                raise MachineError(f"cannot pause a machine that is {self.state}")
            for r in self.runners:
                if not r.pause():
                    raise MachineError(f"{r.name} did not pause")
            self.state = "paused"

    def resume(self) -> None:
        """Continue a paused VM, or start one that was created and never started."""
        if self.state == "created":
            self.start()
            return
        with self._lock:
            if self.state != "paused":
                raise MachineError(f"cannot resume a machine that is {self.state}")
            for r in self.runners:
                r.resume()
            self.state = "running"

    def shutdown(self, timeout: float | None = 5.0) -> int | None:
        """Stop the vCPUs (the guest gets no notice) and return the exit status (None if the
        vCPUs did not stop within ``timeout``)."""
        if self.state == "created":
            self._finish(StopReason("requested", "shut down before start"))
        for r in self.runners:
            r.request_stop()
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the VM stopped; returns the exit status, or None on timeout."""
        if not self._stopped.wait(timeout):
            return None
        for r in self.runners:
            r.join(5.0)
        return self.exit_status

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def _guest_reset(self) -> None:
        """The i8042 pulsed the reset line: the guest asked to reboot, which ends the VM."""
        reason = StopReason("reset", "guest reset through the i8042 controller", 0)
        for r in self.runners:
            r.request_stop(reason)

    def _on_vcpu_stop(self, reason: StopReason) -> None:
        # Runs on the stopping vCPU's thread: record, stop the others, never block on them.
        first = self._finish(reason)
        if first:
            for r in self.runners:
                if r.vcpu.index != reason.vcpu:
                    r.request_stop(StopReason("requested", f"vcpu{reason.vcpu} stopped"))

    def _finish(self, reason: StopReason, quiet: bool = False) -> bool:
        with self._lock:
            if self.stop_reason is not None:
                return False
            self.stop_reason = reason
            self.exit_status = 0 if reason.kind in CLEAN_STOPS else 1
            self.state = "stopped"
        if quiet:
            pass
        elif reason.kind in CLEAN_STOPS:
            log.info("VM stopped: %s", reason)
        else:
            log.error("VM stopped: %s", reason)
        self._stopped.set()
        return True

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        st: dict[str, Any] = {
            "state": self.state,
            "uptime_s": round(now - self.started_at, 6) if self.started_at else 0.0,
            "cpus": self.spec.cpus,
            "mem_bytes": self.spec.mem_size,
            "kernel_kind": self.boot_setup.kernel.kind if hasattr(self, "boot_setup") else None,
            "cmdline": self.cmdline,
            "virtio": [
                {"addr": f"{a:#x}", "irq": q, "type": type(t.device).__name__}
                for a, q, t in self.virtio_devices
            ],
        }
        bt = self.boot_timer
        if bt is not None and getattr(bt, "boot_time_us", None) is not None:
            st["boot_time_us"] = bt.boot_time_us
        if self.stop_reason is not None:
            st["stop_reason"] = {"kind": self.stop_reason.kind, "detail": self.stop_reason.detail}
            st["exit_status"] = self.exit_status
        return st

    def close(self) -> None:
        """Stop everything and release KVM, memory, fds. Idempotent."""
        for r in self.runners:
            if r.running:
                r.request_stop()
        for r in self.runners:
            r.join(5.0)
        # Devices first: their close may hand work to the loop, which runs it before stopping.
        for c in self._closers:
            try:
                c()
            except Exception:
                log.exception("device close failed")
        self._closers.clear()
        try:
            self.loop.stop()
        except Exception:
            log.exception("event loop stop failed")
        for f in self._irqfds:
            f.close()
        self._irqfds.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self._own_system:
            self.system.close()
        if self.stop_reason is None:
            self._finish(StopReason("requested", "closed"), quiet=True)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
