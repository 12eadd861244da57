"""``python -m pytest_ignition.vmm.machine_aarch64 boot|restore [--hypervisor kvm|hvf] ARGS``: the
aarch64 machine (``vmm/arch/aarch64/machine.py``) on a named hypervisor backend, in the process
``python -m pytest_ignition.vmm`` runs (same arguments, control socket, exit statuses 0/1/2).

The engine (``engines/ignition.py``, ``IgnitionEngine.vmm_command``) starts this module on a Mac,
``--hypervisor hvf``, in the entitled interpreter copy (:mod:`.hypervisor.hvf_sign`); an aarch64
Linux host's ``python -m pytest_ignition.vmm`` builds the same machine on KVM.
"""

from __future__ import annotations

import os
import sys

from .arch.aarch64.machine import (
    DEFAULT_CMDLINE,
    HYPERVISORS,
    Aarch64Machine,
    Aarch64Spec,
    MachineError,
    hypervisor_factory,
    kernel_cmdline,
)

__all__ = [
    "DEFAULT_CMDLINE",
    "HYPERVISORS",
    "Aarch64Machine",
    "Aarch64Spec",
    "MachineError",
    "hypervisor_factory",
    "kernel_cmdline",
    "main",
    "split_hypervisor",
]


def split_hypervisor(argv: list[str]) -> tuple[str, list[str]]:
    """``--hypervisor NAME`` (anywhere; default hvf) and the rest of the arguments."""
    name, rest, i = "hvf", [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--hypervisor" and i + 1 < len(argv):
            name = argv[i + 1]
            i += 2
            continue
        if a.startswith("--hypervisor="):
            name = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return name, rest


def main(argv: list[str] | None = None) -> int:
    from . import __main__ as vmm_main

    name, rest = split_hypervisor(sys.argv[1:] if argv is None else list(argv))
    if name not in HYPERVISORS:
        sys.stderr.write(
            f"{vmm_main.PROG}: --hypervisor {name!r}: one of {', '.join(HYPERVISORS)}\n"
        )
        return vmm_main.EXIT_SETUP
    args = vmm_main.parser().parse_args(rest)
    try:
        if args.command in ("boot", "restore"):
            return vmm_main.cmd_boot(args, hypervisor=name)
    except Exception as e:  # one line, no traceback, unless asked (as the x86 VMM)
        if os.environ.get("IGNITION_VMM_DEBUG"):
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"{vmm_main.PROG}: internal error: {type(e).__name__}: {e}\n")
        return 1
    return vmm_main.EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())
