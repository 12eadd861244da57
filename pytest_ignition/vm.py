"""The public VM API: what a test holds (``ignition_vm``) and what it gets back from commands.

Owns :class:`VM` (run commands, move files, the console, reset to the snapshot),
:class:`CommandResult` and the command errors (:class:`CommandError` and its subclasses
:class:`CommandFailed`, :class:`CommandTimeout`, :class:`CommandOutputTooLarge`). Users and
the docs rely on these names; everything engine-specific stays behind
:mod:`pytest_ignition.engines.base`.
"""

from __future__ import annotations

import os
import shlex
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pytest_ignition.agent import AgentOutputLimit, AgentTimeout
from pytest_ignition.engines.base import Engine, Machine, VMConfig

__all__ = [
    "VM",
    "CommandError",
    "CommandFailed",
    "CommandOutputTooLarge",
    "CommandResult",
    "CommandTimeout",
    "HistoryEntry",
]

# Bytes of stdout + stderr a command may write before it is killed (the session setting
# ``--ignition-max-output`` replaces it; config.DEFAULT_MAX_OUTPUT is the same number).
DEFAULT_MAX_OUTPUT = 64 << 20

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
    """A command ran past its timeout and was killed; the VM stays usable."""

    def __init__(
        self, command: str, timeout: float, stdout_bytes: bytes = b"", stderr_bytes: bytes = b""
    ) -> None:
        self.command = command
        self.timeout = timeout
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes
        super().__init__(f"command {command!r} timed out after {timeout:g}s and was killed")


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


class VM:
    """A running guest: commands, files, the serial console, reset to the snapshot.

    ``snapshot_dir`` is the snapshot this VM was restored from (needed by :meth:`reset`);
    ``reset_mode`` is ``"restore"`` (close, then restore afresh) or ``"rollback"`` (in place,
    where the engine supports it; otherwise the same as ``"restore"``). ``max_output`` is the
    default cap on a command's output in bytes (0: none) and ``max_output_source`` where it came
    from, for the error message (the fixtures pass the session setting and its source).
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
    ) -> None:
        if reset_mode not in ("restore", "rollback"):
            raise ValueError(f"reset_mode must be 'restore' or 'rollback', not {reset_mode!r}")
        self._max_output = _check_size(max_output)
        self.max_output_source = max_output_source
        self.engine = engine
        self.machine = machine
        self.config = config
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.reset_mode = reset_mode
        self.history: list[HistoryEntry] = []
        self._closed = False

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
        never shell-interpreted. Raises :class:`CommandTimeout` when ``timeout`` elapses.

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
        shown = _show(cmd)
        data = input.encode() if isinstance(input, str) else input
        started = time.monotonic()
        try:
            res = self.machine.agent.exec(
                payload,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                input=data,
                timeout=timeout,
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
            if timeout is None:
                raise  # no command timeout was asked for: the agent itself stopped answering
            raise CommandTimeout(
                shown,
                timeout,
                partial.stdout if partial else b"",
                partial.stderr if partial else b"",
            ) from None
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

    def check_output(self, cmd: Command, **kw: Any) -> str:
        """``run(cmd, **kw).check().stdout``."""
        return self.run(cmd, **kw).check().stdout

    # -- files ----------------------------------------------------------------------------
    # Not capped by max_output: a guest file is bounded by the guest's memory or disk image.

    def read_file(self, path: str) -> bytes:
        """The bytes of a guest file."""
        self._check_open()
        return self.machine.agent.get_file(str(path))

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Create or replace a guest file with ``data`` and permission bits ``mode``."""
        self._check_open()
        if isinstance(data, str):
            data = data.encode()
        self.machine.agent.put_file(str(path), data, mode=mode)

    def copy_into(self, host_path: str | os.PathLike[str], guest_path: str) -> None:
        """Copy a host file or directory tree into the guest, keeping permission bits."""
        self._check_open()
        src = Path(host_path)
        if not src.exists():
            raise FileNotFoundError(f"no such host file or directory: {src}")
        self.machine.agent.put_tree(src, str(guest_path))

    def copy_from(self, guest_path: str, host_path: str | os.PathLike[str]) -> None:
        """Copy a guest file or directory tree to the host, keeping permission bits.

        A guest file copied onto an existing host directory lands inside it.
        """
        self._check_open()
        dst = Path(host_path)
        mode, _size = self.machine.agent.stat(str(guest_path))
        if not stat.S_ISDIR(mode) and dst.is_dir():
            dst = dst / PurePosixPath(guest_path).name
        self.machine.agent.get_tree(str(guest_path), dst, mode)

    # -- console, reset, lifecycle ----------------------------------------------------------

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
        if self.reset_mode == "rollback" and self.engine.supports_rollback:
            self.engine.rollback(self.machine)
            return
        workdir = self.machine.workdir
        self.machine.close()
        self.machine = self.engine.restore(self.config, self.snapshot_dir, workdir)

    def close(self) -> None:
        """Stop the guest and release everything. Idempotent."""
        if not self._closed:
            self._closed = True
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
