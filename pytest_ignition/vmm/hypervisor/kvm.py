"""The raw KVM layer: ioctls on /dev/kvm, a VM fd and vCPU fds, through cffi in ABI mode.

Owns: the ioctl numbers, thin :class:`System` / :class:`Vm` / :class:`Vcpu` wrappers, and
the plain-data forms of every piece of state a snapshot needs. Getters return data a
snapshot can serialise (``bytes``, ints, dicts, or the dataclasses below, which have
``to_dict``/``from_dict``) and the matching setter accepts it back unchanged. The x86 state
bundles that call them in the order KVM needs (``save/restore_vcpu_state``,
``save/restore_vm_state``, ``VcpuRegisterLoad``) are in :mod:`..arch.x86_64.state`; the
arm64 ioctls in ``vmm/kvm_arm64.py``. ``vmm/kvm.py`` re-exports both for old imports.

Struct layouts live in :mod:`._kvm_cdef`, pre-parsed into :mod:`._kvm_ffi` (cffi's out-of-line
ABI mode, see :mod:`._kvm_ffi_build`). Every failed ioctl raises :class:`KvmError`,
whose message names the ioctl and the errno (``KVM_RUN failed: EINTR (4)``).

Calls go through libc's ``ioctl`` via cffi, which releases the GIL for the duration of the
call, so a vCPU thread blocked in ``KVM_RUN`` does not stall the rest of the VMM.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from .._kvm_cdef import CDEF

# one definition each of ``struct kvm_segment`` and ``struct kvm_cpuid_entry2`` for both layers
from ..arch.x86_64.cpuid import CpuidEntry
from ..arch.x86_64.gdt import Segment

log = logging.getLogger(__name__)


def _load_ffi() -> Any:
    """The pre-parsed declarations of :mod:`._kvm_ffi` when they match :data:`CDEF`.

    Otherwise (module missing, built for another cffi, or generated from an older cdef) the
    cdef is parsed here, which needs pycparser and costs ~2 s per start in the nested harness.
    """
    import zlib

    try:
        from .. import _kvm_ffi

        if _kvm_ffi.CDEF_CRC32 == zlib.crc32(CDEF.encode()):
            return _kvm_ffi.ffi
        log.warning(
            "pytest_ignition/vmm/_kvm_ffi.py is out of date with _kvm_cdef.py; parsing the "
            "cdef at run time (regenerate: python -m pytest_ignition.vmm._kvm_ffi_build)"
        )
    except (ImportError, AttributeError) as e:
        log.debug("pre-parsed KVM declarations unavailable (%s); parsing the cdef", e)
    import cffi

    parsed = cffi.FFI()
    parsed.cdef(CDEF)
    return parsed


ffi = _load_ffi()
_libc = ffi.dlopen(None)

KVM_API_VERSION = 12
KVMIO = 0xAE

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


# -- ioctl numbers ------------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, "struct kvm_msr_list")
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "__u64")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")  # sic: the kernel declares it _IOR
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_SET_SIGNAL_MASK = _iow(0x8B, "struct kvm_signal_mask")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_XSAVE2 = _ior(0xCF, "struct kvm_xsave")

IOCTL_NAMES: dict[int, str] = {
    v: k for k, v in list(globals().items()) if k.startswith("KVM_") and isinstance(v, int)
}

# -- capabilities -------------------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_GET_MSR_FEATURES = 153
KVM_CAP_XSAVE2 = 208

# kvm_run.kvm_dirty_regs bits (x86): what the next KVM_RUN loads from kvm_run.s first
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

# -- exit reasons -------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_NAMES: dict[int, str] = {
    v: k for k, v in list(globals().items()) if k.startswith("KVM_EXIT_") and isinstance(v, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1

KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

PVM_MODULE_PATH = "/sys/module/kvm_pvm"
KVM_DEVICE = "/dev/kvm"

_ULONG_ZERO = ffi.cast("unsigned long", 0)


# -- errors -------------------------------------------------------------------------------
class KvmError(OSError):
    """An ioctl failed. ``ioctl`` is its name, ``errno`` the error number."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        super().__init__(err, os.strerror(err))
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, "E?")
        msg = f"{self.ioctl} failed: {name} ({self.errno})"
        return f"{msg}: {self.detail}" if self.detail else msg

    def __repr__(self) -> str:
        return f"KvmError({self.ioctl!r}, {self.errno}, {self.detail!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.ioctl, self.errno, self.detail))


class KvmUnavailable(Exception):
    """/dev/kvm is missing or cannot be opened; the message says what to do about it."""


def _ioctl(fd: int, request: int, arg: Any = _ULONG_ZERO, name: str | None = None) -> int:
    """Call ioctl(2); ``arg`` is a cdata pointer or an int passed by value."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret = _libc.ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(name or IOCTL_NAMES.get(request, hex(request)), ffi.errno)
    return ret


def _to_bytes(cdata: Any) -> bytes:
    return bytes(ffi.buffer(cdata))


def _from_bytes(ctype: str, data: bytes | bytearray | memoryview, what: str) -> Any:
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise ValueError(f"{what}: expected {size} bytes, got {len(data)}")
    obj = ffi.new(ctype + " *")
    ffi.buffer(obj)[:] = bytes(data)
    return obj


def _get_struct(fd: int, request: int, ctype: str, init: dict[str, int] | None = None) -> bytes:
    """A reading ioctl into a fresh ``ctype`` (zeroed, or ``init``); the struct as raw bytes."""
    obj = ffi.new(ctype + " *", init)
    _ioctl(fd, request, obj)
    return _to_bytes(obj)


def _set_struct(fd: int, request: int, ctype: str, data: bytes, what: str) -> None:
    """A writing ioctl of raw ``ctype`` bytes, checked for size (``what`` names it if wrong)."""
    _ioctl(fd, request, _from_bytes(ctype, data, what))


def _clock_cdata(clock: ClockData, *, realtime: bool = False) -> Any:
    """``KVM_SET_CLOCK``'s argument (``Vm.set_clock`` says what ``realtime`` does)."""
    flags = KVM_CLOCK_REALTIME if realtime and clock.flags & KVM_CLOCK_REALTIME else 0
    c = ffi.new("struct kvm_clock_data *", {"clock": clock.clock, "flags": flags})
    c.realtime = clock.realtime
    return c


def _regs_cdata(regs: Regs | dict[str, int]) -> Any:
    if isinstance(regs, dict):
        regs = Regs.from_dict(regs)
    return ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in _REG_NAMES})


def _sregs_cdata(sregs: Sregs | dict[str, Any]) -> Any:
    if isinstance(sregs, dict):
        sregs = Sregs.from_dict(sregs)
    s = ffi.new("struct kvm_sregs *")
    for name in _SEGS:
        src = getattr(sregs, name)
        dst = getattr(s, name)
        for f in _SEG_FIELDS:
            setattr(dst, f, getattr(src, f))
        dst.unusable = src.unusable
    for name in ("gdt", "idt"):
        src = getattr(sregs, name)
        dst = getattr(s, name)
        dst.base = src.base
        dst.limit = src.limit
    for name in _SREG_INTS:
        setattr(s, name, getattr(sregs, name))
    for i, v in enumerate(sregs.interrupt_bitmap):
        s.interrupt_bitmap[i] = v
    return s


def _xsave_cdata(data: bytes) -> tuple[Any, Any]:
    """(the buffer, which must stay alive, and the ``struct kvm_xsave *`` over it)."""
    if len(data) < 4096:
        raise ValueError(f"xsave: expected at least 4096 bytes, got {len(data)}")
    buf = ffi.new("char[]", bytes(data))
    return buf, ffi.cast("struct kvm_xsave *", buf)


def _msrs_cdata(items: list[tuple[int, int]]) -> tuple[Any, Any]:
    buf = ffi.new("char[]", 8 + 16 * len(items))
    m = ffi.cast("struct kvm_msrs *", buf)
    m.nmsrs = len(items)
    for i, (index, value) in enumerate(items):
        m.entries[i].index = index
        m.entries[i].data = value
    return buf, m


# -- plain-data state ---------------------------------------------------------------------
_REG_NAMES = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()


@dataclass
class Regs:
    """General-purpose registers (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Regs:
        return cls(**d)


_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl")


@dataclass
class DTable:
    """A descriptor-table register (GDTR/IDTR)."""

    base: int = 0
    limit: int = 0


_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SREG_INTS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass
class Sregs:
    """Special registers (``struct kvm_sregs``)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["interrupt_bitmap"] = list(self.interrupt_bitmap)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sregs:
        kw: dict[str, Any] = {}
        for name in _SEGS:
            kw[name] = Segment(**d[name])
        for name in ("gdt", "idt"):
            kw[name] = DTable(**d[name])
        for name in _SREG_INTS:
            kw[name] = d[name]
        kw["interrupt_bitmap"] = tuple(d["interrupt_bitmap"])
        return cls(**kw)


_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


@dataclass
class ClockData:
    """kvmclock state (``struct kvm_clock_data``); ``clock`` is guest nanoseconds."""

    clock: int
    flags: int = 0
    realtime: int = 0
    host_tsc: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> ClockData:
        return cls(**d)


def fpu_bytes(fcw: int = 0x37F, mxcsr: int = 0x1F80) -> bytes:
    """A ``struct kvm_fpu`` in its reset state (x87 control word and MXCSR at their defaults)."""
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fcw = fcw
    fpu.mxcsr = mxcsr
    return _to_bytes(fpu)


def _cpuid2(entries: list[CpuidEntry]) -> Any:
    # the flexible array needs one allocation; the caller keeps ``buf`` alive during the ioctl
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + 40 * len(entries))
    c = ffi.cast("struct kvm_cpuid2 *", buf)
    c.nent = len(entries)
    for i, e in enumerate(entries):
        for name in _CPUID_FIELDS:
            setattr(c.entries[i], name, getattr(e, name))
    return buf, c


def _cpuid_list(c: Any) -> list[CpuidEntry]:
    return [
        CpuidEntry(**{name: getattr(c.entries[i], name) for name in _CPUID_FIELDS})
        for i in range(c.nent)
    ]


def _read_cpuid(fd: int, request: int, n: int) -> list[CpuidEntry]:
    """A ``struct kvm_cpuid2`` reading ioctl, starting with room for ``n`` entries and
    doubling it (up to 4096) while the kernel answers E2BIG."""
    while True:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + 40 * n)
        c = ffi.cast("struct kvm_cpuid2 *", buf)
        c.nent = n
        try:
            _ioctl(fd, request, c)
        except KvmError as e:
            if e.errno == _errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        return _cpuid_list(c)


def _open_kvm(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(
            f"{path} does not exist: this machine has no KVM. Load the kvm_intel or kvm_amd "
            "module (and enable virtualization in the firmware), or use --ignition-engine=qemu."
        ) from None
    except PermissionError:
        raise KvmUnavailable(
            f"{path} is not accessible to this user: add the user to the 'kvm' group "
            f"(sudo usermod -aG kvm $USER, then log in again) or run as root."
        ) from None
    except OSError as e:
        raise KvmUnavailable(f"cannot open {path}: {e}") from None


# -- System -------------------------------------------------------------------------------
class System:
    """The /dev/kvm handle: capabilities, supported CPUID and MSRs, VM creation."""

    def __init__(self, path: str = KVM_DEVICE):
        self.fd = _open_kvm(path)
        try:
            version = self.api_version()
            if version != KVM_API_VERSION:
                raise KvmUnavailable(f"{path}: KVM API version {version}, need {KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise
        self._mmap_size: int | None = None
        self._sync_parts: int | None = None  # KVM_CAP_SYNC_REGS, asked once per process

    @staticmethod
    def is_pvm() -> bool:
        """True when KVM here is PVM: CPL0 guest code is emulated, so kernels do not run fast."""
        return os.path.exists(PVM_MODULE_PATH)

    def api_version(self) -> int:
        return _ioctl(self.fd, KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        if self._mmap_size is None:
            self._mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def supported_cpuid(self) -> list[CpuidEntry]:
        return _read_cpuid(self.fd, KVM_GET_SUPPORTED_CPUID, 128)

    def _msr_list(self, request: int) -> list[int]:
        n = 64
        while True:
            buf = ffi.new("char[]", 4 + 4 * n)
            lst = ffi.cast("struct kvm_msr_list *", buf)
            lst.nmsrs = n
            try:
                _ioctl(self.fd, request, lst)
            except KvmError as e:
                # E2BIG: the kernel wrote the count it needs into nmsrs
                if e.errno == _errno.E2BIG and lst.nmsrs > n and lst.nmsrs < 65536:
                    n = lst.nmsrs
                    continue
                raise
            return [lst.indices[i] for i in range(lst.nmsrs)]

    def msr_index_list(self) -> list[int]:
        """MSRs KVM saves/restores for a vCPU (what a snapshot should carry)."""
        return self._msr_list(KVM_GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        return self._msr_list(KVM_GET_MSR_FEATURE_INDEX_LIST)

    def create_vm(self) -> Vm:
        fd = _ioctl(self.fd, KVM_CREATE_VM, 0)
        return Vm(fd, self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Vm -----------------------------------------------------------------------------------
class Vm:
    """A VM fd: memory slots, in-kernel irqchip and PIT, IRQ lines, clock, vCPU creation."""

    def __init__(self, fd: int, system: System):
        self.fd = fd
        self.system = system
        self.vcpus: list[Vcpu] = []
        self._dirty_bufs: dict[int, tuple[int, Any, Any]] = {}  # slot -> (bytes, bitmap, log)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(
        self,
        slot: int,
        gpa: int,
        size: int,
        host_addr: int,
        *,
        log_dirty: bool = False,
        readonly: bool = False,
    ) -> None:
        """Map ``size`` bytes of host memory at ``host_addr`` to guest ``gpa`` (size 0 deletes)."""
        flags = (KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0) | (
            KVM_MEM_READONLY if readonly else 0
        )
        r = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": host_addr,
            },
        )
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, r)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, ffi.new("__u64 *", addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        c = ffi.new("struct kvm_enable_cap *", {"cap": cap, "flags": flags})
        for i, a in enumerate(args[:4]):
            c.args[i] = a
        _ioctl(self.fd, KVM_ENABLE_CAP, c)

    def irq_line(self, irq: int, level: int) -> None:
        lvl = ffi.new("struct kvm_irq_level *")
        lvl.irq = irq
        lvl.level = 1 if level else 0
        _ioctl(self.fd, KVM_IRQ_LINE, lvl)

    def register_irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None) -> None:
        """Route writes to eventfd ``fd`` to ``gsi``; with ``resample_fd``, level-triggered."""
        i = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi})
        if resample_fd is not None:
            i.flags = KVM_IRQFD_FLAG_RESAMPLE
            i.resamplefd = resample_fd
        _ioctl(self.fd, KVM_IRQFD, i)

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        i = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": KVM_IRQFD_FLAG_DEASSIGN})
        _ioctl(self.fd, KVM_IRQFD, i)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The slot's dirty-page bitmap (one bit per 4 KiB page, LSB first); clears it in KVM."""
        pages = (size + 4095) // 4096
        nbytes = ((pages + 63) // 64) * 8  # KVM writes whole longs
        # one buffer per slot, kept: KVM overwrites all of it, so it needs no zeroing
        cached = self._dirty_bufs.get(slot)
        if cached is None or cached[0] != nbytes:
            bitmap = ffi.new("char[]", max(nbytes, 8))
            log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
            log.dirty_bitmap = bitmap
            cached = self._dirty_bufs[slot] = (nbytes, bitmap, log)
        _, bitmap, log = cached
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, log)
        return ffi.buffer(bitmap, nbytes)[:]

    def get_clock(self) -> ClockData:
        c = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, KVM_GET_CLOCK, c)
        return ClockData(c.clock, c.flags, c.realtime, c.host_tsc)

    def set_clock(self, clock: ClockData | int, *, realtime: bool = False) -> None:
        """Set kvmclock to ``clock.clock`` guest nanoseconds.

        With ``realtime`` (and a saved ``realtime``), KVM instead advances the clock by the
        host wall time elapsed since it was read: a restored guest's monotonic clock would
        jump by the snapshot's age, which the guest reports as an RCU stall of that length,
        so restores and rollbacks do not ask for it (the agent's SYNC sets the wall clock)."""
        if isinstance(clock, int):
            clock = ClockData(clock)
        _ioctl(self.fd, KVM_SET_CLOCK, _clock_cdata(clock, realtime=realtime))

    def get_irqchip(self, chip_id: int) -> bytes:
        """Raw ``struct kvm_irqchip`` (520 bytes) of PIC master (0), PIC slave (1) or IOAPIC (2)."""
        return _get_struct(self.fd, KVM_GET_IRQCHIP, "struct kvm_irqchip", {"chip_id": chip_id})

    def set_irqchip(self, data: bytes) -> None:
        _set_struct(self.fd, KVM_SET_IRQCHIP, "struct kvm_irqchip", data, "irqchip")

    def get_pit2(self) -> bytes:
        return _get_struct(self.fd, KVM_GET_PIT2, "struct kvm_pit_state2")

    def set_pit2(self, data: bytes) -> None:
        _set_struct(self.fd, KVM_SET_PIT2, "struct kvm_pit_state2", data, "pit_state2")

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, index)
        try:
            vcpu = Vcpu(fd, index, self.system.vcpu_mmap_size(), self)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- Vcpu ---------------------------------------------------------------------------------
# struct kvm_sync_regs (x86), the union kvm_run.s: regs, then sregs, then events
_SYNC_OFFSET = ffi.offsetof("struct kvm_run", "s")
_SYNC_LAYOUT = {
    KVM_SYNC_X86_REGS: (0, "struct kvm_regs", KVM_SET_REGS),
    KVM_SYNC_X86_SREGS: (ffi.sizeof("struct kvm_regs"), "struct kvm_sregs", KVM_SET_SREGS),
    KVM_SYNC_X86_EVENTS: (
        ffi.sizeof("struct kvm_regs") + ffi.sizeof("struct kvm_sregs"),
        "struct kvm_vcpu_events",
        KVM_SET_VCPU_EVENTS,
    ),
}


def _sync_parts(vm: Vm | None) -> int:
    """The KVM_SYNC_X86_* bits this KVM loads from kvm_run (0 without a VM to ask)."""
    if vm is None:
        return 0
    cached = vm.system._sync_parts
    if cached is None:
        try:
            cached = vm.check_extension(KVM_CAP_SYNC_REGS) & sum(_SYNC_LAYOUT)
        except KvmError:
            cached = 0
        vm.system._sync_parts = cached
    return cached


class Vcpu:
    """A vCPU fd and its shared ``kvm_run`` page.

    After :meth:`run` returns, ``self.kvm_run`` (a ``struct kvm_run *``) describes the exit;
    :meth:`io_data` gives the PIO data area as a bounds-checked memoryview.
    """

    def __init__(self, fd: int, index: int, mmap_size: int, vm: Vm | None = None):
        self.fd = fd
        self.index = index
        self.vm = vm
        self.mmap_size = mmap_size
        self._mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run: Any = ffi.from_buffer("struct kvm_run *", self._mm)
        self._run_mv = memoryview(self._mm)
        self.run_lock = threading.Lock()  # held by a run loop for as long as it uses kvm_run
        # kvm_run's lifetime against writes from other threads (a kick's immediate_exit): close()
        # unmaps under it, so a kick racing a vCPU thread that is closing its vCPU cannot write
        # to an unmapped page (that was a SIGSEGV at VM shutdown)
        self._map_lock = threading.Lock()
        # What KVM_RUN can load from kvm_run itself (KVM_CAP_SYNC_REGS): :meth:`stage`
        self.sync_parts = _sync_parts(vm)
        self._sync_base = ffi.cast("char *", self.kvm_run) + _SYNC_OFFSET

    # -- running ---------------------------------------------------------------------
    def run(self) -> int:
        """KVM_RUN; returns the exit reason. Raises KvmError (EINTR on a signal/immediate exit)."""
        if _libc.ioctl(self.fd, KVM_RUN, _ULONG_ZERO) < 0:
            raise KvmError("KVM_RUN", ffi.errno)
        return self.kvm_run.exit_reason

    @property
    def exit_reason(self) -> int:
        return self.kvm_run.exit_reason

    def set_signal_mask(self, blocked: set[int] | None) -> None:
        """The signal mask in force *while in KVM_RUN* (None: the thread's own mask).

        With a signal blocked in the thread but not here, a pending instance of it makes
        KVM_RUN return EINTR without the signal ever being delivered to userspace.
        """
        if blocked is None:
            _ioctl(self.fd, KVM_SET_SIGNAL_MASK, ffi.NULL)
            return
        bits = 0
        for sig in blocked:
            if 1 <= int(sig) <= 64:
                bits |= 1 << (int(sig) - 1)
        buf = ffi.new("char[]", 4 + 8)
        m = ffi.cast("struct kvm_signal_mask *", buf)
        m.len = 8  # the kernel's sigset_t on x86_64
        ffi.memmove(m.sigset, bits.to_bytes(8, "little"), 8)
        _ioctl(self.fd, KVM_SET_SIGNAL_MASK, m)

    def set_immediate_exit(self, value: bool) -> None:
        """Set ``kvm_run.immediate_exit``; a no-op once the vCPU is closed (any thread)."""
        with self._map_lock:
            run = self.kvm_run
            if run is not None:
                run.immediate_exit = 1 if value else 0

    def io_data(self) -> memoryview:
        """The data area of a KVM_EXIT_IO (``size * count`` bytes), checked against the mapping."""
        io = self.kvm_run.io
        off = io.data_offset
        length = io.size * io.count
        if off < ffi.sizeof("struct kvm_run") or off + length > self.mmap_size:
            raise KvmError("KVM_EXIT_IO", _errno.EFAULT, f"data {off:#x}+{length} outside kvm_run")
        return self._run_mv[off : off + length]

    def mmio_data(self) -> memoryview:
        """The data field of a KVM_EXIT_MMIO, ``len`` bytes (at most 8)."""
        m = self.kvm_run.mmio
        n = min(m.len, 8)
        return memoryview(ffi.buffer(m.data))[:n]

    # -- registers staged in kvm_run (KVM_CAP_SYNC_REGS) ---------------------------------
    def stage(self, part: int, data: Any) -> None:
        """Have the next KVM_RUN load ``data`` (a ``struct kvm_regs *``, ``kvm_sregs *`` or
        ``kvm_vcpu_events *`` cdata, per ``part``: one ``KVM_SYNC_X86_*`` bit) before it enters
        the guest, instead of a ``KVM_SET_*`` ioctl now: on PVM every vCPU ioctl pays ~6 us of
        vCPU load/put, while KVM_RUN loads the vCPU anyway. Call only while no thread is in
        KVM_RUN on this vCPU. Until that KVM_RUN, what was staged is the vCPU's state: every
        get/set of those registers here loads it first (:meth:`flush_staged`)."""
        if not part & self.sync_parts or part not in _SYNC_LAYOUT:
            raise KvmError("stage", _errno.EINVAL, f"KVM cannot load part {part:#x} from kvm_run")
        off, ctype, _ = _SYNC_LAYOUT[part]
        with self._map_lock:
            run = self.kvm_run
            if run is None:
                raise KvmError("stage", _errno.EBADF, "the vCPU is closed")
            ffi.memmove(self._sync_base + off, data, ffi.sizeof(ctype))
            run.kvm_dirty_regs |= part

    @property
    def staged(self) -> int:
        """The ``KVM_SYNC_X86_*`` bits staged and not yet loaded by KVM."""
        run = self.kvm_run
        return 0 if run is None else run.kvm_dirty_regs

    def flush_staged(self) -> None:
        """Load what :meth:`stage` left for the next KVM_RUN now, by ioctl, in the order
        KVM_RUN would (regs, sregs, events)."""
        run = self.kvm_run
        if run is None or not run.kvm_dirty_regs:
            return
        for part, (off, ctype, request) in _SYNC_LAYOUT.items():
            if run.kvm_dirty_regs & part:
                _ioctl(self.fd, request, ffi.cast(ctype + " *", self._sync_base + off))
                run.kvm_dirty_regs &= ~part

    # -- registers -------------------------------------------------------------------
    def get_regs(self) -> Regs:
        self.flush_staged()
        r = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, KVM_GET_REGS, r)
        return Regs(**{n: getattr(r, n) for n in _REG_NAMES})

    def set_regs(self, regs: Regs | dict[str, int]) -> None:
        self.flush_staged()
        _ioctl(self.fd, KVM_SET_REGS, _regs_cdata(regs))

    def get_sregs(self) -> Sregs:
        self.flush_staged()
        s = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, KVM_GET_SREGS, s)
        kw: dict[str, Any] = {}
        for name in _SEGS:
            seg = getattr(s, name)
            kw[name] = Segment(**{f: getattr(seg, f) for f in _SEG_FIELDS}, unusable=seg.unusable)
        for name in ("gdt", "idt"):
            t = getattr(s, name)
            kw[name] = DTable(t.base, t.limit)
        for name in _SREG_INTS:
            kw[name] = getattr(s, name)
        kw["interrupt_bitmap"] = tuple(s.interrupt_bitmap)
        return Sregs(**kw)

    def set_sregs(self, sregs: Sregs | dict[str, Any]) -> None:
        self.flush_staged()
        _ioctl(self.fd, KVM_SET_SREGS, _sregs_cdata(sregs))

    def get_fpu(self) -> bytes:
        return _get_struct(self.fd, KVM_GET_FPU, "struct kvm_fpu")

    def set_fpu(self, data: bytes) -> None:
        _set_struct(self.fd, KVM_SET_FPU, "struct kvm_fpu", data, "fpu")

    # -- CPUID / MSRs ------------------------------------------------------------------
    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        _buf, c = _cpuid2(entries)
        _ioctl(self.fd, KVM_SET_CPUID2, c)

    def get_cpuid2(self) -> list[CpuidEntry]:
        return _read_cpuid(self.fd, KVM_GET_CPUID2, 256)

    def _msrs(self, items: list[tuple[int, int]]) -> tuple[Any, Any]:
        return _msrs_cdata(items)

    def get_msrs(self, indices: list[int], *, strict: bool = True) -> dict[int, int]:
        """Read MSRs. KVM stops at the first it cannot read: ``strict`` raises naming it,
        otherwise the MSRs read before it are returned."""
        _buf, m = self._msrs([(i, 0) for i in indices])
        n = _ioctl(self.fd, KVM_GET_MSRS, m)
        if strict and n < len(indices):
            raise KvmError("KVM_GET_MSRS", _errno.EINVAL, f"cannot read MSR {indices[n]:#x}")
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: dict[int, int], *, strict: bool = True) -> int:
        """Write MSRs; returns how many KVM accepted (``strict`` raises on a short count)."""
        items = list(msrs.items())
        _buf, m = self._msrs(items)
        n = _ioctl(self.fd, KVM_SET_MSRS, m)
        if strict and n < len(items):
            raise KvmError("KVM_SET_MSRS", _errno.EINVAL, f"cannot write MSR {items[n][0]:#x}")
        return n

    # -- LAPIC, mp_state, xsave, xcrs, events, debugregs ----------------------------------
    def get_lapic(self) -> bytes:
        return _get_struct(self.fd, KVM_GET_LAPIC, "struct kvm_lapic_state")

    def set_lapic(self, data: bytes) -> None:
        _set_struct(self.fd, KVM_SET_LAPIC, "struct kvm_lapic_state", data, "lapic")

    def get_mp_state(self) -> int:
        s = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def _xsave_size(self) -> int:
        if self.vm is not None:
            try:
                size = self.vm.check_extension(KVM_CAP_XSAVE2)
            except KvmError:
                size = 0
            if size > 4096:
                return size
        return 4096

    def get_xsave(self) -> bytes:
        size = self._xsave_size()
        buf = ffi.new("char[]", size)
        if size > 4096:
            _ioctl(self.fd, KVM_GET_XSAVE2, ffi.cast("struct kvm_xsave *", buf))
        else:
            _ioctl(self.fd, KVM_GET_XSAVE, ffi.cast("struct kvm_xsave *", buf))
        return ffi.buffer(buf)[:]

    def set_xsave(self, data: bytes) -> None:
        _buf, x = _xsave_cdata(data)
        _ioctl(self.fd, KVM_SET_XSAVE, x)

    def get_xcrs(self) -> bytes:
        return _get_struct(self.fd, KVM_GET_XCRS, "struct kvm_xcrs")

    def set_xcrs(self, data: bytes) -> None:
        _set_struct(self.fd, KVM_SET_XCRS, "struct kvm_xcrs", data, "xcrs")

    def get_vcpu_events(self) -> bytes:
        self.flush_staged()
        return _get_struct(self.fd, KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events")

    def set_vcpu_events(self, data: bytes) -> None:
        self.flush_staged()
        _set_struct(self.fd, KVM_SET_VCPU_EVENTS, "struct kvm_vcpu_events", data, "vcpu_events")

    def get_debugregs(self) -> bytes:
        return _get_struct(self.fd, KVM_GET_DEBUGREGS, "struct kvm_debugregs")

    def set_debugregs(self, data: bytes) -> None:
        _set_struct(self.fd, KVM_SET_DEBUGREGS, "struct kvm_debugregs", data, "debugregs")

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl(self.fd, KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest it was paused (avoids soft-lockup warnings after a long pause)."""
        _ioctl(self.fd, KVM_KVMCLOCK_CTRL)

    def close(self, timeout: float = 2.0) -> None:
        """Unmap ``kvm_run`` and close the fd.

        A run loop holds :attr:`run_lock` while it may touch ``kvm_run``; if it does not let go
        within ``timeout`` the mapping is deliberately leaked (unmapping it under a live loop
        would crash the process) and only the fd is closed.
        """
        if self.fd < 0:
            return
        if self.run_lock.acquire(timeout=timeout):
            try:
                with self._map_lock:
                    run, self.kvm_run = self.kvm_run, None
                    ffi.release(run)
                    self._run_mv.release()
                    self._mm.close()
            except BufferError:
                pass  # someone still holds a view of kvm_run; the mapping goes with the process
            finally:
                self.run_lock.release()
        else:
            log.warning(
                "vcpu%d: run loop still active; leaving its kvm_run page mapped", self.index
            )
        os.close(self.fd)
        self.fd = -1
