"""The public VM API: what a test holds (``ignition_vm``) and what it gets back from commands.

Owns :class:`VM` (run commands, move files, the console, reset to the snapshot),
:class:`CommandResult`, :class:`CommandFailed` and :class:`CommandTimeout`. Users and the
docs rely on these names; everything engine-specific stays behind
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

from pytest_ignition.agent import AgentTimeout
from pytest_ignition.engines.base import Engine, Machine, VMConfig

__all__ = ["VM", "CommandFailed", "CommandResult", "CommandTimeout", "HistoryEntry"]

Command = str | Sequence[str]

# (command as shown to the user, exit code or None when it timed out, seconds)
HistoryEntry = tuple[str, int | None, float]


def _show(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(str(a) for a in cmd)


def _tail(text: str, lines: int = 20, chars: int = 2000) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])[-chars:]


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


class CommandFailed(Exception):
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


class CommandTimeout(Exception):
    """A command ran past its timeout and was killed; the VM stays usable."""

    def __init__(
        self, command: str, timeout: float, stdout_bytes: bytes = b"", stderr_bytes: bytes = b""
    ) -> None:
        self.command = command
        self.timeout = timeout
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes
        super().__init__(f"command {command!r} timed out after {timeout:g}s and was killed")


class VM:
    """A running guest: commands, files, the serial console, reset to the snapshot.

    ``snapshot_dir`` is the snapshot this VM was restored from (needed by :meth:`reset`);
    ``reset_mode`` is ``"restore"`` (close, then restore afresh) or ``"rollback"`` (in place,
    where the engine supports it; otherwise the same as ``"restore"``).
    """

    def __init__(
        self,
        engine: Engine,
        machine: Machine,
        config: VMConfig,
        snapshot_dir: Path | None = None,
        reset_mode: str = "restore",
    ) -> None:
        if reset_mode not in ("restore", "rollback"):
            raise ValueError(f"reset_mode must be 'restore' or 'rollback', not {reset_mode!r}")
        self.engine = engine
        self.machine = machine
        self.config = config
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self.reset_mode = reset_mode
        self.history: list[HistoryEntry] = []
        self._closed = False

    # -- commands -------------------------------------------------------------------------

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> CommandResult:
        """Run ``cmd`` in the guest: a ``str`` is a shell command, a list is an argv that is
        never shell-interpreted. Raises :class:`CommandTimeout` when ``timeout`` elapses."""
        self._check_open()
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
            )
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
