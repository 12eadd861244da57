"""Assembling a microVM: guest memory, the KVM VM and vCPUs, buses, devices, threads.

:class:`Machine` owns one VM from creation to teardown and calls the x86 pieces where they
live (``vmm/arch/x86_64/``), in this order:

- the VM: TSS and identity-map pages (:mod:`.arch.x86_64.vm`), then memory: :class:`GuestMemory`
  with one KVM slot per region (dirty logging optional), then the in-kernel irqchip (PIC +
  IOAPIC + LAPICs) and PIT (:mod:`.arch.x86_64.vm`; after the slots, see :meth:`_build`);
- devices: on the PIO bus the 8250 UART at 0x3f8 on IRQ 4 with the console and the i8042 at
  0x60/0x64, on the MMIO bus the boot timer at 0xd0000000 when asked (:mod:`.arch.x86_64.devices`),
  then here the virtio-mmio slots from 0xd0001000 on IRQs 5+ through irqfds; backends run on an
  :class:`EventLoop` thread;
- boot layout: kernel, initrd, command line, zero page / PVH info, MP table, page tables
  (:mod:`.arch.x86_64.boot`); the command line gets one ``virtio_mmio.device=4K@0x<addr>:<irq>``
  per virtio device;
- vCPUs: each configured for boot by :mod:`.arch.x86_64.vcpu` (host TSC rate, normalised CPUID,
  boot MSRs, LAPIC LINT0 = ExtINT / LINT1 = NMI, FPU, and for vCPU 0 the entry registers); one
  :class:`VcpuRunner` thread each.

``config()``, ``fingerprint()``, the record entries of ``status()`` and the arch-neutral half
of snapshot files (the spec a restore rebuilds, disk overlays, virtio entries, device state)
are shared with the aarch64 machine (:mod:`.machine_common`), as is the console wiring
(:mod:`.console`).

Snapshots (:mod:`.snapshot`): :meth:`Machine.snapshot` writes the paused VM (vCPU, VM and
device state, RAM, disk overlays) into a store and makes it the rollback base: guest RAM is
remapped in place as a private mapping of the new ``memory.bin`` and KVM's dirty log starts
afresh. :meth:`Machine.restore` rebuilds a VM from a snapshot with RAM mapped privately and
lazily from ``memory.bin`` (logging ``Restore-time = <us> us <ms> ms``, entry to vCPUs in
their run loops). :meth:`Machine.rollback` returns a live VM to its base in place:
exactly the pages dirtied since (KVM's dirty log + the VMM's own writes) copied back from
``memory.bin``, one read per run of adjacent pages, then state reloaded and the vsock reset
posted.

Lifecycle: ``created`` -> ``running`` <-> ``paused`` -> ``stopped``. The first vCPU to stop
(guest reboot via i8042, triple fault, SYSTEM_EVENT, an error, or :meth:`shutdown`) stops
the others; :meth:`wait` returns the exit status: 0 for a guest power-off/reboot or a
requested shutdown, 1 for anything that means the VM broke (KVM internal error, failed
entry, crash), 3 when every vCPU halted with interrupts disabled (x86 Linux's halt, and its
power-off when it has no power-off device: the halt watch, :mod:`.halt`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from . import halt
from .arch.x86_64 import boot, layout, mptable
from .arch.x86_64 import devices as x86_devices
from .arch.x86_64 import state as x86_state
from .arch.x86_64 import vcpu as x86_vcpu
from .arch.x86_64 import vm as x86_vm

# Old homes of what moved to the x86 arch modules, kept importable from here.
from .arch.x86_64.devices import I8042_LEN, I8042_PORT, UART_IRQ, UART_PORT  # noqa: F401
from .arch.x86_64.vcpu import KVM_CAP_TSC_DEADLINE_TIMER  # noqa: F401
from .devices.bus import Bus
from .errors import MachineError
from .eventloop import EventLoop
from .hypervisor import kvm
from .machine_common import MachineRecord, spec_from_config
from .memory import PAGE_SIZE, GuestMemory
from .vcpu import StopReason, VcpuRunner

if TYPE_CHECKING:
    from pathlib import Path

    from . import snapshot as snap

log = logging.getLogger(__name__)
# How often the interrupt watchdog looks at the virtio transports.
IRQ_RECHECK_S = 1.0

MiB = 1 << 20
# The project's guest command line (pytest_ignition.guest.DEFAULT_CMDLINE; a unit test keeps the
# two equal). Kept here so that a boot does not import the guest-build package (~1.5 s under
# the nested TCG harness) and the VMM stays usable on its own.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"

# What a snapshot of this machine records, and what a restore insists on (snapshot.check_machine).
ARCH = "x86_64"
HYPERVISOR = "kvm"
# Stop reasons that end the VM the way its guest or owner intended.
CLEAN_STOPS = frozenset({"requested", "shutdown", "reset", "triple_fault", "halt"})
# Every vCPU halted with interrupts disabled (see .halt): the guest stopped itself for good.
# Its own exit status, so that the owner can say "the guest powered off or halted".
HALTED = "halted"
EXIT_HALTED = 3
# How often an idle VM (no vCPU exit to the VMM since the last look) is checked for that.
HALT_CHECK_S = 0.5


def default_cmdline() -> str:
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
    net: str | None = None  # virtio-net backend: connect:PATH (passt) or listen:PATH (a switch)
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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_MAP_FIXED = 0x10


def _remap_private(mem: GuestMemory, path: str | os.PathLike[str]) -> None:
    """Replace guest RAM's host mappings, in place (same addresses, so KVM's slots and every
    view stay valid), by private mappings of ``path``, which must hold the same bytes: pages
    then load from the file, and ``mem.copy_back`` brings a page back to its file contents
    (``mem`` keeps the file open for that)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != mem.size:
            raise MachineError(f"{path}: memory file is not {mem.size} bytes")
        offset = 0
        for r in mem.regions:
            addr = r.host_addr
            got = _libc.mmap(
                addr,
                r.size,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | _MAP_FIXED,
                fd,
                offset,
            )
            if got != addr:
                err = ctypes.get_errno()
                raise MachineError(f"cannot map {path} over guest RAM: {os.strerror(err)}")
            r.file_offset = offset
            offset += r.size
    except BaseException:
        os.close(fd)
        raise
    mem.set_backing(fd)


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


class Machine(MachineRecord):
    """One microVM. Build with :meth:`create` (idle) or :meth:`boot` (created and started)."""

    def __init__(
        self,
        spec: MachineSpec,
        system: kvm.System | None = None,
        *,
        _restore: snap.Snapshot | None = None,
    ):
        self.spec = spec
        self._restore = _restore
        # The snapshot an in-place rollback returns to: its memory file (mapped privately
        # under guest RAM) and its state, device overlays included (see _set_rollback_base).
        self._base_state: dict[str, Any] | None = None
        # the rollback base's VM and vCPU state as ioctl arguments, built at the first rollback
        self._base_loads: tuple[x86_state.VmStateLoad, list[x86_state.VcpuRegisterLoad]] | None = (
            None
        )
        self._base_memory: Path | None = None
        self._backing: Path | None = None  # the file guest RAM is privately mapped from
        self._dirty_acc: list[list[tuple[int, int]]] | None = None  # see _dirty_runs
        self._fingerprint: dict[str, Any] | None = None
        self._snap_lock = threading.Lock()
        self.restore_time_us: int | None = None
        self.last_rollback: dict[str, Any] | None = None
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
        self._watchdog_armed = False  # the interrupt watchdog: a timer on self.loop
        self._watchdog_stop = threading.Event()
        self._halt_watch: threading.Thread | None = None
        self.interrupts_reraised = 0
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
        x86_vm.prepare(vm)  # TSS and identity-map pages, before memory and vCPUs

        restoring = self._restore is not None
        try:
            if restoring:
                mem = self.mem = GuestMemory.from_file(self._restore.memory_path, spec.mem_size)
            else:
                mem = self.mem = GuestMemory.anonymous(spec.mem_size)
        except OSError as e:
            raise MachineError(
                f"cannot map {spec.mem_size >> 20} MiB of guest memory: {e.strerror or e}"
            ) from None
        # Rollback in place needs KVM's dirty log (restores ask for it unless told not to);
        # on AMD and nested hosts it makes every first write to a page trap.
        self._log_dirty = spec.log_dirty
        for slot, r in enumerate(mem.regions):
            vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr, log_dirty=self._log_dirty)
        # Memory before the irqchip and PIT, as Firecracker does: a memory slot added after
        # KVM_CREATE_IRQCHIP cost ~7 ms here (512 MiB; ~0.3 ms before it), on every boot
        # and restore (measured with /dev/kvm on this host, 12 VMs each way).
        x86_vm.create_interrupt_controllers(vm)

        self.pio = Bus("pio", 1 << 16)
        self.mmio = Bus("mmio")
        self._add_legacy_devices()
        self._add_virtio_devices()

        if restoring:
            self._load_snapshot_state(self._restore)
            return
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
        spec = self.spec
        start_ns = spec.launch_ns if spec.launch_ns is not None else self.created_ns
        legacy = x86_devices.add_legacy_devices(
            self.vm,
            self.pio,
            self.mmio,
            self.loop,
            console_out=spec.console_out,
            console_in=spec.console_in,
            on_reset=self._guest_reset,
            boot_timer_start_ns=start_ns if spec.boot_timer else None,
        )
        self.uart, self.i8042, self.boot_timer = legacy.uart, legacy.i8042, legacy.boot_timer

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
        if spec.net:  # last: configurations without it keep their slots and IRQs
            from .devices.virtio.net import VirtioNet

            try:
                devices.append(VirtioNet(spec.net, self.loop))
            except (OSError, ValueError) as e:
                raise MachineError(str(e)) from None
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
        supported = self.system.supported_cpuid()
        tsc_deadline = x86_vcpu.tsc_deadline_timer(self.system)
        for i in range(spec.cpus):
            vcpu = self.vm.create_vcpu(i)
            x86_vcpu.configure_for_boot(
                vcpu, i, spec.cpus, supported, self.boot_setup, tsc_deadline=tsc_deadline
            )
            runner = VcpuRunner(vcpu, self.pio, self.mmio, self._on_vcpu_stop)
            self.runners.append(runner)

    # -- snapshot / restore / rollback --------------------------------------------------------
    @contextlib.contextmanager
    def _devices_locked(self) -> Iterator[None]:
        """Hold every virtio device's lock: the event loop (vsock rx) writes guest memory too,
        and must not do so while memory and device state are saved or reverted."""
        with contextlib.ExitStack() as stack:
            for _, _, t in self.virtio_devices:
                stack.enter_context(t.device.lock)
            yield

    @contextlib.contextmanager
    def _quiesced(self, resume: bool = True) -> Iterator[bool]:
        """Pause a running VM for the duration (resumed after unless ``resume`` is False);
        yields whether it was running."""
        with self._lock:
            state = self.state
        if state not in ("created", "running", "paused"):
            raise MachineError(f"cannot snapshot or roll back a machine that is {state}")
        was_running = state == "running"
        if was_running:
            self.pause()
        try:
            yield was_running
        finally:
            if was_running and resume and not self.stopped:
                self.resume()

    def capture_state(self) -> dict[str, Any]:
        """Everything but RAM, as plain data (the VM must be paused or not yet started).
        virtio-blk overlays are included in memory (``bytes`` blocks)."""
        from . import snapshot as snap

        msr_list = self.system.msr_index_list()
        state: dict[str, Any] = {
            "format": snap.FORMAT_VERSION,
            "arch": ARCH,
            "hypervisor": HYPERVISOR,
            "id": snap.new_id(),
            "created": time.time(),
            "config": self.config(),
            "fingerprint": self.fingerprint(),
            "memory": {
                "file": snap.MEMORY_FILE,
                "size": self.mem.size,
                "regions": [[r.gpa, r.size] for r in self.mem.regions],
            },
            "vm": x86_state.save_vm_state(self.vm),
            "vcpus": [x86_state.save_vcpu_state(r.vcpu, msr_list) for r in self.runners],
            "devices": {
                "uart": self.uart.state() if self.uart is not None else None,
                "i8042": self.i8042.state() if self.i8042 is not None else None,
                "boot_timer": self.boot_timer.state() if self.boot_timer is not None else None,
                "virtio": [
                    {
                        "addr": addr,
                        "irq": irq,
                        "type": type(t.device).__name__,
                        "state": t.state(),
                    }
                    for addr, irq, t in self.virtio_devices
                ],
            },
        }
        return state

    def snapshot(
        self,
        store: str | os.PathLike[str] | snap.SnapshotStore,
        name: str,
        *,
        settle: float = 0.0,
    ) -> Path:
        """Write snapshot ``name`` into ``store`` (a running VM is paused meanwhile) and make
        it this machine's rollback target. Returns the snapshot's directory. ``settle``: wait
        up to that many seconds first for the vsock connections to finish closing
        (:func:`machine_common.settle_vsock`)."""
        from . import snapshot as snap

        if not isinstance(store, snap.SnapshotStore):
            store = snap.SnapshotStore(store)
        snap.check_name(name)
        t0 = time.perf_counter()
        self._settle_before_snapshot(name, settle)
        with self._snap_lock, self._quiesced(), self._devices_locked():
            state = self.capture_state()
            file_state, overlays = self._file_state(state)

            # A VM mapped from a file needs only its changed pages written over a copy of it.
            # (Only with KVM's dirty log: without it every page is written.)
            backing = self._backing if self._log_dirty else None
            dirty_runs = self._dirty_runs() if backing is not None else None

            def fill(tmp: Path) -> None:
                if backing is not None and dirty_runs is not None:
                    snap.write_memory_delta(tmp / snap.MEMORY_FILE, backing, self.mem, dirty_runs)
                else:
                    snap.write_memory(tmp / snap.MEMORY_FILE, self.mem, anonymous=True)
                self._write_overlays(tmp, file_state, overlays)
                snap.write_state(tmp / snap.STATE_FILE, file_state)

            path = store.write(name, fill)
            self._set_rollback_base(path / snap.MEMORY_FILE, state)
        ms = (time.perf_counter() - t0) * 1000
        log.info("snapshot %s written in %.1f ms", path, ms)
        return path

    def _set_rollback_base(self, memory_path: Path, state: dict[str, Any]) -> None:
        """Make the just-written ``memory_path`` the private backing of guest RAM and start a
        fresh dirty log, so that :meth:`rollback` returns exactly here. Always a remap, even
        when the path is the old backing's: a snapshot replacing its own base is a new file."""
        mem = self.mem
        _remap_private(mem, memory_path)
        self._backing = memory_path
        if not self._log_dirty:
            for slot, r in enumerate(mem.regions):
                self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_addr, log_dirty=True)
            self._log_dirty = True
        for slot, r in enumerate(mem.regions):
            self.vm.get_dirty_log(slot, r.size)  # reading clears it
        mem.take_vmm_dirty_bitmap()  # reading clears it
        self._dirty_acc = None
        self._base_memory = memory_path
        self._base_state = state
        self._base_loads = None

    @classmethod
    def restore(
        cls,
        snapshot: snap.Snapshot | str | os.PathLike[str],
        *,
        expected: dict[str, Any] | None = None,
        vsock: str | None = None,
        net: str | None = None,
        console_out: BinaryIO | Callable[[bytes], object] | None = None,
        console_in: int | None = None,
        kvm_device: str = kvm.KVM_DEVICE,
        system: kvm.System | None = None,
        start: bool = True,
        launch_ns: int | None = None,
        rollback: bool = True,
    ) -> Machine:
        """Rebuild a VM from a snapshot: RAM mapped privately from its memory file (pages
        load on first touch), KVM and device state loaded, vsock told (``after_restore``).
        With ``start`` the vCPUs are handed to their run loops before this returns. Without
        ``rollback`` KVM logs no dirty pages, and :meth:`rollback` is refused until a
        :meth:`snapshot` (which turns the log on) made a new base.

        ``expected`` is a :func:`snapshot.fingerprint` (or part of one) the snapshot must
        match; ``vsock`` overrides the vsock socket path the snapshot recorded, ``net`` the
        virtio-net backend (a snapshot without virtio-net ignores it)."""
        from . import snapshot as snap

        t0 = time.perf_counter_ns()
        if not isinstance(snapshot, snap.Snapshot):
            snapshot = snap.Snapshot.load(snapshot)
        st = snapshot.state
        snap.check_machine(st, ARCH, HYPERVISOR, snapshot.state_path)
        if expected:
            snap.check_fingerprint(st, expected, snapshot.state_path)
        cfg = st["config"]
        try:
            spec = MachineSpec(
                **spec_from_config(
                    cfg,
                    vsock=vsock,
                    net=net,
                    rollback=rollback,
                    launch_ns=launch_ns,
                    kvm_device=kvm_device,
                    console_out=console_out,
                    console_in=console_in,
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            raise snap.SnapshotError(f"{snapshot.state_path}: bad configuration: {e}") from None
        if int(st["memory"]["size"]) != spec.mem_size:
            raise snap.SnapshotError(
                f"{snapshot.state_path}: memory is {st['memory']['size']} bytes, "
                f"the configuration says {spec.mem_size}"
            )
        if len(st["vcpus"]) != spec.cpus:
            raise snap.SnapshotError(
                f"{snapshot.state_path}: {len(st['vcpus'])} vCPU states for {spec.cpus} vCPUs"
            )
        m = cls(spec, system, _restore=snapshot)
        try:
            m.cmdline = cfg["cmdline"]
            m._fingerprint = st.get("fingerprint")
            if start:
                m.start()
            m.restore_time_us = (time.perf_counter_ns() - t0) // 1000
        except BaseException:
            m.close()
            raise
        if start:  # otherwise whoever starts it reports the time, start included
            us = m.restore_time_us
            log.info("Restore-time = %d us %d ms", us, us // 1000)
        return m

    def _load_snapshot_state(self, snapshot: snap.Snapshot) -> None:
        """Second half of :meth:`_build` for a restore: vCPUs, VM and device state."""
        from . import snapshot as snap

        st = snapshot.state
        where = snapshot.state_path
        devs = st["devices"]
        loaded = self._load_virtio_entries(snapshot)  # blk overlays from their own files
        try:
            x86_state.restore_vm_state(self.vm, st["vm"])
            for i, vstate in enumerate(st["vcpus"]):
                vcpu = self.vm.create_vcpu(i)
                x86_state.restore_vcpu_state(vcpu, vstate)
                self.runners.append(VcpuRunner(vcpu, self.pio, self.mmio, self._on_vcpu_stop))
        except ValueError as e:
            raise snap.SnapshotError(f"{where}: {e}") from None
        self._load_device_state(devs, loaded)
        self._base_state = {**st, "devices": {**devs, "virtio": loaded}}
        self._base_loads = None
        self._base_memory = self._backing = snapshot.memory_path
        self._devices_after_restore()

    def rollback(self, *, resume: bool | None = None) -> dict[str, Any]:
        """Return a live VM to its rollback base (the snapshot it was restored from or last
        took) in place: copy back from its memory file exactly the pages dirtied since (KVM's
        dirty log plus the VMM's own writes), reload vCPU, VM and device state, revert disk
        overlays, settle vsock (``after_restore``). A VM that was running resumes unless
        ``resume`` is False. Returns what was done and how long it took."""
        if self._base_state is None or self._base_memory is None:
            raise MachineError("no snapshot to roll back to: restore from one or take one first")
        if not self._log_dirty:
            raise MachineError(
                "this VM was restored without dirty-page logging (restore --no-rollback), "
                "so it cannot be rolled back; take a snapshot first or restore without it"
            )
        t0 = time.perf_counter_ns()
        with self._snap_lock:  # a snapshot replaces the base (and drops its loads) under it
            base = self._base_state
            if self._base_loads is None:  # built before the pause, not during it
                self._base_loads = (
                    x86_state.VmStateLoad(base["vm"]),
                    [x86_state.VcpuRegisterLoad(v) for v in base["vcpus"]],
                )
            vm_load, vcpu_loads = self._base_loads
            with self._quiesced(resume is not False) as was_running:
                with self._devices_locked():
                    pages, ranges = self._revert_memory()
                    t_mem = time.perf_counter_ns()
                    vm_load.apply(self.vm)
                    # Resumed at once: the vCPU threads' next KVM_RUN loads what can be staged.
                    stage = was_running and resume is not False
                    for r, load in zip(self.runners, vcpu_loads, strict=True):
                        load.apply(r.vcpu, during="rollback", stage=stage)
                    self._load_device_state(base["devices"], base["devices"]["virtio"])
                self._devices_after_restore()
                t1 = time.perf_counter_ns()
        info = {
            "pages": pages,
            "ranges": ranges,
            "memory_us": (t_mem - t0) // 1000,
            "rollback_us": (t1 - t0) // 1000,
        }
        self.last_rollback = info
        log.info(
            "Rollback-time = %d us %d ms (%d pages in %d ranges)",
            info["rollback_us"],
            info["rollback_us"] // 1000,
            pages,
            ranges,
        )
        return info

    def _dirty_runs(self) -> list[list[tuple[int, int]]]:
        """Per region, the (first page, count) runs of pages written since the rollback base:
        KVM's dirty log (vCPU and in-kernel writes) plus the VMM's own bitmap. Both are
        cleared by reading, so what was read is kept (``_dirty_acc``) until a new base is set
        or the pages are reverted: a failed snapshot must not make rollback miss a page.
        Each bitmap is decoded on its own (mostly zero: a scan at memcmp speed) and the runs
        merged, rather than OR-ing 16 KiB bitmaps as integers per rollback."""
        from . import snapshot as snap

        mem = self.mem
        acc = self._dirty_acc or [[] for _ in mem.regions]
        self._dirty_acc = acc  # filled in as each log is read
        # The VMM's bits go into every region's runs before any KVM log is read: taking the
        # bitmap cleared all of it, so a KVM read that fails must not lose them.
        vmm_bm = mem.take_vmm_dirty_bitmap()
        for slot, r in enumerate(mem.regions):
            first = r.gpa // PAGE_SIZE
            # memory.layout() starts regions MiB-aligned, so a region's VMM bits are a byte
            # slice (a copy: comparing memoryview slices with bytes is ~15x slower)
            assert first % 8 == 0, f"region at {r.gpa:#x} is not 8-page aligned"
            mine = snap.bitmap_runs(vmm_bm[first // 8 : (first + r.size // PAGE_SIZE + 7) // 8])
            acc[slot] = snap.merge_runs(acc[slot], mine)
        for slot, r in enumerate(mem.regions):
            logged = snap.bitmap_runs(self.vm.get_dirty_log(slot, r.size))
            acc[slot] = snap.merge_runs(acc[slot], logged)
        out = []
        for r, runs in zip(mem.regions, acc, strict=True):
            npages = r.size // PAGE_SIZE  # the bitmaps' last byte may go past the region
            out.append([(s, min(c, npages - s)) for s, c in runs if s < npages])
        return out

    def _revert_memory(self) -> tuple[int, int]:
        """Copy every page dirtied since the base (vCPU or VMM writes) back from the base's
        memory file, one read per run of adjacent pages (``GuestMemory.copy_back`` says why
        not ``MADV_DONTNEED``). Returns (pages, runs)."""
        total = nruns = 0
        mem = self.mem
        for r, runs in zip(mem.regions, self._dirty_runs(), strict=True):
            for start, count in runs:
                mem.copy_back(r, start, count)
                total += count
                nruns += 1
        self._dirty_acc = None
        return total, nruns

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self.state != "created":
                raise MachineError(f"cannot start a machine that is {self.state}")
            self.state = "running"
            self.started_at = time.monotonic()
        if self.virtio_devices and not self._watchdog_armed:
            self._watchdog_armed = True
            self.loop.call_later(IRQ_RECHECK_S, self._watch_interrupts)
        self.loop.start()
        for r in self.runners:
            r.start()
        if self.watches_halt and self._halt_watch is None:
            # Started from the loop, off the restore's critical path: Thread.start() waits
            # for the new thread to run (~0.7 ms quiet, several ms on a loaded host).
            self.loop.call_later(HALT_CHECK_S, self._start_halt_watch)

    def _start_halt_watch(self) -> None:
        if self._halt_watch is not None or self.stopped or self._watchdog_stop.is_set():
            return
        self._halt_watch = threading.Thread(
            target=self._watch_halt, name="vmm-halt-watch", daemon=True
        )
        self._halt_watch.start()

    # x86: a guest's halt never leaves KVM (in-kernel LAPIC), so the VMM looks for it.
    # Subclasses whose guests power off through the hypervisor (arm64 PSCI) turn it off.
    watches_halt = True

    def _watch_halt(self) -> None:
        """Every ``HALT_CHECK_S`` s, when no vCPU exited to the VMM since the last look (a
        halted guest makes no exits; a busy one is never paused for this), pause the vCPUs for
        a moment and read their run state; when every vCPU is halted for good (:mod:`.halt`)
        end the VM with ``halted`` (exit status 3)."""
        last: int | None = None
        while not self._watchdog_stop.wait(HALT_CHECK_S):
            if self.stopped:
                return
            try:  # the vCPU threads add keys to these counters as we read them
                exits = sum(sum(list(r.exits.values())) for r in self.runners)
            except RuntimeError:
                continue
            if exits != last:
                last = exits
                continue
            try:
                done = self._halted_for_good()
            except Exception:  # the watch must never take the VM down
                log.exception("halt watch failed; it stops")
                return
            if done:
                reason = StopReason(
                    HALTED,
                    "every vCPU halted with interrupts disabled (the guest halted or powered "
                    "off without a power-off device)",
                )
                if self._finish(reason):
                    for r in self.runners:
                        r.request_stop(StopReason("requested", "the guest halted"))
                return

    def _halted_for_good(self) -> bool:
        """Pause every vCPU (without a state change: a control request waits on the lock),
        read their run states, resume them; True when none can ever run again."""
        with self._lock:
            if self.state != "running" or not self.runners:
                return False
            try:
                for r in self.runners:
                    if not r.pause(timeout=2.0) or not r.paused:
                        return False
                states = [halt.read_run_state(r.vcpu) for r in self.runners]
            finally:
                for r in self.runners:
                    r.resume()
        return halt.all_halted_for_good(states)

    def _watch_interrupts(self) -> None:
        """Every second (a timer on the event loop), raise again a virtio interrupt the driver
        left unacknowledged for a whole period (see ``MmioTransport.recheck_interrupt``); log
        the first few. What the nested stall reproducer showed about it (see
        ``benchmarks/nested_stall.py``): it fired in 1 of 16 boots and none of 26 restores,
        each time while the guest was starved of CPU, and no stall was traced to a lost edge;
        the stall was the restored clock (see ``x86_state.timer_msrs``, ``Vm.set_clock``). Kept as a
        one-timer safety net: a second edge is harmless."""
        if self._watchdog_stop.is_set():
            return
        self.loop.call_later(IRQ_RECHECK_S, self._watch_interrupts)
        if self.state != "running":
            return
        for addr, irq, transport in list(self.virtio_devices):
            try:
                if transport.recheck_interrupt():
                    self.interrupts_reraised += 1
                    if self.interrupts_reraised <= 5:
                        log.warning(
                            "virtio-mmio %#x (IRQ %d): interrupt unacknowledged for %.0f s; "
                            "raised again (%d so far)",
                            addr, irq, IRQ_RECHECK_S, self.interrupts_reraised,
                        )  # fmt: skip
            except Exception:  # the watchdog must never take the VM down
                log.exception("interrupt watchdog failed for %#x", addr)

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
            if reason.kind == HALTED:
                self.exit_status = EXIT_HALTED
            else:
                self.exit_status = 0 if reason.kind in CLEAN_STOPS else 1
            self.state = "stopped"
        if quiet:
            pass
        elif reason.kind in CLEAN_STOPS or reason.kind == HALTED:
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
            "interrupts_reraised": self.interrupts_reraised,
        }
        return self._add_status_records(st)

    def close(self) -> None:
        """Stop everything and release KVM, memory, fds. Idempotent."""
        self._watchdog_stop.set()
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
