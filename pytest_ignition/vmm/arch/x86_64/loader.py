"""Kernel, initrd and command-line loading into guest memory.

Two kernel formats:
- a bzImage, entered through the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
  the protected-mode part is copied to 1 MiB (or ``pref_address`` for a non-relocatable
  kernel) and entered at load address + 0x200 in long mode with RSI = zero page;
- an uncompressed ELF ``vmlinux``: PT_LOAD segments at their physical addresses, entered at
  the PVH entry point (Xen ELF note ``XEN_ELFNOTE_PHYS32_ENTRY``) when it has one, else at
  ``e_entry`` translated to a physical address (64-bit entry, like a bzImage).

Every offset and length read from the file is checked against the file size and every
destination against guest RAM; anything wrong raises :class:`KernelLoadError` saying what.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from ...memory import GuestMemory, GuestMemoryError
from . import layout

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: xloadflags, i.e. the 64-bit entry is announced
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_NOTE = 4
EM_X86_64 = 62
XEN_ELFNOTE_PHYS32_ENTRY = 18
# The kernel's virtual base for its text mapping; physical = virtual - this, when no
# segment maps the entry point.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000


class KernelLoadError(Exception):
    """The kernel, initrd or command line cannot be loaded; the message says why."""


@dataclass
class SetupHeader:
    """The fields of a bzImage's setup header that loading uses (raw bytes kept for the zero page)."""

    raw: bytes  # from offset 0x1f1 to the end of the header, copied into boot_params
    setup_sects: int
    version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


@dataclass
class KernelImage:
    """Where a loaded kernel sits and how to enter it."""

    kind: str  # "bzimage", "elf64" (64-bit entry, zero page) or "pvh" (32-bit PVH entry)
    entry: int  # guest-physical RIP at the first instruction
    load_addr: int
    end: int  # first byte above everything the kernel needs (including decompression room)
    setup_header: SetupHeader | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)  # (gpa, memsz) loaded

    @property
    def pvh(self) -> bool:
        return self.kind == "pvh"

    @property
    def cmdline_size(self) -> int:
        # 2.06+ headers say; an ELF kernel has no header: Linux's COMMAND_LINE_SIZE on x86 is 2048.
        return self.setup_header.cmdline_size if self.setup_header else 2047

    @property
    def initrd_addr_max(self) -> int:
        if self.setup_header is not None:
            return self.setup_header.initrd_addr_max
        return 0x7FFF_FFFF  # the boot protocol's default for old headers; safe for ELF too


def _low_ram_end(mem: GuestMemory) -> int:
    return min(mem.regions[0].end, layout.MMIO_START)


def read_kernel_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KernelLoadError(f"kernel {os.fspath(path)!r}: no such file") from None
    except IsADirectoryError:
        raise KernelLoadError(f"kernel {os.fspath(path)!r}: is a directory") from None
    except OSError as e:
        raise KernelLoadError(f"kernel {os.fspath(path)!r}: cannot read: {e.strerror}") from None


def parse_setup_header(data: bytes, what: str = "bzImage") -> SetupHeader:
    """Parse and validate a bzImage setup header (boot protocol 2.12+, 64-bit entry)."""
    if len(data) < 0x26C:
        raise KernelLoadError(
            f"{what}: {len(data)} bytes is too short for a bzImage setup header (needs 620)"
        )
    (boot_flag,) = struct.unpack_from("<H", data, 0x1FE)
    magic = data[0x202:0x206]
    if magic != HDRS_MAGIC:
        raise KernelLoadError(f"{what}: not a bzImage (no 'HdrS' magic at 0x202, found {magic!r})")
    if boot_flag != BOOT_FLAG:
        raise KernelLoadError(f"{what}: bad boot flag {boot_flag:#06x} at 0x1fe (want 0xaa55)")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < MIN_BOOT_PROTOCOL:
        raise KernelLoadError(
            f"{what}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
            f"(need 2.12+ for the 64-bit entry)"
        )
    setup_sects = data[0x1F1] or 4  # 0 means 4, for historical reasons
    loadflags = data[0x211]
    (code32_start,) = struct.unpack_from("<I", data, 0x214)
    (initrd_addr_max, kernel_alignment) = struct.unpack_from("<II", data, 0x22C)
    relocatable = bool(data[0x234])
    (xloadflags,) = struct.unpack_from("<H", data, 0x236)
    (cmdline_size,) = struct.unpack_from("<I", data, 0x238)
    (pref_address,) = struct.unpack_from("<Q", data, 0x258)
    (init_size,) = struct.unpack_from("<I", data, 0x260)
    if not loadflags & LOADED_HIGH:
        raise KernelLoadError(f"{what}: a zImage (not LOADED_HIGH) cannot be booted")
    if not xloadflags & XLF_KERNEL_64:
        raise KernelLoadError(f"{what}: kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
    # The header ends at 0x202 + the jump's 8-bit displacement.
    header_end = min(0x202 + data[0x201], len(data), 0x290)
    header_end = max(header_end, 0x26C)
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise KernelLoadError(
            f"{what}: setup_sects={setup_sects} puts the kernel at {setup_size:#x}, "
            f"past the end of the {len(data)}-byte file"
        )
    if kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1):
        raise KernelLoadError(f"{what}: kernel_alignment {kernel_alignment:#x} is not a power of 2")
    return SetupHeader(
        raw=bytes(data[SETUP_HEADER_OFFSET:header_end]),
        setup_sects=setup_sects,
        version=version,
        loadflags=loadflags,
        code32_start=code32_start,
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable=relocatable,
        xloadflags=xloadflags,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
    )


def load_bzimage(mem: GuestMemory, data: bytes, what: str = "bzImage") -> KernelImage:
    hdr = parse_setup_header(data, what)
    pm_offset = (hdr.setup_sects + 1) * 512
    payload = memoryview(data)[pm_offset:]
    if hdr.relocatable or not hdr.pref_address:
        load_addr = layout.HIMEM_START
    else:
        load_addr = hdr.pref_address
    # A relocatable kernel decompresses itself to max(load address aligned, pref_address)
    # and needs init_size bytes there; a fixed one needs them at its load address.
    run_addr = max(load_addr, hdr.pref_address)
    end = max(load_addr + len(payload), run_addr + hdr.init_size)
    low_end = _low_ram_end(mem)
    if end > low_end:
        raise KernelLoadError(
            f"{what}: kernel needs guest RAM up to {end:#x} (load at {load_addr:#x}, "
            f"init_size {hdr.init_size:#x}) but low RAM ends at {low_end:#x}; give the VM more memory"
        )
    try:
        mem.write(load_addr, payload)
    except GuestMemoryError as e:
        raise KernelLoadError(f"{what}: {e}") from None
    return KernelImage(
        kind="bzimage",
        entry=load_addr + 0x200,
        load_addr=load_addr,
        end=end,
        setup_header=hdr,
        segments=[(load_addr, len(payload))],
    )


def _elf_notes(data: bytes, off: int, size: int, what: str):
    """Yield (name, type, desc) from a PT_NOTE segment, stopping at the first malformed note."""
    pos, end = off, off + size
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name_end = pos + namesz
        desc_off = pos + ((namesz + 3) & ~3)
        desc_end = desc_off + descsz
        if desc_end > end:
            raise KernelLoadError(f"{what}: ELF note at {pos - 12:#x} runs past its segment")
        yield data[pos:name_end].rstrip(b"\0"), ntype, data[desc_off:desc_end]
        pos = desc_off + ((descsz + 3) & ~3)


def _parse_elf_header(data: bytes, what: str) -> tuple[int, int, int, int]:
    """Check the ELF header; return (e_entry, e_phoff, e_phentsize, e_phnum)."""
    if len(data) < 64:
        raise KernelLoadError(f"{what}: {len(data)} bytes is too short for an ELF header")
    if data[4] != 2 or data[5] != 1:
        raise KernelLoadError(
            f"{what}: not a 64-bit little-endian ELF (class {data[4]}, data {data[5]})"
        )
    (e_type, e_machine) = struct.unpack_from("<HH", data, 16)
    (e_entry, e_phoff) = struct.unpack_from("<QQ", data, 24)
    (e_phentsize, e_phnum) = struct.unpack_from("<HH", data, 54)
    if e_machine != EM_X86_64:
        raise KernelLoadError(f"{what}: ELF machine {e_machine} is not x86_64 (62)")
    if e_type != 2:
        raise KernelLoadError(f"{what}: ELF type {e_type} is not an executable (2)")
    if e_phentsize < 56 or e_phnum == 0:
        raise KernelLoadError(
            f"{what}: no usable program headers (phentsize {e_phentsize}, phnum {e_phnum})"
        )
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise KernelLoadError(f"{what}: program headers run past the end of the file")
    return e_entry, e_phoff, e_phentsize, e_phnum


def load_elf(mem: GuestMemory, data: bytes, what: str = "vmlinux") -> KernelImage:
    e_entry, e_phoff, e_phentsize, e_phnum = _parse_elf_header(data, what)

    low_end = _low_ram_end(mem)
    segments: list[tuple[int, int]] = []
    pvh_entry: int | None = None
    entry_phys: int | None = None
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == PT_NOTE:
            if p_offset + p_filesz > len(data):
                raise KernelLoadError(f"{what}: note segment {i} runs past the end of the file")
            for name, ntype, desc in _elf_notes(data, p_offset, p_filesz, what):
                if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
                    pvh_entry = int.from_bytes(desc, "little")
            continue
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise KernelLoadError(
                f"{what}: segment {i} has filesz {p_filesz:#x} > memsz {p_memsz:#x}"
            )
        if p_offset + p_filesz > len(data):
            raise KernelLoadError(
                f"{what}: segment {i} ({p_offset:#x}+{p_filesz:#x}) runs past the end of the file"
            )
        if p_paddr < layout.HIMEM_START or p_paddr + p_memsz > low_end:
            raise KernelLoadError(
                f"{what}: segment {i} at {p_paddr:#x}+{p_memsz:#x} is outside guest low RAM "
                f"[{layout.HIMEM_START:#x}, {low_end:#x}); give the VM more memory"
            )
        try:
            mem.write(p_paddr, memoryview(data)[p_offset : p_offset + p_filesz])
            if p_memsz > p_filesz:
                mem.write(p_paddr + p_filesz, bytes(p_memsz - p_filesz))
        except GuestMemoryError as e:
            raise KernelLoadError(f"{what}: {e}") from None
        segments.append((p_paddr, p_memsz))
        if p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry_phys = e_entry - p_vaddr + p_paddr
    if not segments:
        raise KernelLoadError(f"{what}: ELF has no PT_LOAD segments")
    load_addr = min(s[0] for s in segments)
    end = max(s[0] + s[1] for s in segments)
    if pvh_entry is not None:
        if not any(a <= pvh_entry < a + n for a, n in segments):
            raise KernelLoadError(
                f"{what}: PVH entry {pvh_entry:#x} is outside the loaded segments"
            )
        return KernelImage("pvh", pvh_entry, load_addr, end, None, segments)
    if entry_phys is None:
        entry_phys = e_entry - START_KERNEL_MAP if e_entry >= START_KERNEL_MAP else e_entry
    if not any(a <= entry_phys < a + n for a, n in segments):
        raise KernelLoadError(f"{what}: entry point {e_entry:#x} is outside the loaded segments")
    return KernelImage("elf64", entry_phys, load_addr, end, None, segments)


def check_kernel_file(path: str | os.PathLike[str]) -> str:
    """Validate a kernel file's format without guest memory; returns its kind.

    Lets a front end reject a bad kernel with a precise message before it opens /dev/kvm.
    """
    data = read_kernel_file(path)
    what = f"kernel {os.fspath(path)!r}"
    if not data:
        raise KernelLoadError(f"{what}: file is empty")
    if data[:4] == ELF_MAGIC:
        _parse_elf_header(data, what)
        return "elf"
    if len(data) >= 0x206 and data[0x202:0x206] == HDRS_MAGIC:
        parse_setup_header(data, what)
        return "bzimage"
    raise KernelLoadError(f"{what}: neither a bzImage (no 'HdrS' at 0x202) nor an ELF vmlinux")


def load_kernel(mem: GuestMemory, path: str | os.PathLike[str]) -> KernelImage:
    """Load a bzImage or an ELF vmlinux from ``path`` into ``mem``, choosing by content."""
    data = read_kernel_file(path)
    what = f"kernel {os.fspath(path)!r}"
    if not data:
        raise KernelLoadError(f"{what}: file is empty")
    if data[:4] == ELF_MAGIC:
        return load_elf(mem, data, what)
    if len(data) >= 0x206 and data[0x202:0x206] == HDRS_MAGIC:
        return load_bzimage(mem, data, what)
    raise KernelLoadError(f"{what}: neither a bzImage (no 'HdrS' at 0x202) nor an ELF vmlinux")


def load_initrd(
    mem: GuestMemory, path: str | os.PathLike[str], kernel: KernelImage
) -> tuple[int, int]:
    """Copy the initrd page-aligned just below the top of low RAM; return (gpa, size)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise KernelLoadError(f"initrd {os.fspath(path)!r}: no such file") from None
    except OSError as e:
        raise KernelLoadError(f"initrd {os.fspath(path)!r}: cannot read: {e.strerror}") from None
    return place_initrd(mem, data, kernel, what=f"initrd {os.fspath(path)!r}")


def place_initrd(
    mem: GuestMemory, data: bytes, kernel: KernelImage, what: str = "initrd"
) -> tuple[int, int]:
    size = len(data)
    if size == 0:
        raise KernelLoadError(f"{what}: file is empty")
    top = min(_low_ram_end(mem), kernel.initrd_addr_max + 1)
    addr = (top - size) & ~0xFFF
    if top < size or addr < kernel.end:
        raise KernelLoadError(
            f"{what}: {size} bytes do not fit between the kernel's end ({kernel.end:#x}) "
            f"and {top:#x}; give the VM more memory"
        )
    try:
        mem.write(addr, data)
    except GuestMemoryError as e:
        raise KernelLoadError(f"{what}: {e}") from None
    return addr, size


def load_cmdline(mem: GuestMemory, cmdline: str, kernel: KernelImage) -> tuple[int, int]:
    """Write the NUL-terminated command line at 0x20000; return (gpa, length without NUL)."""
    raw = cmdline.encode()
    if b"\0" in raw:
        raise KernelLoadError("kernel command line contains a NUL byte")
    limit = min(kernel.cmdline_size, layout.CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise KernelLoadError(
            f"kernel command line is {len(raw)} bytes; this kernel accepts at most {limit}"
        )
    mem.write(layout.CMDLINE_ADDR, raw + b"\0")
    return layout.CMDLINE_ADDR, len(raw)
