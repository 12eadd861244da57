"""What both machines (x86_64: ``vmm/machine.py``; aarch64: ``vmm/arch/aarch64/machine.py``)
say about themselves the same way: the configuration a snapshot records (:meth:`config`), its
fingerprint (:meth:`fingerprint`, checked by a restore that expects one), the timing,
rollback and stop entries of ``status()``, and the arch-neutral half of snapshot files: the
spec a restore rebuilds (:func:`spec_from_config`), disk overlays written beside the state and
read back, virtio entries checked against the rebuilt devices, legacy and virtio device
state. A mixin over attributes each machine sets in its ``__init__``; nothing here touches a
hypervisor."""

from __future__ import annotations

import copy
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


def spec_from_config(
    cfg: dict[str, Any],
    *,
    vsock: str | None,
    net: str | None,
    rollback: bool,
    **extra: Any,
) -> dict[str, Any]:
    """The spec keywords a restore rebuilds from a snapshot's :meth:`MachineRecord.config`:
    its own fields, with ``vsock``/``net`` overriding the recorded socket paths (a snapshot
    without that device ignores them), dirty logging as ``rollback`` asks, and ``extra`` (the
    run's console, launch time, hypervisor). Raises KeyError/TypeError/ValueError."""
    return {
        "kernel": cfg["kernel"] or "",
        "initrd": cfg["initrd"],
        "mem_size": int(cfg["mem_size"]),
        "cpus": int(cfg["cpus"]),
        "cmdline": cfg["base_cmdline"],
        "vsock": (vsock or cfg["vsock"]) if cfg["vsock"] else None,
        "vsock_cid": int(cfg["vsock_cid"]),
        "net": (net or cfg.get("net")) if cfg.get("net") else None,
        "disks": list(cfg["disks"]),
        "disk_read_only": bool(cfg["disk_read_only"]),
        "rng": bool(cfg["rng"]),
        "boot_timer": bool(cfg["boot_timer"]),
        "log_dirty": rollback,
        **extra,
    }


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

    # -- snapshot files: shared by both machines ------------------------------------------
    def _file_state(self, state: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[int, Any]]]:
        """What a snapshot's state file records of ``state`` (:meth:`capture_state`): the
        same, but each disk overlay replaced by the name of the file :meth:`_write_overlays`
        writes beside it. Returns it and the (slot, device) pairs whose overlays to write."""
        file_state = copy.copy(state)
        file_state["devices"] = copy.deepcopy(
            {k: v for k, v in state["devices"].items() if k != "virtio"}
        )
        entries = []
        overlays: list[tuple[int, Any]] = []
        for i, entry in enumerate(state["devices"]["virtio"]):
            dev_state = dict(entry["state"]["device"])
            if "overlay" in dev_state:
                overlays.append((i, self.virtio_devices[i][2].device))
                dev_state["overlay"] = {}
                dev_state["overlay_file"] = f"disk{i}.overlay"
            entries.append({**entry, "state": {**entry["state"], "device": dev_state}})
        file_state["devices"]["virtio"] = entries
        return file_state, overlays

    @staticmethod
    def _write_overlays(
        tmp: Path, file_state: dict[str, Any], overlays: list[tuple[int, Any]]
    ) -> None:
        """Write the overlays :meth:`_file_state` set aside into the snapshot being made in
        ``tmp``, each with its sha256 in ``file_state`` (checked when it is loaded)."""
        from . import snapshot as snap

        entries = file_state["devices"]["virtio"]
        for i, dev in overlays:
            path = tmp / f"disk{i}.overlay"
            dev.save_overlay(path)
            entries[i]["state"]["device"]["overlay_sha256"] = snap.file_sha256(path)

    def _load_virtio_entries(self, snapshot: Any) -> list[dict[str, Any]]:
        """A snapshot's virtio entries checked against the devices this machine built (same
        slots, IRQs and types), with each disk overlay read back from its file (sha256
        checked). Raises ``SnapshotError``."""
        from . import snapshot as snap

        where = snapshot.state_path
        saved = snapshot.state["devices"].get("virtio", [])
        if not isinstance(saved, list) or len(saved) != len(self.virtio_devices):
            raise snap.SnapshotError(
                f"{where}: {len(saved) if isinstance(saved, list) else 'no list of'} virtio "
                f"devices saved, {len(self.virtio_devices)} built"
            )
        loaded = []
        for i, (entry, (addr, irq, t)) in enumerate(zip(saved, self.virtio_devices, strict=True)):
            if (
                entry["addr"] != addr
                or entry["irq"] != irq
                or entry["type"] != type(t.device).__name__
            ):
                raise snap.SnapshotError(
                    f"{where}: virtio slot {i} was {entry['type']} at {entry['addr']:#x}, "
                    f"rebuilt {type(t.device).__name__} at {addr:#x}"
                )
            dev_state = entry["state"]["device"]
            if "overlay_file" in dev_state:
                path = snapshot.path / dev_state["overlay_file"]
                try:
                    if snap.file_sha256(path) != dev_state.get("overlay_sha256"):
                        raise snap.SnapshotError(f"{path}: disk overlay is corrupt (sha256)")
                    t.device.load_overlay(path)
                except OSError as e:
                    raise snap.SnapshotError(f"{path}: cannot read disk overlay: {e}") from None
                except ValueError as e:
                    raise snap.SnapshotError(str(e)) from None
                dev_state = {**dev_state, "overlay": dict(t.device.overlay)}
            loaded.append({**entry, "state": {**entry["state"], "device": dev_state}})
        return loaded

    def _load_device_state(self, devs: dict[str, Any], virtio: list[dict[str, Any]]) -> None:
        """Device state from a snapshot or a rollback base: the legacy devices this machine
        has (UART, boot timer; i8042 on x86) and every virtio transport with its device."""
        for name in ("uart", "i8042", "boot_timer"):
            dev = getattr(self, name, None)
            if dev is not None and devs.get(name) is not None:
                dev.set_state(devs[name])
        for entry, (_, _, t) in zip(virtio, self.virtio_devices, strict=True):
            t.set_state(entry["state"])

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
