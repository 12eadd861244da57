"""Putting the boot layout together: one call writes everything a kernel needs into guest
memory and returns the register state for vCPU 0 (application processors start in
wait-for-SIPI and need none)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...memory import GuestMemory
from . import bootparams, gdt, loader, mptable, paging, regs


@dataclass
class BootSetup:
    kernel: loader.KernelImage
    cmdline: str
    initrd: tuple[int, int] | None
    boot_info: int  # zero page (64-bit entry) or hvm_start_info (PVH)
    regs: dict[str, int]
    sregs: gdt.BootSregs
    fpu: dict[str, int]

    @property
    def pvh(self) -> bool:
        return self.kernel.pvh


def prepare(
    mem: GuestMemory,
    kernel_path: str | os.PathLike[str],
    *,
    cmdline: str,
    initrd_path: str | os.PathLike[str] | None = None,
    num_cpus: int = 1,
) -> BootSetup:
    """Load the kernel/initrd/cmdline and write the zero page (or PVH info), MP table, GDT
    and page tables. Raises :class:`loader.KernelLoadError` for a bad kernel or initrd."""
    kernel = loader.load_kernel(mem, kernel_path)
    initrd = loader.load_initrd(mem, initrd_path, kernel) if initrd_path else None
    cmdline_addr, _ = loader.load_cmdline(mem, cmdline, kernel)
    e820 = bootparams.e820_map(mem)
    mptable.write_mptable(mem, num_cpus)
    gdt.write_gdt(mem, pvh=kernel.pvh)
    if kernel.pvh:
        boot_info = bootparams.write_pvh_start_info(
            mem, cmdline_addr=cmdline_addr, initrd=initrd, e820=e820
        )
        cr3 = 0
    else:
        zp = bootparams.build_zero_page(
            kernel.setup_header.raw if kernel.setup_header else None,
            cmdline_addr=cmdline_addr,
            initrd=initrd,
            e820=e820,
        )
        boot_info = bootparams.write_zero_page(mem, zp)
        cr3 = paging.write_page_tables(mem)
    return BootSetup(
        kernel=kernel,
        cmdline=cmdline,
        initrd=initrd,
        boot_info=boot_info,
        regs=regs.boot_regs(kernel.entry, pvh=kernel.pvh, boot_info=boot_info),
        sregs=gdt.boot_sregs(pvh=kernel.pvh, cr3=cr3),
        fpu=regs.boot_fpu(),
    )
