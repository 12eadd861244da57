"""A warm VMM process that forks one child per VM: no VM pays for a Python start.

``python -m pytest_ignition.vmm.forkserver SOCKET`` imports the VMM (machine, KVM through
cffi, devices, snapshot format), checks that ``/dev/kvm`` opens, listens on the Unix socket
``SOCKET`` and prints ``ready`` on stdout. It holds no VM fd (KVM refuses VM ioctls from any
process but the VM's creator): every VM is created by a forked child, which then *is* the
VMM process of ``python -m pytest_ignition.vmm boot|restore ARGS`` (same control socket,
console, exit codes: :mod:`pytest_ignition.vmm.__main__`).

One request per connection: a JSON line ``{"argv": [...]}`` (the VMM's arguments) with the
child's stdin, stdout and stderr passed as ``SCM_RIGHTS``. The server answers
``{"pid": N}`` once forked and ``{"exit": CODE}`` when the child ended (negative: killed by
that signal, as in :mod:`subprocess`), or ``{"error": "..."}``. A snapshot's state file is
read and checked once per server (cached by path, inode, size and mtime) before the fork, so
every child inherits it parsed; the server's objects are frozen out of the garbage
collector (``gc.freeze``) before each fork, so a child's collections leave its pages shared.

Lifetimes: the server dies with its parent (``PR_SET_PDEATHSIG``); a child leads its own
session and gets SIGTERM when the server dies; when a client's connection closes before its
child ended (the client died, or gave up, e.g. Ctrl-C during a fork), the child is killed
(SIGTERM, SIGKILL after 5 s). The server is single-threaded, so forking it is safe.

:class:`ForkServer` is the client side (start, restart when dead, spawn); :class:`ForkedVmm`
stands in for the ``subprocess.Popen`` of a VMM process (pid, poll, wait, kill, returncode).
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MAX_REQUEST = 1 << 20
READY = b"ready\n"
START_TIMEOUT = 120.0  # the nested harness imports the VMM in ~2-3 s; a loaded one far slower
KILL_GRACE_S = 5.0


class ForkServerError(Exception):
    """The fork server could not start or answer; the message says why and what to do."""


# -- server ---------------------------------------------------------------------------------
def _warm() -> None:
    """Import what a boot or restore needs, so that children start with it loaded."""
    from . import __main__ as vmm_main
    from . import control, machine, snapshot  # noqa: F401
    from .arch.x86_64 import boot, loader, state  # noqa: F401
    from .devices import legacy  # noqa: F401
    from .devices.virtio import blk, mmio, rng, vsock  # noqa: F401
    from .hypervisor import kvm

    # parse once: argparse compiles its regular expressions on first use (~1-2 ms a child)
    vmm_main.parser().parse_args(["restore", "--store", ".", "--name", "n", "--control", "c"])
    kvm.System().close()  # /dev/kvm opens and speaks our API version, or this raises


_snapshots: dict[str, tuple[tuple[int, ...], Any]] = {}


def _preload(argv: list[str]) -> None:
    """For ``restore --store S --name N``: load and check the snapshot's state once."""
    if not argv or argv[0] != "restore":
        return
    try:
        store = argv[argv.index("--store") + 1]
        name = argv[argv.index("--name") + 1]
    except (ValueError, IndexError):
        return
    from . import __main__ as vmm_main
    from . import snapshot as snap

    path = os.path.join(store, name)
    try:
        st = os.stat(os.path.join(path, snap.STATE_FILE))
    except OSError:
        return  # the child reports it
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _snapshots.get(path)
    if cached is None or cached[0] != ident:
        try:
            cached = (ident, snap.Snapshot.load(path))
        except Exception:
            return  # the child loads it again and reports the error
        _snapshots[path] = cached
    vmm_main.PRELOADED[path] = cached[1]


def _recv_request(conn: socket.socket) -> tuple[list[str], dict[str, str] | None, list[int]]:
    fds = array.array("i")
    buf = b""
    while not buf.endswith(b"\n"):
        msg, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not msg:
            break
        buf += msg
        if len(buf) > MAX_REQUEST:
            break
    try:
        req = json.loads(buf)
        argv = req["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a list of strings")
        env = req.get("env")
        if env is not None and not (
            isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise ValueError("env must map strings to strings")
    except (ValueError, KeyError, TypeError) as e:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"bad request: {e}") from None
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"bad request: {len(fds)} fds passed, need stdin, stdout, stderr")
    return argv, env, list(fds)


def _child(argv: list[str], env: dict[str, str] | None, fds: list[int]) -> None:
    """In the forked child: become the VMM process of ``argv`` (in ``env``, if given: the
    whole environment); never returns."""
    rc = 1
    try:
        os.setsid()
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
            tempfile.tempdir = None  # gettempdir() caches; TMPDIR may have changed
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from . import __main__ as vmm_main

        vmm_main.LAUNCH_NS = time.monotonic_ns()
        sys.argv = [vmm_main.PROG, *argv]
        rc = vmm_main.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # the promise: one line, no traceback
        with contextlib.suppress(Exception):
            os.write(2, f"pytest_ignition.vmm: internal error: {type(e).__name__}: {e}\n".encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc if isinstance(rc, int) else 1)


class _Client:
    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.kill_at: float | None = None

    def send(self, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.conn.sendall(json.dumps(obj).encode() + b"\n")


def serve(path: str) -> int:
    from .__main__ import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)
    parent = os.getppid()
    try:
        _warm()
    except Exception as e:
        sys.stderr.write(f"pytest_ignition.vmm.forkserver: cannot start: {e}\n")
        return 2
    # Frozen objects are never scanned by a collection: a child's collections then touch
    # only its own objects instead of copying the server's pages on write.
    gc.collect()
    gc.freeze()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    lsock.bind(path)
    lsock.listen(64)
    # accept() only after select said ready; non-blocking so that a client gone in between
    # cannot stall the server (BlockingIOError is skipped below)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    clients: dict[int, _Client] = {}  # by conn fd
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()

    def finish(c: _Client, status: int | None) -> None:
        if c.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(c.pidfd)
            os.close(c.pidfd)
            c.pidfd = None
        if status is not None:
            c.send({"exit": os.waitstatus_to_exitcode(status)})
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.conn)
        clients.pop(c.conn.fileno(), None)
        c.conn.close()

    try:
        while True:
            now = time.monotonic()
            timeout = min([c.kill_at - now for c in clients.values() if c.kill_at] + [1.0])
            for key, _ in sel.select(max(0.0, timeout)):
                if key.data is None:
                    try:
                        conn, _ = lsock.accept()  # non-blocking listener: never waits
                    except (BlockingIOError, InterruptedError):
                        continue
                    conn.setblocking(True)
                    conn.set_inheritable(False)
                    c = _Client(conn)
                    try:
                        argv, env, fds = _recv_request(conn)
                    except (ValueError, OSError) as e:
                        c.send({"error": str(e)})
                        conn.close()
                        continue
                    _preload(argv)
                    gc.freeze()  # the state _preload just read, too
                    server_pid = os.getpid()
                    try:
                        pid = os.fork()
                    except OSError as e:
                        c.send({"error": f"fork failed: {e}"})
                        conn.close()
                        for fd in fds:
                            os.close(fd)
                        continue
                    if pid == 0:
                        lsock.close()
                        for other in clients.values():
                            other.conn.close()
                            if other.pidfd is not None:
                                os.close(other.pidfd)
                        sel.close()
                        conn.close()
                        from .__main__ import set_parent_death_signal as pds

                        pds(signal.SIGTERM)  # dies with the server
                        if os.getppid() != server_pid:
                            # the server died before the line above: no signal will come
                            os._exit(128 + signal.SIGTERM)
                        _child(argv, env, fds)
                    for fd in fds:
                        os.close(fd)
                    c.pid = pid
                    c.pidfd = os.pidfd_open(pid)
                    clients[conn.fileno()] = c
                    sel.register(conn, selectors.EVENT_READ, ("conn", c))
                    sel.register(c.pidfd, selectors.EVENT_READ, ("pid", c))
                    c.send({"pid": pid})
                    continue
                kind, c = key.data
                if kind == "pid":
                    _, status = os.waitpid(c.pid, 0)
                    finish(c, status)
                else:  # the client closed (or wrote, which it must not): its child goes too
                    try:
                        data = c.conn.recv(1)
                    except OSError:
                        data = b""
                    if not data and c.kill_at is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(c.pid, signal.SIGTERM)
                        c.kill_at = time.monotonic() + KILL_GRACE_S
                        sel.unregister(c.conn)
            now = time.monotonic()
            for c in list(clients.values()):
                if c.kill_at is not None and now >= c.kill_at:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(c.pid, signal.SIGKILL)
                    c.kill_at = now + 3600  # reaped through its pidfd
            if os.getppid() != parent:
                return 0
    finally:
        for c in clients.values():
            if c.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- client ---------------------------------------------------------------------------------
class ForkedVmm:
    """A VMM process forked by the server, with the parts of ``subprocess.Popen`` the engine
    uses. The exit status comes over the connection (the process is the server's child)."""

    def __init__(self, conn: socket.socket, pid: int, argv: list[str], buffered: bytes = b""):
        self._conn = conn
        self.pid = pid
        self.args = argv
        self.returncode: int | None = None
        self._buf = buffered  # what came after the pid line (a child that exited at once)
        self._lock = threading.Lock()

    def _read(self, timeout: float | None) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            self._conn.settimeout(timeout)
            try:
                while not self._buf.endswith(b"\n"):
                    chunk = self._conn.recv(4096)
                    if not chunk:
                        # The server died: the child got SIGTERM with it (PDEATHSIG).
                        self.returncode = -signal.SIGTERM
                        self._conn.close()
                        return
                    self._buf += chunk
            except (TimeoutError, BlockingIOError):
                return
            finally:
                with contextlib.suppress(OSError):
                    self._conn.settimeout(None)
            try:
                self.returncode = int(json.loads(self._buf)["exit"])
            except (ValueError, KeyError, TypeError):
                self.returncode = 1
            self._conn.close()

    def poll(self) -> int | None:
        self._read(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedVmm pid={self.pid} returncode={self.returncode}>"


class ForkServer:
    """The client's handle on one fork server (started on first use, restarted when dead)."""

    def __init__(self, python: str | None = None, spawn: Any = None, mkdtemp: Any = None):
        self.python = python or sys.executable
        self._spawn = spawn  # e.g. engines._process.spawn (dies with this process)
        # e.g. engines._process.owned_tempdir: an owner file, so that the session-start sweeper
        # removes the dir (and its socket) of a run that was killed
        self._mkdtemp = mkdtemp or (lambda prefix: Path(tempfile.mkdtemp(prefix=prefix)))
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.sock: Path | None = None
        self._lock = threading.Lock()
        self.starts = 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        with self._lock:
            if self.alive():
                return
            self._stop_locked()
            self.dir = Path(self._mkdtemp("ign-fs-"))
            self.sock = self.dir / "fork.sock"
            argv = [self.python, "-m", "pytest_ignition.vmm.forkserver", str(self.sock)]
            spawn = self._spawn or (lambda a, **kw: subprocess.Popen(a, **kw))
            self.proc = spawn(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self.starts += 1
            deadline = time.monotonic() + timeout
            out = b""
            sel = selectors.DefaultSelector()
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            try:
                while not out.endswith(READY):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._stop_locked()
                        raise ForkServerError(
                            f"the VMM fork server did not start within {timeout:g}s"
                        )
                    if not sel.select(min(left, 1.0)):
                        continue
                    chunk = os.read(self.proc.stdout.fileno(), 64)
                    if not chunk:
                        err = b""
                        with contextlib.suppress(Exception):
                            err = self.proc.stderr.read()[-2000:]
                        rc = self.proc.wait()
                        self._stop_locked()
                        raise ForkServerError(
                            f"the VMM fork server exited with {rc} before it was ready: "
                            f"{err.decode(errors='replace').strip() or '(no output)'}"
                        )
                    out += chunk
            finally:
                sel.close()

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: dict[str, str] | None = None,
    ) -> ForkedVmm:
        """Fork a VMM process running ``python -m pytest_ignition.vmm ARGV`` with these fds
        (and ``env`` as its whole environment; default: the server's)."""
        for attempt in (0, 1):
            if not self.alive():
                self.start()
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                conn.settimeout(START_TIMEOUT)
                conn.connect(str(self.sock))
                req: dict[str, Any] = {"argv": argv}
                if env is not None:
                    req["env"] = dict(env)
                data = json.dumps(req).encode() + b"\n"
                fds = array.array("i", [stdin, stdout, stderr])
                conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise ConnectionError("the fork server closed the connection")
                    buf += chunk
                # A child that exits at once has its exit line sent right after the pid line:
                # one recv may hold both; the rest is the ForkedVmm's.
                line, _, rest = buf.partition(b"\n")
                reply = json.loads(line)
            except (OSError, ValueError) as e:
                conn.close()
                if attempt == 0 and not self.alive():
                    continue  # it died under us: restart once
                raise ForkServerError(f"the VMM fork server did not answer: {e}") from None
            except BaseException:
                conn.close()  # e.g. Ctrl-C: the server kills a child it forked for us
                raise
            if "pid" not in reply:
                conn.close()
                raise ForkServerError(f"the VMM fork server refused: {reply.get('error')}")
            conn.settimeout(None)
            return ForkedVmm(conn, int(reply["pid"]), argv, rest)
        raise ForkServerError("the VMM fork server keeps dying")  # pragma: no cover

    def _stop_locked(self) -> None:
        p = self.proc
        if p is not None:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()
        self.proc = None
        if self.dir is not None:  # its socket, and an owner file (see mkdtemp)
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = self.sock = None

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m pytest_ignition.vmm.forkserver SOCKET\n")
        return 2
    return serve(args[0])


if __name__ == "__main__":
    sys.exit(main())
