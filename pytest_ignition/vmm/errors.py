"""The error the aarch64 machine (and the hypervisor backends' factory) raises when a VM cannot be
built or operated. The x86_64 machine still has its own ``vmm.machine.MachineError`` (it moves
here with the x86 seam step); ``vmm/__main__.py`` handles both."""

from __future__ import annotations


class MachineError(Exception):
    """The VM cannot be built (bad spec, kernel, hypervisor capability) or operated; the message
    says what."""
