"""pytest-ignition: every test gets its own Linux microVM.

The public names users import live here; the plugin itself is registered through the
``pytest11`` entry point (:mod:`pytest_ignition.plugin`). Imports are lazy so that loading
the plugin does not pull in the VMM or QEMU client until a test asks for a VM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "VM",
    "CommandError",
    "CommandFailed",
    "CommandOutputTooLarge",
    "CommandResult",
    "CommandTimeout",
    "GuestFailure",
    "TransferTooLarge",
]

if TYPE_CHECKING:
    from pytest_ignition.vm import (
        VM,
        CommandError,
        CommandFailed,
        CommandOutputTooLarge,
        CommandResult,
        CommandTimeout,
        GuestFailure,
        TransferTooLarge,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pytest_ignition import vm

        return getattr(vm, name)
    raise AttributeError(f"module 'pytest_ignition' has no attribute {name!r}")
