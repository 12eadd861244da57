"""VM engines behind one small boundary (:mod:`.base`): QEMU (:mod:`.qemu`) and the bundled
VMM (:mod:`.ignition`); :mod:`.select` picks one for this host and says why."""

from pytest_ignition.engines.base import (
    BootError,
    Engine,
    EngineError,
    EngineUnavailable,
    Machine,
    SnapshotMismatch,
    VMConfig,
)

__all__ = [
    "BootError",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "Machine",
    "SnapshotMismatch",
    "VMConfig",
]
