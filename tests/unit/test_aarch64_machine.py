"""The bundled VMM's aarch64 machine model without a VM: Image header and placement, layout,
the FDT writer (decoded by ``dtc``), and the arm64 KVM ABI (ioctl numbers, struct sizes,
register ids) checked against Linux 6.1's uapi values."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.vmm import kvm_arm64 as k
from pytest_ignition.vmm.arch.aarch64 import fdt
from pytest_ignition.vmm.arch.aarch64 import layout as L
from pytest_ignition.vmm.arch.aarch64.image import ImageError, parse_header

MIB = 1 << 20


def _header(text_offset: int = 0, image_size: int = 6 * MIB, flags: int = 0xA) -> bytes:
    h = bytearray(64)
    h[0:4] = b"MZ@\xfa"  # what the EFI stub puts first
    h[8:16] = text_offset.to_bytes(8, "little")
    h[16:24] = image_size.to_bytes(8, "little")
    h[24:32] = flags.to_bytes(8, "little")
    h[56:60] = b"ARM\x64"
    return bytes(h) + b"\0" * 4096


# --------------------------------------------------------------------------- Image


def test_image_header_and_load_address() -> None:
    img = parse_header(_header())
    assert (img.text_offset, img.page_size, img.anywhere) == (0, 4096, True)
    assert img.load_addr() == L.DRAM_START
    assert img.end() == L.DRAM_START + 6 * MIB  # image_size (with BSS) counts, not the file
    old = parse_header(_header(text_offset=0x1234000, image_size=0, flags=0))
    assert old.text_offset == 0x80000 and old.load_addr() == L.DRAM_START + 0x80000
    assert parse_header(_header(text_offset=0x80000)).load_addr(0x8010_0000) == 0x8028_0000


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"short", "too short"),
        (b"\x1f\x8b" + b"\0" * 100, "gzip"),
        (b"\x7fELF" + b"\0" * 100, "ELF"),
        (b"MZ\0\0zimg" + b"\0" * 100, "zboot"),
        (b"\0" * 64, "magic"),
        (_header(flags=1), "big-endian"),
        (_header(text_offset=0x123), "text_offset"),
        (_header(image_size=100), "smaller than the file"),
    ],
)
def test_image_header_rejects(data: bytes, says: str) -> None:
    with pytest.raises(ImageError, match=says):
        parse_header(data)


def test_built_arm64_image_parses() -> None:
    from pytest_ignition.guest import find_guest

    g = find_guest("aarch64")
    require(
        g is not None,
        "arm64 guest not built (python -m pytest_ignition.guest build --arch aarch64)",
    )
    assert g is not None
    img = parse_header(g.kernel.read_bytes())
    assert img.text_offset == 0 and img.page_size == 4096
    assert img.image_size >= img.file_size


# --------------------------------------------------------------------------- layout


def test_layout() -> None:
    assert L.GIC_REDIST_ADDR + L.redist_size(L.MAX_VCPUS) <= L.UART_ADDR
    with pytest.raises(ValueError):
        L.redist_size(L.MAX_VCPUS + 1)
    assert [L.mpidr(i) for i in (0, 1, 15, 16, 17)] == [0, 1, 15, 0x100, 0x101]
    assert L.virtio_slot(0) == (0x0A00_0000, 16) and L.virtio_slot(1) == (0x0A00_1000, 17)
    # every device is below RAM and none overlaps another
    last = L.virtio_slot(L.VIRTIO_MMIO_SLOTS - 1)[0] + L.VIRTIO_MMIO_SLOT
    assert last <= L.MMIO_END == L.DRAM_START
    assert L.UART_ADDR + L.UART_SIZE <= L.BOOT_TIMER_ADDR < L.VIRTIO_MMIO_BASE
    assert L.fdt_addr(256 * MIB) == L.DRAM_START + 254 * MIB
    assert L.initrd_addr(256 * MIB, 5000, L.DRAM_START + 8 * MIB) == L.DRAM_START + 254 * MIB - 8192
    with pytest.raises(ValueError, match="more memory"):
        L.initrd_addr(64 * MIB, 60 * MIB, L.DRAM_START + 8 * MIB)


# --------------------------------------------------------------------------- FDT


def _dtc(blob: bytes, tmp_path: Path) -> str:
    dtc = shutil.which("dtc")
    require(dtc is not None, "dtc missing (apt-get install device-tree-compiler)")
    p = tmp_path / "t.dtb"
    p.write_bytes(blob)
    r = subprocess.run([dtc, "-I", "dtb", "-O", "dts", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", f"dtc warnings: {r.stderr}"
    return r.stdout


def test_writer_header_and_blocks_are_consistent() -> None:
    w = fdt.FdtWriter()
    w.reserve(0x9000_0000, 0x1000)
    with w.node(""):
        w.prop_u32("a", 1)
        with w.node("child@1"):
            w.prop_str("b", "x", "yz")
            w.prop_u32("a", 2)  # the name is stored once
    blob = w.finish(boot_cpuid=3)
    magic, total, off_struct, off_str, off_rsv, ver, last, cpu, size_str, size_struct = (
        struct.unpack(">10I", blob[:40])
    )
    assert (magic, total, ver, last, cpu) == (0xD00DFEED, len(blob), 17, 16, 3)
    assert off_rsv % 8 == 0 and off_struct % 4 == 0
    assert struct.unpack(">QQ", blob[off_rsv : off_rsv + 16]) == (0x9000_0000, 0x1000)
    assert off_str + size_str == total and off_struct + size_struct == off_str
    assert blob[off_str:total] == b"a\0b\0"
    assert blob[off_str - 4 : off_str] == struct.pack(">I", fdt.FDT_END)


@pytest.mark.parametrize(
    "build",
    [
        lambda w: w.prop("x"),  # outside a node
        lambda w: (w.begin_node(""), w.begin_node("bad name")),
        lambda w: (w.begin_node(""), w.prop("name-that-is-far-too-long-for-a-property")),
        lambda w: (w.begin_node(""), w.finish()),  # left open
        lambda w: w.end_node(),
        lambda w: w.begin_node("notroot"),
        lambda w: (w.begin_node(""), w.prop_str("s", "a\0b")),
    ],
)
def test_writer_rejects_malformed_trees(build) -> None:
    with pytest.raises(fdt.FdtError):
        build(fdt.FdtWriter())


def test_writer_size_limit() -> None:
    w = fdt.FdtWriter(max_size=256)
    with w.node(""):
        w.prop("big", b"\0" * 300)
    with pytest.raises(fdt.FdtError, match="exceeds"):
        w.finish()


def test_machine_fdt_decodes_with_dtc(tmp_path: Path) -> None:
    virtio = [fdt.VirtioNode(*L.virtio_slot(i)) for i in range(3)]
    blob = fdt.machine_fdt(
        512 * MIB,
        2,
        "console=ttyS0 ignition.boot_timer=0x9030000",
        initrd=(0x9F00_0000, 0x9F10_0000),
        virtio=virtio,
    )
    assert len(blob) <= L.FDT_MAX_SIZE
    dts = _dtc(blob, tmp_path)
    for want in (
        'compatible = "linux,dummy-virt";',
        'bootargs = "console=ttyS0 ignition.boot_timer=0x9030000";',
        "linux,initrd-start = <0x00 0x9f000000>;",
        "memory@80000000 {",
        "reg = <0x00 0x80000000 0x00 0x20000000>;",
        "cpu@1 {",
        'enable-method = "psci";',
        'compatible = "arm,psci-0.2";',
        'method = "hvc";',
        'compatible = "arm,gic-v3";',
        # distributor 64 KiB + one 128 KiB redistributor per vCPU
        "reg = <0x00 0x8000000 0x00 0x10000 0x00 0x80a0000 0x00 0x40000>;",
        "interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;",
        'compatible = "ns16550a";',
        "clock-frequency = <0x1c2000>;",
        "virtio_mmio@a002000 {",
        "interrupts = <0x00 0x12 0x01>;",
    ):
        assert want in dts, want
    assert dts.count('compatible = "virtio,mmio";') == 3
    assert dts.count('device_type = "cpu";') == 2


def test_machine_fdt_rejects_bad_input() -> None:
    with pytest.raises(fdt.FdtError, match="inside RAM"):
        fdt.machine_fdt(64 * MIB, 1, "", initrd=(0x1000, 0x2000))
    with pytest.raises(fdt.FdtError, match="two virtio"):
        fdt.machine_fdt(64 * MIB, 1, "", virtio=[fdt.VirtioNode(0xA000000, 16)] * 2)
    with pytest.raises(ValueError):
        fdt.machine_fdt(64 * MIB, L.MAX_VCPUS + 1, "")


# --------------------------------------------------------------------------- arm64 KVM ABI


def test_arm64_kvm_abi_matches_the_uapi() -> None:
    # values from linux/kvm.h and arch/arm64/include/uapi/asm/kvm.h (6.1), as used by the
    # throwaway VMM that booted an arm64 guest on KVM inside the nested arm64 harness
    assert k.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert k.KVM_ARM_PREFERRED_TARGET == 0x8020AEAF
    assert (k.KVM_GET_ONE_REG, k.KVM_SET_ONE_REG) == (0x4010AEAB, 0x4010AEAC)
    assert k.KVM_GET_REG_LIST == 0xC008AEB0
    assert k.KVM_CREATE_DEVICE == 0xC00CAEE0
    assert (k.KVM_SET_DEVICE_ATTR, k.KVM_GET_DEVICE_ATTR) == (0x4018AEE1, 0x4018AEE2)
    assert k.KVM_IRQ_LINE == 0x4008AE61
    sizes = {
        "struct kvm_vcpu_init": 32,
        "struct kvm_one_reg": 16,
        "struct kvm_create_device": 12,
        "struct kvm_device_attr": 24,
        "struct kvm_irq_level": 8,
    }
    assert {t: k.ffi.sizeof(t) for t in sizes} == sizes
    assert k.core_reg("x0") == 0x6030_0000_0010_0000
    assert k.core_reg("pc") == 0x6030_0000_0010_0040
    assert k.core_reg("pstate") == 0x6030_0000_0010_0042
    assert k.core_reg("v0") == 0x6040_0000_0010_0054  # 128-bit, offset 336
    assert k.core_reg("fpsr") == 0x6020_0000_0010_00D4
    assert k.MPIDR_EL1 == 0x6030_0000_0013_C005
    assert k.KVM_REG_ARM_TIMER_CNT == 0x6030_0000_0013_DF1A
    assert k.KVM_REG_ARM_TIMER_CVAL == 0x6030_0000_0013_DF02
    assert [k.reg_size(k.core_reg(r)) for r in ("x0", "v3", "fpcr")] == [8, 16, 4]
    assert k.spi_irq(16) == 0x0100_0030  # type SPI, INTID 48
    assert k.redist_attr(0x101, 0x10) == 0x101_0000_0010
    with pytest.raises(ValueError):
        k.core_reg("x31")
    with pytest.raises(ValueError):
        k.sys_reg(4, 0, 0, 0, 0)


def test_vcpu_init_features() -> None:
    init = k.VcpuInit(5).with_feature(k.KVM_ARM_VCPU_PSCI_0_2)
    assert init.features[0] == 4
    assert init.with_feature(k.KVM_ARM_VCPU_POWER_OFF).features[0] == 5
    assert init.features[0] == 4  # not mutated


def test_arm64_ioctls_fail_by_name_on_another_kvm() -> None:
    require(os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK), "no /dev/kvm")
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this host's KVM is arm64: the ioctls would succeed")
    from pytest_ignition.vmm import kvm

    with kvm.System() as system, system.create_vm() as vm:
        with pytest.raises(kvm.KvmError) as ei:
            k.preferred_target(vm.fd)
        assert ei.value.ioctl == "KVM_ARM_PREFERRED_TARGET"
        with pytest.raises(kvm.KvmError, match="KVM_CREATE_DEVICE"):
            k.VgicV3(vm.fd)
