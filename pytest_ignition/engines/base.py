"""The engine boundary: what every VM engine (QEMU, the bundled VMM) provides.

Owns :class:`VMConfig` (what to boot, and the key that ties a snapshot to it), the
:class:`Machine` handle of one running guest, the :class:`Engine` operations
(boot / snapshot / restore / rollback) and the errors an engine raises.

Contract (every engine):

* ``boot(config, workdir)`` returns a machine whose agent answered a ping within
  ``config.boot_timeout``; a guest that panics, exits or hangs first raises
  :class:`BootError` carrying the console tail.
* ``snapshot(machine, directory)`` writes a self-contained snapshot of the running machine
  into ``directory``. **The machine keeps running afterwards** (it is resumed) and stays
  usable; callers close it when they are done with it. No agent request may be in flight.
* ``restore(config, directory, workdir)`` starts a new machine from a snapshot: agent
  ready, guest clock set from the host's, guest entropy reseeded (two restores of one
  snapshot never hand out the same random bytes). A snapshot taken with another config
  raises :class:`SnapshotMismatch` naming the snapshot's metadata file.
* ``rollback(machine)`` puts a machine back to the state of the snapshot it was restored
  from, in place; engines without support raise ``NotImplementedError``
  (``supports_rollback`` says which).
* ``Machine.close()`` is idempotent, kills and reaps every process of the machine and
  removes its sockets and disk overlays, also when called from ``finally`` on Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_ignition.agent import AgentClient

__all__ = [
    "BootError",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "Machine",
    "SnapshotMismatch",
    "VMConfig",
]


@dataclass(frozen=True)
class VMConfig:
    """What to boot. ``kernel_args`` are appended to the guest's default command line.

    ``image`` is an ext4 file attached read-only as the guest's root (the lower layer of an
    overlay whose upper layer lives in guest RAM); ``init`` says who is PID 1 then (``agent``:
    the initramfs's init, commands run chrooted in the image; ``systemd``: the image's own
    init after a switch_root). ``rootfs`` stays an extra copy-on-write disk at ``/rootfs``.
    ``network`` is ``none`` (loopback) or ``user`` (virtio-net to a passt backend).
    """

    kernel: Path
    initrd: Path | None
    rootfs: Path | None = None
    kernel_args: str = ""
    memory_mib: int = 512
    cpus: int = 1
    boot_timeout: float = 120.0
    image: Path | None = None
    init: str = "agent"
    network: str = "none"
    arch: str = "x86_64"
    # Defaults for commands (an OCI image's Env and WorkingDir); a call's env/cwd win.
    guest_env: tuple[tuple[str, str], ...] = ()
    guest_cwd: str | None = None

    def __post_init__(self) -> None:
        # Normalise paths so that equal configs compare (and hash) equal.
        for name in ("kernel", "initrd", "rootfs", "image"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.memory_mib < 16:
            raise ValueError(f"memory_mib={self.memory_mib}: a guest needs at least 16 MiB")
        if self.cpus < 1:
            raise ValueError(f"cpus={self.cpus}: need at least one vCPU")
        if self.boot_timeout <= 0:
            raise ValueError(f"boot_timeout={self.boot_timeout}: must be positive")

    def files(self) -> dict[str, Path]:
        """The host files this config reads, by field name."""
        out = {"kernel": self.kernel}
        if self.initrd is not None:
            out["initrd"] = self.initrd
        if self.rootfs is not None:
            out["rootfs"] = self.rootfs
        if self.image is not None:
            out["image"] = self.image
        return out

    def key(self) -> str:
        """Hex sha256 over the fields and each file's (size, mtime_ns).

        A snapshot records this key, so a snapshot of another kernel, initrd, rootfs or
        machine shape is never reused. ``boot_timeout`` does not change the guest and is
        left out.
        """
        fields: dict[str, Any] = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(self).items()
            if k != "boot_timeout"
        }
        stamps: dict[str, Any] = {}
        for name, path in self.files().items():
            try:
                st = path.stat()
                stamps[name] = [str(path.resolve()), st.st_size, st.st_mtime_ns]
            except OSError:
                stamps[name] = [str(path), None, None]
        blob = json.dumps({"fields": fields, "files": stamps}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class EngineError(Exception):
    """Base class of engine errors."""


class EngineUnavailable(EngineError):
    """The engine cannot run here; ``hint`` says what to install or do."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason} ({hint})" if hint else reason)
        self.reason = reason
        self.hint = hint


class BootError(EngineError):
    """The guest panicked, exited or hung while booting or restoring."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        text = message
        if console_tail:
            text += "\n--- console tail ---\n" + console_tail.rstrip("\n")
        super().__init__(text)
        self.message = message
        self.console_tail = console_tail


class SnapshotMismatch(EngineError):
    """A snapshot does not belong to the config (or engine) it is being restored with."""


class Machine(ABC):
    """One running guest.

    ``agent`` is connected and answered a ping; ``console`` is a pexpect spawn-like object
    on the serial console (``sendline``/``expect`` reach the guest's shell);
    ``ready_seconds`` is the time from launching the VMM to the agent's first answer;
    ``workdir`` holds the machine's sockets, logs and overlays.
    """

    agent: AgentClient
    ready_seconds: float
    workdir: Path

    @property
    @abstractmethod
    def console(self) -> Any:
        """A pexpect spawn-like object on the serial console (connected on first use)."""

    @abstractmethod
    def console_tail(self, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters the guest wrote to its serial console."""

    @abstractmethod
    def is_alive(self) -> bool:
        """True while the VMM process runs."""

    @abstractmethod
    def close(self) -> None:
        """Kill and reap the VMM, remove sockets and overlays. Idempotent."""

    def exit_cause(self) -> str | None:
        """Once the VMM exited: what its exit status says happened to the guest, if more than
        the code (``vm.diagnose`` uses it; the bundled VMM: a guest that halted for good)."""
        return None

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Engine(ABC):
    """A way to run guests (see the module docstring for the contract)."""

    name: str
    accelerator: str
    supports_rollback: bool = False
    #: version of this engine's ``meta.json`` layout; a snapshot of another version is refused
    snapshot_format: int = 1

    def read_meta(self, config: VMConfig, directory: Path) -> dict[str, Any]:
        """A snapshot's ``meta.json``, checked against ``config`` and this engine.

        Raises :class:`SnapshotMismatch` naming the file and every difference found;
        engines add their own checks in :meth:`meta_problems`.
        """
        meta_path = Path(directory) / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise SnapshotMismatch(f"{meta_path}: no such snapshot metadata") from None
        except (OSError, ValueError) as exc:
            raise SnapshotMismatch(f"{meta_path}: unreadable snapshot metadata: {exc}") from exc
        if not isinstance(meta, dict):
            raise SnapshotMismatch(f"{meta_path}: not a snapshot metadata object")
        problems = []
        if meta.get("format") != self.snapshot_format:
            problems.append(f"format {meta.get('format')!r}, expected {self.snapshot_format}")
        if meta.get("engine") != self.name:
            problems.append(f"taken by engine {meta.get('engine')!r}, not {self.name!r}")
        if meta.get("config_key") != config.key():
            problems.append(
                "taken with another configuration (kernel, initrd, rootfs, kernel_args, "
                "memory or cpus differ, or a file changed since)"
            )
        problems += self.meta_problems(config, meta)
        if problems:
            raise SnapshotMismatch(f"{meta_path}: snapshot does not match: " + "; ".join(problems))
        return meta

    def meta_problems(self, config: VMConfig, meta: dict[str, Any]) -> list[str]:
        """Engine-specific reasons a snapshot's metadata does not fit ``config``."""
        return []

    @abstractmethod
    def boot(self, config: VMConfig, workdir: Path) -> Machine:
        """Boot ``config`` with its files under ``workdir``; agent ready on return."""

    @abstractmethod
    def snapshot(self, machine: Machine, directory: Path, *, keep_agent: bool = True) -> None:
        """Write a snapshot of ``machine`` into ``directory``; the machine keeps running.

        The bundled VMM snapshots with the agent disconnected, so ``machine.agent`` may be a
        new client afterwards, as after :meth:`rollback`: read it again. ``keep_agent=False``:
        the caller closes the machine next, so no agent need be connected afterwards."""

    @abstractmethod
    def restore(
        self, config: VMConfig, directory: Path, workdir: Path, *, rollback: bool = True
    ) -> Machine:
        """A new machine from the snapshot in ``directory``: agent ready, clock and CRNG fresh.

        ``rollback=False`` promises that :meth:`rollback` will not be asked for this machine,
        so an engine may skip what only rollback needs (the bundled VMM's dirty-page log)."""

    def rollback(self, machine: Machine) -> None:
        """Back to the snapshot ``machine`` was restored from, in place."""
        raise NotImplementedError(f"the {self.name} engine cannot roll back in place")

    def describe(self) -> str:
        """A short line for the pytest header, e.g. ``qemu 7.2.22 (tcg)``."""
        return f"{self.name} ({self.accelerator})"
