"""The VMM process's control socket: JSON lines over a Unix stream socket.

One request per line, one reply per line::

    {"cmd": "status"}    -> {"ok": true, "state": "running", "uptime_s": 1.23, ...}
    {"cmd": "pause"}     -> {"ok": true, "state": "paused"}
    {"cmd": "resume"}    -> {"ok": true, "state": "running"}
    {"cmd": "shutdown"}  -> {"ok": true, "state": "stopping"}   (then the process exits)
    {"cmd": "snapshot", "store": DIR, "name": NAME}
                         -> {"ok": true, "path": ..., "snapshot_ms": ...}
                            (store/name default to the process's --store/--name)
    {"cmd": "rollback"}  -> {"ok": true, "pages": N, "ranges": R, "rollback_us": ...}
                            (back to the snapshot this process restored from or last took)
    {"cmd": "probe"}     -> {"ok": true, "vcpus": [...], "virtio": [...], ...}
                            (timer, interrupt and queue state: see vmm.probe)

Anything malformed (not JSON, not an object, unknown command, a line over 64 KiB) gets
``{"ok": false, "error": "..."}`` and the connection keeps serving. Each client has its own
thread; the socket file is removed by :meth:`ControlServer.close`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from .threads import VmmThread

log = logging.getLogger(__name__)
# Linux creates the socket close-on-exec atomically; elsewhere (macOS) Python makes every new
# socket non-inheritable anyway (PEP 446).
_SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)

MAX_LINE = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Serve ``handler`` on the Unix socket at ``path`` (created, and removed on close)."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler):
        self.path = os.fspath(path)
        self.handler = handler
        self._closed = threading.Event()
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._busy = 0  # requests being answered
        if os.path.exists(self.path):
            # A stale socket from a dead VMM: refuse to steal a live one.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)
            else:
                raise OSError(f"control socket {self.path} is in use by another process")
            finally:
                probe.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _SOCK_CLOEXEC)
        # Bind and listen under a temporary name; start() renames it into place, so the
        # socket file appears only once it accepts connections (no ECONNREFUSED for a client
        # polling for it) and only when its owner says it is ready.
        tmp: str | None = f"{self.path}.{os.getpid()}~"
        if len(os.fsencode(tmp)) > 107:
            tmp = None  # too long for sun_path: bind in place
        self._tmp = tmp
        try:
            self.sock.bind(tmp or self.path)
            self.sock.listen(8)
        except BaseException:
            self.sock.close()
            self._unlink_tmp()
            raise
        self._thread = VmmThread(self._accept_loop, "vmm-control")

    def start(self) -> None:
        """Publish the socket under its path and serve."""
        if self._tmp is not None:
            os.rename(self._tmp, self.path)
            self._tmp = None
        self._thread.start()

    def _unlink_tmp(self) -> None:
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        # A request being answered when the VM stopped (a "resume" whose guest exits at once,
        # a "shutdown") still gets its reply; a stuck one cannot hold the process for long.
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=2.0)
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._tmp is not None:
            self._unlink_tmp()  # never published: the path may belong to someone else
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            with self._lock:
                self._clients.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="vmm-control-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while not self._closed.is_set():
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        with self._idle:
                            self._busy += 1
                        try:
                            conn.sendall(self._reply(line))
                        finally:
                            with self._idle:
                                self._busy -= 1
                                self._idle.notify_all()
                if len(buf) > MAX_LINE:
                    conn.sendall(_encode({"ok": False, "error": "request line too long"}))
                    buf = b""
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def _reply(self, line: bytes) -> bytes:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return _encode({"ok": False, "error": f"bad JSON: {e}"})
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return _encode({"ok": False, "error": 'expected an object like {"cmd": "status"}'})
        try:
            reply = self.handler(req)
        except Exception as e:
            log.exception("control: %r failed", req.get("cmd"))
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return _encode(reply)


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def request(path: str | os.PathLike[str], cmd: str, timeout: float = 10.0, **args: Any) -> dict:
    """Send one command to a control socket and return the reply (a small client for tools)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(_encode({"cmd": cmd, **args}))
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"control socket {os.fspath(path)} closed without a reply")
            buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])
