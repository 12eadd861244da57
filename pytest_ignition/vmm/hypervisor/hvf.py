"""Hypervisor.framework backend (macOS 15+ on Apple silicon) of the hypervisor layer (:mod:`.base`).

EXPERIMENTAL: written without a Mac; none of :class:`HvfVm`/:class:`HvfVcpu` has been executed.
What runs everywhere (and is unit-tested here): the C declarations (:data:`CDEF`, checked against
Apple's header signatures by tests/unit/test_hvf_cdef.py), the 16 KiB granule rules
(:func:`check_mapping`), the snapshot state's plain-data round trip (:class:`HvfState`) and the
exit logic in :mod:`.arm64_exits`.

The framework is reached through cffi in ABI mode (``ffi.dlopen`` of the framework binary, which
lives only in the dyld shared cache; dlopen still finds it). ``hv_vm_create`` returns HV_DENIED
unless the process's main executable carries ``com.apple.security.hypervisor``: the VMM runs in an
ad-hoc-signed copy of the interpreter (:mod:`.hvf_sign`, ``python -m pytest_ignition.vmm.doctor
--sign``). Constants are Apple's (``hv_vcpu_types.h``, ``hv_error.h``, ``hv_vm_types.h``).

The machine that drives it is ``vmm/arch/aarch64/machine.py``, in the process of
``vmm/machine_aarch64.py`` (``--ignition-engine=ignition`` on macOS). SIMD/FP registers Q0-Q31 go through a C shim compiled on the Mac at first use
(:mod:`.hvf_simd`: ``hv_vcpu_set_simd_fp_reg`` takes a 16-byte vector by value, in ``v0``, which
ABI mode cannot pass); FPCR/FPSR are core registers.

Known gaps (besides never having run): config objects are not ``os_release``d (one per VM/GIC,
per process); with ``hv_gic`` the vtimer PPI's routing is [unverified] (the userspace path
presents it with ``hv_vcpu_set_pending_interrupt``); trapped system registers are
read-as-zero/write-ignored and logged; whether ``hv_vm_map`` of a ``MAP_PRIVATE`` file mapping
(a restore) faults its pages in lazily is [unverified].
"""

from __future__ import annotations

import base64
import logging
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_ignition.vmm.arch.aarch64 import layout
from pytest_ignition.vmm.hypervisor import arm64_exits as ax
from pytest_ignition.vmm.hypervisor import hvf_simd
from pytest_ignition.vmm.hypervisor.base import Exit, HypervisorVcpu, HypervisorVm

log = logging.getLogger(__name__)

FRAMEWORK_PATH = "/System/Library/Frameworks/Hypervisor.framework/Hypervisor"
GRANULE = 16 * 1024  # Apple silicon's stage-2 page size; hv_vm_map wants it for all three values

# Every function here must appear with the same argument count in tests/unit/hvf_signatures.txt.
# Enum types are 32-bit except hv_sys_reg_t/hv_gic_icc_reg_t (uint16_t); Apple's arm64 ABI has the
# caller extend narrow arguments, so the width only has to be no wider than Apple's.
CDEF = """
typedef int32_t hv_return_t;
typedef uint64_t hv_vcpu_t;
typedef uint64_t hv_ipa_t;
typedef uint64_t hv_memory_flags_t;
typedef uint32_t hv_reg_t;
typedef uint16_t hv_sys_reg_t;
typedef uint32_t hv_interrupt_type_t;
typedef uint32_t hv_exit_reason_t;
typedef uint16_t hv_gic_icc_reg_t;
typedef void *hv_vm_config_t;
typedef void *hv_vcpu_config_t;
typedef void *hv_gic_config_t;
typedef void *hv_gic_state_t;
typedef struct {
    uint64_t syndrome;
    uint64_t virtual_address;
    hv_ipa_t physical_address;
} hv_vcpu_exit_exception_t;
typedef struct {
    hv_exit_reason_t reason;
    hv_vcpu_exit_exception_t exception;
} hv_vcpu_exit_t;

hv_vm_config_t hv_vm_config_create(void);
hv_return_t hv_vm_config_get_max_ipa_size(uint32_t *ipa_bit_length);
hv_return_t hv_vm_config_set_ipa_size(hv_vm_config_t config, uint32_t ipa_bit_length);
hv_return_t hv_vm_create(hv_vm_config_t config);
hv_return_t hv_vm_destroy(void);
hv_return_t hv_vm_map(void *addr, hv_ipa_t ipa, size_t size, hv_memory_flags_t flags);
hv_return_t hv_vm_unmap(hv_ipa_t ipa, size_t size);
hv_return_t hv_vm_protect(hv_ipa_t ipa, size_t size, hv_memory_flags_t flags);

hv_return_t hv_vcpu_create(hv_vcpu_t *vcpu, hv_vcpu_exit_t **exit, hv_vcpu_config_t config);
hv_return_t hv_vcpu_destroy(hv_vcpu_t vcpu);
hv_return_t hv_vcpu_run(hv_vcpu_t vcpu);
hv_return_t hv_vcpus_exit(hv_vcpu_t *vcpus, uint32_t vcpu_count);
hv_return_t hv_vcpu_get_reg(hv_vcpu_t vcpu, hv_reg_t reg, uint64_t *value);
hv_return_t hv_vcpu_set_reg(hv_vcpu_t vcpu, hv_reg_t reg, uint64_t value);
hv_return_t hv_vcpu_get_sys_reg(hv_vcpu_t vcpu, hv_sys_reg_t reg, uint64_t *value);
hv_return_t hv_vcpu_set_sys_reg(hv_vcpu_t vcpu, hv_sys_reg_t reg, uint64_t value);
hv_return_t hv_vcpu_set_pending_interrupt(hv_vcpu_t vcpu, hv_interrupt_type_t type, bool pending);
hv_return_t hv_vcpu_get_vtimer_mask(hv_vcpu_t vcpu, bool *vtimer_is_masked);
hv_return_t hv_vcpu_set_vtimer_mask(hv_vcpu_t vcpu, bool vtimer_is_masked);
hv_return_t hv_vcpu_get_vtimer_offset(hv_vcpu_t vcpu, uint64_t *vtimer_offset);
hv_return_t hv_vcpu_set_vtimer_offset(hv_vcpu_t vcpu, uint64_t vtimer_offset);

hv_gic_config_t hv_gic_config_create(void);
hv_return_t hv_gic_config_set_distributor_base(hv_gic_config_t config, hv_ipa_t distributor_base_address);
hv_return_t hv_gic_config_set_redistributor_base(hv_gic_config_t config, hv_ipa_t redistributor_base_address);
hv_return_t hv_gic_get_distributor_size(size_t *distributor_size);
hv_return_t hv_gic_get_redistributor_size(size_t *redistributor_size);
hv_return_t hv_gic_create(hv_gic_config_t gic_config);
hv_return_t hv_gic_set_spi(uint32_t intid, bool level);
hv_return_t hv_gic_get_icc_reg(hv_vcpu_t vcpu, hv_gic_icc_reg_t reg, uint64_t *value);
hv_return_t hv_gic_set_icc_reg(hv_vcpu_t vcpu, hv_gic_icc_reg_t reg, uint64_t value);
hv_gic_state_t hv_gic_state_create(void);
hv_return_t hv_gic_state_get_size(hv_gic_state_t state, size_t *gic_state_size);
hv_return_t hv_gic_state_get_data(hv_gic_state_t state, void *gic_state_data);
hv_return_t hv_gic_set_state(const void *gic_state_data, size_t gic_state_size);
"""

# libSystem: the counter the vtimer offset is relative to (CNTVCT_EL0 = mach_absolute_time() -
# vtimer_offset) and its tick length.
LIBSYSTEM_CDEF = """
uint64_t mach_absolute_time(void);
typedef struct { uint32_t numer; uint32_t denom; } mach_timebase_info_data_t;
int mach_timebase_info(mach_timebase_info_data_t *info);
"""

HV_SUCCESS = 0
HV_ERRORS = {
    0xFAE94001: "HV_ERROR",
    0xFAE94002: "HV_BUSY",
    0xFAE94003: "HV_BAD_ARGUMENT",
    0xFAE94004: "HV_ILLEGAL_GUEST_STATE",
    0xFAE94005: "HV_NO_RESOURCES",
    0xFAE94006: "HV_NO_DEVICE",
    0xFAE94007: "HV_DENIED",
    0xFAE9400F: "HV_UNSUPPORTED",
}
HV_EXIT_REASON_CANCELED = 0
HV_EXIT_REASON_EXCEPTION = 1
HV_EXIT_REASON_VTIMER_ACTIVATED = 2
HV_EXIT_REASON_UNKNOWN = 3
HV_INTERRUPT_TYPE_IRQ = 0
HV_INTERRUPT_TYPE_FIQ = 1
HV_MEMORY_READ, HV_MEMORY_WRITE, HV_MEMORY_EXEC = 1, 2, 4

# hv_reg_t
HV_REG_X0 = 0
HV_REG_PC = 31
HV_REG_FPCR = 32
HV_REG_FPSR = 33
HV_REG_CPSR = 34
CORE_REGS = {**{f"x{i}": HV_REG_X0 + i for i in range(31)}, "pc": HV_REG_PC, "fpcr": HV_REG_FPCR,
             "fpsr": HV_REG_FPSR, "cpsr": HV_REG_CPSR}  # fmt: skip


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """hv_sys_reg_t of a system register: the MRS/MSR encoding op0:op1:CRn:CRm:op2 in 16 bits."""
    return (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2


SYS_REGS = {
    "MPIDR_EL1": sys_reg(3, 0, 0, 0, 5),
    "SCTLR_EL1": sys_reg(3, 0, 1, 0, 0),
    "CPACR_EL1": sys_reg(3, 0, 1, 0, 2),
    "TTBR0_EL1": sys_reg(3, 0, 2, 0, 0),
    "TTBR1_EL1": sys_reg(3, 0, 2, 0, 1),
    "TCR_EL1": sys_reg(3, 0, 2, 0, 2),
    "SPSR_EL1": sys_reg(3, 0, 4, 0, 0),
    "ELR_EL1": sys_reg(3, 0, 4, 0, 1),
    "SP_EL0": sys_reg(3, 0, 4, 1, 0),
    "AFSR0_EL1": sys_reg(3, 0, 5, 1, 0),
    "AFSR1_EL1": sys_reg(3, 0, 5, 1, 1),
    "ESR_EL1": sys_reg(3, 0, 5, 2, 0),
    "FAR_EL1": sys_reg(3, 0, 6, 0, 0),
    "PAR_EL1": sys_reg(3, 0, 7, 4, 0),
    "MAIR_EL1": sys_reg(3, 0, 10, 2, 0),
    "AMAIR_EL1": sys_reg(3, 0, 10, 3, 0),
    "VBAR_EL1": sys_reg(3, 0, 12, 0, 0),
    "CONTEXTIDR_EL1": sys_reg(3, 0, 13, 0, 1),
    "TPIDR_EL1": sys_reg(3, 0, 13, 0, 4),
    "CNTKCTL_EL1": sys_reg(3, 0, 14, 1, 0),
    "TPIDR_EL0": sys_reg(3, 3, 13, 0, 2),
    "TPIDRRO_EL0": sys_reg(3, 3, 13, 0, 3),
    "CNTV_CTL_EL0": sys_reg(3, 3, 14, 3, 1),
    "CNTV_CVAL_EL0": sys_reg(3, 3, 14, 3, 2),
    "SP_EL1": sys_reg(3, 4, 4, 1, 0),
    "MDSCR_EL1": sys_reg(2, 0, 0, 2, 2),
}
# GIC CPU interface registers: not in hv_gic's opaque state, saved per vCPU (ICC_PMR first is
# harmless; IGRPEN1 last re-enables group 1 once priorities and the BPRs are back).
ICC_REGS = {
    "ICC_PMR_EL1": sys_reg(3, 0, 4, 6, 0),
    "ICC_BPR0_EL1": sys_reg(3, 0, 12, 8, 3),
    "ICC_AP0R0_EL1": sys_reg(3, 0, 12, 8, 4),
    "ICC_AP1R0_EL1": sys_reg(3, 0, 12, 9, 0),
    "ICC_BPR1_EL1": sys_reg(3, 0, 12, 12, 3),
    "ICC_CTLR_EL1": sys_reg(3, 0, 12, 12, 4),
    "ICC_SRE_EL1": sys_reg(3, 0, 12, 12, 5),
    "ICC_IGRPEN0_EL1": sys_reg(3, 0, 12, 12, 6),
    "ICC_IGRPEN1_EL1": sys_reg(3, 0, 12, 12, 7),
}


class HvfUnavailable(RuntimeError):
    """Hypervisor.framework cannot be used on this host (with what to do about it)."""


class HvfError(RuntimeError):
    """A framework call failed."""

    def __init__(self, call: str, code: int) -> None:
        name = HV_ERRORS.get(code & 0xFFFFFFFF, f"{code & 0xFFFFFFFF:#x}")
        hint = ""
        if name == "HV_DENIED":
            hint = (
                " (the interpreter lacks the com.apple.security.hypervisor entitlement: "
                "run python -m pytest_ignition.vmm.doctor --sign and use the signed copy)"
            )
        super().__init__(f"{call} failed: {name}{hint}")
        self.code = code & 0xFFFFFFFF


def check_mapping(gpa: int, host_addr: int, size: int, granule: int = GRANULE) -> None:
    """Refuse a mapping the framework would reject, with a message that says which value is off.
    A 4 KiB-aligned request (fine for KVM/x86) is the usual mistake."""
    bad = [
        f"{what} {value:#x}"
        for what, value in (("guest address", gpa), ("host address", host_addr), ("size", size))
        if value % granule
    ]
    if size <= 0:
        bad.append(f"size {size}")
    if bad:
        raise ValueError(
            f"Hypervisor.framework maps memory in {granule // 1024} KiB granules; not aligned: "
            + ", ".join(bad)
            + " (allocate guest RAM with mmap and round sizes and addresses up to 16 KiB)"
        )


@dataclass
class VcpuState:
    """One vCPU's saved state (plain ints)."""

    regs: dict[str, int]  # CORE_REGS names
    sys_regs: dict[str, int]  # SYS_REGS names
    icc_regs: dict[str, int]  # ICC_REGS names
    vtimer_offset: int
    vtimer_masked: bool
    powered_on: bool = True
    simd: list[bytes] = field(default_factory=list)  # Q0-Q31, 16 bytes each (little-endian)


@dataclass
class HvfState:
    """Everything of a VM that is not RAM or devices: the vCPUs, the host counter at save (to
    shift the vtimer offsets on restore so the guest counter does not jump) and hv_gic's opaque,
    OS-version-specific blob."""

    vcpus: list[VcpuState]
    counter_at_save: int
    gic_blob: bytes
    arch: str = "aarch64"
    hypervisor: str = "hvf"
    # 2: with the SIMD/FP registers (v1, never written by a released VMM, had none)
    format_version: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "arch": self.arch,
            "hypervisor": self.hypervisor,
            "counter_at_save": self.counter_at_save,
            "gic_blob": base64.b64encode(self.gic_blob).decode("ascii"),
            "vcpus": [
                {
                    "regs": dict(v.regs),
                    "sys_regs": dict(v.sys_regs),
                    "icc_regs": dict(v.icc_regs),
                    "vtimer_offset": v.vtimer_offset,
                    "vtimer_masked": v.vtimer_masked,
                    "powered_on": v.powered_on,
                    "simd": [q.hex() for q in v.simd],
                }
                for v in self.vcpus
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HvfState:
        """Parse :meth:`to_dict`'s output; a snapshot from another format, arch or hypervisor, or
        with an unknown or out-of-range register, is refused (the file may be foreign)."""
        if (
            d.get("format_version") != 2
            or d.get("arch") != "aarch64"
            or d.get("hypervisor") != "hvf"
        ):
            raise ValueError(
                f"not an HVF aarch64 snapshot state v2: {d.get('format_version')!r} "
                f"{d.get('arch')!r} {d.get('hypervisor')!r}"
            )

        def regs(src: Any, names: dict[str, int], what: str) -> dict[str, int]:
            if not isinstance(src, dict):
                raise ValueError(f"{what}: not a mapping")
            out = {}
            for k, v in src.items():
                if k not in names:
                    raise ValueError(f"{what}: unknown register {k!r}")
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
                    raise ValueError(f"{what}: {k} = {v!r} is not a 64-bit value")
                out[k] = v
            return out

        vcpus = []
        raw_vcpus = d.get("vcpus")
        if not isinstance(raw_vcpus, list):
            raise ValueError("snapshot state has no vCPU list")
        for i, v in enumerate(raw_vcpus):
            if not isinstance(v, dict):
                raise ValueError(f"vcpu {i}: not a mapping")
            off = v.get("vtimer_offset")
            if not isinstance(off, int) or not 0 <= off < 1 << 64:
                raise ValueError(f"vcpu {i}: bad vtimer_offset {off!r}")
            q = v.get("simd")
            try:
                simd = hvf_simd.check_q(
                    [bytes.fromhex(x) for x in q] if isinstance(q, list) else q, f"vcpu {i} simd"
                )
            except (TypeError, ValueError) as e:
                raise ValueError(str(e) if "simd" in str(e) else f"vcpu {i} simd: {e}") from None
            vcpus.append(
                VcpuState(
                    regs=regs(v.get("regs"), CORE_REGS, f"vcpu {i} regs"),
                    sys_regs=regs(v.get("sys_regs"), SYS_REGS, f"vcpu {i} sys_regs"),
                    icc_regs=regs(v.get("icc_regs"), ICC_REGS, f"vcpu {i} icc_regs"),
                    vtimer_offset=off,
                    vtimer_masked=bool(v.get("vtimer_masked")),
                    powered_on=bool(v.get("powered_on", True)),
                    simd=simd,
                )
            )
        if not vcpus:
            raise ValueError("snapshot state has no vCPUs")
        counter = d.get("counter_at_save")
        if not isinstance(counter, int) or isinstance(counter, bool) or counter < 0:
            raise ValueError(f"bad counter_at_save {counter!r}")
        blob = d.get("gic_blob", "")
        if not isinstance(blob, str):
            raise ValueError("gic_blob: not a base64 string")
        try:
            gic = base64.b64decode(blob, validate=True)
        except ValueError as e:
            raise ValueError(f"gic_blob: {e}") from None
        return cls(vcpus, counter, gic)


def default_cache_dir() -> Path:
    """Where the signed interpreter copy and the SIMD shim live (as ``vmm/doctor.py``)."""
    return Path(os.environ.get("IGNITION_CACHE_DIR") or Path.home() / ".cache" / "pytest-ignition")


def restored_vtimer_offset(saved_offset: int, counter_at_save: int, counter_now: int) -> int:
    """The vtimer offset that keeps the guest's counter where it stopped: the host counter moved
    by (now - at_save) while the VM was saved, so the offset grows by the same amount."""
    return (saved_offset + (counter_now - counter_at_save)) & ((1 << 64) - 1)


_lib: Any = None
_libsystem: Any = None
_ffi: Any = None


def load(system: str | None = None) -> tuple[Any, Any, Any]:
    """(ffi, framework lib, libSystem lib), loaded once. Elsewhere than macOS: HvfUnavailable."""
    global _lib, _libsystem, _ffi
    system = system or platform.system()
    if system != "Darwin":
        raise HvfUnavailable(
            f"Hypervisor.framework exists only on macOS (this is {system}); "
            "on Linux the bundled VMM uses /dev/kvm"
        )
    if _lib is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        ffi.cdef(LIBSYSTEM_CDEF)
        try:
            lib = ffi.dlopen(FRAMEWORK_PATH)
        except OSError as e:
            raise HvfUnavailable(f"cannot load {FRAMEWORK_PATH}: {e}") from e
        _ffi, _lib, _libsystem = ffi, lib, ffi.dlopen(None)
    return _ffi, _lib, _libsystem


def _check(call: str, rc: int) -> None:
    if rc != HV_SUCCESS:
        raise HvfError(call, rc)


class HvfVm(HypervisorVm):
    """The process's one HVF VM with an in-kernel GICv3 (macOS 15+). Not run on a Mac yet."""

    granule = GRANULE
    name = "hvf"

    def __init__(self, ipa_bits: int = 40, cache_dir: Path | None = None) -> None:
        self.ffi, self.lib, self.libsystem = load()
        # Before the VM exists, so a missing compiler is a clean setup error.
        self.simd = hvf_simd.load(self.ffi, cache_dir or default_cache_dir())
        self.counter_at_save: int | None = None  # of the state being restored (state_from_plain)
        cfg = self.lib.hv_vm_config_create()
        _check("hv_vm_config_set_ipa_size", self.lib.hv_vm_config_set_ipa_size(cfg, ipa_bits))
        _check("hv_vm_create", self.lib.hv_vm_create(cfg))
        self._maps: dict[int, tuple[int, int]] = {}  # gpa -> (host, size)
        self._tracking = False
        self._dirty: set[int] = set()
        self._dirty_lock = threading.Lock()
        self.vcpus: list[HvfVcpu] = []
        self.cpus_on: dict[int, bool] = {}  # MPIDR affinity -> running
        self.gic = False
        self._destroyed = False
        tb = self.ffi.new("mach_timebase_info_data_t *")
        self.libsystem.mach_timebase_info(tb)
        self.tick_ns = tb.numer / tb.denom

    def counter(self) -> int:
        return int(self.libsystem.mach_absolute_time())

    def map(self, gpa: int, host_addr: int, size: int, *, writable: bool = True) -> None:
        check_mapping(gpa, host_addr, size)
        flags = HV_MEMORY_READ | HV_MEMORY_EXEC | (HV_MEMORY_WRITE if writable else 0)
        ptr = self.ffi.cast("void *", host_addr)
        _check("hv_vm_map", self.lib.hv_vm_map(ptr, gpa, size, flags))
        self._maps[gpa] = (host_addr, size)

    def unmap(self, gpa: int, size: int) -> None:
        check_mapping(gpa, 0, size)
        _check("hv_vm_unmap", self.lib.hv_vm_unmap(gpa, size))
        self._maps.pop(gpa, None)

    def create_interrupt_controller(self, vcpus: int) -> None:
        if self.vcpus:
            raise RuntimeError("hv_gic_create must come before the first vCPU")
        size = self.ffi.new("size_t *")
        _check("hv_gic_get_redistributor_size", self.lib.hv_gic_get_redistributor_size(size))
        if size[0] > layout.GIC_REDIST_SIZE:
            raise RuntimeError(
                f"hv_gic's redistributor frame is {size[0]:#x} bytes, the layout has "
                f"{layout.GIC_REDIST_SIZE:#x} per vCPU"
            )
        cfg = self.lib.hv_gic_config_create()
        _check(
            "hv_gic_config_set_distributor_base",
            self.lib.hv_gic_config_set_distributor_base(cfg, layout.GIC_DIST_ADDR),
        )
        _check(
            "hv_gic_config_set_redistributor_base",
            self.lib.hv_gic_config_set_redistributor_base(cfg, layout.GIC_REDIST_ADDR),
        )
        _check("hv_gic_create", self.lib.hv_gic_create(cfg))
        self.gic = True

    def set_irq(self, intid: int, level: bool) -> None:
        _check("hv_gic_set_spi", self.lib.hv_gic_set_spi(intid, level))
        if level:
            # A vCPU in WFI sleeps in this process (HvfVcpu._wfi), not in the framework: wake
            # it to take the interrupt (a spurious wake only ends one WFI early).
            for v in self.vcpus:
                v.wake.set()

    def create_vcpu(self, index: int) -> HvfVcpu:
        vcpu = HvfVcpu(self, index)
        self.vcpus.append(vcpu)
        self.cpus_on[vcpu.mpidr] = index == 0
        return vcpu

    def kick(self, vcpus: list[HypervisorVcpu]) -> None:
        ids = [v.id for v in vcpus if isinstance(v, HvfVcpu)]
        for v in vcpus:
            if isinstance(v, HvfVcpu):
                v.wake.set()
        if ids:
            arr = self.ffi.new("hv_vcpu_t[]", ids)
            _check("hv_vcpus_exit", self.lib.hv_vcpus_exit(arr, len(ids)))

    # Dirty tracking: no dirty log in HVF; RAM is write-protected and the first write to each
    # granule faults (a data abort on mapped RAM), is recorded, and the granule made writable.
    def start_dirty_tracking(self) -> None:
        with self._dirty_lock:
            self._tracking = True
            self._protect_all()

    def _protect_all(self) -> None:
        for gpa, (_, size) in self._maps.items():
            _check(
                "hv_vm_protect",
                self.lib.hv_vm_protect(gpa, size, HV_MEMORY_READ | HV_MEMORY_EXEC),
            )

    def take_dirty(self) -> set[int]:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
            if self._tracking:
                for g in dirty:
                    _check(
                        "hv_vm_protect",
                        self.lib.hv_vm_protect(g, GRANULE, HV_MEMORY_READ | HV_MEMORY_EXEC),
                    )
            return dirty

    def dirty_fault(self, gpa: int) -> bool:
        """A write fault at ``gpa``: True when it is tracked RAM (recorded, made writable; the
        guest re-executes the store), False when it is MMIO."""
        if not self._tracking or not any(g <= gpa < g + s for g, (_, s) in self._maps.items()):
            return False
        g = gpa - gpa % GRANULE
        with self._dirty_lock:
            self._dirty.add(g)
            flags = HV_MEMORY_READ | HV_MEMORY_WRITE | HV_MEMORY_EXEC
            _check("hv_vm_protect", self.lib.hv_vm_protect(g, GRANULE, flags))
        return True

    def save_interrupt_controller(self) -> bytes:
        st = self.lib.hv_gic_state_create()
        size = self.ffi.new("size_t *")
        _check("hv_gic_state_get_size", self.lib.hv_gic_state_get_size(st, size))
        buf = self.ffi.new("char[]", size[0])
        _check("hv_gic_state_get_data", self.lib.hv_gic_state_get_data(st, buf))
        return bytes(self.ffi.buffer(buf, size[0]))

    def restore_interrupt_controller(self, blob: bytes) -> None:
        _check("hv_gic_set_state", self.lib.hv_gic_set_state(blob, len(blob)))

    def state_to_plain(self, vcpu_states: list[Any], ic_blob: bytes) -> dict[str, Any]:
        return HvfState(list(vcpu_states), self.counter(), ic_blob).to_dict()

    def state_from_plain(self, d: dict[str, Any]) -> tuple[list[Any], bytes]:
        st = HvfState.from_dict(d)
        self.counter_at_save = st.counter_at_save  # restore_state shifts the vtimer offsets
        return st.vcpus, st.gic_blob

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        for gpa, (_, size) in list(self._maps.items()):
            self.lib.hv_vm_unmap(gpa, size)
        _check("hv_vm_destroy", self.lib.hv_vm_destroy())


# A WFI sleeps at most this long per run() call, so the loop re-checks for shutdown.
WFI_MAX_SLEEP_S = 0.5


@dataclass
class _PendingRead:
    abort: ax.DataAbort


class HvfVcpu(HypervisorVcpu):
    """One vCPU, created by (and bound to) the calling thread. Not run on a Mac yet."""

    def __init__(self, vm: HvfVm, index: int) -> None:
        self.vm, self.index, self.lib, self.ffi = vm, index, vm.lib, vm.ffi
        vid = self.ffi.new("hv_vcpu_t *")
        exitp = self.ffi.new("hv_vcpu_exit_t **")
        _check("hv_vcpu_create", self.lib.hv_vcpu_create(vid, exitp, self.ffi.NULL))
        self.id = int(vid[0])
        self.exit = exitp[0]
        # The MPIDR the device tree's cpu@N reg and the redistributor order use (layout.mpidr):
        # PSCI CPU_ON targets and GICR_TYPER affinities are matched against it.
        self.mpidr = layout.mpidr(index)
        self.set_sys_reg("MPIDR_EL1", self.mpidr)
        self.vtimer = ax.Vtimer()
        self.wake = threading.Event()
        self._pending: _PendingRead | None = None

    def get_reg(self, reg: int) -> int:
        out = self.ffi.new("uint64_t *")
        _check("hv_vcpu_get_reg", self.lib.hv_vcpu_get_reg(self.id, reg, out))
        return int(out[0])

    def set_reg(self, reg: int, value: int) -> None:
        _check("hv_vcpu_set_reg", self.lib.hv_vcpu_set_reg(self.id, reg, value))

    def set_boot_registers(self, pc: int, x0: int) -> None:
        for i in range(1, 4):
            self.set_reg(HV_REG_X0 + i, 0)
        self.set_reg(HV_REG_X0, x0)
        self.set_reg(HV_REG_PC, pc)
        self.set_reg(HV_REG_CPSR, ax.PSTATE_EL1H_DAIF_MASKED)

    def get_q(self, n: int) -> bytes:
        """SIMD/FP register Qn (16 bytes, as stored: little-endian lanes)."""
        out = self.ffi.new("uint8_t[16]")
        rc = self.vm.simd.ign_hvf_get_simd_fp_reg(self.id, hvf_simd.HV_SIMD_FP_REG_Q0 + n, out)
        _check("hv_vcpu_get_simd_fp_reg", rc)
        return bytes(self.ffi.buffer(out, hvf_simd.Q_BYTES))

    def set_q(self, n: int, value: bytes) -> None:
        if len(value) != hvf_simd.Q_BYTES:
            raise ValueError(f"Q{n}: {len(value)} bytes, a Q register has 16")
        buf = self.ffi.new("uint8_t[16]", value)
        rc = self.vm.simd.ign_hvf_set_simd_fp_reg(self.id, hvf_simd.HV_SIMD_FP_REG_Q0 + n, buf)
        _check("hv_vcpu_set_simd_fp_reg", rc)

    def get_sys_reg(self, name: str) -> int:
        out = self.ffi.new("uint64_t *")
        _check("hv_vcpu_get_sys_reg", self.lib.hv_vcpu_get_sys_reg(self.id, SYS_REGS[name], out))
        return int(out[0])

    def set_sys_reg(self, name: str, value: int) -> None:
        _check("hv_vcpu_set_sys_reg", self.lib.hv_vcpu_set_sys_reg(self.id, SYS_REGS[name], value))

    def _advance(self, ec: int) -> None:
        step = ax.pc_advance(ec)
        if step:
            self.set_reg(HV_REG_PC, self.get_reg(HV_REG_PC) + step)

    def _apply(self, actions: list[tuple[str, bool]]) -> None:
        for what, value in actions:
            if what == "mask":
                _check("hv_vcpu_set_vtimer_mask", self.lib.hv_vcpu_set_vtimer_mask(self.id, value))
        # [unverified] with hv_gic the framework's GIC takes the vtimer PPI; without it the line is
        # presented with set_pending_interrupt before each run (cleared by the framework on exit).

    def run(self) -> Exit:
        if self.vtimer.line and not self.vm.gic:
            self.lib.hv_vcpu_set_pending_interrupt(self.id, HV_INTERRUPT_TYPE_IRQ, True)
        _check("hv_vcpu_run", self.lib.hv_vcpu_run(self.id))
        reason = self.exit.reason
        if reason == HV_EXIT_REASON_CANCELED:
            return Exit("canceled")
        if reason == HV_EXIT_REASON_VTIMER_ACTIVATED:
            self._apply(self.vtimer.activated())
            return Exit("none")
        if reason != HV_EXIT_REASON_EXCEPTION:
            raise ax.GuestFault(f"vCPU {self.index}: unknown exit reason {reason}")
        self._apply(self.vtimer.sync(self.get_sys_reg("CNTV_CTL_EL0")))
        esr = int(self.exit.exception.syndrome)
        ec = ax.exception_class(esr)
        if ec == ax.EC_DABT_LOWER:
            pa = int(self.exit.exception.physical_address)
            if esr & (1 << 6) and self.vm.dirty_fault(pa):
                return Exit("none")  # PC unchanged: the store runs again, now writable
            abort = ax.decode_data_abort(esr)
            self._advance(ec)
            if abort.write:
                reg = 0 if abort.srt == ax.XZR else self.get_reg(HV_REG_X0 + abort.srt)
                value = ax.mmio_write_value(abort, reg)
                return Exit("mmio", pa, abort.size, True, value)
            self._pending = _PendingRead(abort)
            return Exit("mmio", pa, abort.size, False)
        if ec in (ax.EC_HVC64, ax.EC_SMC64):
            x = [self.get_reg(HV_REG_X0 + i) for i in range(4)]
            res = ax.psci_call(*x, cpus_on=self.vm.cpus_on)
            self.set_reg(HV_REG_X0, res.x0)
            self._advance(ec)
            if res.action == "system-off":
                return Exit("psci-off")
            if res.action == "system-reset":
                return Exit("psci-reset")
            if res.action == "off":
                self.vm.cpus_on[self.mpidr] = False
                return Exit("psci-cpu-off")
            if res.action == "cpu-on":
                self.vm.cpus_on[res.target] = True
                detail = {"target": res.target, "entry": res.entry, "context": res.context}
                return Exit("psci-cpu-on", detail=detail)
            return Exit("none")
        if ec == ax.EC_WFX:
            self._advance(ec)
            if esr & 1:  # WFE: nothing to wait for in a VM without events between vCPUs
                return Exit("none")
            return self._wfi()
        if ec == ax.EC_SYSREG:
            # Unknown trapped system register: RAZ/WI, logged (QEMU injects UNDEF for some).
            is_read, rt = esr & 1, (esr >> 5) & 0x1F
            if is_read and rt != ax.XZR:
                self.set_reg(HV_REG_X0 + rt, 0)
            self._advance(ec)
            log.warning("vCPU %d: trapped sysreg access ESR %#x (RAZ/WI)", self.index, esr)
            return Exit("none", detail={"sysreg_esr": esr})
        raise ax.GuestFault(f"vCPU {self.index}: unhandled exception, ESR {esr:#x} (EC {ec:#x})")

    def _wfi(self) -> Exit:
        ctl = self.get_sys_reg("CNTV_CTL_EL0")
        cval = self.get_sys_reg("CNTV_CVAL_EL0")
        off = self.ffi.new("uint64_t *")
        _check("hv_vcpu_get_vtimer_offset", self.lib.hv_vcpu_get_vtimer_offset(self.id, off))
        ticks = ax.wfi_ticks(ctl, cval, self.vm.counter() - int(off[0]))
        timeout = (
            WFI_MAX_SLEEP_S
            if ticks is None
            else min(WFI_MAX_SLEEP_S, ticks * self.vm.tick_ns / 1e9)
        )
        if timeout > 0:
            self.wake.wait(timeout)
        self.wake.clear()
        return Exit("wfi")

    def complete_mmio_read(self, value: int) -> None:
        if self._pending is None:
            raise RuntimeError("complete_mmio_read without a pending MMIO read")
        result = ax.mmio_read_result(self._pending.abort, value)
        if result is not None:
            self.set_reg(HV_REG_X0 + self._pending.abort.srt, result)
        self._pending = None

    def save_state(self) -> VcpuState:
        icc = {}
        for name, reg in ICC_REGS.items():
            out = self.ffi.new("uint64_t *")
            _check("hv_gic_get_icc_reg", self.lib.hv_gic_get_icc_reg(self.id, reg, out))
            icc[name] = int(out[0])
        off = self.ffi.new("uint64_t *")
        _check("hv_vcpu_get_vtimer_offset", self.lib.hv_vcpu_get_vtimer_offset(self.id, off))
        masked = self.ffi.new("bool *")
        _check("hv_vcpu_get_vtimer_mask", self.lib.hv_vcpu_get_vtimer_mask(self.id, masked))
        return VcpuState(
            regs={n: self.get_reg(r) for n, r in CORE_REGS.items()},
            sys_regs={n: self.get_sys_reg(n) for n in SYS_REGS},
            icc_regs=icc,
            vtimer_offset=int(off[0]),
            vtimer_masked=bool(masked[0]),
            powered_on=self.vm.cpus_on.get(self.mpidr, False),
            simd=[self.get_q(n) for n in range(hvf_simd.NUM_Q_REGS)],
        )

    def restore_state(self, state: Any, *, counter_at_save: int | None = None) -> None:
        # MPIDR first: hv_gic matches redistributors to vCPUs by it.
        self.set_sys_reg("MPIDR_EL1", state.sys_regs.get("MPIDR_EL1", self.mpidr))
        for n, v in state.sys_regs.items():
            self.set_sys_reg(n, v)
        for n, v in state.regs.items():
            self.set_reg(CORE_REGS[n], v)
        for n, q in enumerate(hvf_simd.check_q(state.simd)):
            self.set_q(n, q)
        off = state.vtimer_offset
        if counter_at_save is None:
            counter_at_save = self.vm.counter_at_save
        if counter_at_save is not None:
            off = restored_vtimer_offset(off, counter_at_save, self.vm.counter())
        _check("hv_vcpu_set_vtimer_offset", self.lib.hv_vcpu_set_vtimer_offset(self.id, off))
        _check(
            "hv_vcpu_set_vtimer_mask",
            self.lib.hv_vcpu_set_vtimer_mask(self.id, state.vtimer_masked),
        )
        self.vtimer.masked = self.vtimer.line = state.vtimer_masked
        self.vm.cpus_on[self.mpidr] = state.powered_on

    def restore_icc(self, state: VcpuState) -> None:
        """After hv_gic_set_state: the CPU interface registers (else PMR=0 masks everything)."""
        for name, v in state.icc_regs.items():
            _check("hv_gic_set_icc_reg", self.lib.hv_gic_set_icc_reg(self.id, ICC_REGS[name], v))

    def after_interrupt_controller_restore(self, state: Any) -> None:
        self.restore_icc(state)

    def destroy(self) -> None:
        _check("hv_vcpu_destroy", self.lib.hv_vcpu_destroy(self.id))


__all__ = [
    "CDEF",
    "GRANULE",
    "HvfError",
    "HvfState",
    "HvfUnavailable",
    "HvfVcpu",
    "HvfVm",
    "VcpuState",
    "check_mapping",
    "load",
    "restored_vtimer_offset",
]
