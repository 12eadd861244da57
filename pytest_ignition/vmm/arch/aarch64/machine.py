"""The aarch64 microVM, one machine over the hypervisor layer: KVM on arm64 Linux, Hypervisor.framework
on macOS.

:class:`Aarch64Machine` talks to the hypervisor only through :mod:`...hypervisor.base`
(``HypervisorVm``/``HypervisorVcpu``), never to KVM or the framework; :func:`hypervisor_factory`
picks the backend: ``kvm`` (:mod:`...hypervisor.kvm_aarch64`, proven in the arm64 nested
harness by tests/nested_arm64) or ``hvf`` (:mod:`...hypervisor.hvf`, EXPERIMENTAL: never run on
a Mac, tested here against a fake framework). The process around it is ``python -m
pytest_ignition.vmm boot|restore`` (``vmm/__main__.py``: on an aarch64 host with KVM; the engine
starts ``python -m pytest_ignition.vmm.machine_aarch64 ... --hypervisor hvf`` on a Mac).

- memory: one RAM region at ``layout.DRAM_START`` (2 GiB), mapped in the hypervisor's granule
  (4 KiB on KVM, 16 KiB on HVF); a restore maps ``memory.bin`` privately;
- boot: the arm64 ``Image`` at a 2 MiB-aligned base + ``text_offset``, the initrd and the device
  tree at the end of RAM (:mod:`.layout`, :mod:`.image`, :mod:`.fdt`), vCPU 0 entered at the
  Image with x0 = the DTB; secondaries wait powered off for PSCI ``CPU_ON`` (in KVM, or here
  for HVF); the kernel command line gets ``ignition.boot_timer=0x9030000`` (the guest's init
  writes its byte there) and loses ``reboot=`` (PSCI resets);
- devices: the 16550 UART (SPI 1, level), the boot timer, virtio-mmio slots from ``0x0a000000``
  (SPI 16+, edge pulses) for vsock, disks, rng and net in the x86 machine's order, on an MMIO
  bus; backends on an :class:`EventLoop`;
- vCPUs: one thread each that creates its vCPU (HVF binds a vCPU to its creating thread) and
  runs every call on it; pause = kick + park, with a deadline;
- snapshot: vCPU states, the interrupt controller's blob and device state in ``vmstate``
  (tagged ``arch``/``hypervisor``: a restore refuses another's), RAM in ``memory.bin``;
  rollback copies back the granules written since (the hypervisor's dirty tracking + the VMM's
  own writes) from that file.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ... import console
from ...devices.bus import Bus, RateLimitedLog
from ...errors import MachineError
from ...eventloop import EventLoop
from ...hypervisor.arm64_exits import GuestFault
from ...hypervisor.base import Exit, HypervisorVcpu, HypervisorVm
from ...machine_common import MachineRecord, spec_from_config
from ...memory import PAGE_SIZE, GuestMemory, GuestMemoryError, Region
from . import fdt, image
from . import layout as L

log = logging.getLogger(__name__)

MiB = 1 << 20
ARCH = "aarch64"
HYPERVISORS = ("kvm", "hvf")
# The project's guest command line (pytest_ignition.guest.DEFAULT_CMDLINE): the 16550 is ttyS0;
# reset and power-off are PSCI calls, so no reboot= (as the QEMU engine's aarch64 line).
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
CLEAN_STOPS = frozenset({"requested", "shutdown", "reset"})
PAUSE_TIMEOUT_S = 10.0
KICK_EVERY_S = 0.05
IRQ_RECHECK_S = 1.0


@dataclass(frozen=True)
class StopReason:
    kind: str  # "shutdown" | "reset" | "requested" | "error"
    detail: str = ""
    vcpu: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class Aarch64Spec:
    """What to boot (``python -m pytest_ignition.vmm boot``'s options)."""

    kernel: str
    initrd: str | None = None
    mem_size: int = 512 * MiB
    cpus: int = 1
    cmdline: str | None = None
    vsock: str | None = None
    vsock_cid: int = 3
    net: str | None = None
    disks: list[str] = field(default_factory=list)
    disk_read_only: bool = False
    rng: bool = True
    boot_timer: bool = False
    log_dirty: bool = True  # rollback in place needs the hypervisor's dirty tracking
    hypervisor: str = "hvf"
    launch_ns: int | None = None
    console_out: BinaryIO | Callable[[bytes], object] | None = None
    console_in: int | None = None

    def __post_init__(self) -> None:
        if self.mem_size < 64 * MiB or self.mem_size > L.DRAM_MAX:
            raise MachineError(f"memory size {self.mem_size}: the aarch64 machine takes 64 MiB..")
        if not 1 <= self.cpus <= L.MAX_VCPUS:
            raise MachineError(f"--cpus {self.cpus}: must be 1..{L.MAX_VCPUS}")


def round_up(n: int, granule: int) -> int:
    return (n + granule - 1) // granule * granule


def kernel_cmdline(base: str | None, boot_timer: bool) -> str:
    """The guest's command line: ``base`` (default :data:`DEFAULT_CMDLINE`) without ``reboot=``
    (x86's reset method; here PSCI resets), plus where the boot timer is (virtio devices are
    in the device tree, not on the command line)."""
    text = base if base is not None else DEFAULT_CMDLINE
    parts = [a for a in text.split() if not a.startswith("reboot=")]
    if boot_timer:
        parts.append(f"ignition.boot_timer={L.BOOT_TIMER_ADDR:#x}")
    return " ".join(parts)


def hypervisor_factory(
    name: str, cache_dir: Path | None = None, *, kvm_device: str | None = None
) -> Callable[[], HypervisorVm]:
    """The backend called ``name`` (:data:`HYPERVISORS`): a callable that creates the VM."""
    if name == "kvm":

        def make_kvm() -> HypervisorVm:
            from ...hypervisor import kvm
            from ...hypervisor.kvm_aarch64 import KvmArm64Vm

            try:
                return KvmArm64Vm(kvm_device or kvm.KVM_DEVICE)
            except kvm.KvmUnavailable as e:
                raise MachineError(str(e)) from None
            except kvm.KvmError as e:
                raise MachineError(f"cannot create the VM: {e}") from None

        return make_kvm
    if name != "hvf":
        raise MachineError(f"unknown hypervisor {name!r} for the aarch64 machine (kvm, hvf)")

    def make() -> HypervisorVm:
        from ...hypervisor import hvf

        try:
            vm = hvf.HvfVm(cache_dir=cache_dir)
        except (hvf.HvfUnavailable, hvf.HvfError, hvf.hvf_simd.ShimError) as e:
            raise MachineError(str(e)) from None
        _install_fence(vm.simd.ign_fence)
        return vm

    return make


def check_kernel_file(path: str) -> image.ArmImage:
    """The arm64 ``Image`` header of ``path``; :class:`MachineError` saying what it is if not."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MachineError(f"kernel {path!r}: {e.strerror or e}") from None
    try:
        return image.parse_header(data)
    except image.ImageError as e:
        raise MachineError(f"kernel {path!r}: {e}") from None


def _open_base_memory(path: Path, size: int) -> int:
    """An fd of the rollback base's memory file (``size`` bytes), for ``GuestMemory.set_backing``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MachineError(f"cannot open the rollback base memory file {path}: {e}") from None
    try:
        actual = os.fstat(fd).st_size
    except OSError as e:
        os.close(fd)
        raise MachineError(f"{path}: {e}") from None
    if actual != size:
        os.close(fd)
        raise MachineError(f"{path}: memory file is {actual} bytes, guest RAM is {size}")
    return fd


def _install_fence(fence: Callable[[], None]) -> None:
    """Give the virtqueues a real barrier on Apple silicon: ``vmm/barrier.py`` finds no fence
    there (``platform.machine()`` is ``arm64`` and W^X forbids its executable page), so its
    functions are replaced by the shim's ``ign_fence`` (``dmb ish``)."""
    try:
        from ... import barrier
    except ImportError:
        return
    if not getattr(barrier, "HAVE_FENCE", False):
        barrier.mb = barrier.rmb = barrier.wmb = fence
        barrier.HAVE_FENCE = True


class _VcpuThread:
    """The thread that owns one vCPU: creates it, runs every call on it (:meth:`call`) while
    parked, and runs the guest while the machine is running and the vCPU is powered on."""

    def __init__(self, machine: Aarch64Machine, index: int) -> None:
        self.m = machine
        self.index = index
        self.vcpu: HypervisorVcpu | None = None
        self.name = f"vcpu{index}"
        self._cond = threading.Condition()
        self._calls: queue.SimpleQueue[tuple[Callable[[HypervisorVcpu], Any], list[Any]]] = (
            queue.SimpleQueue()
        )
        self.want = "park"  # "run" | "park" | "stop"
        # KVM keeps a powered-off secondary inside KVM_RUN until PSCI CPU_ON: run them all
        self.powered_on = index == 0 or bool(getattr(machine.vm, "psci_in_kernel", False))
        self.parked = threading.Event()
        self.created = threading.Event()
        self.create_error: BaseException | None = None
        self.exits = 0
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)

    # -- from other threads ----------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        if not self.created.wait(timeout):
            raise MachineError(f"{self.name}: the vCPU was not created within {timeout:g} s")
        if self.create_error is not None:
            raise MachineError(f"{self.name}: {self.create_error}") from self.create_error

    def call(self, fn: Callable[[HypervisorVcpu], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(vcpu)`` on this thread (the vCPU must be parked) and return its result."""
        box: list[Any] = []
        done = threading.Event()
        box.append(done)
        self._calls.put((fn, box))
        with self._cond:
            self._cond.notify_all()
        if not done.wait(timeout):
            raise MachineError(f"{self.name}: a call did not complete within {timeout:g} s")
        if len(box) > 2 and isinstance(box[2], BaseException):
            raise box[2]
        return box[1] if len(box) > 1 else None

    def set_want(self, want: str) -> None:
        with self._cond:
            if self.want != "stop":
                self.want = want
            self._cond.notify_all()

    def power_on(self, pc: int, x0: int) -> None:
        """PSCI CPU_ON from another vCPU: enter at ``pc`` with x0 = ``x0`` on the next run."""
        self._calls.put((lambda v: v.set_boot_registers(pc, x0), [threading.Event()]))
        with self._cond:
            self.powered_on = True
            self._cond.notify_all()

    # -- on this thread ---------------------------------------------------------------------
    def _drain_calls(self) -> None:
        while True:
            try:
                fn, box = self._calls.get_nowait()
            except queue.Empty:
                return
            done = box[0]
            try:
                result = fn(self.vcpu)  # type: ignore[arg-type]
                box.append(result)
            except BaseException as e:  # handed to the caller
                box.extend([None, e])
            done.set()

    def _main(self) -> None:
        try:
            self.vcpu = self.m.vm.create_vcpu(self.index)
        except BaseException as e:
            self.create_error = e
            self.created.set()
            return
        self.created.set()
        try:
            while True:
                with self._cond:
                    while True:
                        self._drain_calls()
                        if self.want == "stop":
                            self.parked.set()
                            return
                        if self.want == "run" and self.powered_on:
                            break
                        self.parked.set()
                        self._cond.wait(0.5)
                    self.parked.clear()
                self._drain_calls()  # a CPU_ON's entry registers
                self._run()
        except BaseException as e:  # the VM broke: never a silent thread death
            self.m._stop(StopReason("error", f"{self.name}: {type(e).__name__}: {e}", self.index))
        finally:
            self.parked.set()
            self._destroy()

    def _destroy(self) -> None:
        with contextlib.suppress(Exception):
            if self.vcpu is not None:
                self.vcpu.destroy()

    def _run(self) -> None:
        m, vcpu = self.m, self.vcpu
        assert vcpu is not None
        while self.want == "run" and self.powered_on:
            try:
                ex = vcpu.run()
            except GuestFault as e:
                m._stop(StopReason("error", f"{self.name}: {e}", self.index))
                return
            self.exits += 1
            kind = ex.kind
            if kind == "mmio":
                self._mmio(vcpu, ex)
            elif kind in ("none", "wfi", "canceled"):
                continue
            elif kind == "psci-off":
                m._stop(
                    StopReason("shutdown", "the guest powered off (PSCI SYSTEM_OFF)", self.index)
                )
                return
            elif kind == "psci-reset":
                m._stop(StopReason("reset", "the guest rebooted (PSCI SYSTEM_RESET)", self.index))
                return
            elif kind == "psci-cpu-off":
                with self._cond:
                    self.powered_on = False
                return
            elif kind == "psci-cpu-on":
                d = ex.detail
                m._cpu_on(d["target"], d["entry"], d["context"])
            else:
                m._stop(StopReason("error", f"{self.name}: unexpected exit {kind!r}", self.index))
                return

    def _mmio(self, vcpu: HypervisorVcpu, ex: Exit) -> None:
        bus = self.m.mmio
        if ex.write:
            if not bus.write(ex.address, ex.data.to_bytes(ex.size, "little")):
                self.m._unhandled("write", ex.address, ex.size)
            return
        buf = bytearray(ex.size)
        if not bus.read(ex.address, buf):
            self.m._unhandled("read", ex.address, ex.size)  # reads as zero
        vcpu.complete_mmio_read(int.from_bytes(buf, "little"))


class Aarch64Machine(MachineRecord):
    """One aarch64 microVM on a :class:`HypervisorVm`. Build with :meth:`create` or
    :meth:`restore`; then :meth:`start`, :meth:`pause`/:meth:`resume`, :meth:`snapshot`,
    :meth:`rollback`, :meth:`shutdown`, :meth:`wait`, :meth:`close` (the control socket's
    operations, as :class:`vmm.machine.Machine` offers them)."""

    def __init__(
        self,
        spec: Aarch64Spec,
        hypervisor: Callable[[], HypervisorVm],
        *,
        _restore: Any = None,
    ) -> None:
        self.spec = spec
        self._restore = _restore
        self.state = "created"
        self.created_ns = time.monotonic_ns()
        self.started_at: float | None = None
        self.stop_reason: StopReason | None = None
        self.exit_status: int | None = None
        self.restore_time_us: int | None = None
        self.last_rollback: dict[str, Any] | None = None
        self.cmdline = ""
        self.virtio_devices: list[tuple[int, int, Any]] = []  # (addr, SPI, transport)
        self.uart: Any = None
        self.boot_timer: Any = None
        self.interrupts_reraised = 0
        self._lock = threading.Lock()
        self._snap_lock = threading.Lock()
        self._stopped = threading.Event()
        self._closers: list[Callable[[], object]] = []
        self._base_state: dict[str, Any] | None = None
        self._base_memory: Path | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._unhandled_log = RateLimitedLog(log)
        self.threads: list[_VcpuThread] = []
        self.mmio = Bus("mmio")
        self.loop = EventLoop("vmm-events")
        self.mem: GuestMemory | None = None
        self._mm: mmap.mmap | None = None
        self.vm: HypervisorVm | None = None
        try:
            self.vm = hypervisor()
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, spec: Aarch64Spec, hypervisor: Callable[[], HypervisorVm]) -> Aarch64Machine:
        return cls(spec, hypervisor)

    def _build(self) -> None:
        spec, vm = self.spec, self.vm
        assert vm is not None
        size = round_up(spec.mem_size, max(vm.granule, PAGE_SIZE))
        if size != spec.mem_size:
            raise MachineError(
                f"memory size {spec.mem_size} is not a multiple of the hypervisor's "
                f"{vm.granule // 1024} KiB granule (try {size >> 20} MiB)"
            )
        restoring = self._restore is not None
        # a restore: the memory file RAM is privately mapped from, kept open for rollback
        fd = _open_base_memory(self._restore.memory_path, size) if restoring else -1
        try:
            if restoring:
                mm = mmap.mmap(
                    fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            else:
                mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            if isinstance(e, OSError):
                raise MachineError(f"cannot map {size >> 20} MiB of guest memory: {e}") from None
            raise
        self._mm = mm
        # One region; memory.bin holds it from offset 0 (snapshot.write_memory).
        region = Region(L.DRAM_START, size, mm, file_offset=0)
        self.mem = GuestMemory([region])
        if fd >= 0:
            self.mem.set_backing(fd)  # the restore's rollback base (_load_snapshot_state)
        vm.map(L.DRAM_START, region.host_addr, size)
        # HVF: hv_gic_create after the VM, before the first vCPU.
        vm.create_interrupt_controller(spec.cpus)
        self._add_devices()
        for i in range(spec.cpus):
            t = _VcpuThread(self, i)
            self.threads.append(t)
            t.start()
        if restoring:
            self._load_snapshot_state(self._restore)
            return
        self.cmdline = kernel_cmdline(spec.cmdline, spec.boot_timer)
        entry, dtb = self._load_kernel()
        self.threads[0].call(lambda v: v.set_boot_registers(entry, dtb))
        # Dirty tracking starts with the first snapshot (the rollback base): during the boot
        # it would only make every first write fault.

    def _load_kernel(self) -> tuple[int, int]:
        spec, mem = self.spec, self.mem
        assert mem is not None
        try:
            with open(spec.kernel, "rb") as f:
                kernel = f.read()
            initrd = b""
            if spec.initrd:
                with open(spec.initrd, "rb") as f:
                    initrd = f.read()
        except OSError as e:
            raise MachineError(f"cannot read the kernel or initrd: {e}") from None
        try:
            img = image.parse_header(kernel)
        except image.ImageError as e:
            raise MachineError(f"{spec.kernel}: {e}") from None
        load = img.load_addr()
        if img.end() > L.fdt_addr(spec.mem_size):
            raise MachineError(f"the kernel ({img.end() - load} bytes) does not fit in RAM")
        mem.write(load, kernel)
        initrd_range = None
        if initrd:
            try:
                ia = L.initrd_addr(spec.mem_size, len(initrd), img.end())
            except ValueError as e:
                raise MachineError(str(e)) from None
            mem.write(ia, initrd)
            initrd_range = (ia, ia + len(initrd))
        nodes = [fdt.VirtioNode(addr, spi) for addr, spi, _ in self.virtio_devices]
        dtb = fdt.machine_fdt(
            spec.mem_size, spec.cpus, self.cmdline, initrd=initrd_range, virtio=nodes
        )
        fa = L.fdt_addr(spec.mem_size)
        mem.write(fa, dtb)
        return load, fa

    def _add_devices(self) -> None:
        from ...devices import legacy

        spec, vm = self.spec, self.vm
        assert vm is not None and self.mem is not None
        uart_intid = L.SPI_BASE_INTID + L.UART_SPI
        self.uart = legacy.Serial8250(
            console.writer(spec.console_out),
            irq=lambda level: vm.set_irq(uart_intid, bool(level)),
        )
        self.mmio.insert(self.uart, L.UART_ADDR, L.UART_SIZE)
        if spec.console_in is not None:
            fd = spec.console_in
            on_input = console.reader(self.loop, fd, self.uart.feed)
            try:
                self.loop.add_reader(fd, on_input)
            except (PermissionError, OSError, ValueError):
                log.debug("console input fd %d cannot be polled; output only", fd)
        if spec.boot_timer:
            start = spec.launch_ns if spec.launch_ns is not None else self.created_ns
            self.boot_timer = legacy.BootTimer(start)
            self.mmio.insert(self.boot_timer, L.BOOT_TIMER_ADDR, 0x1000)
        devices: list[Any] = []
        if spec.vsock:
            from ...devices.virtio.vsock import VirtioVsock

            try:
                vsock = VirtioVsock(spec.vsock, self.loop, guest_cid=spec.vsock_cid)
            except (OSError, ValueError) as e:
                raise MachineError(f"vsock socket {spec.vsock!r}: {e}") from None
            devices.append(vsock)
            self._closers.append(vsock.close)
        for path in spec.disks:
            from ...devices.virtio.blk import VirtioBlk

            try:
                devices.append(VirtioBlk(path, read_only=spec.disk_read_only))
            except OSError as e:
                raise MachineError(f"disk {path!r}: {e.strerror or e}") from None
        if spec.rng:
            from ...devices.virtio.rng import VirtioRng

            devices.append(VirtioRng())
        if spec.net:
            from ...devices.virtio.net import VirtioNet

            try:
                devices.append(VirtioNet(spec.net, self.loop))
            except (OSError, ValueError) as e:
                raise MachineError(str(e)) from None
        for dev in devices:
            self._add_virtio(dev)

    def _add_virtio(self, device: Any) -> None:
        from ...devices.virtio.mmio import MmioTransport

        vm = self.vm
        assert vm is not None and self.mem is not None
        addr, spi = L.virtio_slot(len(self.virtio_devices))
        intid = L.SPI_BASE_INTID + spi

        def pulse() -> None:  # edge-triggered in the device tree: a rising edge
            vm.set_irq(intid, True)
            vm.set_irq(intid, False)

        transport = MmioTransport(device, self.mem, pulse)
        self.mmio.insert(transport, addr, L.VIRTIO_MMIO_SLOT)
        self.virtio_devices.append((addr, spi, transport))
        closer = getattr(device, "close", None)
        if closer is not None and closer not in self._closers:
            self._closers.append(closer)

    def _unhandled(self, what: str, addr: int, size: int) -> None:
        self._unhandled_log(
            logging.WARNING,
            f"unhandled-{what}",
            "MMIO %s of %d bytes at %#x: no device (reads as zero, writes ignored)",
            what,
            size,
            addr,
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self.state != "created":
                raise MachineError(f"cannot start a machine that is {self.state}")
            self.state = "running"
            self.started_at = time.monotonic()
        if self.virtio_devices:
            self.loop.call_later(IRQ_RECHECK_S, self._watch_interrupts)
        self.loop.start()
        for t in self.threads:
            t.set_want("run")

    def _watch_interrupts(self) -> None:
        """Raise again a virtio interrupt left unacknowledged for a whole period (as the x86
        machine's watchdog: a second edge is harmless)."""
        if self.stopped:
            return
        self.loop.call_later(IRQ_RECHECK_S, self._watch_interrupts)
        if self.state != "running":
            return
        for _, _, t in list(self.virtio_devices):
            with contextlib.suppress(Exception):
                if t.recheck_interrupt():
                    self.interrupts_reraised += 1

    def _kick_until_parked(self, threads: list[_VcpuThread], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        vm = self.vm
        assert vm is not None
        while True:
            running = [t for t in threads if not t.parked.is_set()]
            if not running:
                return
            if time.monotonic() > deadline:
                names = ", ".join(t.name for t in running)
                raise MachineError(f"{names} did not stop running within {timeout:g} s")
            vcpus = [t.vcpu for t in running if t.vcpu is not None]
            with contextlib.suppress(Exception):
                vm.kick(vcpus)
            for t in running:
                t.parked.wait(KICK_EVERY_S)

    def pause(self) -> None:
        with self._lock:
            if self.state != "running":
                raise MachineError(f"cannot pause a machine that is {self.state}")
            for t in self.threads:
                t.set_want("park")
        # Not under the lock: a vCPU stopping the VM meanwhile (_stop) must not wait for us.
        try:
            self._kick_until_parked(self.threads, PAUSE_TIMEOUT_S)
        except MachineError:
            with self._lock:
                if self.state == "running":
                    for t in self.threads:  # still running: not half-paused
                        t.set_want("run")
            raise
        with self._lock:
            if self.state != "running":
                raise MachineError(f"the machine stopped while pausing ({self.stop_reason})")
            self.state = "paused"

    def resume(self) -> None:
        if self.state == "created":
            self.start()
            return
        with self._lock:
            if self.state != "paused":
                raise MachineError(f"cannot resume a machine that is {self.state}")
            self.state = "running"
            for t in self.threads:
                t.set_want("run")

    def _cpu_on(self, mpidr: int, entry: int, context: int) -> None:
        for i, t in enumerate(self.threads):
            if L.mpidr(i) == mpidr:
                t.power_on(entry, context)
                return
        log.warning("PSCI CPU_ON for unknown MPIDR %#x", mpidr)

    def _stop(self, reason: StopReason) -> None:
        """The first stop wins: record it and park every vCPU (from any thread)."""
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            self.exit_status = 0 if reason.kind in CLEAN_STOPS else 1
            self.state = "stopped"
        (log.info if reason.kind in CLEAN_STOPS else log.error)("VM stopped: %s", reason)
        for t in self.threads:
            t.set_want("stop")
        vm = self.vm
        if vm is not None:
            with contextlib.suppress(Exception):
                vm.kick([t.vcpu for t in self.threads if t.vcpu is not None])
        self._stopped.set()

    def shutdown(self, timeout: float | None = 5.0) -> int | None:
        self._stop(StopReason("requested", "shut down"))
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._stopped.wait(timeout):
            return None
        return self.exit_status

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = {
            "state": self.state,
            "arch": ARCH,
            "hypervisor": getattr(self.vm, "name", self.spec.hypervisor),
            "experimental": getattr(self.vm, "name", self.spec.hypervisor) == "hvf",
            "uptime_s": round(time.monotonic() - self.started_at, 6) if self.started_at else 0.0,
            "cpus": self.spec.cpus,
            "mem_bytes": self.spec.mem_size,
            "cmdline": self.cmdline,
            "virtio": [
                {"addr": f"{a:#x}", "irq": L.SPI_BASE_INTID + s, "type": type(t.device).__name__}
                for a, s, t in self.virtio_devices
            ],
            "exits": sum(t.exits for t in self.threads),
            "interrupts_reraised": self.interrupts_reraised,
        }
        return self._add_status_records(st)

    def close(self) -> None:
        """Stop everything and release the VM, memory and fds. Idempotent."""
        if self.stop_reason is None:
            with self._lock:
                if self.stop_reason is None:
                    self.stop_reason = StopReason("requested", "closed")
                    self.exit_status = 0
                    self.state = "stopped"
            self._stopped.set()
        for t in self.threads:
            t.set_want("stop")
        vm = self.vm
        if vm is not None:
            with contextlib.suppress(Exception):
                vm.kick([t.vcpu for t in self.threads if t.vcpu is not None])
        for t in self.threads:
            if t.thread.is_alive():
                t.thread.join(5.0)
        for c in self._closers:
            try:
                c()
            except Exception:
                log.exception("device close failed")
        self._closers.clear()
        with contextlib.suppress(Exception):
            self.loop.stop()
        if vm is not None:
            with contextlib.suppress(Exception):
                vm.destroy()
            self.vm = None
        if self.mem is not None:
            with contextlib.suppress(OSError):
                self.mem.close()  # its one region is self._mm, and the rollback base's file
        elif self._mm is not None:  # GuestMemory was never made around it
            with contextlib.suppress(BufferError, ValueError):
                self._mm.close()
        self._mm = None
        self.mem = None

    def __enter__(self) -> Aarch64Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- snapshot / restore / rollback -----------------------------------------------------------
    @contextlib.contextmanager
    def _quiesced(self, resume: bool = True) -> Iterator[None]:
        state = self.state
        if state not in ("created", "running", "paused"):
            raise MachineError(f"cannot snapshot or roll back a machine that is {state}")
        was_running = state == "running"
        if was_running:
            self.pause()
        try:
            with contextlib.ExitStack() as stack:
                for _, _, t in self.virtio_devices:
                    stack.enter_context(t.device.lock)
                yield
        finally:
            if was_running and resume and not self.stopped:
                self.resume()

    def capture_state(self) -> dict[str, Any]:
        """Everything but RAM, as plain data (vCPUs parked)."""
        from ... import snapshot as snap

        vm, mem = self.vm, self.mem
        assert vm is not None and mem is not None
        vcpu_states = [t.call(lambda v: v.save_state()) for t in self.threads]
        hv_state = vm.state_to_plain(vcpu_states, vm.save_interrupt_controller())
        return {
            "format": snap.FORMAT_VERSION,
            "arch": ARCH,
            "hypervisor": vm.name,
            "id": snap.new_id(),
            "created": time.time(),
            "config": self.config(),
            "fingerprint": self.fingerprint(),
            "memory": {
                "file": snap.MEMORY_FILE,
                "size": mem.size,
                "regions": [[r.gpa, r.size] for r in mem.regions],
            },
            "vm": hv_state,  # the backend's format: vCPU registers, interrupt controller
            "vcpus": [{"mpidr": L.mpidr(t.index)} for t in self.threads],
            "devices": {
                "uart": self.uart.state() if self.uart is not None else None,
                "boot_timer": self.boot_timer.state() if self.boot_timer is not None else None,
                "virtio": [
                    {"addr": a, "irq": s, "type": type(t.device).__name__, "state": t.state()}
                    for a, s, t in self.virtio_devices
                ],
            },
        }

    def snapshot(self, store: Any, name: str, *, settle: float = 0.0) -> Path:
        """Write snapshot ``name`` into ``store`` (pausing a running VM meanwhile) and make it
        the rollback base; ``settle`` as in the x86 machine's."""
        from ... import snapshot as snap

        if not isinstance(store, snap.SnapshotStore):
            store = snap.SnapshotStore(store)
        snap.check_name(name)
        t0 = time.perf_counter()
        self._settle_before_snapshot(name, settle)
        with self._snap_lock, self._quiesced():
            state = self.capture_state()
            file_state, overlays = self._file_state(state)
            mem = self.mem
            assert mem is not None

            def fill(tmp: Path) -> None:
                snap.write_memory(tmp / snap.MEMORY_FILE, mem, anonymous=False)
                self._write_overlays(tmp, file_state, overlays)
                snap.write_state(tmp / snap.STATE_FILE, file_state)

            path = store.write(name, fill)
            self._set_rollback_base(path / snap.MEMORY_FILE, state)
        log.info("snapshot %s written in %.1f ms", path, (time.perf_counter() - t0) * 1000)
        return path

    def _set_rollback_base(
        self, memory_path: Path, state: dict[str, Any], *, mapped_from: bool = False
    ) -> None:
        """From now on :meth:`rollback` returns here: dirty tracking restarts (everything
        written since is copied back from ``memory_path``, which holds RAM as it is now).

        The file is opened once, here, and held as ``mem.backing_fd``: rollback copies back
        through that fd, so a snapshot replacing the file at ``memory_path`` later (same name)
        cannot change what it reads. ``mapped_from``: RAM was just mapped from this file and
        ``mem`` already holds it (a restore, :meth:`_build`). Unlike the x86 machine, RAM is
        not remapped privately over the new file after a snapshot: under HVF, replacing the
        host mapping behind ``hv_vm_map`` is not known to reach the guest. The region stays as
        it is (anonymous after a boot, the previous file's private mapping after a restore),
        which holds the same bytes as the file."""
        vm, mem = self.vm, self.mem
        assert vm is not None and mem is not None
        if not mapped_from or mem.backing_fd < 0:
            mem.set_backing(_open_base_memory(memory_path, mem.size))  # before any other change
        vm.start_dirty_tracking()
        vm.take_dirty()
        mem.take_vmm_dirty_bitmap()  # reading clears it
        self._base_memory = memory_path
        self._base_state = state

    @classmethod
    def restore(
        cls,
        snapshot: Any,
        hypervisor: Callable[[], HypervisorVm],
        *,
        expected: dict[str, Any] | None = None,
        vsock: str | None = None,
        net: str | None = None,
        console_out: BinaryIO | Callable[[bytes], object] | None = None,
        console_in: int | None = None,
        start: bool = True,
        launch_ns: int | None = None,
        rollback: bool = True,
        hypervisor_name: str = "hvf",
    ) -> Aarch64Machine:
        """Rebuild a VM from a snapshot taken by this machine on the same hypervisor."""
        from ... import snapshot as snap

        t0 = time.perf_counter_ns()
        if not isinstance(snapshot, snap.Snapshot):
            snapshot = snap.Snapshot.load(snapshot)
        st = snapshot.state
        snap.check_machine(st, ARCH, hypervisor_name, snapshot.state_path)
        if expected:
            snap.check_fingerprint(st, expected, snapshot.state_path)
        cfg = st["config"]
        try:
            spec = Aarch64Spec(
                **spec_from_config(
                    cfg,
                    vsock=vsock,
                    net=net,
                    rollback=rollback,
                    hypervisor=hypervisor_name,
                    launch_ns=launch_ns,
                    console_out=console_out,
                    console_in=console_in,
                )
            )
        except (KeyError, TypeError, ValueError, MachineError) as e:
            raise snap.SnapshotError(f"{snapshot.state_path}: bad configuration: {e}") from None
        if int(st["memory"]["size"]) != spec.mem_size:
            raise snap.SnapshotError(
                f"{snapshot.state_path}: memory is {st['memory']['size']} bytes, "
                f"the configuration says {spec.mem_size}"
            )
        m = cls(spec, hypervisor, _restore=snapshot)
        try:
            m.cmdline = cfg["cmdline"]
            m._fingerprint = st.get("fingerprint")
            if start:
                m.start()
            m.restore_time_us = (time.perf_counter_ns() - t0) // 1000
        except BaseException:
            m.close()
            raise
        return m

    def _load_snapshot_state(self, snapshot: Any) -> None:
        from ... import snapshot as snap

        st, where = snapshot.state, snapshot.state_path
        devs = st["devices"]
        loaded = self._load_virtio_entries(snapshot)  # blk overlays from their own files
        try:
            self._load_cpu_state(st["vm"])
        except ValueError as e:
            raise snap.SnapshotError(f"{where}: {e}") from None
        self._load_device_state(devs, loaded)
        base = {**st, "devices": {**devs, "virtio": loaded}}
        if self.spec.log_dirty:
            self._set_rollback_base(snapshot.memory_path, base, mapped_from=True)
        self._devices_after_restore()

    def _load_cpu_state(self, plain: dict[str, Any]) -> None:
        """vCPU registers (each on its thread), then the interrupt controller, then what each
        vCPU keeps of it (HVF: the ICC registers)."""
        vm = self.vm
        assert vm is not None
        vcpu_states, blob = vm.state_from_plain(plain)
        if len(vcpu_states) != len(self.threads):
            raise ValueError(f"{len(vcpu_states)} vCPU states for {len(self.threads)} vCPUs")
        for t, vs in zip(self.threads, vcpu_states, strict=True):
            t.call(lambda v, vs=vs: v.restore_state(vs))
            t.powered_on = bool(getattr(vs, "powered_on", t.index == 0)) or bool(
                getattr(vm, "psci_in_kernel", False)
            )
        vm.restore_interrupt_controller(blob)
        for t, vs in zip(self.threads, vcpu_states, strict=True):
            t.call(lambda v, vs=vs: v.after_interrupt_controller_restore(vs))

    def rollback(self, *, resume: bool | None = None) -> dict[str, Any]:
        """Return a live VM to its rollback base in place: copy back, from the base's memory
        file, every granule written since (the hypervisor's dirty tracking plus the VMM's own
        writes), reload vCPU, interrupt controller and device state, post the vsock reset."""
        if self._base_state is None or self._base_memory is None:
            raise MachineError("no snapshot to roll back to: restore from one or take one first")
        if not self.spec.log_dirty:
            raise MachineError("this VM was restored without dirty tracking (--no-rollback)")
        t0 = time.perf_counter_ns()
        base = self._base_state
        with self._snap_lock, self._quiesced(resume is not False):
            granules = self._revert_memory()
            t_mem = time.perf_counter_ns()
            try:
                self._load_cpu_state(base["vm"])
            except ValueError as e:
                raise MachineError(f"rollback: {e}") from None
            self._load_device_state(base["devices"], base["devices"]["virtio"])
            self._devices_after_restore()
            t1 = time.perf_counter_ns()
        g = self.vm.granule if self.vm is not None else PAGE_SIZE
        info = {
            "granules": granules,
            "pages": granules * (g // PAGE_SIZE),  # 4 KiB pages, as the x86 machine counts
            "memory_us": (t_mem - t0) // 1000,
            "rollback_us": (t1 - t0) // 1000,
        }
        self.last_rollback = info
        log.info(
            "Rollback-time = %d us %d ms (%d granules)",
            info["rollback_us"],
            info["rollback_us"] // 1000,
            granules,
        )
        return info

    def dirty_granules(self) -> list[int]:
        """Guest-physical granule addresses written since the base (cleared by reading)."""
        vm, mem = self.vm, self.mem
        assert vm is not None and mem is not None
        g = vm.granule
        dirty = set(vm.take_dirty())
        dirty.update((p * PAGE_SIZE) // g * g for p in mem.take_vmm_dirty())
        return sorted(dirty)

    def _revert_memory(self) -> int:
        """Copy every granule written since the base back from the base's memory file (the fd
        :meth:`_set_rollback_base` opened), one ``GuestMemory.copy_back`` (a ``preadv``, not a
        VMM write) per run of adjacent granules. Returns the number of dirty granules."""
        mem = self.mem
        assert mem is not None
        if mem.backing_fd < 0:
            raise MachineError(
                f"this VM has no rollback base memory file open ({self._base_memory}): "
                "nothing to copy its memory back from"
            )
        region = mem.regions[0]
        g = self.vm.granule if self.vm is not None else PAGE_SIZE
        granules = self.dirty_granules()
        runs: list[tuple[int, int]] = []  # (start, end) byte offsets in the region
        for gpa in granules:  # sorted
            off = gpa - region.gpa
            if not 0 <= off < region.size:
                continue
            end = min(off + g, region.size)
            if runs and runs[-1][1] == off:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((off, end))
        try:
            for start, end in runs:
                first = start // PAGE_SIZE
                mem.copy_back(region, first, -(-end // PAGE_SIZE) - first)
        except (GuestMemoryError, OSError) as e:
            raise MachineError(f"rollback from {self._base_memory}: {e}") from None
        return len(granules)
