"""What both machines (x86_64: ``vmm/machine.py``; aarch64: ``vmm/arch/aarch64/machine.py``)
say about themselves the same way: the configuration a snapshot records (:meth:`config`), its
fingerprint (:meth:`fingerprint`, checked by a restore that expects one) and the timing,
rollback and stop entries of ``status()``. A mixin over attributes each machine sets in its
``__init__``; nothing here touches a hypervisor."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .errors import MachineError

log = logging.getLogger(__name__)

# The spec fields a restore must be given again (snapshot.fingerprint's keywords, but for
# vsock: only whether there is one counts, not its socket path).
FINGERPRINTED = (
    "kernel",
    "initrd",
    "mem_size",
    "cpus",
    "cmdline",
    "disks",
    "disk_read_only",
    "vsock_cid",
    "rng",
    "boot_timer",
)


class MachineRecord:
    """Mixed into a machine whose ``spec`` has the fields of ``MachineSpec`` that a snapshot
    keeps (kernel, initrd, mem_size, cpus, cmdline, vsock, vsock_cid, net, disks,
    disk_read_only, rng, boot_timer)."""

    spec: Any
    cmdline: str
    boot_timer: Any
    restore_time_us: int | None
    last_rollback: dict[str, Any] | None
    state: str
    virtio_devices: list[Any]
    stop_reason: Any
    exit_status: int | None
    _base_memory: Path | None
    _fingerprint: dict[str, Any] | None

    def config(self) -> dict[str, Any]:
        """The machine's configuration as recorded in a snapshot (enough to rebuild it)."""
        spec = self.spec
        return {
            "kernel": os.path.abspath(spec.kernel) if spec.kernel else None,
            "initrd": os.path.abspath(spec.initrd) if spec.initrd else None,
            "mem_size": spec.mem_size,
            "cpus": spec.cpus,
            "cmdline": self.cmdline,
            "base_cmdline": spec.cmdline,
            "vsock": spec.vsock,
            "vsock_cid": spec.vsock_cid,
            "net": spec.net,
            "disks": [os.path.abspath(d) for d in spec.disks],
            "disk_read_only": spec.disk_read_only,
            "rng": spec.rng,
            "boot_timer": spec.boot_timer,
        }

    def fingerprint(self) -> dict[str, Any]:
        """This machine's configuration fingerprint (a restored one keeps its snapshot's)."""
        from . import snapshot as snap

        if self._fingerprint is None:
            spec = self.spec
            try:
                kw = {name: getattr(spec, name) for name in FINGERPRINTED}
                self._fingerprint = snap.fingerprint(**kw, vsock=bool(spec.vsock))
            except OSError as e:
                raise MachineError(f"cannot fingerprint the configuration: {e}") from None
        return self._fingerprint

    def _add_status_records(self, st: dict[str, Any]) -> dict[str, Any]:
        """Add to a ``status()`` dict what is known so far: the guest's boot time, the restore
        time, the rollback base and the last rollback, and how the VM stopped."""
        bt = self.boot_timer
        if bt is not None and getattr(bt, "boot_time_us", None) is not None:
            st["boot_time_us"] = bt.boot_time_us
        if self.restore_time_us is not None:
            st["restore_time_us"] = self.restore_time_us
        if self._base_memory is not None:
            st["rollback_base"] = str(self._base_memory.parent)
        if self.last_rollback is not None:
            st["last_rollback"] = self.last_rollback
        if self.stop_reason is not None:
            st["stop_reason"] = {"kind": self.stop_reason.kind, "detail": self.stop_reason.detail}
            st["exit_status"] = self.exit_status
        return st

    def _settle_before_snapshot(self, name: str, settle: float) -> None:
        """A running VM's vsock connections get up to ``settle`` seconds to finish closing."""
        if settle > 0 and self.state == "running":
            if not settle_vsock(self.virtio_devices, settle):
                log.info("snapshot %s: vsock connections still open after %.1f s", name, settle)

    def _devices_after_restore(self) -> None:
        """Tell each device that the guest now runs from the state last loaded (vsock: the
        old process's or run's connections are gone; see ``VirtioVsock.after_restore``)."""
        for _, _, t in self.virtio_devices:
            after = getattr(t.device, "after_restore", None)
            if after is not None:
                after()


# How often a snapshot's settle wait looks at the vsock devices.
SETTLE_POLL_S = 0.002


def settle_vsock(virtio_devices: list[Any], seconds: float) -> bool:
    """Let the guest finish closing its vsock connections before a snapshot: wait at most
    ``seconds`` (the VM running) until every device with an ``idle()`` says it is idle.

    An idle snapshot spares every restore and rollback of it the transport reset and the
    guest's round trip to handle it (``VirtioVsock.after_restore``). True when idle."""
    devices = [t.device for _, _, t in virtio_devices if hasattr(t.device, "idle")]
    deadline = time.monotonic() + max(0.0, seconds)
    while True:
        busy = False
        for dev in devices:
            with dev.lock:
                busy = busy or not dev.idle()
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(SETTLE_POLL_S)
