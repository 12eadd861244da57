"""The aarch64 microVM on KVM/arm64: the x86 :class:`~pytest_ignition.vmm.machine.Machine` with
the architecture's parts replaced.

What is arm64 here (everything else, the lifecycle, vCPU threads, virtio devices, the event
loop, snapshot files, the dirty log and in-place rollback, is the shared machine's):

- memory: one RAM region at :data:`layout.DRAM_START` (2 GiB); everything below is MMIO;
- boot: the ``Image`` at a 2 MiB-aligned base + ``text_offset``, the initrd below the device
  tree, the device tree (:func:`fdt.machine_fdt`) in the last 2 MiB of RAM; vCPU 0 enters at
  the Image with x0 = the tree; the virtio devices are in the tree, not on the command line;
- vCPUs: ``KVM_ARM_VCPU_INIT`` with PSCI 0.2 (secondaries powered off until the guest's PSCI
  CPU_ON, which KVM handles, as it does SYSTEM_OFF/RESET: a ``KVM_EXIT_SYSTEM_EVENT``);
- interrupts: the in-kernel vGICv3; the 16550 UART on a level SPI (``KVM_IRQ_LINE``), each
  virtio-mmio transport on an edge SPI through an irqfd (GSI = SPI number);
- devices: the UART and the boot timer on the MMIO bus (no PIO bus devices, no i8042: the guest
  reboots and powers off through PSCI);
- state: per vCPU every register of ``KVM_GET_REG_LIST`` (timer registers included: restoring
  the virtual counter keeps guest time continuous) and the MP state; the vGIC through
  :mod:`.vgic`. Snapshots say ``"arch": "aarch64"``; a restore refuses another architecture's.

Restore order (as Firecracker): VM, memory, vCPUs initialised, vGIC created and initialised,
vCPU registers (MPIDR first), then the vGIC's registers, then devices.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from typing import TYPE_CHECKING, Any

from ... import kvm
from ... import kvm_arm64 as k
from ...devices.bus import Bus
from ...machine import Machine, MachineError, MachineSpec, _Irqfd
from ...memory import PAGE_SIZE, GuestMemory, GuestMemoryError, Region
from ...vcpu import VcpuRunner
from . import fdt, image, vgic
from . import layout as L

if TYPE_CHECKING:
    from ... import snapshot as snap

log = logging.getLogger(__name__)

ARCH = "aarch64"
MiB = 1 << 20

__all__ = ["ARCH", "Arm64Machine", "MachineError", "MachineSpec", "check_kernel_file"]


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


def _ram_at(gpa: int, size: int, path: str | os.PathLike[str] | None = None) -> GuestMemory:
    """Guest RAM as one region at ``gpa``: anonymous, or privately mapped from ``path``."""
    if path is None:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return GuestMemory([Region(gpa, size, mm)])
    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise GuestMemoryError(f"{path}: memory file is {actual} bytes, expected {size}")
        mm = mmap.mmap(
            f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    return GuestMemory([Region(gpa, size, mm, 0)])


def _reg_key(reg_id: int) -> str:
    return f"{reg_id:#x}"


def save_vcpu(vcpu: kvm.Vcpu) -> dict[str, Any]:
    """Every register KVM lists for the vCPU, and its MP state (plain data)."""
    regs = [[_reg_key(r), k.get_one_reg(vcpu.fd, r)] for r in k.reg_list(vcpu.fd)]
    return {"regs": regs, "mp_state": vcpu.get_mp_state()}


def load_vcpu(vcpu: kvm.Vcpu, state: dict[str, Any], *, during: str) -> int:
    """Load :func:`save_vcpu`'s output: MPIDR first (the redistributors are found by it), then
    the rest in saved order, then the MP state. A register KVM refuses is accepted only if it
    already holds the saved value (e.g. firmware pseudo-registers after the first KVM_RUN).
    Returns how many registers were written."""
    try:
        regs = [(int(i, 16), int(v)) for i, v in state["regs"]]
        mp_state = int(state["mp_state"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"vCPU state: {e!r}") from None
    regs.sort(key=lambda rv: rv[0] != k.MPIDR_EL1)
    written = 0
    for reg_id, value in regs:
        try:
            k.set_one_reg(vcpu.fd, reg_id, value)
            written += 1
        except kvm.KvmError as e:
            try:
                same = k.get_one_reg(vcpu.fd, reg_id) == value
            except kvm.KvmError:
                same = False
            if not same:
                raise ValueError(
                    f"vcpu{vcpu.index}: KVM refused register {reg_id:#x} during {during}: {e}"
                ) from None
    vcpu.set_mp_state(mp_state)
    return written


class Arm64Machine(Machine):
    """One aarch64 microVM (see the module docstring for what differs from x86)."""

    arch = ARCH

    def __init__(self, spec: MachineSpec, system: kvm.System | None = None, **kw: Any):
        self.gic: k.VgicV3 | None = None
        self.fdt_addr = 0
        self.kernel_addr = 0
        super().__init__(spec, system, **kw)

    # -- construction -------------------------------------------------------------------
    def _build(self) -> None:
        spec = self.spec
        if spec.mem_size < 64 * MiB:
            raise MachineError(f"{spec.mem_size >> 20} MiB: the aarch64 machine needs >= 64 MiB")
        if spec.mem_size > L.DRAM_MAX:
            raise MachineError(f"{spec.mem_size >> 20} MiB is more RAM than the machine maps")
        if spec.cpus > L.MAX_VCPUS:
            raise MachineError(f"--cpus {spec.cpus}: the aarch64 machine takes 1..{L.MAX_VCPUS}")
        try:
            if self.system.check_extension(k.KVM_CAP_ARM_PSCI_0_2) != 1:
                raise MachineError("KVM here has no PSCI 0.2 (KVM_CAP_ARM_PSCI_0_2)")
        except kvm.KvmError as e:
            raise MachineError(f"KVM capability check failed: {e}") from None
        self.vm = self.system.create_vm()
        restoring = self._restore is not None
        try:
            path = self._restore.memory_path if restoring else None
            mem = self.mem = _ram_at(L.DRAM_START, spec.mem_size, path)
        except OSError as e:
            raise MachineError(
                f"cannot map {spec.mem_size >> 20} MiB of guest memory: {e.strerror or e}"
            ) from None
        self._log_dirty = spec.log_dirty
        for slot, r in enumerate(mem.regions):
            self.vm.set_user_memory_region(
                slot, r.gpa, r.size, r.host_addr, log_dirty=self._log_dirty
            )
        self.pio = Bus("pio", 1 << 16)  # nothing on it: arm64 has no port I/O
        self.mmio = Bus("mmio", L.DRAM_START)
        # the vGIC first: its initialisation sets up the SPI routing the irqfds use
        self._create_vcpus_and_gic()
        self._add_legacy_devices()
        self._add_virtio_devices()
        if restoring:
            self._load_snapshot_state(self._restore)
            return
        self._load_kernel()

    def _add_legacy_devices(self) -> None:
        from ...devices import legacy

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

        vm_fd = self.vm.fd

        def uart_irq(level: int) -> None:
            try:
                k.irq_line(vm_fd, L.UART_SPI, bool(level))
            except kvm.KvmError as e:
                log.debug("UART SPI %d: %s", L.UART_SPI, e)

        self.uart = legacy.Serial8250(out, irq=uart_irq)
        self.mmio.insert(self.uart, L.UART_ADDR, L.UART_SIZE)
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
                    self.loop.remove_reader(fd)
                    return
                self.uart.feed(data)

            try:
                self.loop.add_reader(fd, on_input)
            except PermissionError:
                log.debug("console input fd %d cannot be polled; the console is output-only", fd)
        if spec.boot_timer:
            start_ns = spec.launch_ns if spec.launch_ns is not None else self.created_ns
            self.boot_timer = legacy.BootTimer(start_ns)
            self.mmio.insert(self.boot_timer, L.BOOT_TIMER_ADDR, 0x1000)

    def add_virtio(self, device: Any) -> tuple[int, int]:
        """Put a virtio device in the next MMIO slot with the next SPI; returns (addr, SPI)."""
        from ...devices.virtio.mmio import MmioTransport

        n = len(self.virtio_devices)
        try:
            addr, spi = L.virtio_slot(n)
        except ValueError as e:
            raise MachineError(f"too many virtio devices: {e}") from None
        irqfd = _Irqfd(self.vm, spi)  # the vGIC's default routing: GSI n = SPI n
        self._irqfds.append(irqfd)
        transport = MmioTransport(device, self.mem, irqfd.trigger)
        self.mmio.insert(transport, addr, L.VIRTIO_MMIO_SLOT)
        self.virtio_devices.append((addr, spi, transport))
        closer = getattr(device, "close", None)
        if closer is not None and closer not in self._closers:
            self._closers.append(closer)
        return addr, spi

    def _create_vcpus_and_gic(self) -> None:
        vm = self.vm
        vcpus = []
        for i in range(self.spec.cpus):
            vcpu = vm.create_vcpu(i)
            k.vcpu_init(vcpu.fd, k.boot_vcpu_init(vm.fd, i))
            vcpus.append(vcpu)
        redist = L.GIC_REDIST_ADDR
        self.gic = k.VgicV3.create(vm.fd, L.GIC_DIST_ADDR, redist, L.GIC_NR_IRQS)
        self.gic.init()
        for vcpu in vcpus:
            self.runners.append(VcpuRunner(vcpu, self.pio, self.mmio, self._on_vcpu_stop))

    def _load_kernel(self) -> None:
        spec = self.spec
        mem = self.mem
        try:
            with open(spec.kernel, "rb") as f:
                kernel = f.read()
            initrd = b""
            if spec.initrd:
                with open(spec.initrd, "rb") as f:
                    initrd = f.read()
        except OSError as e:
            raise MachineError(f"{e.filename}: {e.strerror or e}") from None
        try:
            img = image.parse_header(kernel)
        except image.ImageError as e:
            raise MachineError(f"kernel {spec.kernel!r}: {e}") from None
        self.kernel_addr = load = img.load_addr(L.DRAM_START)
        top = L.fdt_addr(spec.mem_size)
        if img.end(L.DRAM_START) > top:
            raise MachineError(
                f"kernel needs {img.end(L.DRAM_START) - L.DRAM_START} bytes of RAM: "
                "give the VM more memory"
            )
        mem.write(load, kernel)
        initrd_range = None
        if initrd:
            try:
                ia = L.initrd_addr(spec.mem_size, len(initrd), img.end(L.DRAM_START))
            except ValueError as e:
                raise MachineError(str(e)) from None
            mem.write(ia, initrd)
            initrd_range = (ia, ia + len(initrd))
        base = spec.cmdline if spec.cmdline is not None else _default_cmdline()
        parts = [base.strip()] if base.strip() else []
        if spec.boot_timer:
            parts.append(f"ignition.boot_timer={L.BOOT_TIMER_ADDR:#x}")
        self.cmdline = " ".join(parts)
        nodes = [fdt.VirtioNode(addr, spi) for addr, spi, _ in self.virtio_devices]
        try:
            dtb = fdt.machine_fdt(
                spec.mem_size, spec.cpus, self.cmdline, initrd=initrd_range, virtio=nodes
            )
        except fdt.FdtError as e:
            raise MachineError(f"device tree: {e}") from None
        self.fdt_addr = L.fdt_addr(spec.mem_size)
        mem.write(self.fdt_addr, dtb)
        # what the VMM wrote at boot is the guest's, not dirt to revert
        mem.take_vmm_dirty_bitmap()  # reading clears it
        k.set_boot_regs(self.runners[0].vcpu.fd, load, self.fdt_addr)

    # -- state ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {**super().config(), "arch": ARCH}

    def status(self) -> dict[str, Any]:
        return {**super().status(), "arch": ARCH, "kernel_kind": "Image"}

    def _mpidrs(self) -> list[int]:
        """Each vCPU's affinity in the vGIC attributes' form (Aff3 in bits 31:24, not 39:32)."""
        out = []
        for r in self.runners:
            v = k.get_one_reg(r.vcpu.fd, k.MPIDR_EL1)
            out.append((v & 0xFF_FFFF) | ((v >> 32) & 0xFF) << 24)
        return out

    def _save_vm(self) -> dict[str, Any]:
        assert self.gic is not None
        return {"vgic": vgic.save(self.gic, self._mpidrs(), L.GIC_NR_IRQS)}

    def capture_state(self) -> dict[str, Any]:
        """Everything but RAM, as plain data (the VM must be paused or not yet started)."""
        from ... import snapshot as snap

        return {
            "format": snap.FORMAT_VERSION,
            "arch": ARCH,
            "id": snap.new_id(),
            "created": time.time(),
            "config": self.config(),
            "fingerprint": self.fingerprint(),
            "memory": {
                "file": snap.MEMORY_FILE,
                "size": self.mem.size,
                "regions": [[r.gpa, r.size] for r in self.mem.regions],
            },
            "vm": self._save_vm(),
            "vcpus": [save_vcpu(r.vcpu) for r in self.runners],
            "devices": {
                "uart": self.uart.state() if self.uart is not None else None,
                "i8042": None,
                "boot_timer": self.boot_timer.state() if self.boot_timer is not None else None,
                "virtio": [
                    {"addr": addr, "irq": irq, "type": type(t.device).__name__, "state": t.state()}
                    for addr, irq, t in self.virtio_devices
                ],
            },
        }

    def _load_arch_state(self, st: dict[str, Any], *, during: str) -> None:
        """vCPU registers, then the vGIC (its redistributors are found by the MPIDRs)."""
        assert self.gic is not None
        vcpus = st["vcpus"]
        if len(vcpus) != len(self.runners):
            raise ValueError(f"{len(vcpus)} vCPU states for {len(self.runners)} vCPUs")
        for r, vstate in zip(self.runners, vcpus, strict=True):
            load_vcpu(r.vcpu, vstate, during=during)
        try:
            vgic.load(self.gic, st["vm"]["vgic"])
        except kvm.KvmError as e:
            raise ValueError(f"KVM refused the vGIC state during {during}: {e}") from None
        except (KeyError, TypeError) as e:
            raise ValueError(f"vGIC state: {e!r}") from None

    def _load_snapshot_state(self, snapshot: snap.Snapshot) -> None:
        """Second half of :meth:`_build` for a restore: vCPU, vGIC and device state."""
        from ... import snapshot as snap

        st = snapshot.state
        where = snapshot.state_path
        if st.get("arch", "x86_64") != ARCH:
            raise snap.SnapshotError(
                f"{where}: a snapshot of an {st.get('arch', 'x86_64')} VM; this is {ARCH}"
            )
        devs = st["devices"]
        saved_virtio = devs["virtio"]
        if len(saved_virtio) != len(self.virtio_devices):
            raise snap.SnapshotError(
                f"{where}: {len(saved_virtio)} virtio devices saved, {len(self.virtio_devices)} built"
            )
        loaded = []
        for i, (entry, (addr, irq, t)) in enumerate(
            zip(saved_virtio, self.virtio_devices, strict=True)
        ):
            if (
                entry["addr"] != addr
                or entry["irq"] != irq
                or entry["type"] != type(t.device).__name__
            ):
                raise snap.SnapshotError(
                    f"{where}: virtio slot {i} was {entry['type']} at {entry['addr']:#x}, "
                    f"rebuilt {type(t.device).__name__} at {addr:#x}"
                )
            dev_state = entry["state"]["device"]
            if "overlay_file" in dev_state:
                path = snapshot.path / dev_state["overlay_file"]
                try:
                    if snap.file_sha256(path) != dev_state.get("overlay_sha256"):
                        raise snap.SnapshotError(f"{path}: disk overlay is corrupt (sha256)")
                    t.device.load_overlay(path)
                except OSError as e:
                    raise snap.SnapshotError(f"{path}: cannot read disk overlay: {e}") from None
                except ValueError as e:
                    raise snap.SnapshotError(str(e)) from None
                dev_state = {**dev_state, "overlay": dict(t.device.overlay)}
            loaded.append({**entry, "state": {**entry["state"], "device": dev_state}})
        try:
            self._load_arch_state(st, during="restore")
        except ValueError as e:
            raise snap.SnapshotError(f"{where}: {e}") from None
        self._load_device_state(devs, loaded)
        self._base_state = {**st, "devices": {**devs, "virtio": loaded}}
        self._base_memory = self._backing = snapshot.memory_path
        for _, _, t in self.virtio_devices:
            reset = getattr(t.device, "send_transport_reset", None)
            if reset is not None:
                reset()  # the guest's vsock connections died with the old process

    def rollback(self, *, resume: bool | None = None) -> dict[str, Any]:
        """As :meth:`Machine.rollback`: the dirtied pages reverted, then vCPU, vGIC and device
        state reloaded, the vsock reset posted; logs ``Rollback-time``."""
        if self._base_state is None or self._base_memory is None:
            raise MachineError("no snapshot to roll back to: restore from one or take one first")
        if not self._log_dirty:
            raise MachineError(
                "this VM was restored without dirty-page logging (restore --no-rollback), "
                "so it cannot be rolled back; take a snapshot first or restore without it"
            )
        t0 = time.perf_counter_ns()
        base = self._base_state
        with self._snap_lock, self._quiesced(resume is not False):
            with self._devices_locked():
                pages, ranges = self._revert_memory()
                t_mem = time.perf_counter_ns()
                try:
                    self._load_arch_state(base, during="rollback")
                except ValueError as e:
                    raise MachineError(f"rollback: {e}") from None
                self._load_device_state(base["devices"], base["devices"]["virtio"])
            for _, _, t in self.virtio_devices:
                reset = getattr(t.device, "send_transport_reset", None)
                if reset is not None:
                    reset()
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

    def close(self) -> None:
        super().close()
        if self.gic is not None:
            self.gic.close()
            self.gic = None


def _default_cmdline() -> str:
    from ...machine import default_cmdline

    return default_cmdline()


# PAGE_SIZE is re-exported for tests that compute dirty-page counts against this machine.
__all__ += ["PAGE_SIZE"]
