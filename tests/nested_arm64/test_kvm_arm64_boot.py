"""The aarch64 machine model on real arm64 KVM: a Linux guest booted with nothing but
``vmm/kvm_arm64`` (vCPU init with PSCI 0.2, vGICv3), ``vmm/arch/aarch64`` (Image placement,
the device tree) and a polled 16550 in the run loop below, until the guest's userspace writes
the boot-timer byte: the model those modules describe boots Linux, with no machine code around
it (the bundled VMM's aarch64 machine, ``vmm/arch/aarch64/machine.py``, is
``test_vmm_arm64.py``'s).
"""

from __future__ import annotations

import mmap
import os
import time

import pytest

from pytest_ignition._testing import require

MIB = 1 << 20


class Uart16550:
    """The registers a polled 8250 driver touches; IIR says "THR empty" when asked to."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ier = 0
        self.lcr = 0

    def read(self, off: int) -> int:
        if off == 5:  # LSR: THR empty, transmitter idle
            return 0x60
        if off == 2:  # IIR: THR-empty pending when enabled, else none (with FIFOs)
            return 0xC2 if self.ier & 0x02 else 0xC1
        if off == 1:
            return self.ier
        if off == 3:
            return self.lcr
        return 0

    def write(self, off: int, value: int) -> None:
        if off == 0 and not self.lcr & 0x80:
            self.out.append(value)
        elif off == 1 and not self.lcr & 0x80:
            self.ier = value & 0x0F
        elif off == 3:
            self.lcr = value


def _guest() -> tuple[bytes, bytes]:
    kernel = os.environ.get("IGNITION_ARM64_KERNEL")
    initrd = os.environ.get("IGNITION_ARM64_INITRD")
    if not kernel:
        from pytest_ignition.guest import find_guest

        g = find_guest("aarch64")
        require(
            g is not None,
            "arm64 guest not built (python -m pytest_ignition.guest build --arch aarch64)",
        )
        assert g is not None
        kernel, initrd = str(g.kernel), str(g.initrd)
    with open(kernel, "rb") as f:
        k = f.read()
    with open(initrd or "/dev/null", "rb") as f:
        i = f.read()
    return k, i


def test_linux_boots_to_userspace_on_the_aarch64_machine_model() -> None:
    require(os.path.exists("/dev/kvm"), "no /dev/kvm in the arm64 harness")
    from pytest_ignition.vmm import kvm
    from pytest_ignition.vmm import kvm_arm64 as k
    from pytest_ignition.vmm.arch.aarch64 import fdt, image
    from pytest_ignition.vmm.arch.aarch64 import layout as L

    kernel, initrd = _guest()
    mem_size = 256 * MIB
    ram = mmap.mmap(-1, mem_size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    import ctypes

    host_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    system = kvm.System()
    vm = system.create_vm()
    try:
        assert system.check_extension(k.KVM_CAP_ARM_PSCI_0_2) == 1
        vm.set_user_memory_region(0, L.DRAM_START, mem_size, host_addr)
        vcpu = vm.create_vcpu(0)
        k.vcpu_init(vcpu.fd, k.boot_vcpu_init(vm.fd, 0))
        gic = k.VgicV3.create(vm.fd, L.GIC_DIST_ADDR, L.GIC_REDIST_ADDR, L.GIC_NR_IRQS)
        gic.init()
        assert len(k.reg_list(vcpu.fd)) > 100  # what a snapshot would save

        img = image.parse_header(kernel)
        load = img.load_addr()
        ram[load - L.DRAM_START : load - L.DRAM_START + len(kernel)] = kernel
        ia = L.initrd_addr(mem_size, len(initrd), img.end())
        ram[ia - L.DRAM_START : ia - L.DRAM_START + len(initrd)] = initrd
        cmdline = (
            f"console=ttyS0 earlycon=uart8250,mmio,{L.UART_ADDR:#x} panic=-1 "
            f"ignition.boot_timer={L.BOOT_TIMER_ADDR:#x}"
        )
        dtb = fdt.machine_fdt(mem_size, 1, cmdline, initrd=(ia, ia + len(initrd)), uart_spi=None)
        fa = L.fdt_addr(mem_size)
        ram[fa - L.DRAM_START : fa - L.DRAM_START + len(dtb)] = dtb
        k.set_boot_regs(vcpu.fd, load, fa)
        assert k.get_one_reg(vcpu.fd, k.core_reg("pc")) == load

        uart = Uart16550()
        t0 = time.monotonic()
        boot_timer_at = None
        exits = 0
        deadline = t0 + 600
        while time.monotonic() < deadline:
            reason = vcpu.run()
            exits += 1
            if reason == k.KVM_EXIT_MMIO:
                m = vcpu.kvm_run.mmio
                addr, n, is_write = m.phys_addr, m.len, m.is_write
                data = vcpu.mmio_data()
                if L.UART_ADDR <= addr < L.UART_ADDR + 8:
                    if is_write:
                        uart.write(addr - L.UART_ADDR, data[0])
                    else:
                        data[0] = uart.read(addr - L.UART_ADDR)
                elif addr == L.BOOT_TIMER_ADDR and is_write and data[0] == 123:
                    boot_timer_at = time.monotonic() - t0
                    break
                elif not is_write:
                    for j in range(n):
                        data[j] = 0xFF
            elif reason == k.KVM_EXIT_SYSTEM_EVENT:
                break
            else:
                pytest.fail(f"unexpected exit {reason} after {exits} exits:\n{uart.out[-2000:]!r}")
        log = uart.out.decode(errors="replace")
        print(f"boot timer after {boot_timer_at} s, {exits} exits")
        print(log[-3000:])
        assert "Booting Linux on physical CPU 0x0000000000" in log
        assert "psci: PSCIv" in log
        assert "GICv3" in log
        assert boot_timer_at is not None, "userspace never wrote the boot-timer byte"
    finally:
        vm.close()
        system.close()
