"""The KVM backend of the hypervisor layer for the aarch64 machine (arm64 Linux hosts).

:class:`KvmArm64Vm` and :class:`KvmArm64Vcpu` implement :mod:`.base` over the raw ioctls of
:mod:`.kvm` (VM, memory slots, ``KVM_RUN``, dirty log) and ``vmm/kvm_arm64.py`` (vCPU init
with PSCI 0.2, ONE_REG, the vGICv3, SPI lines), so that ``vmm/arch/aarch64/machine.py`` runs on
KVM as it does on Hypervisor.framework:

- memory: one ``KVM_SET_USER_MEMORY_REGION`` slot per mapping, 4 KiB granule; dirty tracking is
  the slot's ``KVM_MEM_LOG_DIRTY_PAGES`` flag (set at map time when asked, or by re-registering
  the slot) and ``KVM_GET_DIRTY_LOG``;
- interrupts: the in-kernel vGICv3. KVM wants it created and initialised after every vCPU
  exists, so :meth:`KvmArm64Vm.create_interrupt_controller` only records the vCPU count and the
  last :meth:`KvmArm64Vm.create_vcpu` creates it. SPIs by ``KVM_IRQ_LINE``;
- PSCI (CPU_ON/OFF, SYSTEM_OFF/RESET), WFI and the timer are KVM's: the machine sees only MMIO
  exits and ``KVM_EXIT_SYSTEM_EVENT`` (as "psci-off"/"psci-reset"); every vCPU is run from the
  start, KVM keeps a powered-off secondary inside ``KVM_RUN`` (:attr:`psci_in_kernel`);
- kicks: ``immediate_exit`` + a real-time signal the vCPU thread blocks but ``KVM_RUN`` unblocks
  (``KVM_SET_SIGNAL_MASK``), as ``vmm/vcpu.py`` does on x86;
- state: per vCPU every ``KVM_GET_REG_LIST`` register (MPIDR loaded first) and the MP state;
  the vGIC's registers by ``vmm/arch/aarch64/vgic.py`` (after the vCPUs' registers).
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import threading
from typing import Any

from .. import kvm_arm64 as k
from ..arch.aarch64 import layout as L
from ..arch.aarch64 import vgic
from . import kvm
from .arm64_exits import GuestFault
from .base import Exit, HypervisorVcpu, HypervisorVm

log = logging.getLogger(__name__)

NAME = "kvm"
KICK_SIGNAL = signal.SIGRTMIN + 6  # the x86 run loop's (vmm/vcpu.py): one kick signal per process

__all__ = ["NAME", "KvmArm64Vcpu", "KvmArm64Vm", "load_vcpu", "save_vcpu"]


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


def _drain_kicks() -> None:
    while signal.sigtimedwait((KICK_SIGNAL,), 0) is not None:
        pass


def _bitmap_pages(bitmap: bytes, gpa: int) -> list[int]:
    """Guest-physical addresses of the pages set in a KVM dirty bitmap (LSB first)."""
    out = []
    words = memoryview(bitmap).cast("Q")
    for wi, word in enumerate(words):
        while word:
            low = word & -word
            out.append(gpa + ((wi * 64 + low.bit_length() - 1) << 12))
            word ^= low
    return out


class KvmArm64Vcpu(HypervisorVcpu):
    """A KVM vCPU initialised with PSCI 0.2 (secondaries powered off), on its creating thread."""

    def __init__(self, vm: KvmArm64Vm, index: int) -> None:
        self.index = index
        self._vm = vm
        self.vcpu = vm.vm.create_vcpu(index)
        self.thread_id = threading.get_ident()
        try:
            k.vcpu_init(self.vcpu.fd, k.boot_vcpu_init(vm.vm.fd, index))
            # Block kicks on this thread, unblock them inside KVM_RUN (see vmm/vcpu.py).
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
            self.vcpu.set_signal_mask({int(s) for s in old} - {int(KICK_SIGNAL)})
        except BaseException:
            self.vcpu.close()
            raise
        self._mmio = self.vcpu.kvm_run.mmio

    def run(self) -> Exit:
        v = self.vcpu
        try:
            er = v.run()
        except kvm.KvmError as e:
            if e.errno == errno.EINTR:
                v.set_immediate_exit(False)  # before draining: a later kick sets it again
                _drain_kicks()
                return Exit("canceled")
            if e.errno == errno.EAGAIN:
                return Exit("none")
            raise GuestFault(str(e)) from None
        if er == kvm.KVM_EXIT_MMIO:
            m = self._mmio
            n = m.len
            if not 1 <= n <= 8:
                raise GuestFault(f"MMIO exit of {n} bytes at {m.phys_addr:#x}")
            data = int.from_bytes(kvm.ffi.buffer(m.data, n), "little") if m.is_write else 0
            return Exit("mmio", m.phys_addr, n, bool(m.is_write), data)
        if er == kvm.KVM_EXIT_SYSTEM_EVENT:
            t = v.kvm_run.system_event.type
            if t == kvm.KVM_SYSTEM_EVENT_SHUTDOWN:
                return Exit("psci-off")
            if t == kvm.KVM_SYSTEM_EVENT_RESET:
                return Exit("psci-reset")
            if t == kvm.KVM_SYSTEM_EVENT_CRASH:
                raise GuestFault("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)")
            return Exit("none", detail={"system_event": t})
        if er == kvm.KVM_EXIT_INTR:
            v.set_immediate_exit(False)
            _drain_kicks()
            return Exit("canceled")
        raise GuestFault(f"unexpected exit {kvm.EXIT_NAMES.get(er, str(er))}")

    def complete_mmio_read(self, value: int) -> None:
        m = self._mmio
        n = min(m.len, 8)
        kvm.ffi.memmove(m.data, value.to_bytes(8, "little")[:n], n)

    def get_reg(self, reg: int) -> int:
        return k.get_one_reg(self.vcpu.fd, reg)

    def set_reg(self, reg: int, value: int) -> None:
        k.set_one_reg(self.vcpu.fd, reg, value)

    def set_boot_registers(self, pc: int, x0: int) -> None:
        k.set_boot_regs(self.vcpu.fd, pc, x0)

    def mpidr(self) -> int:
        return k.get_one_reg(self.vcpu.fd, k.MPIDR_EL1)

    def save_state(self) -> dict[str, Any]:
        return save_vcpu(self.vcpu)

    def restore_state(self, state: Any) -> None:
        load_vcpu(self.vcpu, state, during="restore")

    def destroy(self) -> None:
        self.vcpu.close()


class KvmArm64Vm(HypervisorVm):
    """An arm64 KVM VM (``KVM_CREATE_VM`` type 0: 40-bit IPA) with an in-kernel vGICv3."""

    granule = 4096
    name = NAME
    psci_in_kernel = True  # KVM runs PSCI, WFI and the timer: every vCPU is run from the start

    def __init__(self, device: str = kvm.KVM_DEVICE) -> None:
        self.system = kvm.System(device)
        try:
            if self.system.check_extension(k.KVM_CAP_ARM_PSCI_0_2) != 1:
                raise kvm.KvmUnavailable("KVM here has no PSCI 0.2 (KVM_CAP_ARM_PSCI_0_2)")
            self.vm = self.system.create_vm()
        except BaseException:
            self.system.close()
            raise
        self.gic: k.VgicV3 | None = None
        self._slots: list[tuple[int, int, int, bool]] = []  # (gpa, size, host_addr, log_dirty)
        self._ncpus = 0
        self._vcpus: list[KvmArm64Vcpu] = []
        self._lock = threading.Lock()

    # -- memory -------------------------------------------------------------------------
    def _check(self, *values: int) -> None:
        if any(v % self.granule for v in values):
            raise ValueError(f"{[hex(v) for v in values]}: not {self.granule}-byte aligned")

    def map(self, gpa: int, host_addr: int, size: int, *, writable: bool = True) -> None:
        self._check(gpa, host_addr, size)
        slot = len(self._slots)
        self.vm.set_user_memory_region(slot, gpa, size, host_addr, readonly=not writable)
        self._slots.append((gpa, size, host_addr, False))

    def unmap(self, gpa: int, size: int) -> None:
        self._check(gpa, size)
        for slot, (g, s, _, _) in enumerate(self._slots):
            if g == gpa and s == size:
                self.vm.set_user_memory_region(slot, gpa, 0, 0)
                self._slots[slot] = (g, 0, 0, False)
                return
        raise ValueError(f"no mapping of {size:#x} bytes at {gpa:#x}")

    def start_dirty_tracking(self) -> None:
        for slot, (gpa, size, host, on) in enumerate(self._slots):
            if size and not on:
                self.vm.set_user_memory_region(slot, gpa, size, host, log_dirty=True)
                self._slots[slot] = (gpa, size, host, True)

    def take_dirty(self) -> set[int]:
        out: set[int] = set()
        for slot, (gpa, size, _, on) in enumerate(self._slots):
            if size and on:
                out.update(_bitmap_pages(self.vm.get_dirty_log(slot, size), gpa))
        return out

    # -- interrupts and vCPUs -----------------------------------------------------------
    def create_interrupt_controller(self, vcpus: int) -> None:
        self._ncpus = vcpus  # created by the last create_vcpu: KVM inits it after all vCPUs

    def create_vcpu(self, index: int) -> KvmArm64Vcpu:
        with self._lock:
            vcpu = KvmArm64Vcpu(self, index)
            self._vcpus.append(vcpu)
            if len(self._vcpus) == self._ncpus:
                self.gic = k.VgicV3.create(
                    self.vm.fd, L.GIC_DIST_ADDR, L.GIC_REDIST_ADDR, L.GIC_NR_IRQS
                )
                self.gic.init()
            return vcpu

    def set_irq(self, intid: int, level: bool) -> None:
        try:
            k.irq_line(self.vm.fd, intid - L.SPI_BASE_INTID, level)
        except kvm.KvmError as e:
            log.debug("INTID %d: %s", intid, e)

    def kick(self, vcpus: list[HypervisorVcpu]) -> None:
        for v in vcpus:
            assert isinstance(v, KvmArm64Vcpu)
            v.vcpu.set_immediate_exit(True)  # covers a kick landing just before KVM_RUN
            try:
                signal.pthread_kill(v.thread_id, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass  # the vCPU thread is gone

    # -- state --------------------------------------------------------------------------
    def _mpidrs(self) -> list[int]:
        """Each vCPU's affinity in the vGIC attributes' form (Aff3 in bits 31:24, not 39:32)."""
        out = []
        for v in sorted(self._vcpus, key=lambda v: v.index):
            m = v.mpidr()
            out.append((m & 0xFF_FFFF) | ((m >> 32) & 0xFF) << 24)
        return out

    def save_interrupt_controller(self) -> bytes:
        assert self.gic is not None
        return json.dumps(vgic.save(self.gic, self._mpidrs(), L.GIC_NR_IRQS)).encode()

    def restore_interrupt_controller(self, blob: bytes) -> None:
        assert self.gic is not None
        try:
            vgic.load(self.gic, json.loads(blob))
        except kvm.KvmError as e:
            raise ValueError(f"KVM refused the vGIC state: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"vGIC state: {e!r}") from None

    def state_to_plain(self, vcpu_states: list[Any], ic_blob: bytes) -> dict[str, Any]:
        return {
            "hypervisor": NAME,
            "arch": "aarch64",
            "vcpus": vcpu_states,
            "vgic": json.loads(ic_blob),
        }

    def state_from_plain(self, d: dict[str, Any]) -> tuple[list[Any], bytes]:
        if not isinstance(d, dict) or d.get("hypervisor") != NAME or d.get("arch") != "aarch64":
            raise ValueError("not an aarch64 KVM state")
        vcpus, gic = d.get("vcpus"), d.get("vgic")
        if not isinstance(vcpus, list) or not all(isinstance(v, dict) for v in vcpus):
            raise ValueError("vCPU states: not a list of objects")
        if not isinstance(gic, dict):
            raise ValueError("vGIC state: not an object")
        return vcpus, json.dumps(gic).encode()

    def destroy(self) -> None:
        if self.gic is not None:
            self.gic.close()
            self.gic = None
        self.vm.close()
        self.system.close()
