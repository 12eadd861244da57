"""The QEMU engine: ``qemu-system-x86_64 -M microvm`` or ``qemu-system-aarch64 -M virt``, via QMP.

Owns launching QEMU (one process per machine, its own session, SIGKILLed by the kernel
when this process dies), the serial console (a chardev socket with a log file), the agent
channel (virtio-serial port ``org.ignition.agent`` on a chardev socket), disks as qcow2
overlays over a base that is never written, and snapshots:

* snapshot: QMP ``stop``, ``migrate`` to ``exec:cat > <dir>/state.partial && mv ...``,
  wait for completion and the rename, copy the disk overlay to
  ``<dir>/disk.qcow2``, write ``<dir>/meta.json``, QMP ``cont`` (the machine keeps
  running, per the engine contract).
* restore: QEMU with the identical device arguments plus ``-incoming fd:N`` (the state file)
  and a fresh overlay backed by ``disk.qcow2``; the agent socket is connected before the
  guest runs (so the guest never sees the host side of its port go away), QMP ``cont``
  once the state is loaded, then the guest clock is set and its CRNG reseeded (one SYNC
  request, whose answer confirms the agent is alive).

The kernel command line gets ``reboot=t``: microvm has no i8042, and a triple fault is
the reset that ``-no-reboot`` turns into QEMU exiting (a panicking guest, ``panic=-1``).
QEMU 7.2 has no ``file:`` migration URI; restore reads the state through an inherited fd.

aarch64 guests (``VMConfig.arch``) run on ``-M virt,gic-version=3`` (arm64 has no microvm):
``-nodefaults`` leaves the PL011 (``console=ttyAMA0``) and the 32 virtio-mmio transports, which
the guest finds in the device tree QEMU generates (``-device virtio-*-device``, no PCI
enumeration). Reset and power-off are PSCI calls, so no ``reboot=`` flag is needed; a panic's
PSCI reset ends QEMU under ``-no-reboot`` as on x86. The engine's accelerator (hvf on macOS,
kvm on Linux, chosen in ``engines/select.py``) serves guests of the host's architecture;
another architecture's guest always runs under TCG, with ``-cpu max,pauth-impdef=on`` on arm64
(QEMU's default QARMA pointer-auth emulation makes a boot ~3x slower).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pytest_ignition import netdev
from pytest_ignition.console import SerialConsole, read_tail
from pytest_ignition.engines._process import (
    MachineDirs,
    default_cmdline,
    kill_process,
    spawn,
    track,
    untrack,
)
from pytest_ignition.engines.base import (
    BootError,
    Engine,
    EngineError,
    EngineUnavailable,
    Machine,
    SnapshotMismatch,
    VMConfig,
)

__all__ = ["QEMU_BINARIES", "QemuEngine", "QemuMachine", "SNAPSHOT_FORMAT"]

SNAPSHOT_FORMAT = 1
AGENT_PORT_NAME = "org.ignition.agent"
QEMU_HINT = "apt-get install qemu-system-x86 (provides qemu-system-x86_64)"
# guest architecture -> (QEMU binary, how to get it)
QEMU_BINARIES = {
    "x86_64": ("qemu-system-x86_64", QEMU_HINT),
    "aarch64": (
        "qemu-system-aarch64",
        "apt-get install qemu-system-arm (provides qemu-system-aarch64), or brew install qemu",
    ),
}
QEMU_IMG_HINT = "apt-get install qemu-utils (provides qemu-img; needed for a rootfs)"
T = TypeVar("T")


# --------------------------------------------------------------------------- QMP


class _LoopThread:
    """One private asyncio event loop on a daemon thread, for every QMP connection.

    ``qemu.qmp`` is asyncio; running it here keeps it away from any loop the user's
    tests run, and lets machines be driven from any thread.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(
                    target=self._loop.run_forever, name="ignition-qmp", daemon=True
                ).start()
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise


_qmp_loop = _LoopThread()


class QmpError(EngineError):
    """A QMP command failed or QEMU's monitor did not answer."""


class _Qmp:
    """A synchronous face on ``qemu.qmp.QMPClient`` (run on :data:`_qmp_loop`)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        from qemu.qmp import ConnectError, QMPClient

        self.timeout = timeout

        async def connect() -> Any:
            # QEMU binds the socket before it listens: a refused connect is retried.
            deadline = time.monotonic() + timeout
            while True:
                client = QMPClient("ignition")
                try:
                    await client.connect(str(path))
                    return client
                except ConnectError:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.002)

        self._client = _qmp_loop.run(connect(), timeout + 1)

    def cmd(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        from qemu.qmp import ExecuteError

        try:
            return _qmp_loop.run(self._client.execute(name, args or None), timeout or self.timeout)
        except ExecuteError as exc:
            raise QmpError(f"QMP {name} failed: {exc}") from exc
        except TimeoutError as exc:
            raise QmpError(f"QMP {name}: no answer within {timeout or self.timeout}s") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            _qmp_loop.run(self._client.disconnect(), 5.0)


def _host_arch() -> str:
    import platform

    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


# --------------------------------------------------------------------------- the machine


class QemuMachine(Machine):
    """One QEMU process and everything it owns (a private directory under ``workdir``)."""

    def __init__(self, engine: QemuEngine, config: VMConfig, workdir: Path) -> None:
        self.engine = engine
        self.config = config
        self.workdir = Path(workdir)
        # A private directory per machine, so machines may share a workdir.
        self._dirs = MachineDirs(self.workdir, "qemu-", "console.sock")
        self.dir = self._dirs.dir
        self.sockdir = sockdir = self._dirs.sockdir
        self.console_sock = sockdir / "console.sock"
        self.agent_sock = sockdir / "agent.sock"
        self.qmp_sock = sockdir / "qmp.sock"
        self.console_log = self.dir / "console.log"
        self.qemu_log = self.dir / "qemu.log"
        self.overlay: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent: Any = None
        self.ready_seconds = 0.0
        self.restored_from: Path | None = None
        self.passt: netdev.Passt | None = None  # network=user: this VM's passt
        # network=segment: QEMU listens here for the ignition_network switch
        self.net_socket = sockdir / "net.sock" if config.network == "segment" else None
        self._console = SerialConsole(
            self.console_sock, self.console_log, other_logs=(self.qemu_log,)
        )
        self._qmp: _Qmp | None = None
        self._closed = False
        self._lock = threading.Lock()
        track(self)

    # -- Machine API -------------------------------------------------------------------------

    @property
    def console(self) -> Any:
        return self._console.spawn

    def console_tail(self, max_chars: int = 4000) -> str:
        return self._console.tail(max_chars)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def qmp(self) -> _Qmp:
        """The QMP connection (opened on first use; only snapshots need it)."""
        if self._qmp is None:
            if not self.is_alive():
                raise EngineError("QEMU is not running")
            self._qmp = _Qmp(self.qmp_sock)
        return self._qmp

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.agent is not None:
                with contextlib.suppress(Exception):
                    self.agent.close()
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            self._kill()
            self._console.close()  # after the kill: the log is complete
        finally:
            self._dirs.remove()
            untrack(self)

    def _kill(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)
        if self.passt is not None:
            self.passt.close()

    def qemu_stderr(self, max_chars: int = 2000) -> str:
        return read_tail(self.qemu_log, max_chars)

    def __repr__(self) -> str:
        return f"<QemuMachine pid={self.pid} {'closed' if self._closed else 'open'}>"


# --------------------------------------------------------------------------- the engine


class QemuEngine(Engine):
    """QEMU ``microvm`` with virtio-mmio devices; snapshots by migration to a file."""

    name = "qemu"
    supports_rollback = False
    snapshot_format = SNAPSHOT_FORMAT

    def __init__(
        self,
        accelerator: str = "tcg",
        qemu: str | None = None,
        qemu_img: str = "qemu-img",
        arch: str | None = None,
    ) -> None:
        """``accelerator`` is for guests of ``arch`` (default: the host's architecture);
        ``qemu`` overrides that architecture's binary. Other architectures use TCG and
        their own ``qemu-system-*``, looked up when first needed."""
        if accelerator not in ("kvm", "hvf", "tcg"):
            raise ValueError(f"unknown accelerator {accelerator!r}")
        self.accelerator = accelerator
        self.arch = arch or _host_arch()
        if self.arch not in QEMU_BINARIES:
            raise EngineUnavailable(f"no QEMU machine for {self.arch} guests here")
        self._binaries: dict[str, str] = {}
        self._versions: dict[str, str] = {}
        self.qemu = self.binary(self.arch, qemu)
        self.qemu_img = shutil.which(qemu_img)

    def binary(self, arch: str, override: str | None = None) -> str:
        """The ``qemu-system-*`` for ``arch`` guests; EngineUnavailable says what to install."""
        if arch not in self._binaries:
            name, hint = QEMU_BINARIES.get(arch, (f"qemu-system-{arch}", ""))
            found = shutil.which(override or name)
            if found is None:
                raise EngineUnavailable(f"{override or name} was not found on PATH", hint=hint)
            self._binaries[arch] = found
        return self._binaries[arch]

    def accelerator_for(self, arch: str) -> str:
        """The engine's accelerator for the host's own architecture, TCG for any other."""
        return self.accelerator if arch == self.arch else "tcg"

    def version_of(self, arch: str) -> str:
        """The version of ``arch``'s QEMU, e.g. ``7.2.22``."""
        if arch not in self._versions:
            out = subprocess.run(
                [self.binary(arch), "--version"], capture_output=True, text=True, timeout=30
            ).stdout
            m = re.search(r"version (\S+)", out)
            self._versions[arch] = m.group(1) if m else "unknown"
        return self._versions[arch]

    @property
    def version(self) -> str:
        """QEMU's version (of the host architecture's binary), e.g. ``7.2.22``."""
        return self.version_of(self.arch)

    def describe(self) -> str:
        return f"qemu {self.version} ({self.accelerator})"

    # -- argument building ----------------------------------------------------------------------

    def cmdline(self, config: VMConfig) -> str:
        if config.arch == "aarch64":
            # virt's UART is a PL011 (ttyAMA0); reset and power-off go through PSCI.
            base = default_cmdline().replace("console=ttyS0", "console=ttyAMA0")
            parts = [" ".join(a for a in base.split() if not a.startswith("reboot="))]
        else:
            # microvm has no i8042, so the default reboot=k would fall through to a jump into
            # the firmware, which boots the kernel again instead of resetting: a panicking
            # guest would loop instead of exiting. A triple fault resets, and -no-reboot exits.
            parts = [default_cmdline(), "reboot=t"]
        if config.image is not None:
            parts += ["ignition.image=1", f"ignition.init={config.init}"]
        if config.rootfs is not None:
            parts.append("ignition.rootfs=serial:ignition-rootfs")
        if config.network != "none":
            parts.append(netdev.cmdline_arg(config.network))
        if config.kernel_args.strip():
            parts.append(config.kernel_args.strip())
        return " ".join(parts)

    def machine_args(self, config: VMConfig) -> list[str]:
        """Machine, accelerator and CPU for the config's architecture."""
        accel = self.accelerator_for(config.arch)
        if config.arch == "aarch64":
            # GICv3 as the bundled VMM's machine has (no GICv2 limit of 8 vCPUs); under KVM the
            # host's own GIC version ("max": a GICv2-only host such as a Raspberry Pi 4).
            gic = "max" if accel == "kvm" else "3"
            cpu = "host" if accel in ("kvm", "hvf") else "max,pauth-impdef=on"
            return ["-M", f"virt,gic-version={gic}", "-accel", accel, "-cpu", cpu]
        args = ["-M", "microvm,acpi=off", "-accel", accel]
        if accel in ("kvm", "hvf"):
            args += ["-cpu", "host"]
        return args

    def device_args(self, config: VMConfig) -> list[str]:
        """Everything but per-instance paths: identical between boot and restore."""
        args = self.machine_args(config)
        args += [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-m",
            str(config.memory_mib),
            "-smp",
            str(config.cpus),
            "-append",
            self.cmdline(config),
            "-serial",
            "chardev:con",
            "-device",
            "virtio-serial-device",
            "-device",
            f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng0",
        ]
        # Disks are found by serial in the guest: the virtio-mmio slot order is not ours.
        if config.image is not None:
            args += ["-device", "virtio-blk-device,drive=image,serial=ignition-image"]
        if config.rootfs is not None:
            args += ["-device", "virtio-blk-device,drive=root,serial=ignition-rootfs"]
        if config.network != "none":
            args += ["-device", f"virtio-net-device,netdev=net0,mac={netdev.GUEST_MAC}"]
        return args

    def _instance_args(self, m: QemuMachine, config: VMConfig) -> list[str]:
        args = ["-kernel", str(Path(config.kernel).resolve())]
        if config.initrd is not None:
            args += ["-initrd", str(Path(config.initrd).resolve())]
        args += [
            "-chardev",
            # logappend: QEMU writes O_APPEND, so the log guard can truncate the log under it
            f"socket,id=con,path={m.console_sock},server=on,wait=off,logfile={m.console_log},"
            "logappend=on",
            "-chardev",
            f"socket,id=agent,path={m.agent_sock},server=on,wait=off",
            "-qmp",
            f"unix:{m.qmp_sock},server=on,wait=off",
        ]
        if config.image is not None:
            # Read-only: the guest's writes go to an overlay in its own RAM (see guest/init).
            image = str(Path(config.image).resolve()).replace(",", ",,")
            args += ["-drive", f"if=none,id=image,file={image},format=raw,readonly=on"]
        if m.overlay is not None:
            args += ["-drive", f"if=none,id=root,file={m.overlay},format=qcow2,cache=unsafe"]
        # passt's stream protocol both ways: QEMU connects to passt (user), or listens for the
        # ignition_network switch (segment); see pytest_ignition/netdev.py.
        if m.passt is not None:
            args += [
                "-netdev",
                f"stream,id=net0,server=off,addr.type=unix,addr.path={m.passt.socket}",
            ]
        elif m.net_socket is not None:
            args += ["-netdev", f"stream,id=net0,server=on,addr.type=unix,addr.path={m.net_socket}"]
        return args

    def _overlay(self, m: QemuMachine, base: Path, base_format: str) -> None:
        if self.qemu_img is None:
            raise EngineUnavailable("qemu-img was not found on PATH", hint=QEMU_IMG_HINT)
        overlay = m.dir / "overlay.qcow2"
        res = subprocess.run(
            [
                self.qemu_img,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(base.resolve()),
                "-F",
                base_format,
                str(overlay),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise EngineError(f"qemu-img create over {base} failed: {res.stderr.strip()}")
        m.overlay = overlay

    # -- launching and waiting -----------------------------------------------------------------

    def _check_files(self, config: VMConfig) -> None:
        for name, path in config.files().items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path} does not exist")

    def _launch(
        self, m: QemuMachine, config: VMConfig, extra: list[str], pass_fds: tuple[int, ...] = ()
    ) -> float:
        qemu = self.binary(config.arch)
        if config.network == "user" and m.passt is None:
            m.passt = netdev.Passt(m.sockdir, m.dir)
        argv = [qemu, *self.device_args(config), *self._instance_args(m, config), *extra]
        log = open(m.qemu_log, "ab")  # noqa: SIM115 - handed to the child (O_APPEND: capped)
        try:
            started = time.monotonic()
            m.proc = spawn(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=pass_fds,
            )
        finally:
            log.close()
        return started

    def _fail(self, m: QemuMachine, what: str) -> BootError:
        # Give a dying QEMU a moment so that the log holds its last words.
        if m.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(timeout=0.5)
        msg = what
        if m.proc is not None and m.proc.poll() is not None:
            msg += f" (QEMU exited with {m.proc.returncode})"
        err = m.qemu_stderr().strip()
        if err:
            msg += f"\nQEMU said: {err}"
        m.close()
        return BootError(msg, m.console_tail())

    def _connect_agent(self, m: QemuMachine, deadline: float, timeout: float, what: str) -> None:
        """Connect the agent socket (the guest need not be listening yet)."""
        from pytest_ignition.agent import AgentClient

        # The sockets appear once QEMU has parsed its arguments.
        while not m.agent_sock.exists():
            if m.proc is not None and m.proc.poll() is not None:
                raise self._fail(m, f"QEMU exited before the guest {what}")
            if time.monotonic() > deadline:
                raise self._fail(m, f"QEMU did not start within {timeout:g}s")
            time.sleep(0.002)
        try:
            m.agent = AgentClient.connect_unix(
                str(m.agent_sock), timeout=max(0.1, deadline - time.monotonic())
            )
        except Exception as exc:
            raise self._fail(m, f"cannot connect to the agent socket: {exc!r}") from exc

    def _wait_agent_ready(self, m: QemuMachine, deadline: float, timeout: float, what: str) -> None:
        try:
            m.agent.wait_ready(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            if m.proc is not None and m.proc.poll() is not None:
                raise self._fail(m, f"the guest stopped before it {what}") from exc
            if time.monotonic() >= deadline - 0.05:
                raise self._fail(
                    m, f"the guest agent did not answer within {timeout:g}s after launch"
                ) from exc
            raise self._fail(m, f"the guest agent failed: {exc!r}") from exc

    def _resume_incoming(self, m: QemuMachine, deadline: float, timeout: float) -> None:
        """Wait until QEMU has loaded the incoming state, then ``cont``.

        The snapshot was taken of a stopped guest, and QEMU keeps the source's run state
        after an incoming migration, so the guest stays paused until told to run.
        """
        while not m.qmp_sock.exists():
            if not m.is_alive():
                raise self._fail(m, "QEMU exited while loading the snapshot")
            if time.monotonic() > deadline:
                raise self._fail(m, f"QEMU did not start within {timeout:g}s")
            time.sleep(0.002)
        try:
            qmp = m.qmp()
            while True:
                status = qmp.cmd("query-status").get("status")
                if status == "running":
                    return
                if status in ("paused", "postmigrate", "prelaunch"):
                    qmp.cmd("cont")
                    return
                if status != "inmigrate":
                    raise EngineError(f"unexpected run state {status!r} after loading")
                mig = qmp.cmd("query-migrate")
                if mig.get("status") == "failed":
                    raise EngineError(f"loading failed: {mig.get('error-desc', 'no detail')}")
                if time.monotonic() > deadline:
                    raise EngineError(f"the snapshot did not load within {timeout:g}s")
                time.sleep(0.002)
        except Exception as exc:
            if isinstance(exc, BootError):
                raise
            raise self._fail(m, f"restoring the snapshot failed: {exc}") from exc

    # -- Engine API ------------------------------------------------------------------------------

    def boot(self, config: VMConfig, workdir: Path) -> QemuMachine:
        self._check_files(config)
        m = QemuMachine(self, config, workdir)
        try:
            if config.rootfs is not None:
                self._overlay(m, Path(config.rootfs), "raw")
            started = self._launch(m, config, [])
            deadline = started + config.boot_timeout
            self._connect_agent(m, deadline, config.boot_timeout, "booted")
            self._wait_agent_ready(m, deadline, config.boot_timeout, "booted")
            m.ready_seconds = time.monotonic() - started
            return m
        except BaseException:
            m.close()
            raise

    def snapshot(self, machine: Machine, directory: Path, *, keep_agent: bool = True) -> None:
        if not isinstance(machine, QemuMachine) or machine.engine is not self:
            raise TypeError("snapshot() needs a machine of this engine")
        if not machine.is_alive():
            raise EngineError("cannot snapshot a machine whose QEMU is not running")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        qmp = machine.qmp()
        state = directory / "state"
        partial = directory / "state.partial"
        for stale in (state, partial, directory / "meta.json", directory / "disk.qcow2"):
            stale.unlink(missing_ok=True)
        qmp.cmd("stop")
        try:
            # The stream goes to a local file: no reason to throttle it (default 128 MiB/s).
            qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            # A pipe to `cat` beats QEMU writing the file itself (fd:) by ~1/3: the file
            # writes run beside the migration. `cat` may still be writing when QEMU reports
            # completion, so the stream is renamed into place by the same shell once `cat`
            # is done, and waited for below.
            q_partial, q_state = shlex.quote(str(partial)), shlex.quote(str(state))
            qmp.cmd("migrate", uri=f"exec:cat > {q_partial} && mv -f {q_partial} {q_state}")
            deadline = time.monotonic() + 600
            while True:
                info = qmp.cmd("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise EngineError(
                        f"snapshot migration {status}: {info.get('error-desc', 'no detail')}"
                    )
                if time.monotonic() > deadline:
                    raise EngineError("snapshot migration did not complete within 600s")
                time.sleep(0.005)
            while not state.exists():
                if time.monotonic() > deadline:
                    raise EngineError(f"the snapshot stream never reached {state}")
                time.sleep(0.002)
            # Images were flushed and inactivated by the completed migration: copy now.
            if machine.overlay is not None:
                self._save_disk(machine, directory / "disk.qcow2")
            meta = {
                "format": SNAPSHOT_FORMAT,
                "engine": self.name,
                "config_key": machine.config.key(),
                "qemu_version": self.version_of(machine.config.arch),
                "accelerator": self.accelerator_for(machine.config.arch),
                "arch": machine.config.arch,
                "args": self.device_args(machine.config),
                "disk": machine.overlay is not None,
                "state_bytes": state.stat().st_size,
                "created": time.time(),
            }
            tmp = directory / "meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, directory / "meta.json")  # written last: marks the snapshot whole
        finally:
            if machine.is_alive():
                qmp.cmd("cont")

    def _save_disk(self, machine: QemuMachine, dest: Path) -> None:
        """The machine's disk as a qcow2 backed directly by the config's rootfs.

        A booted machine's overlay already is that, so it is copied. A restored machine's
        overlay sits on another snapshot's disk: it is flattened onto the rootfs so that
        this snapshot does not depend on the other one.
        """
        assert machine.overlay is not None and machine.config.rootfs is not None
        if machine.restored_from is None:
            shutil.copyfile(machine.overlay, dest)
            return
        assert self.qemu_img is not None  # restore() made the overlay with it
        base = str(Path(machine.config.rootfs).resolve())
        res = subprocess.run(
            [self.qemu_img, "convert", "-U", "-q", "-O", "qcow2", "-B", base, "-F", "raw"]
            + [str(machine.overlay), str(dest)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            raise EngineError(f"saving the disk of {machine!r} failed: {res.stderr.strip()}")

    def meta_problems(self, config: VMConfig, meta: dict[str, Any]) -> list[str]:
        problems = []
        if meta.get("args") != self.device_args(config):
            problems.append("QEMU device arguments differ (other accelerator or version)")
        version = self.version_of(config.arch)
        if meta.get("qemu_version") != version:
            problems.append(f"taken with QEMU {meta.get('qemu_version')}, this is {version}")
        if meta.get("arch", "x86_64") != config.arch:
            problems.append(f"an {meta.get('arch', 'x86_64')} snapshot, not {config.arch}")
        return problems

    def restore(
        self, config: VMConfig, directory: Path, workdir: Path, *, rollback: bool = True
    ) -> QemuMachine:
        directory = Path(directory)
        meta = self.read_meta(config, directory)
        state = directory / "state"
        if not state.is_file():
            raise SnapshotMismatch(f"{directory / 'meta.json'}: its state file {state} is missing")
        self._check_files(config)
        m = QemuMachine(self, config, workdir)
        m.restored_from = directory
        try:
            if meta.get("disk"):
                self._overlay(m, directory / "disk.qcow2", "qcow2")
            # QEMU reads the state from an inherited descriptor: no shell, no cat, no pipe.
            fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                started = self._launch(m, config, ["-incoming", f"fd:{fd}"], pass_fds=(fd,))
            finally:
                os.close(fd)
            deadline = started + config.boot_timeout
            # Connected before the guest runs: it then never sees the host side go away.
            self._connect_agent(m, deadline, config.boot_timeout, "was restored")
            self._resume_incoming(m, deadline, config.boot_timeout)
            self._wait_agent_ready(m, deadline, config.boot_timeout, "was restored")
            try:  # its OK answer is the proof of life: no extra ping
                m.agent.sync(time_ns=time.time_ns(), entropy=os.urandom(64))
            except Exception as exc:
                raise self._fail(m, f"the restored guest's agent failed: {exc!r}") from exc
            m.ready_seconds = time.monotonic() - started
            return m
        except BaseException:
            m.close()
            raise
