"""Host ends of a guest's virtio-net device, shared by both engines.

Owns the ``network`` modes below ``VMConfig.network``, the guest side's kernel argument
(``ignition.net=<mode>``, read by the init's network block in ``guest/init/etc/init.d/rcS``), the
guest MAC every snapshot carries, and the ``passt`` process of ``network=user``:

* ``none``: no network device (loopback only).
* ``user``: virtio-net whose frames go to one ``passt`` per VM (outbound NAT, DHCP, DNS, no
  root). passt listens on ``<machine sockdir>/passt.sock``; the VMM connects to it with passt's
  stream protocol (4-byte big-endian length + Ethernet frame). Guest addresses are fixed (below),
  so every restore of a snapshot finds the same lease valid; passt maps connections to the
  gateway address to the host's loopback, which the guest knows as ``host.ignition.internal``.
* ``segment`` (internal: VMs that join an ``ignition_network``): virtio-net whose VMM *listens*
  on ``<machine sockdir>/net.sock`` with the same stream protocol; the network's switch
  (:mod:`pytest_ignition.network`) connects to it after the restore.

The passt process dies with the VM: it is started with the VM, killed with it (``-1`` also makes
it exit when the VMM's connection closes), and its socket lives in the machine's socket dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from pytest_ignition.engines.base import EngineError, EngineUnavailable

__all__ = [
    "GUEST_ADDRESS",
    "GUEST_MAC",
    "HOST_ALIAS",
    "HOST_GATEWAY",
    "MODES",
    "Passt",
    "cmdline_arg",
]

MODES = ("none", "user", "segment")
GUEST_MAC = "52:54:00:12:34:56"  # the same in every snapshot; segments give members their own
GUEST_ADDRESS = "10.0.2.15"  # passt's DHCP answer (-a); fixed so restores keep a valid lease
GUEST_PREFIX = 24
HOST_GATEWAY = "10.0.2.2"  # passt's gateway (-g): connections to it reach the host's 127.0.0.1
HOST_ALIAS = "host.ignition.internal"
PASST_HINT = "apt-get install passt (the user-mode network stack behind network=user)"
PASST_START_TIMEOUT = 10.0


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"network={mode!r}: write none or user")
    return mode


def cmdline_arg(mode: str) -> str:
    """The kernel argument that tells the guest's init how to set eth0 up ("" for none)."""
    return "" if check_mode(mode) == "none" else f"ignition.net={mode}"


def passt_binary() -> str:
    found = shutil.which("passt")
    if found is None:
        raise EngineUnavailable("passt was not found on PATH (needed for network=user)", PASST_HINT)
    return found


class Passt:
    """One passt process serving one VM on a Unix socket in ``sockdir``."""

    def __init__(self, sockdir: Path, logdir: Path | None = None) -> None:
        from pytest_ignition.engines._process import spawn

        self.socket = Path(sockdir) / "passt.sock"
        self.log = Path(logdir or sockdir) / "passt.log"
        argv = [
            passt_binary(),
            "--foreground",
            "--one-off",  # exit when the VMM's connection closes
            "--quiet",
            # As root passt would switch to nobody, who cannot reach a private socket dir.
            "--runas",
            f"{os.getuid()}:{os.getgid()}",
            "--socket",
            str(self.socket),
            "--log-file",
            str(self.log),
            "--ipv4-only",
            "--address",
            GUEST_ADDRESS,
            "--netmask",
            str(GUEST_PREFIX),
            "--gateway",
            HOST_GATEWAY,
            "--mtu",
            "1500",  # the bundled VMM's virtio-net has no mergeable buffers: 1500-byte frames
        ]
        self.errlog = self.log.with_suffix(".stderr")
        self.socket.unlink(missing_ok=True)
        with open(self.errlog, "wb") as err:
            self.proc: subprocess.Popen[bytes] = spawn(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=True
            )
        deadline = time.monotonic() + PASST_START_TIMEOUT
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise EngineError(
                    f"passt exited with {self.proc.returncode} before it listened on "
                    f"{self.socket}: {self._why()} (network=user needs a host with a default "
                    "route; use network=none or ignition_network otherwise)"
                )
            if time.monotonic() > deadline:
                self.close()
                raise EngineError(
                    f"passt did not listen on {self.socket} within {PASST_START_TIMEOUT:g} s"
                )
            time.sleep(0.005)

    def _why(self) -> str:
        lines: list[str] = []
        for f in (self.errlog, self.log):
            with contextlib.suppress(OSError):
                lines += [
                    ln
                    for ln in f.read_text(errors="replace").splitlines()[-20:]
                    if ln.strip() and not ln.startswith("Failed to send")
                ]
        return "; ".join(lines[-6:]) or "no message"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        from pytest_ignition.engines._process import kill_process

        kill_process(self.proc)
        self.socket.unlink(missing_ok=True)
