"""The ignition engine: each machine is one ``python -m pytest_ignition.vmm`` process.

Owns launching the bundled VMM (its own session, killed by the kernel when this process
dies), the serial console relay, the agent over virtio-vsock (Firecracker's Unix-socket
convention, port 52), and snapshots through the VMM's control socket:

* boot: ``python -m pytest_ignition.vmm boot --kernel K --initrd I --vsock <dir>/vsock.sock
  --control <dir>/control.sock --console stdio --boot-timer``; the agent is reached with
  ``CONNECT 52`` on the vsock socket and pinged until it answers.
* snapshot: control ``{"cmd": "snapshot", "store": <parent>, "name": <leaf>}`` (the VMM
  pauses, writes ``state`` + ``memory.bin`` into ``<parent>/<leaf>``), then ``resume`` if the
  VMM left it paused; ``meta.json`` (this engine's) is written last and ties the snapshot
  to the :class:`VMConfig`.
* restore: ``python -m pytest_ignition.vmm restore --store <parent> --name <leaf>``; memory is
  mapped lazily from ``memory.bin``, vsock connections were reset by the VMM so the agent
  listens again; the engine then sets the guest clock and reseeds its CRNG.
* rollback: control ``rollback`` on a restored (or snapshotted) machine, then a fresh agent
  session.

The console: the VMM's stdin/stdout are one end of a socketpair; a relay thread appends
every byte of guest output to ``console.log`` and serves ``console.sock``, which
:class:`pytest_ignition.console.SerialConsole` connects to, exactly as with QEMU.

Usable only where KVM runs guest kernels natively: real VT-x/AMD-V (``/dev/kvm`` present,
not PVM, whose emulated CPL0 makes a kernel boot take minutes).

On macOS (``hypervisor="hvf"``, EXPERIMENTAL, never run on a Mac) the same protocol is served by
``python -m pytest_ignition.vmm.machine_aarch64 ... --hypervisor hvf`` (the aarch64 machine on
Hypervisor.framework) run by the entitled interpreter copy (``vmm/hypervisor/hvf_sign.py``):
:meth:`IgnitionEngine.vmm_command` is the one place where the two differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from pytest_ignition import netdev
from pytest_ignition.console import SerialConsole, read_tail
from pytest_ignition.engines import _process
from pytest_ignition.engines.base import (
    BootError,
    Engine,
    EngineError,
    EngineUnavailable,
    Machine,
    VMConfig,
)

__all__ = ["IgnitionEngine", "IgnitionMachine", "SNAPSHOT_FORMAT", "available"]

SNAPSHOT_FORMAT = 1
AGENT_VSOCK_PORT = 52
# How long a snapshot waits for the guest to finish closing the agent's vsock connection (it
# takes a few guest round trips: ~ms natively, tens of ms in the nested harness).
SNAPSHOT_SETTLE_S = 5.0
# The VMM's exit status for a guest that halted for good (vmm.machine.EXIT_HALTED, kept equal by
# a unit test; not imported: the engine does not load the VMM's modules).
VMM_EXIT_HALTED = 3
_MAX_SOCK_PATH = 100  # sun_path is 108 bytes; the vsock convention appends "_<port>"


def available() -> tuple[bool, str]:
    """Whether the bundled VMM can run guests here at useful speed, and if not, why."""
    if not sys.platform.startswith("linux"):
        return False, f"the bundled VMM needs Linux KVM (this is {sys.platform})"
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist (load kvm_intel or kvm_amd)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    if os.path.exists("/sys/module/kvm_pvm"):
        return False, (
            "/dev/kvm is PVM: guest kernel (CPL0) code is emulated instruction by instruction, "
            "so a Linux guest would take minutes to boot (use the nested harness or QEMU)"
        )
    return True, "KVM runs guest kernels natively"


class _ConsoleRelay:
    """Guest serial output -> ``console.log`` (always) and a connected console client; the
    client's input -> the guest. One thread, select-driven; the log is opened for append so
    it survives the relay."""

    def __init__(self, vmm_end: socket.socket, sock_path: Path, log_path: Path) -> None:
        self.vmm = vmm_end
        self.vmm.setblocking(False)
        self.log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by the thread
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(sock_path))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.sock_path = sock_path
        self.client: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="ignition-console", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                fds: list[Any] = [self.vmm, self.listener, self._stop_r]
                if self.client is not None:
                    fds.append(self.client)
                ready, _, _ = select.select(fds, [], [])
                if self._stop_r in ready:
                    break
                if self.vmm in ready:
                    try:
                        data = self.vmm.recv(65536)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        break  # the VMM went away
                    if data:
                        self.log.write(data)
                        if self.client is not None:
                            try:
                                self.client.sendall(data)
                            except OSError:
                                self._drop_client()
                if self.listener in ready:
                    with contextlib.suppress(OSError):
                        conn, _ = self.listener.accept()
                        self._drop_client()  # one interactive user at a time: the newest
                        self.client = conn
                if self.client is not None and self.client in ready:
                    try:
                        data = self.client.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop_client()
                    else:
                        with contextlib.suppress(OSError):
                            self.vmm.setblocking(True)
                            self.vmm.sendall(data)
                            self.vmm.setblocking(False)
        finally:
            self._drop_client()
            self.log.close()
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.sock_path)

    def _drop_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.close()
            self.client = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self.thread.join(5.0)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.vmm.close()


def early_triple_fault(vmm_said: str, console_tail: str) -> bool:
    """Whether a failed boot is the one worth a second try: the VMM says the guest
    triple-faulted and the console shows its init never ran. Seen in the nested harness
    (emulated AMD SVM), about one boot in 25; the same kernel boots the next time."""
    return "triple_fault" in vmm_said and "init done" not in console_tail


def fork_server_enabled() -> bool:
    """Whether bundled-VMM processes are forked from a warm fork server (the default) rather
    than spawned; ``IGNITION_VMM_FORKSERVER=0`` (also ``no``, ``false``, ``off``) spawns."""
    from pytest_ignition.config import env_switch

    return env_switch("IGNITION_VMM_FORKSERVER")


class _LateProbes(threading.Thread):
    """Diagnostics for a guest that is slow to answer: with ``IGNITION_PROBE_LOG=FILE``, once
    a wait on the agent has lasted ``IGNITION_PROBE_AFTER`` seconds (default 15), the VMM's
    ``probe`` is appended to FILE as a JSON line every 5 s until the wait ends."""

    def __init__(self, m: IgnitionMachine, what: str) -> None:
        super().__init__(daemon=True, name="ignition-late-probe")
        self.m, self.what = m, what
        self.log = os.environ.get("IGNITION_PROBE_LOG", "")
        try:
            self.after = float(os.environ.get("IGNITION_PROBE_AFTER", "15"))
        except ValueError:
            self.after = 15.0
        self.done = threading.Event()

    def __enter__(self) -> _LateProbes:
        if self.log:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()

    def run(self) -> None:
        t0 = time.monotonic()
        if self.done.wait(self.after):
            return
        while not self.done.is_set() and self.m.is_alive():
            try:
                reply: dict[str, Any] = self.m.control("probe", timeout=20)
            except EngineError as exc:
                reply = {"error": str(exc)}
            entry = {
                "what": self.what,
                "workdir": str(self.m.workdir),
                "pid": self.m.pid,
                "late_s": round(time.monotonic() - t0, 2),
                "time": time.time(),
                **reply,
            }
            with contextlib.suppress(OSError), open(self.log, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.done.wait(5.0):
                return


class IgnitionMachine(Machine):
    """One VMM process and what it owns (a private directory under ``workdir``)."""

    def __init__(self, engine: IgnitionEngine, config: VMConfig, workdir: Path) -> None:
        self.engine = engine
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="vmm-", dir=self.workdir))
        self._sockdir_owned = False
        sockdir = self.dir
        if len(str(sockdir / "control.sock")) > _MAX_SOCK_PATH - 8:
            sockdir = _process.owned_tempdir("ign-")
            self._sockdir_owned = True
        self.sockdir = sockdir
        self.vsock_sock = sockdir / "vsock.sock"
        self.control_sock = sockdir / "control.sock"
        self.console_sock = sockdir / "console.sock"
        self.console_log = self.dir / "console.log"
        self.vmm_log = self.dir / "vmm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent: Any = None
        self.ready_seconds = 0.0
        self.rollback_ok = True  # False: restored without a dirty-page log
        self.restored_from: Path | None = None
        self.passt: netdev.Passt | None = None  # network=user: this VM's passt
        # network=segment: the VMM listens here for the ignition_network switch
        self.net_socket = sockdir / "net.sock" if config.network == "segment" else None
        self._relay: _ConsoleRelay | None = None
        self._console = SerialConsole(
            self.console_sock, self.console_log, other_logs=(self.vmm_log,)
        )
        self._closed = False
        self._lock = threading.Lock()
        _process.track(self)

    # -- Machine API ------------------------------------------------------------------------
    @property
    def console(self) -> Any:
        return self._console.spawn

    def console_tail(self, max_chars: int = 4000) -> str:
        return self._console.tail(max_chars)

    def vmm_output(self, max_chars: int = 4000) -> str:
        """The VMM's own log (stderr): setup errors, Guest-boot-time, stop reasons."""
        return read_tail(self.vmm_log, max_chars)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_cause(self) -> str | None:
        """What the VMM's exit status says happened to the guest, when it says more than
        the code (None while it runs, or for the other codes)."""
        code = self.proc.poll() if self.proc is not None else None
        if code == VMM_EXIT_HALTED:
            return (
                "the guest powered off or halted (every vCPU halted with interrupts disabled; "
                "the bundled VMM ends such a VM)"
            )
        return None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def control(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """One request on the VMM's control socket; raises EngineError when it fails."""
        req = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.control_sock))
                s.sendall(req)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise EngineError(f"VMM control {cmd!r}: {exc}") from exc
        try:
            reply = json.loads(buf)
        except ValueError as exc:
            raise EngineError(f"VMM control {cmd!r}: bad reply {buf[:200]!r}") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            err = reply.get("error") if isinstance(reply, dict) else reply
            raise EngineError(f"VMM control {cmd!r} failed: {err}")
        return reply

    def probe_text(self, timeout: float = 10.0) -> str | None:
        """The VMM's ``probe`` (vCPU run state, timers, pending interrupts, virtqueue cursors)
        in one paragraph, for an error about a guest that does not answer; None if the VMM
        cannot say."""
        from pytest_ignition.vmm.probe import describe

        if not self.is_alive():
            return None
        try:
            return describe(self.control("probe", timeout=timeout))
        except (EngineError, KeyError, TypeError, ValueError) as exc:
            return f"(the VMM did not answer a probe: {exc})"

    def boot_time_us(self) -> int | None:
        """The guest's boot time as the VMM's boot timer measured it (None if not yet)."""
        try:
            return self.control("status", timeout=5.0).get("boot_time_us")
        except EngineError:
            return None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.agent is not None:
                with contextlib.suppress(Exception):
                    self.agent.close()
            self._kill()
            if self._relay is not None:
                self._relay.close()
            self._console.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._sockdir_owned:
                shutil.rmtree(self.sockdir, ignore_errors=True)
            _process.untrack(self)

    def _kill(self) -> None:
        if self.passt is not None:
            self.passt.close()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __repr__(self) -> str:
        return f"<IgnitionMachine pid={self.pid} {'closed' if self._closed else 'open'}>"


class IgnitionEngine(Engine):
    """The bundled VMM, one process per machine; snapshots through its control socket."""

    name = "ignition"
    accelerator = "kvm"
    supports_rollback = True
    snapshot_format = SNAPSHOT_FORMAT
    HYPERVISORS = ("kvm", "hvf")

    def __init__(
        self, python: str | None = None, check: bool = False, hypervisor: str = "kvm"
    ) -> None:
        if hypervisor not in self.HYPERVISORS:
            raise ValueError(f"hypervisor {hypervisor!r}: one of {', '.join(self.HYPERVISORS)}")
        if hypervisor == "hvf" and not python:
            raise EngineUnavailable(
                "the Hypervisor.framework VMM needs the entitled interpreter copy",
                hint="python -m pytest_ignition.vmm doctor --sign",
            )
        self.hypervisor = hypervisor
        self.accelerator = hypervisor
        self.python = python or sys.executable
        self._fs: Any = None  # the fork server (pytest_ignition.vmm.forkserver), on first use
        self._fs_lock = threading.Lock()
        self.boot_retries = 0  # boots tried again after an early triple fault (see boot())
        if check:
            ok, why = available()
            if not ok:
                raise EngineUnavailable(why, hint="use --ignition-engine=qemu")

    def describe(self) -> str:
        if self.hypervisor == "hvf":
            return (
                "ignition (bundled VMM, aarch64 machine on Hypervisor.framework: EXPERIMENTAL, "
                "never run on a Mac before)"
            )
        return "ignition (bundled VMM, kvm)"

    def vmm_command(self, command: str) -> list[str]:
        """The VMM process's argv up to its options, for ``command`` (boot or restore): the x86
        machine on KVM (``python -m pytest_ignition.vmm``), or on macOS the aarch64 machine on
        Hypervisor.framework in the entitled interpreter. The one place the two differ."""
        if self.hypervisor == "hvf":
            return [
                self.python,
                "-m",
                "pytest_ignition.vmm.machine_aarch64",
                command,
                "--hypervisor",
                "hvf",
            ]
        return [self.python, "-m", "pytest_ignition.vmm", command]

    def vmm_env(self) -> dict[str, str]:
        """Environment the VMM process needs on top of ours: nothing for KVM. For HVF the signed
        interpreter is a copy of the *base* interpreter, which does not see a virtualenv's
        site-packages: ``PYTHONPATH`` names where this process imports pytest_ignition and cffi
        from (``vmm/hypervisor/hvf_sign.vmm_env``; doctor checks the copy with the same)."""
        if self.hypervisor != "hvf":
            return {}
        from pytest_ignition.vmm.hypervisor import hvf_sign

        return hvf_sign.vmm_env()

    def cmdline(self, config: VMConfig) -> str:
        parts = [_process.default_cmdline()]
        if config.image is not None:
            parts += ["ignition.image=1", f"ignition.init={config.init}"]
        if config.rootfs is not None:
            # disks appear in --disk order: the image (when there is one) is vda
            parts.append(f"ignition.rootfs=/dev/vd{'b' if config.image is not None else 'a'}")
        if config.network != "none":
            parts.append(netdev.cmdline_arg(config.network))
        if config.kernel_args.strip():
            parts.append(config.kernel_args.strip())
        return " ".join(parts)

    def _common(self, m: IgnitionMachine) -> list[str]:
        net = []  # passt's stream protocol: to this VM's passt, or a listener for a segment
        if m.passt is not None:
            net = ["--net", f"connect:{m.passt.socket}"]
        elif m.net_socket is not None:
            net = ["--net", f"listen:{m.net_socket}"]
        return [
            "--vsock",
            str(m.vsock_sock),
            "--control",
            str(m.control_sock),
            "--console",
            "stdio",
            *net,
        ]

    def boot_argv(self, m: IgnitionMachine, config: VMConfig) -> list[str]:
        argv = self.vmm_command("boot")
        argv += ["--kernel", str(Path(config.kernel).resolve())]
        if config.initrd is not None:
            argv += ["--initrd", str(Path(config.initrd).resolve())]
        argv += ["--mem", f"{config.memory_mib}M", "--cpus", str(config.cpus)]
        argv += ["--cmdline", self.cmdline(config), "--boot-timer"]
        if config.image is not None:
            # copy-on-write like every VMM disk, and mounted read-only by the guest: never written
            argv += ["--disk", str(Path(config.image).resolve())]
        if config.rootfs is not None:
            argv += ["--disk", str(Path(config.rootfs).resolve())]
        return argv + self._common(m)

    def _start_net(self, m: IgnitionMachine) -> None:
        if m.config.network == "user" and m.passt is None:
            m.passt = netdev.Passt(m.sockdir, m.dir)

    def _launch(self, m: IgnitionMachine, argv: list[str]) -> float:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = open(m.vmm_log, "ab")  # noqa: SIM115 - handed to the child (O_APPEND: capped)
        try:
            m._relay = _ConsoleRelay(ours, m.console_sock, m.console_log)
            started = time.monotonic()
            # the virtio-blk overlay (an unlinked sparse file) lands in the machine's dir
            env = {**os.environ, **self.vmm_env(), "TMPDIR": str(m.dir)}
            fs = self._fork_server(argv)
            if fs is not None:
                m.proc = fs.spawn(  # type: ignore[assignment]
                    argv[3:],
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=log.fileno(),
                    env=env,
                )
            else:
                m.proc = _process.spawn(
                    argv,
                    stdin=theirs.fileno(),
                    stdout=theirs.fileno(),
                    stderr=log,
                    close_fds=True,
                    env=env,
                )
        finally:
            log.close()
            theirs.close()
        return started

    def _fork_server(self, argv: list[str]) -> Any:
        """The session's warm VMM process (started on first use, restarted if it died); None
        (VM processes spawned one by one) with ``IGNITION_VMM_FORKSERVER=0``, under the
        keep-failed keeper (it wraps each VM process), or for a VMM other than this Python's.
        In the nested harness a forked restore reaches agent-ready in ~0.25 s against ~2-3 s
        spawned. (It was opt-in while guests in the harness stalled now and then; that was
        KVM's stale TSC rate, fixed in ``vmm.arch.x86_64.state.use_host_tsc_rate``, not the fork.)"""
        if not fork_server_enabled() or _process._keeper_mode:
            return None
        if argv[:3] != [self.python, "-m", "pytest_ignition.vmm"]:
            return None
        with self._fs_lock:
            if self._fs is None:
                import atexit

                from pytest_ignition.vmm.forkserver import ForkServer

                self._fs = ForkServer(
                    self.python, spawn=_process.spawn, mkdtemp=_process.owned_tempdir
                )
                atexit.register(self._fs.stop)
        return self._fs

    def _fail(self, m: IgnitionMachine, what: str) -> BootError:
        if m.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(timeout=0.5)
        msg = what
        if m.proc is not None and m.proc.poll() is not None:
            msg += f" (the VMM exited with {m.proc.returncode})"
        out = m.vmm_output(2000).strip()
        if out:
            msg += f"\nthe VMM said: {out}"
        tail = m.console_tail()
        # None while still running (gave up waiting); read by the auto engine's fallback rule
        exit_code = m.proc.poll() if m.proc is not None else None
        m.close()
        err = BootError(msg, tail)
        err.vmm_exit = exit_code  # type: ignore[attr-defined]
        return err

    def _connect_agent(
        self, m: IgnitionMachine, deadline: float, timeout: float, what: str, sync: bool = False
    ) -> None:
        """Connect ``m.agent`` and wait until it answers; with ``sync`` also set the restored
        guest's clock and reseed its CRNG, in the same round trip (``ready_and_sync``)."""
        while not m.vsock_sock.exists():
            if not m.is_alive():
                raise self._fail(m, f"the VMM exited before the guest {what}")
            if time.monotonic() > deadline:
                raise self._fail(m, f"the VMM did not start within {timeout:g}s")
            time.sleep(0.005)
        # A CONNECT is refused (the VMM closes it) until the guest agent listens, and after a
        # restore or rollback the guest may drop a fresh connection when it handles the
        # transport-reset event: retry both until the deadline.
        with _LateProbes(m, what):
            self._agent_loop(m, deadline, timeout, what, sync)

    def _agent_loop(
        self, m: IgnitionMachine, deadline: float, timeout: float, what: str, sync: bool
    ) -> None:
        from pytest_ignition.agent import AgentClient, AgentError

        last: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if not m.is_alive():
                raise self._fail(m, f"the guest stopped before it {what}") from last
            if remaining <= 0:
                state = m.probe_text()
                raise self._fail(
                    m,
                    f"the guest agent did not answer within {timeout:g}s ({last!r})"
                    + (f"\nVM state: {state}" if state else ""),
                ) from last
            agent = None
            try:
                agent = AgentClient.connect_vsock_uds(
                    str(m.vsock_sock), AGENT_VSOCK_PORT, timeout=min(2.0, remaining)
                )
                wait = max(0.1, min(30.0, deadline - time.monotonic()))
                if sync:
                    agent.ready_and_sync(wait, time.time_ns(), os.urandom(256))
                else:
                    agent.wait_ready(timeout=wait)
                m.agent = agent
                return
            except (AgentError, OSError) as exc:
                last = exc
                if agent is not None:
                    with contextlib.suppress(Exception):
                        agent.close()
                time.sleep(0.05)

    def _check_files(self, config: VMConfig) -> None:
        for name, path in config.files().items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path} does not exist")

    # -- Engine API -----------------------------------------------------------------------------
    def boot(self, config: VMConfig, workdir: Path) -> IgnitionMachine:
        try:
            return self._boot_once(config, workdir)
        except BootError as e:
            # One more try, said out loud; a guest that faults twice is a boot error.
            if not early_triple_fault(str(e), e.console_tail):
                raise
            warnings.warn(
                f"pytest-ignition: the bundled VMM's guest triple-faulted before its init ran; "
                f"booting it once more ({config.kernel})",
                RuntimeWarning,
                stacklevel=2,
            )
            self.boot_retries += 1
            return self._boot_once(config, workdir)

    def _boot_once(self, config: VMConfig, workdir: Path) -> IgnitionMachine:
        self._check_files(config)
        m = IgnitionMachine(self, config, workdir)
        try:
            self._start_net(m)
            started = self._launch(m, self.boot_argv(m, config))
            deadline = started + config.boot_timeout
            self._connect_agent(m, deadline, config.boot_timeout, "booted")
            m.ready_seconds = time.monotonic() - started
            return m
        except BaseException:
            m.close()
            raise

    def snapshot(self, machine: Machine, directory: Path, *, keep_agent: bool = True) -> None:
        if not isinstance(machine, IgnitionMachine):
            raise TypeError("snapshot() needs a machine of the ignition engine")
        if not machine.is_alive():
            raise EngineError("cannot snapshot a machine whose VMM is not running")
        directory = Path(directory).resolve()
        directory.parent.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)
        # No agent connection in the snapshot: then no restore or rollback of it has to reset
        # the guest's vsock transport and wait for the guest to handle that before the agent
        # can be reached (the VMM waits up to SNAPSHOT_SETTLE_S for the close to finish).
        had_agent = keep_agent and machine.agent is not None
        if machine.agent is not None:
            with contextlib.suppress(Exception):
                machine.agent.close()
            machine.agent = None
        try:
            reply = machine.control(
                "snapshot",
                timeout=600,
                store=str(directory.parent),
                name=directory.name,
                settle=SNAPSHOT_SETTLE_S,
            )
            try:
                meta = {
                    "format": SNAPSHOT_FORMAT,
                    "engine": self.name,
                    "config_key": machine.config.key(),
                    "cmdline": self.cmdline(machine.config),
                    "snapshot_ms": reply.get("snapshot_ms"),
                    "created": time.time(),
                }
                tmp = directory / "meta.json.tmp"
                tmp.write_text(json.dumps(meta, indent=2) + "\n")
                os.replace(tmp, directory / "meta.json")
            finally:
                if reply.get("state") == "paused" and machine.is_alive():
                    machine.control("resume")
        except BaseException:
            if had_agent and machine.is_alive():  # best effort: the snapshot's error matters
                with contextlib.suppress(Exception):
                    self._reconnect_after_snapshot(machine)
            raise
        if had_agent and machine.is_alive():
            self._reconnect_after_snapshot(machine)

    def _reconnect_after_snapshot(self, machine: IgnitionMachine) -> None:
        timeout = machine.config.boot_timeout
        self._connect_agent(
            machine, time.monotonic() + timeout, timeout, "answered after a snapshot"
        )

    def restore(
        self, config: VMConfig, directory: Path, workdir: Path, *, rollback: bool = True
    ) -> IgnitionMachine:
        directory = Path(directory).resolve()
        self.read_meta(config, directory)
        self._check_files(config)
        m = IgnitionMachine(self, config, workdir)
        m.restored_from = directory
        try:
            argv = self.vmm_command("restore")
            argv += ["--store", str(directory.parent), "--name", directory.name]
            if not rollback:
                # no dirty-page log: on AMD and nested hosts it makes every first write trap
                argv.append("--no-rollback")
                m.rollback_ok = False
            # meta.json already tied the snapshot to ``config``; the VMM checks its own
            # checksums, so the kernel need not be hashed again on every restore.
            self._start_net(m)
            started = self._launch(m, argv + self._common(m))
            deadline = started + config.boot_timeout
            self._connect_agent(m, deadline, config.boot_timeout, "was restored", sync=True)
            m.ready_seconds = time.monotonic() - started
            return m
        except BaseException:
            m.close()
            raise

    def rollback(self, machine: Machine) -> None:
        if not isinstance(machine, IgnitionMachine):
            raise TypeError("rollback() needs a machine of the ignition engine")
        if not machine.rollback_ok:
            raise EngineError("this machine was restored with rollback=False: no dirty-page log")
        if machine.agent is not None:
            with contextlib.suppress(Exception):
                machine.agent.close()
            machine.agent = None
        machine.control("rollback", timeout=120)
        deadline = time.monotonic() + machine.config.boot_timeout
        self._connect_agent(
            machine, deadline, machine.config.boot_timeout, "was rolled back", sync=True
        )
