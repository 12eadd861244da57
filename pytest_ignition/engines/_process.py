"""What every engine's machine needs from the host, in one place: starting the VM process so
that it dies with this one, killing its process group, a private directory (with a short
socket directory where the workdir's path is too long for ``sun_path``), closing whatever is
still open at exit, and the guest's default kernel command line.

Also the temp directories' owner files and the sweeper: every directory the plugin makes in the
system temp dir (``ignition-*`` session dirs, ``ign-*`` socket dirs) gets an owner file (pid, the
pid's start time, boot id, pid namespace, host); :func:`sweep_dead_runs` removes those whose owner
is gone (a SIGKILLed or crashed run), never a live run's, never following symlinks."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MachineDirs",
    "default_cmdline",
    "owned_tempdir",
    "sweep_dead_runs",
    "enable_keeper",
    "keep_process",
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


# --ignition-keep-failed: VM processes start under a keeper (pytest_ignition.keeper) that
# outlives this process, so that a failed test's VM can be kept; see enable_keeper().
_keeper_mode = False


def enable_keeper(on: bool = True) -> None:
    """Start every later VM process under a keeper process (for ``--ignition-keep-failed``)."""
    global _keeper_mode
    _keeper_mode = on


def _spawn_kept(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    # The keeper kills the VM when the pipe's write end closes (this process exited, or
    # kill_process closed it) unless it was told to keep it (keep_process).
    r, w = os.pipe2(os.O_CLOEXEC)
    inner = tuple(kw.pop("pass_fds", ()))
    keeper = [sys.executable, "-m", "pytest_ignition.keeper", str(r), ",".join(map(str, inner))]
    try:
        proc = _spawner.popen(
            [*keeper, "--", *argv], start_new_session=True, pass_fds=(*inner, r), **kw
        )
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    proc._ignition_ctl = w  # type: ignore[attr-defined]
    return proc


def keep_process(proc: subprocess.Popen[bytes], deadline: float, entry: Path) -> bool:
    """Tell the keeper of ``proc`` to keep it until ``deadline`` (epoch seconds); False when
    ``proc`` was not started under a keeper."""
    w = getattr(proc, "_ignition_ctl", None)
    if w is None or proc.poll() is not None:
        return False
    try:
        os.write(w, f"keep {deadline:.3f} {entry}\n".encode())
    except OSError:
        return False
    os.close(w)
    proc._ignition_ctl = None  # type: ignore[attr-defined]
    return True


def spawn(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kw)`` in its own session, SIGKILLed when this process dies
    (with the keeper enabled: ended by its keeper then, unless kept)."""
    if _keeper_mode:
        return _spawn_kept(argv, **kw)
    return _spawner.popen(
        argv,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        **kw,
    )


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started by :func:`spawn` and its process group, and reap it."""
    w = getattr(proc, "_ignition_ctl", None)
    if w is not None:  # a keeper's pipe: closed with the machine
        proc._ignition_ctl = None  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            os.close(w)
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
            self.sockdir = owned_tempdir("ign-")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._sockdir_owned:
            shutil.rmtree(self.sockdir, ignore_errors=True)


# ---------------------------------------------------------------- temp dirs of dead runs

OWNER_FILE = ".ignition-owner"
TMP_PREFIXES = ("ignition-", "ign-")  # session dirs (fixtures), short socket dirs (engines)


def _proc_start(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of ``pid``, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19]), fields[0]  # stat fields 22 and 3; the name may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record(pid: int | None = None) -> dict[str, Any]:
    """What identifies a running process across pid reuse, reboots and containers."""
    pid = os.getpid() if pid is None else pid
    start = _proc_start(pid)
    return {
        "pid": pid,
        "start": start[0] if start else None,
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pidns": _pidns(),
        "host": socket.gethostname(),
    }


def owned_tempdir(prefix: str, dir: Path | None = None) -> Path:
    """``tempfile.mkdtemp(prefix=...)`` with an owner file naming this process."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    (d / OWNER_FILE).write_text(json.dumps(owner_record()))
    return d


def owner_alive(rec: dict[str, Any]) -> bool | None:
    """True: the owner runs; False: it is gone for sure; None: cannot tell (keep the dir)."""
    if rec.get("host") != socket.gethostname():
        return None  # a temp dir shared with another host
    boot_id = _read_text("/proc/sys/kernel/random/boot_id")
    if rec.get("boot_id") and boot_id and rec["boot_id"] != boot_id:
        return False  # made before the last reboot
    if rec.get("pidns") != _pidns():
        return None  # another container's pids mean nothing here
    try:
        pid = int(rec["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    if not os.path.isdir("/proc/self"):  # no procfs (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    now = _proc_start(pid)
    if now is None or now[1] in ("Z", "X"):
        return False  # gone, or a zombie nobody reaped yet
    return rec.get("start") is None or now[0] == rec["start"]  # else: the pid was reused


def _read_owner(path: str) -> dict[str, Any] | None:
    try:
        fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > 4096:
            return None
        rec = json.loads(os.read(fd, 4096))
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def sweep_dead_runs(tmpdir: str | Path | None = None, protect: tuple[str, ...] = ()) -> list[Path]:
    """Remove this user's ``ignition-*`` / ``ign-*`` dirs in ``tmpdir`` whose owner is gone.

    A dir with no owner file (older versions, or one being made right now), another user's, a
    symlink, or one holding a ``protect`` path (a kept VM's) stays. Returns what was removed.
    """
    root = str(tmpdir if tmpdir is not None else tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    uid = os.getuid()
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIXES):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        rec = _read_owner(entry.path)
        if rec is None or owner_alive(rec) is not False:
            continue
        if any(p == entry.path or p.startswith(entry.path + os.sep) for p in protect):
            continue
        # rmtree works through directory fds with O_NOFOLLOW (rmtree.avoids_symlink_attacks on
        # Linux): a symlink inside is removed, never followed.
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


_live: weakref.WeakSet[Any] = weakref.WeakSet()


_collector = threading.local()


def track(machine: Any) -> None:
    """Close ``machine`` at interpreter exit if nobody has by then."""
    _live.add(machine)
    made = getattr(_collector, "made", None)
    if made is not None:
        made.append(machine)


@contextlib.contextmanager
def collecting(made: list[Any]) -> Iterator[list[Any]]:
    """Append every machine this thread creates meanwhile to ``made`` (so that another thread
    can close one whose boot or restore is still in progress)."""
    prev = getattr(_collector, "made", None)
    _collector.made = made
    try:
        yield made
    finally:
        _collector.made = prev


def untrack(machine: Any) -> None:
    _live.discard(machine)


@atexit.register
def _close_all() -> None:
    for m in list(_live):
        with contextlib.suppress(Exception):
            m.close()
