"""The public VM API: what a test holds (``ignition_vm``) and what it gets back from commands.

Owns :class:`VM` (run commands, move files, the console, reset to the snapshot),
:class:`CommandResult` and the command errors (:class:`CommandError` and its subclasses
:class:`CommandFailed`, :class:`CommandTimeout`, :class:`CommandOutputTooLarge`,
:class:`TransferTooLarge`, :class:`GuestFailure`). Users and the docs rely on these names;
everything engine-specific stays behind :mod:`pytest_ignition.engines.base`.

A request that finds the VM broken (the agent's stream closed, or no answer past a deadline) is
diagnosed (:func:`diagnose`: is the VM process alive, its exit code, a kernel panic or OOM line
in the console tail) and raised as :class:`GuestFailure`; the VM is then ``broken`` and the
fixtures discard it instead of handing it to the next test.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pytest_ignition.agent import (
    AgentDisconnected,
    AgentOutputLimit,
    AgentTimeout,
    AgentTransferLimit,
    ExecResult,
)
from pytest_ignition.engines.base import Engine, Machine, VMConfig

__all__ = [
    "VM",
    "CommandError",
    "CommandFailed",
    "CommandOutputTooLarge",
    "CommandResult",
    "CommandTimeout",
    "GuestFailure",
    "HistoryEntry",
    "TransferTooLarge",
    "diagnose",
]

# Bytes of stdout + stderr a command may write before it is killed (the session setting
# ``--ignition-max-output`` replaces it; config.DEFAULT_MAX_OUTPUT is the same number).
DEFAULT_MAX_OUTPUT = 64 << 20
# Bytes read_file returns / copy_from writes per tree at most (``--ignition-max-transfer``).
DEFAULT_MAX_TRANSFER = 256 << 20

Command = str | Sequence[str]

# (command as shown to the user, exit code or None when it timed out, seconds)
HistoryEntry = tuple[str, int | None, float]


def _show(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(str(a) for a in cmd)


def _tail(text: str, lines: int = 20, chars: int = 2000) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])[-chars:]


def _head(data: bytes, lines: int = 5, chars: int = 300) -> str:
    """The start of some output, printable: control characters (a stream of NULs) escaped."""
    text = data[: chars * 4].decode("utf-8", errors="replace")
    text = "\n".join(text.splitlines()[:lines])
    shown = "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)
    return shown[:chars] + ("..." if len(shown) > chars or len(data) > len(text) else "")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class CommandResult:
    """The outcome of :meth:`VM.run`. Unpacks as ``(exit_code, stdout, stderr)``.

    ``exit_code`` follows the shell's convention when the command died of a signal
    (128 + signal number); ``signal`` holds that signal number, else None.
    """

    command: str
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    signal: int | None = None
    _decoded: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def rc(self) -> int:
        return self.exit_code

    @property
    def stdout(self) -> str:
        if "stdout" not in self._decoded:
            self._decoded["stdout"] = self.stdout_bytes.decode("utf-8", errors="replace")
        return self._decoded["stdout"]

    @property
    def stderr(self) -> str:
        if "stderr" not in self._decoded:
            self._decoded["stderr"] = self.stderr_bytes.decode("utf-8", errors="replace")
        return self._decoded["stderr"]

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0

    @property
    def failed(self) -> bool:
        return self.exit_code != 0

    def check(self) -> CommandResult:
        """Return self when the command succeeded, else raise :class:`CommandFailed`."""
        if self.failed:
            raise CommandFailed(self)
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter((self.exit_code, self.stdout, self.stderr))

    def __repr__(self) -> str:
        return (
            f"CommandResult(command={self.command!r}, exit_code={self.exit_code}, "
            f"stdout={len(self.stdout_bytes)}B, stderr={len(self.stderr_bytes)}B, "
            f"duration={self.duration:.3f}s)"
        )


class CommandError(Exception):
    """Base of the errors about a command run in the guest: ``except CommandError`` takes all."""


class CommandFailed(CommandError):
    """A command exited non-zero where success was required (``check``/``check_output``)."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        how = (
            f"was killed by signal {result.signal}"
            if result.signal
            else f"exited with {result.exit_code}"
        )
        msg = f"command {result.command!r} {how}"
        err = _tail(result.stderr)
        if err:
            msg += "\n--- stderr (tail) ---\n" + err
        super().__init__(msg)


class CommandTimeout(CommandError):
    """A command ran past its timeout and was killed; the VM stays usable.

    ``setting`` says where the timeout came from (this call's ``timeout=``, or the session's
    ``command_timeout`` and its source) and how to raise it.
    """

    def __init__(
        self,
        command: str,
        timeout: float,
        stdout_bytes: bytes = b"",
        stderr_bytes: bytes = b"",
        setting: str = "",
    ) -> None:
        self.command = command
        self.timeout = timeout
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes
        self.setting = setting
        msg = f"command {command!r} timed out after {timeout:g}s and was killed"
        if setting:
            msg += f"; the timeout is {setting}"
        super().__init__(msg)


class CommandOutputTooLarge(CommandError):
    """A command wrote more than ``max_output`` bytes (stdout and stderr together) and was killed.

    Raised by :meth:`VM.run` whatever the command's exit status; the VM stays usable.
    ``stdout_bytes`` / ``stderr_bytes`` hold the first ``max_output`` bytes in the order they
    arrived; ``setting`` says where the limit came from (this call, or the session setting and
    its source).
    """

    def __init__(
        self,
        command: str,
        max_output: int,
        setting: str,
        stdout_bytes: bytes = b"",
        stderr_bytes: bytes = b"",
        signal: int | None = None,
    ) -> None:
        self.command = command
        self.max_output = max_output
        self.setting = setting
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes
        self.signal = signal
        msg = (
            f"command {command!r} wrote more than {_size(max_output)} of output (stdout and "
            f"stderr together) and was killed; the first {max_output} bytes are in "
            f".stdout_bytes/.stderr_bytes. The limit is {setting}; 0 means no limit"
        )
        for name, data in (("stdout", stdout_bytes), ("stderr", stderr_bytes)):
            if data:
                msg += f"\n--- {name} (head) ---\n" + _head(data)
        super().__init__(msg)

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")


class TransferTooLarge(CommandError):
    """A guest file (``read_file``) or tree (``copy_from``) is larger than ``max_transfer`` bytes.

    Nothing past the cap was read into host memory; ``copy_from`` leaves the files it wrote
    before the cap was reached. ``setting`` says where the cap came from and how to raise it.
    """

    def __init__(self, path: str, max_transfer: int, setting: str, what: str = "file") -> None:
        self.path = path
        self.max_transfer = max_transfer
        self.setting = setting
        super().__init__(
            f"guest {what} {path!r} is larger than {_size(max_transfer)}; nothing past that was "
            f"transferred. The limit is {setting}; 0 means no limit"
        )


class GuestFailure(CommandError):
    """The VM broke during a request: the guest panicked or powered off, its agent died, the VM
    process exited, or the guest stopped answering. ``diagnosis`` says which (with the panic
    line), ``console_tail`` is the end of the serial console. The VM is discarded afterwards
    (``vm.broken``): the next test gets a fresh one.
    """

    def __init__(self, what: str, diagnosis: str, console_tail: str = "") -> None:
        self.what = what
        self.diagnosis = diagnosis
        self.console_tail = console_tail
        msg = f"{what}: {diagnosis}"
        if console_tail.strip():
            msg += "\n--- console tail ---\n" + _tail(console_tail, lines=30, chars=3000)
        super().__init__(msg)


_PANIC_MARKERS = ("Kernel panic - not syncing", "BUG: ", "Oops: ", "general protection fault")


def diagnose(machine: Any, cause: str = "", wait: float = 2.5) -> str:
    """What happened to a VM whose agent stopped answering, in one line.

    Waits up to ``wait`` seconds for a dying VM process to exit (a panicking guest exits its
    VMM: ``panic=-1`` reboots, and the VMMs exit on reboot; the bundled VMM exits ~0.5-1 s
    after a guest halt or power-off), or until the console shows a halt (QEMU's process stays
    after a power-off), then looks at its exit code and the console tail
    (kernel panic line, OOM kills, power-off).
    """
    proc = getattr(machine, "proc", None)
    alive_fn = getattr(machine, "is_alive", None)

    def alive() -> bool:
        try:
            return bool(alive_fn()) if alive_fn is not None else True
        except Exception:
            return False

    def console_says() -> bool:
        try:
            tail = str(machine.console_tail(3000))
        except Exception:
            return False
        return _halted(tail)  # a panic reboots, which ends both VMMs: wait for that

    end = time.monotonic() + wait
    n = 0
    while alive() and time.monotonic() < end:
        if n % 5 == 4 and console_says():  # every 0.25 s
            break
        n += 1
        time.sleep(0.05)
    try:
        tail = str(machine.console_tail(16000))
    except Exception:
        tail = ""
    lines = tail.splitlines()
    panic = next((ln.strip() for ln in lines if _PANIC_MARKERS[0] in ln), None)
    if panic is None:
        panic = next((ln.strip() for ln in lines if any(m in ln for m in _PANIC_MARKERS)), None)
    oom = [ln.strip() for ln in lines if "Out of memory: Killed process" in ln or "oom-kill" in ln]
    parts: list[str] = []
    if not alive():
        code = getattr(proc, "returncode", None)
        exit_cause = getattr(machine, "exit_cause", None)
        try:
            said = exit_cause() if exit_cause is not None else None
        except Exception:
            said = None
        if panic is not None:
            parts.append(f"the guest kernel panicked: {panic}")
        elif said:
            parts.append(str(said))
        elif "reboot: Power down" in tail or "reboot: System halted" in tail:
            parts.append("the guest powered off")
        elif "reboot: Restarting system" in tail:
            parts.append("the guest rebooted (the VM exits on a guest reboot)")
        if code is None:
            parts.append("the VM process has exited")
        elif code < 0:
            parts.append(f"the VM process was killed by signal {-code}")
        else:
            parts.append(f"the VM process exited with code {code}")
    else:
        if panic is not None:
            parts.append(f"the guest kernel reported: {panic}")
        if _halted(tail):
            parts.append(
                "the guest powered off or halted (its VM process was still running; the VM is "
                "discarded)"
            )
        elif cause.startswith("disconnected"):
            parts.append(
                "the guest agent died (its connection closed; the VM process is still running)"
            )
        else:
            parts.append(f"the guest is unresponsive ({cause or 'no answer'}; VM process running)")
            state = _probe(machine)
            if state:
                parts.append(f"VM state: {state}")
    if oom:
        parts.append(f"OOM killer: {oom[-1]}")
    return "; ".join(parts)


def _probe(machine: Any) -> str | None:
    """The VMM's own view of an unresponsive guest (the bundled VMM: vCPU run state, timers,
    pending interrupts, virtqueue cursors), so that a rare stall can be told apart after the
    fact; None for an engine without one."""
    probe_text = getattr(machine, "probe_text", None)
    if probe_text is None:
        return None
    try:
        return probe_text(timeout=5.0) or None
    except Exception as exc:  # the diagnosis must not fail for want of a probe
        return f"(no probe: {exc!r})"


def _halted(tail: str) -> bool:
    return "reboot: Power down" in tail or "reboot: System halted" in tail


class _Watchdog:
    """One daemon thread that looks at every VM with a request in flight, every ``interval``
    seconds: a VM process that exited, or a guest that printed a kernel panic or powered off
    (under QEMU's microvm a powered-off guest halts and its process stays), gets its agent
    connection closed, so the request fails at once with a diagnosis instead of waiting for
    its timeout."""

    interval = 0.5

    def __init__(self) -> None:
        self._active: dict[int, tuple[VM, int]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watching(self, vm: VM) -> Iterator[None]:
        key = id(vm)
        with self._lock:
            _, n = self._active.get(key, (vm, 0))
            self._active[key] = (vm, n + 1)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ignition-vm-watchdog", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                _, n = self._active.get(key, (vm, 1))
                if n <= 1:
                    self._active.pop(key, None)
                else:
                    self._active[key] = (vm, n - 1)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                vms = [vm for vm, _ in self._active.values()]
            for vm in vms:
                with contextlib.suppress(Exception):
                    self._check(vm)

    @staticmethod
    def _check(vm: VM) -> None:
        m = vm.machine
        alive = getattr(m, "is_alive", None)
        dead = alive is not None and not alive()
        if not dead:
            tail = str(m.console_tail(3000))
            dead = _halted(tail) or _PANIC_MARKERS[0] in tail
        if dead:
            agent = getattr(m, "agent", None)
            if agent is not None and getattr(agent, "connected", False):
                agent.close()  # requests in flight raise AgentDisconnected


_watchdog = _Watchdog()


class VM:
    """A running guest: commands, files, the serial console, reset to the snapshot.

    ``snapshot_dir`` is the snapshot this VM was restored from (needed by :meth:`reset`);
    ``reset_mode`` is ``"restore"`` (close, then restore afresh) or ``"rollback"`` (in place,
    where the engine supports it; otherwise the same as ``"restore"``). ``max_output`` is the
    default cap on a command's output in bytes (0: none) and ``max_output_source`` where it came
    from, for the error message (the fixtures pass the session setting and its source).
    ``command_timeout`` (seconds, None: none) is ``run``'s timeout when it is given none;
    ``max_transfer`` (bytes, 0: none) caps ``read_file`` per file and ``copy_from`` per tree.
    ``broken`` is None, or why the VM is unusable (set when a request found it dead).
    """

    def __init__(
        self,
        engine: Engine,
        machine: Machine,
        config: VMConfig,
        snapshot_dir: Path | None = None,
        reset_mode: str = "restore",
        *,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_output_source: str = "default",
        command_timeout: float | None = None,
        command_timeout_source: str = "default",
        max_transfer: int = DEFAULT_MAX_TRANSFER,
        max_transfer_source: str = "default",
    ) -> None:
        if reset_mode not in ("restore", "rollback"):
            raise ValueError(f"reset_mode must be 'restore' or 'rollback', not {reset_mode!r}")
        self._max_output = _check_size(max_output)
        self.max_output_source = max_output_source
        if command_timeout is not None and not command_timeout > 0:
            raise ValueError(f"command_timeout must be positive or None, not {command_timeout!r}")
        self.command_timeout = command_timeout
        self.command_timeout_source = command_timeout_source
        self.max_transfer = _check_size(max_transfer)
        self.max_transfer_source = max_transfer_source
        self.broken: str | None = None
        self.engine = engine
        self.machine = machine
        self.config = config
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.reset_mode = reset_mode
        self.history: list[HistoryEntry] = []
        self._closed = False
        self._tunnels: Any = None  # pytest_ignition.tunnel.Tunnels, made on first use

    @property
    def max_output(self) -> int:
        """The cap on a command's stdout + stderr in bytes when ``run`` is given none (0: none)."""
        return self._max_output

    @max_output.setter
    def max_output(self, value: int | str) -> None:
        self._max_output = _check_size(value)
        self.max_output_source = "vm.max_output"

    # -- commands -------------------------------------------------------------------------

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        max_output: int | str | None = None,
    ) -> CommandResult:
        """Run ``cmd`` in the guest: a ``str`` is a shell command, a list is an argv that is
        never shell-interpreted. Raises :class:`CommandTimeout` when ``timeout`` elapses
        (None: this VM's ``command_timeout``, the session setting; 0: no timeout at all), and
        :class:`GuestFailure` when the VM dies meanwhile.

        ``max_output``: bytes of stdout and stderr together to keep (an int, or a size such as
        ``"1M"``; 0 = no limit; None = this VM's ``max_output``, the session setting). A command
        that writes more is killed and :class:`CommandOutputTooLarge` is raised.
        """
        self._check_open()
        if max_output is None:
            cap = self.max_output
            setting = _session_setting(cap, self.max_output_source)
        else:
            cap = _check_size(max_output)
            setting = f"max_output={max_output!r} of this call; raise it there"
        if isinstance(cmd, str):
            payload: str | list[str] = cmd
        else:
            payload = [os.fspath(a) for a in cmd]
            if not payload:
                raise ValueError("empty argv")
        if timeout is None:
            limit = self.command_timeout
            limit_setting = _timeout_setting(limit, self.command_timeout_source)
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
        else:
            limit = float(timeout) if timeout > 0 else None
            limit_setting = f"timeout={timeout!r} of this call; raise it there"
        shown = _show(cmd)
        data = input.encode() if isinstance(input, str) else input
        started = time.monotonic()
        try:
            with _watchdog.watching(self):
                res = self.machine.agent.exec(
                    payload,
                    env=self._env(env),
                    cwd=cwd if cwd is not None else getattr(self.config, "guest_cwd", None),
                    input=data,
                    timeout=limit,
                    max_output=cap,
                )
        except AgentOutputLimit as exc:
            self.history.append((shown, None, time.monotonic() - started))
            raise CommandOutputTooLarge(
                shown, cap, setting, exc.stdout, exc.stderr, exc.result.signal
            ) from None
        except AgentTimeout as exc:
            partial = exc.result
            self.history.append((shown, None, time.monotonic() - started))
            no_exit = partial is None or (partial.exit_code is None and partial.signal is None)
            if limit is None or (no_exit and not self._agent_answers()):
                # No EXIT even after the kill, and no answer to a ping: the guest is gone.
                raise self._failure(f"command {shown!r}", exc) from None
            partial = partial or ExecResult(None, None, b"", b"", 0.0, True)
            raise CommandTimeout(
                shown, limit, partial.stdout, partial.stderr, limit_setting
            ) from None
        except AgentDisconnected as exc:
            self.history.append((shown, None, time.monotonic() - started))
            raise self._failure(f"command {shown!r}", exc) from None
        except BaseException:
            self.history.append((shown, None, time.monotonic() - started))
            raise
        # A timed-out command never gets here: the agent client raises AgentTimeout for it.
        duration = res.duration
        if res.exit_code is not None:
            code = res.exit_code
        elif res.signal is not None:
            code = 128 + res.signal
        else:
            code = -1
        self.history.append((shown, code, duration))
        return CommandResult(shown, code, res.stdout, res.stderr, duration, res.signal)

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str] | None:
        """The image's environment (an OCI image's ``Env``) under the call's ``env``."""
        base = dict(getattr(self.config, "guest_env", ()) or ())
        if not base:
            return dict(env) if env is not None else None
        return {**base, **(env or {})}

    def check_output(self, cmd: Command, **kw: Any) -> str:
        """``run(cmd, **kw).check().stdout``."""
        return self.run(cmd, **kw).check().stdout

    # -- files ----------------------------------------------------------------------------
    # Capped by max_transfer (not max_output): read_file per file, copy_from per tree.

    def read_file(self, path: str, *, max_size: int | str | None = None) -> bytes:
        """The bytes of a guest file; :class:`TransferTooLarge` past ``max_size`` bytes (None:
        this VM's ``max_transfer``, the session setting; 0: no limit). The host stops reading at
        the cap, so a huge guest file never fills host memory."""
        self._check_open()
        cap, setting = self._transfer_cap(max_size)
        try:
            return self._agent_call(
                f"read_file {path!r}", lambda: self.machine.agent.get_file(str(path), limit=cap)
            )
        except AgentTransferLimit:
            raise TransferTooLarge(str(path), cap, setting) from None

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Create or replace a guest file with ``data`` and permission bits ``mode``."""
        self._check_open()
        if isinstance(data, str):
            data = data.encode()
        self._agent_call(
            f"write_file {path!r}",
            lambda: self.machine.agent.put_file(str(path), data, mode=mode),
        )

    def copy_into(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        """Copy a host file or directory tree into the guest, keeping permission bits."""
        self._check_open()
        src = Path(host_path)
        if not src.exists():
            raise FileNotFoundError(f"no such host file or directory: {src}")
        self._agent_call(
            f"copy_into {guest_path!r}", lambda: self.machine.agent.put_tree(src, str(guest_path))
        )

    def copy_from(
        self,
        guest_path: str,
        host_path: str | os.PathLike[str],
        *,
        max_size: int | str | None = None,
    ) -> list[str]:
        """Copy a guest file or directory tree to the host, keeping permission bits; returns
        the entries skipped (with the reason), also logged as warnings.

        A guest file copied onto an existing host directory lands inside it. The host is
        protected from the guest (see ``AgentClient.get_tree``): setuid/setgid/sticky bits are
        dropped, symlinks, devices, FIFOs and sockets are skipped with a warning, nothing is
        written through a symlink, and the tree's total size is capped by ``max_size`` (None:
        this VM's ``max_transfer``; 0: none) with :class:`TransferTooLarge`.
        """
        self._check_open()
        cap, setting = self._transfer_cap(max_size)
        dst = Path(host_path)
        agent = self.machine.agent

        def copy() -> list[str]:
            mode, _size = agent.stat(str(guest_path))
            target = dst
            if not stat.S_ISDIR(mode) and dst.is_dir():
                target = dst / PurePosixPath(guest_path).name
            return agent.get_tree(str(guest_path), target, mode, limit=cap)

        try:
            return self._agent_call(f"copy_from {guest_path!r}", copy)
        except AgentTransferLimit:
            raise TransferTooLarge(str(guest_path), cap, setting, what="tree") from None

    def _transfer_cap(self, max_size: int | str | None) -> tuple[int, str]:
        if max_size is None:
            return self.max_transfer, _transfer_setting(self.max_transfer, self.max_transfer_source)
        return _check_size(max_size), f"max_size={max_size!r} of this call; raise it there"

    # -- failures -------------------------------------------------------------------------

    def _agent_call(self, what: str, fn: Any) -> Any:
        """``fn()``, with a lost agent connection or a request past its deadline diagnosed."""
        try:
            with _watchdog.watching(self):
                return fn()
        except (AgentDisconnected, AgentTimeout) as exc:
            raise self._failure(what, exc) from None

    def _agent_answers(self, timeout: float = 5.0) -> bool:
        try:
            self.machine.agent.ping(timeout=timeout)
            return True
        except Exception:
            return False

    def _failure(self, what: str, exc: BaseException) -> GuestFailure:
        """Diagnose the VM after ``exc`` and mark it broken (it is never reused)."""
        cause = "disconnected" if isinstance(exc, AgentDisconnected) else f"timeout: {exc}"
        diagnosis = diagnose(self.machine, cause)
        self.broken = diagnosis
        try:
            tail = self.machine.console_tail(4000)
        except Exception:
            tail = ""
        return GuestFailure(what, diagnosis, tail)

    # -- TCP over the agent channel (pytest_ignition/tunnel.py) -----------------------------
    # No network device needed. Listeners and connections belong to this VM's current guest:
    # reset() and close() end them (forward/expose again after a reset).

    def _tunnel(self) -> Any:
        self._check_open()
        if self._tunnels is None:
            from pytest_ignition.tunnel import Tunnels

            self._tunnels = Tunnels(self.machine.agent, name=repr(self))
        return self._tunnels

    def forward(self, guest_port: int, host_port: int = 0) -> int:
        """Listen on the host's ``127.0.0.1:host_port`` (0: a free port) and carry each
        connection to ``127.0.0.1:guest_port`` in the guest. Returns the host port."""
        return int(self._tunnel().forward(guest_port, host_port))

    def connect(self, guest_port: int, timeout: float = 10) -> socket.socket:
        """One connection to ``127.0.0.1:guest_port`` in the guest, without a listening port.

        A closed guest port raises ConnectionRefusedError. The socket is one end of a Unix
        socketpair: ``shutdown(SHUT_WR)`` half-closes towards the guest.
        """
        sock: socket.socket = self._tunnel().connect(guest_port, timeout)
        return sock

    def expose(self, host_port: int, guest_port: int | None = None) -> int:
        """Listen on ``127.0.0.1:guest_port`` inside the guest (default: ``host_port``) and carry
        each connection to ``127.0.0.1:host_port`` on the host. Returns the guest port."""
        return int(self._tunnel().expose(host_port, guest_port))

    def _close_tunnels(self) -> None:
        t, self._tunnels = self._tunnels, None
        if t is not None:
            t.close()

    # -- console, reset, lifecycle ----------------------------------------------------------

    def shell(self, argv: Sequence[str] | None = None, *, cwd: str | None = None) -> int:
        """An interactive root shell in this VM on your terminal; returns its exit code.

        For debugging: call it from a test under ``--pdb`` or a breakpoint. pytest's capture is
        suspended while it runs; the terminal is real (job control, Ctrl-C goes to the guest,
        window size passed on). ``argv`` defaults to ``/bin/sh -l``. Needs a terminal: under
        xdist or with stdin redirected it raises RuntimeError.
        """
        self._check_open()
        from pytest_ignition import terminal

        with terminal.suspended_capture():
            if not (os.isatty(0) and os.isatty(1)):
                raise RuntimeError(
                    "vm.shell() needs a terminal on stdin and stdout (run pytest in a terminal, "
                    "without xdist: -p no:xdist or -n0)"
                )
            return terminal.interact(self.machine.agent, argv or terminal.DEFAULT_SHELL, cwd=cwd)

    @property
    def console(self) -> Any:
        """A pexpect spawn on the serial console: ``sendline``/``expect`` reach a root shell."""
        self._check_open()
        return self.machine.console

    def console_tail(self, max_chars: int = 4000) -> str:
        """The last characters the guest wrote to its serial console."""
        return self.machine.console_tail(max_chars)

    @property
    def ready_seconds(self) -> float:
        """Seconds from launching the VMM to the agent's first answer (last boot/restore)."""
        return self.machine.ready_seconds

    def reset(self) -> None:
        """Back to the snapshot this VM came from (same VM object afterwards)."""
        self._check_open()
        if self.snapshot_dir is None:
            raise RuntimeError("this VM was not restored from a snapshot; nothing to reset to")
        self._close_tunnels()
        alive = getattr(self.machine, "is_alive", None)
        healthy = self.broken is None and (alive is None or alive())
        if healthy and self.reset_mode == "rollback" and self.engine.supports_rollback:
            self.engine.rollback(self.machine)
            return
        # A broken VM (GuestFailure) is never rolled back in place: a fresh restore instead.
        workdir = self.machine.workdir
        self.machine.close()
        self.machine = self.engine.restore(
            self.config, self.snapshot_dir, workdir, rollback=self.reset_mode == "rollback"
        )
        self.broken = None

    def close(self) -> None:
        """Stop the guest and release everything. Idempotent."""
        if not self._closed:
            self._closed = True
            self._close_tunnels()
            self.machine.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VM is closed")

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<VM {self.engine.name}/{self.engine.accelerator} {state}>"


def _check_size(value: int | str) -> int:
    """A byte count from an int or a size string (``"64M"``); 0 = no limit."""
    if isinstance(value, str):
        from pytest_ignition.config import parse_size

        return parse_size(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"max_output must be a number of bytes >= 0 or a size like '64M', not {value!r}"
        )
    return value


def _timeout_setting(limit: float | None, source: str) -> str:
    """Where a VM's default command timeout came from, and how to raise it."""
    how = (
        "raise it with --ignition-command-timeout, IGNITION_COMMAND_TIMEOUT, the ini key "
        "ignition_command_timeout or the marker key command_timeout (0 = none), or per call "
        "with vm.run(..., timeout=...)"
    )
    if source == "vm.command_timeout":
        return "this VM's command_timeout; raise it there or per call with timeout="
    where = f"its default, {limit:g} s" if source == "default" and limit else source
    return f"the setting command_timeout (from {where}): {how}"


def _transfer_setting(cap: int, source: str) -> str:
    """Where a VM's transfer cap came from, and how to raise it."""
    how = (
        "raise it with --ignition-max-transfer, IGNITION_MAX_TRANSFER or the ini key "
        "ignition_max_transfer, or per call with max_size=..."
    )
    where = f"its default, {_size(cap)}" if source == "default" else source
    return f"the session setting max_transfer (from {where}): {how}"


def _session_setting(cap: int, source: str) -> str:
    """Where a VM's default cap came from, and how to raise it (for the error message)."""
    how = (
        "raise it with --ignition-max-output, IGNITION_MAX_OUTPUT or the ini key "
        "ignition_max_output, or per call with vm.run(..., max_output=...)"
    )
    if source == "vm.max_output":
        return "this VM's max_output, set with vm.max_output = ...; raise it there or per call"
    where = f"its default, {_size(cap)}" if source == "default" else source
    return f"the session setting max_output (from {where}): {how}"
