"""The x86_64 boot structures, checked in guest memory with no vCPU."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ignition.vmm.arch.x86_64 import (
    boot,
    bootparams,
    cpuid,
    gdt,
    layout,
    loader,
    mptable,
    msrs,
    paging,
)
from pytest_ignition.vmm.arch.x86_64.loader import KernelLoadError
from pytest_ignition.vmm.memory import FOUR_GIB, MMIO_START, GuestMemory

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(128 * MiB)
    yield m
    m.close()


def synthetic_bzimage(
    *,
    payload: bytes = b"\x90" * 4096,
    setup_sects: int = 4,
    version: int = 0x020F,
    xloadflags: int = loader.XLF_KERNEL_64 | loader.XLF_CAN_BE_LOADED_ABOVE_4G,
    relocatable: bool = True,
    pref_address: int = 0x100_0000,
    init_size: int = 0x40_0000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    magic: bytes = b"HdrS",
) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A  # jump over the header: header ends at 0x26c
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loader.LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<II", setup, 0x22C, initrd_addr_max, 0x20_0000)
    setup[0x234] = int(relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def synthetic_elf(*, pvh_entry: int | None = 0x100_0100, paddr: int = 0x100_0000) -> bytes:
    """A minimal x86_64 ELF executable: one PT_LOAD (filesz 0x200, memsz 0x1000) and a Xen note."""
    vaddr = 0xFFFF_FFFF_8000_0000 + paddr
    text = bytes(range(256)) * 2
    note = b""
    if pvh_entry is not None:
        note = struct.pack("<III", 4, 4, loader.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
        note += struct.pack("<I", pvh_entry)
    phnum = 2 if note else 1
    phoff = 64
    data_off = phoff + 56 * phnum
    text_off = (data_off + len(note) + 15) & ~15
    ehdr = bytearray(64)
    ehdr[0:4] = b"\x7fELF"
    ehdr[4], ehdr[5], ehdr[6] = 2, 1, 1
    struct.pack_into(
        "<HHIQQQIHHHHHH", ehdr, 16, 2, 62, 1, vaddr + 0x10, phoff, 0, 0, 64, 56, phnum, 64, 0, 0
    )
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, text_off, vaddr, paddr, len(text), 0x1000, 0x1000)
    if note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, data_off, 0, 0, len(note), len(note), 4)
    body = bytes(ehdr) + phdrs + note
    return body + bytes(text_off - len(body)) + text


# -- bzImage ------------------------------------------------------------------------------
def test_synthetic_bzimage_loads_at_1mib(mem, tmp_path):
    payload = bytes(range(256)) * 16
    path = tmp_path / "bzImage"
    path.write_bytes(synthetic_bzimage(payload=payload))
    k = loader.load_kernel(mem, path)
    assert k.kind == "bzimage"
    assert k.load_addr == 0x100000
    assert k.entry == 0x100200
    assert mem.read(0x100000, len(payload)) == payload
    assert k.setup_header.version_str == "2.15"
    # relocatable: decompresses at pref_address, so needs pref_address + init_size
    assert k.end == 0x100_0000 + 0x40_0000


def test_non_relocatable_bzimage_loads_at_pref_address(mem):
    k = loader.load_bzimage(mem, synthetic_bzimage(relocatable=False, pref_address=0x20_0000))
    assert k.load_addr == 0x20_0000
    assert k.entry == 0x20_0200


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"MZ" + bytes(100), "neither a bzImage"),
        (synthetic_bzimage()[:0x240], "too short"),
        (synthetic_bzimage(magic=b"HdrX"), "neither a bzImage"),
        (synthetic_bzimage(version=0x0206), "too old"),
        (synthetic_bzimage(xloadflags=0), "64-bit entry"),
        (synthetic_bzimage(payload=b"", setup_sects=4), "past the end"),
        (b"\x7fELF" + bytes(20), "too short for an ELF"),
    ],
)
def test_bad_kernels_raise_clear_errors(mem, tmp_path, data, message):
    path = tmp_path / "kernel"
    path.write_bytes(data)
    with pytest.raises(KernelLoadError, match=message):
        loader.load_kernel(mem, path)


def test_missing_kernel_file(mem, tmp_path):
    with pytest.raises(KernelLoadError, match="no such file"):
        loader.load_kernel(mem, tmp_path / "nope")
    with pytest.raises(KernelLoadError, match="is a directory"):
        loader.load_kernel(mem, tmp_path)


def test_kernel_larger_than_ram_is_rejected(tmp_path):
    small = GuestMemory.anonymous(8 * MiB)
    try:
        with pytest.raises(KernelLoadError, match="more memory"):
            loader.load_bzimage(small, synthetic_bzimage())
    finally:
        small.close()


def test_initrd_placed_high_page_aligned(mem):
    k = loader.load_bzimage(mem, synthetic_bzimage())
    data = b"initrd!" * 1000
    addr, size = loader.place_initrd(mem, data, k)
    assert size == len(data)
    assert addr % 4096 == 0
    assert addr + size <= 128 * MiB
    assert 128 * MiB - (addr + size) < 4096
    assert mem.read(addr, size) == data


def test_initrd_respects_initrd_addr_max(mem):
    k = loader.load_bzimage(mem, synthetic_bzimage(initrd_addr_max=0x37FF_FFF, init_size=0x10_0000))
    addr, size = loader.place_initrd(mem, b"x" * 5000, k)
    assert addr + size <= 0x380_0000


def test_initrd_that_does_not_fit(mem):
    k = loader.load_bzimage(mem, synthetic_bzimage())
    with pytest.raises(KernelLoadError, match="do not fit"):
        loader.place_initrd(mem, bytes(120 * MiB), k)


def test_cmdline_length_checked(mem):
    k = loader.load_bzimage(mem, synthetic_bzimage(cmdline_size=16))
    assert loader.load_cmdline(mem, "console=ttyS0", k) == (0x20000, 13)
    assert mem.read(0x20000, 14) == b"console=ttyS0\0"
    with pytest.raises(KernelLoadError, match="at most 16"):
        loader.load_cmdline(mem, "console=ttyS0 quiet", k)
    with pytest.raises(KernelLoadError, match="NUL"):
        loader.load_cmdline(mem, "a\0b", k)


def test_real_guest_bzimage_header():
    from pytest_ignition._testing import require

    try:
        from pytest_ignition.guest import find_guest
    except ImportError:
        find_guest = None  # type: ignore[assignment]
    guest = find_guest() if find_guest else None
    require(
        guest is not None, "the guest kernel is not built (python -m pytest_ignition.guest build)"
    )
    data = guest.kernel.read_bytes()
    hdr = loader.parse_setup_header(data)
    assert hdr.version >= 0x020C
    assert hdr.xloadflags & loader.XLF_KERNEL_64
    assert hdr.cmdline_size >= 255
    m = GuestMemory.anonymous(256 * MiB)
    try:
        k = loader.load_kernel(m, guest.kernel)
        # a relocatable kernel goes to 1 MiB, a fixed one to where it was linked
        expected = 0x100000 if hdr.relocatable else hdr.pref_address
        assert k.load_addr == expected
        assert k.entry == expected + 0x200
        pm = (hdr.setup_sects + 1) * 512
        assert m.read(k.load_addr, 4096) == data[pm : pm + 4096]
        if guest.vmlinux.exists():
            m2 = GuestMemory.anonymous(256 * MiB)
            try:
                v = loader.load_kernel(m2, guest.vmlinux)
                assert v.kind == "pvh", "the guest config asks for PVH"
                assert v.load_addr <= v.entry < v.end
            finally:
                m2.close()
    finally:
        m.close()


# -- ELF ------------------------------------------------------------------------------------
def test_elf_pvh_entry_from_xen_note(mem):
    k = loader.load_elf(mem, synthetic_elf())
    assert k.kind == "pvh"
    assert k.entry == 0x100_0100
    assert mem.read(0x100_0000, 512) == bytes(range(256)) * 2
    assert mem.read(0x100_0200, 0xE00) == bytes(0xE00)  # bss zeroed up to memsz


def test_elf_without_note_uses_64bit_entry(mem):
    k = loader.load_elf(mem, synthetic_elf(pvh_entry=None))
    assert k.kind == "elf64"
    assert k.entry == 0x100_0010


def test_elf_segment_outside_ram(mem):
    with pytest.raises(KernelLoadError, match="outside guest low RAM"):
        loader.load_elf(mem, synthetic_elf(paddr=200 * MiB))


def test_elf_truncated(mem):
    data = synthetic_elf()
    with pytest.raises(KernelLoadError, match="past the end"):
        loader.load_elf(mem, data[:-10])


# -- zero page and e820 ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (
            128 * MiB,
            [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 128 * MiB - 0x100000, 1)],
        ),
        (
            3 * GiB + 512 * MiB,
            [
                (0, 0x9FC00, 1),
                (0x9FC00, 0x60400, 2),
                (0x100000, MMIO_START - 0x100000, 1),
                (FOUR_GIB, 3 * GiB + 512 * MiB - MMIO_START, 1),
            ],
        ),
        (
            5 * GiB,
            [
                (0, 0x9FC00, 1),
                (0x9FC00, 0x60400, 2),
                (0x100000, MMIO_START - 0x100000, 1),
                (FOUR_GIB, 5 * GiB - MMIO_START, 1),
            ],
        ),
    ],
)
def test_e820_around_the_mmio_gap(size, expected):
    m = GuestMemory.anonymous(size)  # anonymous mappings are lazily backed: cheap
    try:
        e820 = bootparams.e820_map(m)
        assert e820 == expected
        assert sum(s for _, s, t in e820 if t == 1) == size - 0x60400
        for addr, length, _ in e820:
            assert not (addr < FOUR_GIB and addr + length > MMIO_START), "RAM in the MMIO gap"
    finally:
        m.close()


def test_zero_page_fields(mem):
    k = loader.load_bzimage(mem, synthetic_bzimage())
    e820 = bootparams.e820_map(mem)
    zp = bootparams.build_zero_page(
        k.setup_header.raw, cmdline_addr=0x20000, initrd=(0x7000000, 12345), e820=e820
    )
    assert len(zp) == 4096
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] & 0x01  # LOADED_HIGH
    assert struct.unpack_from("<I", zp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", zp, 0x218) == (0x7000000, 12345)
    assert struct.unpack_from("<H", zp, 0x206)[0] == 0x020F  # copied from the image
    assert bootparams.parse_e820(zp) == e820
    assert zp[0x1EF] == 0, "sentinel must stay 0 or the kernel wipes the header"


def test_synthetic_setup_header_for_elf():
    zp = bootparams.build_zero_page(None, cmdline_addr=0x20000, initrd=None, e820=[(0, 4096, 1)])
    assert zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<I", zp, 0x230)[0] == 0x0100_0000


def test_pvh_start_info(mem):
    e820 = bootparams.e820_map(mem)
    addr = bootparams.write_pvh_start_info(
        mem, cmdline_addr=0x20000, initrd=(0x7000000, 999), e820=e820
    )
    info = mem.read(addr, 56)
    magic, version, _flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", info
    )
    assert (magic, version, nr_modules, cmdline, rsdp) == (0x336EC578, 1, 1, 0x20000, 0)
    assert struct.unpack("<QQQQ", mem.read(modlist, 32))[:2] == (0x7000000, 999)
    assert entries == len(e820)
    got = [struct.unpack_from("<QQI", mem.read(memmap + 24 * i, 24)) for i in range(entries)]
    assert got == e820


# -- page tables, GDT ----------------------------------------------------------------------------
def test_identity_page_tables(mem):
    cr3 = paging.write_page_tables(mem)
    assert cr3 == 0x9000
    assert mem.read_u64(0x9000) == 0xA000 | 3
    for g in range(4):
        assert mem.read_u64(0xA000 + 8 * g) == (0xB000 + 0x1000 * g) | 3
    assert mem.read_u64(0xB000) == 0x83
    assert mem.read_u64(0xB008) == 0x200000 | 0x83
    for va in (0, 0x100200, 0x7FF_FFFF, 0x4000_1234, 0xCFFF_F000, 0xFFFF_FFFF):
        assert paging.translate(mem, cr3, va) == va
    assert paging.translate(mem, cr3, FOUR_GIB) is None


def test_one_gib_page_tables():
    pages = paging.build_page_tables(1)
    assert set(pages) == {0x9000, 0xA000, 0xB000}
    assert struct.unpack_from("<Q", pages[0xA000], 8)[0] == 0


def test_gdt_descriptors_and_long_mode_sregs(mem):
    g = gdt.write_gdt(mem)
    assert struct.unpack("<4Q", mem.read(0x500, 32)) == tuple(g)
    assert g[0] == 0
    assert g[1] == 0x00AF_9B00_0000_FFFF  # 64-bit code: L=1, D=0, G=1, P=1, type 0xb
    assert g[2] == 0x00CF_9300_0000_FFFF
    s = gdt.boot_sregs()
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.type, s.cs.s, s.cs.present) == (8, 1, 0, 0xB, 1, 1)
    assert s.cs.limit == 0xFFFF_FFFF
    assert s.ds.selector == s.ss.selector == 0x10 and s.ds.type == 3
    assert s.tr.selector == 0x18 and s.tr.type == 0xB and s.tr.s == 0
    assert s.cr0 & gdt.CR0_PE and s.cr0 & gdt.CR0_PG
    assert s.cr4 & gdt.CR4_PAE
    assert s.efer == gdt.EFER_LME | gdt.EFER_LMA
    assert s.cr3 == 0x9000
    assert (s.gdt_base, s.gdt_limit, s.idt_base, s.idt_limit) == (0x500, 31, 0x520, 7)


def test_pvh_sregs_are_flat_protected_mode():
    s = gdt.boot_sregs(pvh=True)
    assert s.cr0 & gdt.CR0_PE and not s.cr0 & gdt.CR0_PG
    assert s.efer == 0 and s.cr4 == 0
    assert (s.cs.base, s.cs.limit, s.cs.db, s.cs.l, s.cs.type) == (0, 0xFFFF_FFFF, 1, 0, 0xB)
    assert (s.ds.limit, s.ds.db) == (0xFFFF_FFFF, 1)
    assert (s.tr.type, s.tr.limit, s.tr.present) == (0xB, 0x67, 1)


def test_descriptor_round_trip():
    for flags, base, limit in [(0xC093, 0x12345678, 0xABCDE), (0x008B, 0x1000, 0x67)]:
        seg = gdt.segment_from_descriptor(3, gdt.gdt_entry(flags, base, limit))
        assert seg.base == base
        assert seg.type == flags & 0xF
        assert seg.selector == 0x18


# -- MP table -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4])
def test_mptable_checksums_and_cpus(mem, n):
    base = mptable.write_mptable(mem, n)
    assert base == 0x9FC00
    fp = mem.read(base, 16)
    assert fp[:4] == b"_MP_"
    assert sum(fp) % 256 == 0
    (cfg,) = struct.unpack_from("<I", fp, 4)
    assert cfg == base + 16
    hdr = mem.read(cfg, 44)
    assert hdr[:4] == b"PCMP"
    (length,) = struct.unpack_from("<H", hdr, 4)
    table = mem.read(cfg, length)
    assert sum(table) % 256 == 0
    (count,) = struct.unpack_from("<H", hdr, 34)
    assert struct.unpack_from("<I", hdr, 36)[0] == 0xFEE0_0000
    pos, cpus, irqs, lints, ioapics = 44, [], [], [], []
    for _ in range(count):
        kind = table[pos]
        if kind == 0:
            cpus.append((table[pos + 1], table[pos + 3]))
            pos += 20
        else:
            if kind == 2:
                ioapics.append((table[pos + 1], struct.unpack_from("<I", table, pos + 4)[0]))
            elif kind == 3:
                irqs.append((table[pos + 5], table[pos + 7]))
            elif kind == 4:
                lints.append((table[pos + 1], table[pos + 7]))
            pos += 8
    assert pos == length
    assert cpus == [(i, 3 if i == 0 else 1) for i in range(n)]
    assert ioapics == [(n, 0xFEC0_0000)]
    assert irqs == [(i, i) for i in range(24)]
    assert lints == [(3, 0), (1, 1)]  # ExtINT on LINT0, NMI on LINT1
    assert base + 16 + length <= 0x100000


def test_mptable_cpu_limits():
    with pytest.raises(ValueError):
        mptable.build_mptable(0)
    with pytest.raises(ValueError):
        mptable.build_mptable(mptable.MAX_CPUS + 1)
    assert len(mptable.build_mptable(mptable.MAX_CPUS)) == mptable.mptable_size(mptable.MAX_CPUS)


# -- CPUID, MSRs, LAPIC ----------------------------------------------------------------------------
SUPPORTED = [
    cpuid.CpuidEntry(0, eax=0x1F, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
    cpuid.CpuidEntry(1, eax=0x806EA, ebx=0xFF0800, ecx=0x7FFAFBBF | (1 << 3), edx=0xBFEBFBFF),
    cpuid.CpuidEntry(4, 0, 1, eax=0x1C004121),
    cpuid.CpuidEntry(4, 3, 1, eax=0x1C03C163),
    cpuid.CpuidEntry(6, eax=0x77, ecx=9),
    cpuid.CpuidEntry(0xA, eax=0x07300404),
    cpuid.CpuidEntry(0xB, 0, 1, eax=1, ebx=2, ecx=0x100, edx=7),
    cpuid.CpuidEntry(0xB, 1, 1, eax=4, ebx=8, ecx=0x201, edx=7),
    cpuid.CpuidEntry(0x4000_0001, eax=0x1234),
    cpuid.CpuidEntry(0x8000_0008, eax=0x3027, ecx=0x7007),
]


@pytest.mark.parametrize(("cpu", "count"), [(0, 1), (1, 2), (3, 4)])
def test_cpuid_normalisation(cpu, count):
    out = cpuid.normalise(SUPPORTED, cpu, count)
    l1 = cpuid.find(out, 1)
    assert l1.ebx >> 24 == cpu
    assert (l1.ebx >> 16) & 0xFF == count
    assert (l1.ebx >> 8) & 0xFF == 8
    assert l1.ecx & cpuid.LEAF1_ECX_HYPERVISOR
    assert l1.ecx & cpuid.LEAF1_ECX_TSC_DEADLINE
    assert not l1.ecx & cpuid.LEAF1_ECX_MONITOR
    assert bool(l1.edx & cpuid.LEAF1_EDX_HTT) == (count > 1)
    assert cpuid.find(out, 6) == cpuid.CpuidEntry(6)
    assert cpuid.find(out, 0xA) == cpuid.CpuidEntry(0xA)
    smt, core = cpuid.find(out, 0xB, 0), cpuid.find(out, 0xB, 1)
    assert (smt.ebx, (smt.ecx >> 8) & 0xFF, smt.edx) == (1, 1, cpu)
    assert (core.ebx, (core.ecx >> 8) & 0xFF, core.edx) == (count, 2, cpu)
    assert 1 << core.eax >= count
    assert ((cpuid.find(out, 0xB, 2).ecx >> 8) & 0xFF) == 0  # the list ends with an invalid level
    hv = cpuid.find(out, 0x4000_0000)
    sig = b"".join(v.to_bytes(4, "little") for v in (hv.ebx, hv.ecx, hv.edx))
    assert sig == b"KVMKVMKVM\0\0\0"
    assert hv.eax >= 0x4000_0001
    assert cpuid.find(out, 0x4000_0001).eax == 0x1234  # KVM feature leaf kept
    l3 = cpuid.find(out, 4, 3)
    assert (l3.eax >> 26) + 1 == count and ((l3.eax >> 14) & 0xFFF) + 1 == count
    assert cpuid.find(out, 4, 0).eax >> 14 & 0xFFF == 0
    assert cpuid.find(out, 0x8000_0008).ecx & 0xFF == count - 1
    # the input list is never modified
    assert SUPPORTED[1].ebx == 0xFF0800


def test_cpuid_without_tsc_deadline():
    out = cpuid.normalise(SUPPORTED, 0, 1, tsc_deadline=False)
    assert not cpuid.find(out, 1).ecx & cpuid.LEAF1_ECX_TSC_DEADLINE


def test_boot_msrs():
    m = dict(msrs.boot_msrs())
    assert m[msrs.MSR_IA32_MISC_ENABLE] & 1
    assert m[msrs.MSR_MTRR_DEF_TYPE] == 0x806
    for idx in (
        0x174,
        0x175,
        0x176,
        0xC0000081,
        0xC0000082,
        0xC0000083,
        0xC0000084,
        0xC0000102,
        0x10,
    ):
        assert m[idx] == 0


def test_lapic_lint():
    regs = bytearray(1024)
    struct.pack_into("<I", regs, 0x350, 0x10000 | 0x300)
    out = msrs.set_lint(regs)
    assert struct.unpack_from("<I", out, 0x350)[0] == 0x10000 | 0x700
    assert (struct.unpack_from("<I", out, 0x360)[0] >> 8) & 7 == 4


# -- all at once ------------------------------------------------------------------------------------
def test_prepare_bzimage(mem, tmp_path):
    kpath = tmp_path / "bzImage"
    kpath.write_bytes(synthetic_bzimage())
    ipath = tmp_path / "initrd"
    ipath.write_bytes(b"07070" * 100)
    s = boot.prepare(mem, kpath, cmdline="console=ttyS0", initrd_path=ipath, num_cpus=2)
    assert not s.pvh
    assert s.regs == {"rip": 0x100200, "rflags": 2, "rsp": 0x8FF0, "rbp": 0x8FF0, "rsi": 0x7000}
    zp = mem.read(layout.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<II", zp, 0x218) == s.initrd
    assert mem.read(0x20000, 14) == b"console=ttyS0\0"
    assert mem.read(0x9FC00, 4) == b"_MP_"
    assert mem.read_u64(0x9000) & 1


def test_prepare_pvh(mem, tmp_path):
    kpath = tmp_path / "vmlinux"
    kpath.write_bytes(synthetic_elf())
    s = boot.prepare(mem, kpath, cmdline="console=ttyS0")
    assert s.pvh
    assert s.regs == {"rip": 0x100_0100, "rflags": 2, "rbx": layout.PVH_INFO_ADDR}
    assert s.sregs.cr0 & gdt.CR0_PG == 0
    assert mem.read_u32(layout.PVH_INFO_ADDR) == bootparams.HVM_START_MAGIC


# -- hostile kernel files ------------------------------------------------------------------------


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


_edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=24)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=_edits, cut=st.one_of(st.none(), st.integers(0, 0x1200)))
def test_mutated_bzimage_never_escapes(mem, tmp_path, edits, cut):
    # edits land mostly in the setup header and the first payload bytes
    data = _mutate(
        synthetic_bzimage(payload=bytes(0x400)), [(0x1F0 + p % 0x90, v) for p, v in edits], cut
    )
    path = tmp_path / "k"
    path.write_bytes(data)
    try:
        k = loader.load_kernel(mem, path)
    except KernelLoadError:
        return
    assert k.end <= 128 * MiB and k.load_addr <= k.entry < k.end


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=_edits, cut=st.one_of(st.none(), st.integers(0, 0x400)))
def test_mutated_elf_never_escapes(mem, tmp_path, edits, cut):
    # the ELF header, program headers and the Xen note all sit in the first 0x100 bytes
    data = _mutate(synthetic_elf(), [(p % 0x100, v) for p, v in edits], cut)
    path = tmp_path / "k"
    path.write_bytes(data)
    try:
        k = loader.load_kernel(mem, path)
    except KernelLoadError:
        return
    assert all(0x100000 <= a and a + n <= 128 * MiB for a, n in k.segments)
    assert any(a <= k.entry < a + n for a, n in k.segments)
