"""The hypervisor layer's operations, as abstract classes a backend implements.

A backend (KVM in :mod:`.kvm_aarch64`, Hypervisor.framework in :mod:`.hvf`)
gives the machine a :class:`HypervisorVm` and one :class:`HypervisorVcpu` per vCPU. The machine and
the devices never call the hypervisor's C API themselves.

Invariants every backend keeps (the machine relies on them):

* one VM per process on HVF; the VM outlives its vCPUs and its interrupt controller;
* guest memory is mapped in whole granules (:attr:`HypervisorVm.granule`): guest-physical address,
  host address and size all aligned, else :class:`ValueError` before the hypervisor is called;
* a vCPU is created on the thread that will run it, and every call on it except
  :meth:`HypervisorVm.kick` comes from that thread;
* the interrupt controller is created after the VM and before the first vCPU (HVF's ``hv_gic``
  demands it; KVM's vGIC is initialised after all vCPUs exist, before the first run);
* :meth:`HypervisorVcpu.run` returns one decoded exit and never blocks past a kick;
* state saved by ``save_state`` is plain data (ints, bytes) so a snapshot can be written as JSON +
  blobs, and restored in a new process by ``restore_state`` before the vCPU first runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Exit", "HypervisorVcpu", "HypervisorVm"]


@dataclass
class Exit:
    """One vCPU exit, decoded into what the machine must do.

    ``kind``: "mmio" (``address``, ``size``, ``write``, ``data`` for writes; the machine answers a
    read with :meth:`HypervisorVcpu.complete_mmio_read`), "psci-off" (SYSTEM_OFF), "psci-reset",
    "canceled" (a kick), "wfi" (handled inside the backend unless it could not sleep), "none"
    (handled inside the backend; run again).
    """

    kind: str
    address: int = 0
    size: int = 0
    write: bool = False
    data: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


class HypervisorVm(abc.ABC):
    """A VM: memory map, interrupt controller, dirty tracking."""

    granule: int  # bytes; 4096 on KVM/x86, 16384 on HVF
    name: str  # recorded in snapshots ("kvm", "hvf"); a snapshot restores only on its own
    # The hypervisor runs PSCI (CPU_ON/OFF), WFI and the timer itself (KVM): the machine runs
    # every vCPU from the start and sees no "psci-cpu-on"/"psci-cpu-off" exits.
    psci_in_kernel: bool = False

    @abc.abstractmethod
    def map(self, gpa: int, host_addr: int, size: int, *, writable: bool = True) -> None:
        """Map ``size`` bytes of host memory at ``host_addr`` into the guest at ``gpa``. All three
        aligned to :attr:`granule`; the host range is one mmap region that outlives the mapping."""

    @abc.abstractmethod
    def unmap(self, gpa: int, size: int) -> None:
        """Remove a mapping made by :meth:`map` (same alignment rules)."""

    @abc.abstractmethod
    def create_interrupt_controller(self, vcpus: int) -> None:
        """Create the in-kernel interrupt controller for ``vcpus`` vCPUs (before the first vCPU)."""

    @abc.abstractmethod
    def set_irq(self, intid: int, level: bool) -> None:
        """Drive the level of shared interrupt ``intid`` (arm64: SPI INTID, 32 and up)."""

    @abc.abstractmethod
    def create_vcpu(self, index: int) -> HypervisorVcpu:
        """Create vCPU ``index`` on the calling thread (which must then run it)."""

    @abc.abstractmethod
    def kick(self, vcpus: list[HypervisorVcpu]) -> None:
        """Make running (or next-to-run) vCPUs return from :meth:`HypervisorVcpu.run`. Any thread."""

    @abc.abstractmethod
    def start_dirty_tracking(self) -> None:
        """From now on record which granules the guest writes (KVM: dirty log; HVF: write-protect
        and record the faults)."""

    @abc.abstractmethod
    def take_dirty(self) -> set[int]:
        """Guest-physical granule addresses written since the last call (tracking stays on)."""

    @abc.abstractmethod
    def save_interrupt_controller(self) -> bytes:
        """The interrupt controller's state as an opaque blob (HVF: ``hv_gic_state``; excludes the
        CPU interface registers, which go with each vCPU)."""

    @abc.abstractmethod
    def restore_interrupt_controller(self, blob: bytes) -> None:
        """Load a blob from :meth:`save_interrupt_controller`, after the vCPUs exist and before any
        runs."""

    @abc.abstractmethod
    def state_to_plain(self, vcpu_states: list[Any], ic_blob: bytes) -> dict[str, Any]:
        """The VM's saved state (the vCPUs' :meth:`HypervisorVcpu.save_state` results and the
        interrupt controller's blob) as JSON-able data, tagged with arch and hypervisor."""

    @abc.abstractmethod
    def state_from_plain(self, d: dict[str, Any]) -> tuple[list[Any], bytes]:
        """Parse :meth:`state_to_plain`'s output (hostile input: ValueError when it is not
        this backend's) into (vCPU states, interrupt controller blob)."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Tear the VM down (its vCPUs first). Idempotent."""


class HypervisorVcpu(abc.ABC):
    """One vCPU, owned by the thread that created it."""

    index: int

    @abc.abstractmethod
    def run(self) -> Exit:
        """Enter the guest until something the machine must see happens."""

    @abc.abstractmethod
    def complete_mmio_read(self, value: int) -> None:
        """Answer the last "mmio" read exit with ``value`` (the backend writes the register)."""

    @abc.abstractmethod
    def get_reg(self, reg: int) -> int:
        """A core register (backend's ids)."""

    @abc.abstractmethod
    def set_reg(self, reg: int, value: int) -> None:
        """Set a core register (backend's ids)."""

    @abc.abstractmethod
    def set_boot_registers(self, pc: int, x0: int) -> None:
        """Enter a kernel: PC, X0 (the device tree on boot, the context of a PSCI CPU_ON),
        X1-X3 zero, PSTATE EL1h with DAIF masked."""

    @abc.abstractmethod
    def save_state(self) -> Any:
        """Everything needed to resume this vCPU in a new process, as plain data."""

    @abc.abstractmethod
    def restore_state(self, state: Any) -> None:
        """Load :meth:`save_state`'s result before this vCPU first runs."""

    def after_interrupt_controller_restore(self, state: Any) -> None:  # noqa: B027
        """Called with the same state once :meth:`HypervisorVm.restore_interrupt_controller`
        has run (HVF: the GIC CPU interface registers, which hv_gic's blob excludes)."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Destroy the vCPU (owning thread only)."""
