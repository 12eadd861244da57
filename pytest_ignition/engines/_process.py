"""What every engine's machine needs from the host, in one place: starting the VM process so
that it dies with this one, killing its process group, a private directory (with a short
socket directory where the workdir's path is too long for ``sun_path``), closing whatever is
still open at exit, and the guest's default kernel command line."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "MachineDirs",
    "default_cmdline",
    "kill_process",
    "spawn",
    "track",
    "untrack",
]

# sun_path is 108 bytes; keep socket paths well below it.
MAX_SOCK_PATH = 100
_PR_SET_PDEATHSIG = 1
_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)


def default_cmdline() -> str:
    """The bundled guest's kernel command line (engines append their own arguments)."""
    try:
        from pytest_ignition.guest import DEFAULT_CMDLINE
    except ImportError:  # the guest package is optional for users with their own kernel
        return "console=ttyS0 reboot=k panic=-1 quiet"
    return DEFAULT_CMDLINE


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Spawner:
    """Starts every VM process from one long-lived daemon thread.

    PDEATHSIG fires when the *thread* that forked the child exits, not the process: a VM
    started from a short-lived worker thread (e.g. one that prepares the next test's VM)
    would be killed with it. This thread lives as long as the interpreter.
    """

    def __init__(self) -> None:
        self._q: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _run(self) -> None:
        while True:
            fn, reply = self._q.get()
            try:
                reply.put((True, fn()))
            except BaseException as exc:  # handed back to the caller
                reply.put((False, exc))

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ignition-spawner", daemon=True
                )
                self._thread.start()
        reply: queue.Queue[Any] = queue.Queue()
        self._q.put((lambda: subprocess.Popen(argv, **kw), reply))
        try:
            ok, value = reply.get()
        except BaseException:
            # Interrupted (Ctrl-C) while the child was being started: it must not outlive
            # this call unseen, so wait for it and kill it.
            ok, value = reply.get()
            if ok:
                kill_process(value)
            raise
        if not ok:
            raise value
        return value


_spawner = _Spawner()


def spawn(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kw)`` in its own session, SIGKILLed when this process dies."""
    return _spawner.popen(
        argv,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        **kw,
    )


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started by :func:`spawn` and its process group, and reap it."""
    if proc.poll() is None:
        # It leads its own process group (anything it forks is in it too). Signalled before
        # the leader is reaped, so the group id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL: only a D-state wait
        proc.wait(timeout=10)


class MachineDirs:
    """A machine's private directory under ``workdir`` and the directory of its sockets: the
    private one, or a short one under the system temp dir when ``longest_socket`` would not
    fit in ``sun_path`` there."""

    def __init__(self, workdir: Path, prefix: str, longest_socket: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
        self.sockdir = self.dir
        self._sockdir_owned = len(str(self.dir / longest_socket)) > MAX_SOCK_PATH
        if self._sockdir_owned:
            self.sockdir = Path(tempfile.mkdtemp(prefix="ign-"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._sockdir_owned:
            shutil.rmtree(self.sockdir, ignore_errors=True)


_live: weakref.WeakSet[Any] = weakref.WeakSet()


def track(machine: Any) -> None:
    """Close ``machine`` at interpreter exit if nobody has by then."""
    _live.add(machine)


def untrack(machine: Any) -> None:
    _live.discard(machine)


@atexit.register
def _close_all() -> None:
    for m in list(_live):
        with contextlib.suppress(Exception):
            m.close()
