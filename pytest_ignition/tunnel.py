"""TCP tunnels over the agent channel: ``vm.forward``, ``vm.connect``, ``vm.expose``.

Owns the host side of the agent's TCP tunnel frames (docs/agent-protocol.md, "TCP tunnels"): one
:class:`Tunnels` per VM, with one selector thread that moves bytes between host sockets and agent
channels. No network device is needed: the agent connects to (or listens on) 127.0.0.1 inside
the guest, and the bytes travel as frames beside the VM's commands.

Flow control is per channel and both ways: the host grants the agent :data:`WINDOW` bytes and
credits them back only as it writes them to the host socket, and sends the agent at most the
window the agent announced until the agent credits it back. So a guest peer that floods or never
reads stalls only its own connection, the host never buffers more than :data:`WINDOW` per
connection, and the agent's other work (commands, files) goes on. Everything the agent sends is
checked: a frame that breaks the window or the state machine resets that connection.

The forwarders live as long as the VM's agent connection: :meth:`Tunnels.close` (called by
``VM.close`` and ``VM.reset``) closes every listener and connection; nothing listens afterwards.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING

from pytest_ignition.agent import AgentDisconnected, ChannelSink, Frame, FrameType

if TYPE_CHECKING:
    from pytest_ignition.agent import AgentClient

__all__ = ["Tunnels", "WINDOW"]

log = logging.getLogger(__name__)

WINDOW = 256 * 1024  # bytes of guest data the host buffers per connection
CHUNK = 64 * 1024  # largest TCP_DATA payload the host sends
MAX_AGENT_WINDOW = 16 << 20  # a larger window announced by the agent is clipped to this
MAX_PENDING_ACCEPTS = 64  # per expose: guest connections waiting for their host connect
_U32 = struct.Struct("<I")
_CONNECT = struct.Struct("<II")  # port, window
_ATTACH = struct.Struct("<III")  # listen chan, conn id, window
_REJECT = struct.Struct("<II")  # conn id, errno


def _oserror(code: int, message: str) -> OSError:
    """``OSError(code, ...)`` becomes ConnectionRefusedError, ConnectionResetError, ... by code."""
    if not 0 < code < 1000:
        code = errno.EPROTO
    return OSError(code, f"{os.strerror(code)}: {message}")


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (a peer sees ECONNRESET, not an orderly end)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    sock.close()


class _Sink(ChannelSink):
    """Routes one channel's frames (reader thread) into the selector thread's inbox."""

    def __init__(self, owner: Tunnels, target: object) -> None:
        self.owner = owner
        self.target = target

    def put(self, item: Frame | None) -> None:
        self.owner._post(self.target, item)


class _Conn:
    """One tunnelled connection: a host socket joined to an agent channel."""

    def __init__(self, sock: socket.socket, what: str) -> None:
        self.sock = sock
        self.what = what
        self.chan = 0
        self.state = "connecting"  # -> open -> closed
        self.outbuf = bytearray()  # guest data not yet written to sock (<= WINDOW)
        self.credit = 0  # bytes we may still send to the agent
        self.delivered = 0  # written to sock since the last TCP_CREDIT
        self.host_eof = False  # sock reached EOF; TCP_SHUTDOWN sent
        self.guest_eof = False  # TCP_EOF received
        self.wr_shut = False  # sock.shutdown(SHUT_WR) done
        self.agent_closed = False  # TCP_CLOSED(0) received: close once outbuf is written
        self.ready: threading.Event | None = None  # vm.connect waits on it
        self.error: OSError | None = None


class _Forward:
    """A host listener (vm.forward) whose connections reach a guest port."""

    def __init__(self, sock: socket.socket, guest_port: int) -> None:
        self.sock = sock
        self.guest_port = guest_port


class _Expose:
    """A guest listener (vm.expose) whose connections reach a host port."""

    def __init__(self, host_port: int, guest_port: int) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.chan = 0
        self.ready = threading.Event()
        self.error: OSError | None = None
        self.pending = 0  # host connects in progress


class _Dialing:
    """A host connect for one guest connection accepted by an expose listener."""

    def __init__(self, expose: _Expose, conn_id: int, sock: socket.socket) -> None:
        self.expose = expose
        self.conn_id = conn_id
        self.sock = sock


class Tunnels:
    """The TCP tunnels of one agent connection (one VM). Thread-safe; see the module docstring."""

    def __init__(self, agent: AgentClient, name: str = "vm") -> None:
        self.agent = agent
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[object, Frame | None]] = deque()
        self._calls: deque[object] = deque()  # objects to register from the selector thread
        self._conns: dict[int, _Conn] = {}  # by channel
        self._forwards: list[_Forward] = []
        self._exposes: dict[int, _Expose] = {}  # by listen channel
        self._closed = False
        self._dead: str | None = None  # the agent stream is gone
        self._thread = threading.Thread(
            target=self._loop, name=f"ignition-tunnels-{name}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def connect(self, guest_port: int, timeout: float = 10.0) -> socket.socket:
        """One connection to ``127.0.0.1:guest_port`` in the guest, as a connected socket.

        The socket is one end of a Unix socketpair (``shutdown(SHUT_WR)`` half-closes towards the
        guest). A closed guest port raises ConnectionRefusedError; no answer within ``timeout``
        raises TimeoutError.
        """
        _check_port(guest_port, "guest_port")
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        c = _Conn(ours, f"connect to guest port {guest_port}")
        c.ready = threading.Event()
        try:
            self._start_connect(c, guest_port)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if not c.ready.wait(timeout):
            self._post(("abort", c), None)
            theirs.close()
            raise TimeoutError(
                f"{self.name}: connecting to guest port {guest_port}: no answer from the agent "
                f"within {timeout:g} s"
            )
        if c.error is not None:
            theirs.close()
            raise c.error
        return theirs

    def forward(self, guest_port: int, host_port: int = 0) -> int:
        """Listen on the host's ``127.0.0.1:host_port`` (0: any free port); each connection
        reaches ``127.0.0.1:guest_port`` in the guest. Returns the host port."""
        _check_port(guest_port, "guest_port")
        if not 0 <= host_port <= 65535:
            raise ValueError(f"host_port {host_port} out of range 0..65535")
        self._check_alive()
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(("127.0.0.1", host_port))
            lsock.listen(64)
            lsock.setblocking(False)
        except BaseException:
            lsock.close()
            raise
        port = lsock.getsockname()[1]
        self._post(("register", _Forward(lsock, guest_port)), None)
        return int(port)

    def expose(self, host_port: int, guest_port: int | None = None, timeout: float = 10.0) -> int:
        """Listen on ``127.0.0.1:guest_port`` in the guest (default: ``host_port``); each
        connection reaches ``127.0.0.1:host_port`` on the host. Returns the guest port."""
        _check_port(host_port, "host_port")
        gport = host_port if guest_port is None else guest_port
        _check_port(gport, "guest_port")
        self._check_alive()
        e = _Expose(host_port, gport)
        e.chan = self.agent.open_channel(_Sink(self, e))
        with self._lock:
            self._exposes[e.chan] = e
        try:
            self.agent.send_frame(FrameType.TCP_LISTEN, e.chan, _U32.pack(gport))
        except AgentDisconnected:
            self._forget_expose(e)
            raise
        if not e.ready.wait(timeout):
            self._forget_expose(e)
            raise TimeoutError(
                f"{self.name}: listening on guest port {gport}: no answer from the agent within "
                f"{timeout:g} s"
            )
        if e.error is not None:
            self._forget_expose(e)
            raise e.error
        return gport

    def close(self) -> None:
        """Close every listener and connection and stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        """Tunnelled connections currently open (for tests and reports)."""
        with self._lock:
            return len(self._conns)

    # ------------------------------------------------------------------ plumbing

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: the VM's tunnels are closed")
        if self._dead is not None:
            raise AgentDisconnected(f"{self.name}: {self._dead}")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full) or closing

    def _post(self, target: object, item: Frame | None) -> None:
        with self._lock:
            self._inbox.append((target, item))
        self._wake()

    def _send(self, ftype: int, chan: int, payload: bytes = b"") -> bool:
        try:
            self.agent.send_frame(ftype, chan, payload)
            return True
        except AgentDisconnected as e:
            self._dead = str(e)
            return False

    def _start_connect(self, c: _Conn, guest_port: int) -> None:
        self._check_alive()
        c.chan = self.agent.open_channel(_Sink(self, c))
        with self._lock:
            self._conns[c.chan] = c
        if not self._send(FrameType.TCP_CONNECT, c.chan, _CONNECT.pack(guest_port, WINDOW)):
            self._drop(c, None)
            raise AgentDisconnected(f"{self.name}: {self._dead}")

    def _forget_expose(self, e: _Expose) -> None:
        self._send(FrameType.TCP_CLOSE, e.chan, _U32.pack(0))
        self.agent.close_channel(e.chan)
        with self._lock:
            self._exposes.pop(e.chan, None)

    def _drop(self, c: _Conn, err: int | None) -> None:
        """Forget ``c``: close its socket (reset when ``err``), free its channel."""
        if c.state == "closed":
            return
        c.state = "closed"
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        if err:
            _reset(c.sock)
        else:
            c.sock.close()
        if c.chan:
            self.agent.close_channel(c.chan)
        with self._lock:
            self._conns.pop(c.chan, None)
        if c.ready is not None and not c.ready.is_set():
            c.error = c.error or _oserror(errno.ECONNRESET, c.what)
            c.ready.set()

    def _abort(self, c: _Conn, err: int, why: str) -> None:
        """Reset both ends: tell the agent, close the host socket."""
        if c.state == "closed":
            return
        log.debug("%s: %s: %s", self.name, c.what, why)
        self._send(FrameType.TCP_CLOSE, c.chan, _U32.pack(err))
        self._drop(c, err)

    # ------------------------------------------------------------------ the selector thread

    def _loop(self) -> None:
        try:
            while not self._closed:
                self._update_interest()
                for key, mask in self._sel.select(timeout=1.0):
                    obj = key.data
                    if obj is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    elif isinstance(obj, _Conn):
                        self._on_conn(obj, mask)
                    elif isinstance(obj, _Forward):
                        self._on_forward_accept(obj)
                    elif isinstance(obj, _Dialing):
                        self._on_dialed(obj)
                self._drain_inbox()
        except Exception:
            log.exception("%s: tunnel thread failed", self.name)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns.values())
            exposes = list(self._exposes.values())
        for c in conns:
            if c.state != "closed":
                if self._dead is None:
                    self._send(FrameType.TCP_CLOSE, c.chan, _U32.pack(errno.ECONNRESET))
                self._drop(c, errno.ECONNRESET)
        for e in exposes:
            if self._dead is None:
                self._send(FrameType.TCP_CLOSE, e.chan, _U32.pack(0))
            self.agent.close_channel(e.chan)
            e.error = e.error or _oserror(errno.ECONNABORTED, "tunnels closed")
            e.ready.set()
        for key in list(self._sel.get_map().values()):
            obj = key.data
            if isinstance(obj, (_Forward, _Dialing)):
                obj.sock.close()
        self._forwards.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        # Calls posted after the loop ended (a forward racing close) still get closed.
        with self._lock:
            late = list(self._inbox)
            self._inbox.clear()
        for target, _ in late:
            if isinstance(target, tuple) and target[0] == "register":
                target[1].sock.close()

    def _update_interest(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            if c.state == "closed":
                continue
            ev = 0
            if c.state == "open" and not c.host_eof and c.credit > 0:
                ev |= selectors.EVENT_READ
            if c.outbuf or (c.guest_eof and not c.wr_shut):
                ev |= selectors.EVENT_WRITE
            try:
                key = self._sel.get_key(c.sock)
            except KeyError:
                key = None
            if key is None and ev:
                self._sel.register(c.sock, ev, c)
            elif key is not None and not ev:
                self._sel.unregister(c.sock)
            elif key is not None and key.events != ev:
                self._sel.modify(c.sock, ev, c)

    def _drain_inbox(self) -> None:
        while True:
            with self._lock:
                if not self._inbox:
                    return
                target, item = self._inbox.popleft()
            if isinstance(target, tuple):
                kind, obj = target
                if kind == "register":
                    self._forwards.append(obj)
                    self._sel.register(obj.sock, selectors.EVENT_READ, obj)
                elif kind == "abort" and obj.state != "closed":
                    self._abort(obj, errno.ECONNRESET, "given up by the caller")
            elif item is None:
                self._on_disconnect(target)
            elif isinstance(target, _Conn):
                self._on_conn_frame(target, item)
            elif isinstance(target, _Expose):
                self._on_expose_frame(target, item)

    def _on_disconnect(self, target: object) -> None:
        self._dead = self._dead or "the agent connection closed"
        if isinstance(target, _Conn):
            target.error = target.error or _oserror(errno.ECONNRESET, f"{target.what}: agent gone")
            self._drop(target, errno.ECONNRESET)
        elif isinstance(target, _Expose):
            target.error = target.error or _oserror(errno.ECONNABORTED, "agent gone")
            target.ready.set()

    # -- frames from the agent

    def _on_conn_frame(self, c: _Conn, f: Frame) -> None:
        if c.state == "closed":
            return
        t = f.type
        if t == FrameType.ERROR:
            code = _U32.unpack_from(f.payload)[0] if len(f.payload) >= 4 else 0
            msg = f.payload[4:].decode("utf-8", "replace")
            if c.state == "connecting":
                c.error = _oserror(code, f"{c.what}: {msg}")
                if c.ready is not None:
                    c.ready.set()
                self._drop(c, errno.ECONNREFUSED)
            else:
                self._abort(c, errno.ECONNRESET, f"agent error {code}: {msg}")
            return
        if t == FrameType.TCP_CONNECTED:
            if c.state != "connecting" or len(f.payload) != 4:
                return self._abort(c, errno.EPROTO, "unexpected TCP_CONNECTED")
            c.credit = min(_U32.unpack(f.payload)[0], MAX_AGENT_WINDOW)
            c.state = "open"
            if c.ready is not None:
                c.ready.set()
            return
        if c.state != "open":
            return self._abort(c, errno.EPROTO, f"frame 0x{t:02x} before TCP_CONNECTED")
        if t == FrameType.TCP_RDATA:
            if c.guest_eof or len(c.outbuf) + len(f.payload) > WINDOW:
                return self._abort(c, errno.ECONNRESET, "agent broke the window or sent after EOF")
            c.outbuf += f.payload
            self._write(c)
        elif t == FrameType.TCP_RCREDIT:
            if len(f.payload) != 4:
                return self._abort(c, errno.EPROTO, "malformed TCP_RCREDIT")
            c.credit = min(c.credit + _U32.unpack(f.payload)[0], MAX_AGENT_WINDOW)
        elif t == FrameType.TCP_EOF:
            c.guest_eof = True
            self._write(c)
        elif t == FrameType.TCP_CLOSED:
            code = _U32.unpack(f.payload)[0] if len(f.payload) == 4 else errno.EPROTO
            self.agent.close_channel(c.chan)
            if code:
                self._drop(c, code)
            else:
                c.agent_closed = True
                c.guest_eof = True
                self._write(c)
        else:
            self._abort(c, errno.EPROTO, f"unexpected frame type 0x{t:02x}")

    def _on_expose_frame(self, e: _Expose, f: Frame) -> None:
        if f.type == FrameType.OK:
            e.ready.set()
        elif f.type == FrameType.ERROR:
            code = _U32.unpack_from(f.payload)[0] if len(f.payload) >= 4 else 0
            msg = f.payload[4:].decode("utf-8", "replace")
            e.error = _oserror(code, f"{self.name}: guest port {e.guest_port}: {msg}")
            e.ready.set()
        elif f.type == FrameType.TCP_ACCEPT and len(f.payload) == 4:
            (conn_id,) = _U32.unpack(f.payload)
            if e.pending >= MAX_PENDING_ACCEPTS:
                self._send(FrameType.TCP_REJECT, e.chan, _REJECT.pack(conn_id, errno.ECONNREFUSED))
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            rc = sock.connect_ex(("127.0.0.1", e.host_port))
            if rc not in (0, errno.EINPROGRESS):
                sock.close()
                self._send(FrameType.TCP_REJECT, e.chan, _REJECT.pack(conn_id, rc))
                return
            e.pending += 1
            d = _Dialing(e, conn_id, sock)
            self._sel.register(sock, selectors.EVENT_WRITE, d)
        else:
            log.debug("%s: unexpected frame 0x%02x on an expose channel", self.name, f.type)

    # -- host sockets

    def _on_dialed(self, d: _Dialing) -> None:
        self._sel.unregister(d.sock)
        e = d.expose
        e.pending -= 1
        err = d.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        with self._lock:
            alive = e.chan in self._exposes and not self._closed
        if err or not alive:
            d.sock.close()
            if alive:
                self._send(
                    FrameType.TCP_REJECT, e.chan, _REJECT.pack(d.conn_id, err or errno.ECONNREFUSED)
                )
            return
        d.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(d.sock, f"guest port {e.guest_port} -> host port {e.host_port}")
        c.chan = self.agent.open_channel(_Sink(self, c))
        with self._lock:
            self._conns[c.chan] = c
        self._send(FrameType.TCP_ATTACH, c.chan, _ATTACH.pack(e.chan, d.conn_id, WINDOW))

    def _on_forward_accept(self, fw: _Forward) -> None:
        for _ in range(64):
            try:
                sock, _addr = fw.sock.accept()  # non-blocking listener: never waits
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("%s: accept on a forward failed: %s", self.name, e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(sock, f"host port {fw.sock.getsockname()[1]} -> guest port {fw.guest_port}")
            try:
                self._start_connect(c, fw.guest_port)
            except (AgentDisconnected, RuntimeError):
                _reset(sock)
                return

    def _on_conn(self, c: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write(c)
        if c.state == "open" and mask & selectors.EVENT_READ:
            self._read(c)

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(min(CHUNK, c.credit))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._abort(c, e.errno or errno.ECONNRESET, f"host socket: {e}")
        if not data:
            c.host_eof = True
            self._send(FrameType.TCP_SHUTDOWN, c.chan)
            return
        c.credit -= len(data)
        self._send(FrameType.TCP_DATA, c.chan, data)

    def _write(self, c: _Conn) -> None:
        if c.state == "closed":
            return
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return self._abort(c, errno.ECONNRESET, f"host socket: {e}")
            del c.outbuf[:n]
            c.delivered += n
        # In quarters of the window (not per write): a small exchange costs one frame each way.
        if c.delivered >= WINDOW // 4 and not c.agent_closed:
            self._send(FrameType.TCP_CREDIT, c.chan, _U32.pack(c.delivered))
            c.delivered = 0
        if c.outbuf:
            return
        if c.guest_eof and not c.wr_shut:
            c.wr_shut = True
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if c.agent_closed:
            self._drop(c, None)


def _check_port(port: int, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be a TCP port 1..65535, not {port!r}")
