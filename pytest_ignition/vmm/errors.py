"""The error both machines (x86_64: ``vmm/machine.py``; aarch64: ``vmm/arch/aarch64/machine.py``)
and the hypervisor backends' factory raise when a VM cannot be built or operated;
``vmm/machine.py`` re-exports it as ``machine.MachineError`` for old imports."""

from __future__ import annotations


class MachineError(Exception):
    """The VM cannot be built (bad spec, kernel, hypervisor capability) or operated; the message
    says what."""
