"""The x86_64 machine model. Boot layout: pure functions that write the kernel, initrd, command line, zero page
or PVH start info, e820 map, identity page tables, GDT and MP table into guest memory, and
compute the CPUID, MSR, LAPIC and register state of the vCPUs. Those need no KVM.

Modules: ``layout`` (addresses), ``loader`` (bzImage / ELF / initrd / cmdline),
``bootparams`` (zero page, e820, PVH), ``paging``, ``gdt`` (GDT and sregs), ``mptable``,
``cpuid``, ``msrs`` (MSRs and LAPIC LINT0/LINT1), ``regs``, ``boot`` (all of it at once).
Over a KVM VM or vCPU they are given: ``state`` (save/restore), ``vm`` (TSS, identity map,
irqchip + PIT), ``vcpu`` (a new vCPU's boot configuration), ``devices`` (the legacy devices).
"""
