"""virtio-vsock (device id 19) with Firecracker's Unix-socket convention on the host side.

Host-initiated: a client connects to the Unix socket ``uds_path`` and sends ``CONNECT <port>\\n``;
the device sends OP_REQUEST to guest port ``<port>`` from a fresh host port and, once the guest
answers OP_RESPONSE, writes ``OK <hostport>\\n`` to the client; from then on the client's
socket is the stream. Guest-initiated: OP_REQUEST to host port P connects to the Unix socket
``<uds_path>_<P>``. Streams only, with credit-based flow control: we advertise ``BUF_ALLOC``
bytes of receive buffer and count what we forwarded (``fwd_cnt``); we send the guest no more
than its advertised ``buf_alloc`` minus what it has not yet consumed.

Threading: every piece of processing (queues and sockets) runs on the EventLoop's thread under
the device lock; the vCPU thread's queue notifications are handed over with
``call_soon_threadsafe``. Sockets are only registered, unregistered and closed on that thread,
so an fd is never closed while the loop could still select on it.

Everything the guest sends is hostile: a bad length, unknown op or type, wrong CIDs, data
beyond the credit we gave, or a packet for an unknown connection gets that connection reset
(OP_RST) and a log line; the device keeps serving. Connections are not part of
:meth:`VirtioVsock.state`; whether the snapshot had any is (``idle``). After a restore or
rollback the machine calls :meth:`after_restore`: from an idle snapshot (the engine closes its
agent connection and lets it settle before a snapshot) the guest has no connection to lose, so
the host's live ones are just closed and the host may connect at once; otherwise the device
posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, the guest drops its stale connections and its
listeners start over.

A host client that connects after the reset was posted but before the guest handled it would
be reset with the stale ones: Linux handles the rx queue before the event queue, so the
guest would accept it (OP_RESPONSE, the client gets ``OK``) and then drop it on the reset. So
host connections wait (``deferred``) until the guest refills the event queue (its notify after
handling the event) or :data:`RESET_GRACE_S` passed.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_ignition.vmm.devices.virtio.mmio import VirtioDevice
from pytest_ignition.vmm.devices.virtio.queue import DescriptorChain
from pytest_ignition.vmm.devices.virtio.ratelimit import GuestLog
from pytest_ignition.vmm.memory import GuestMemoryError

log = GuestLog(logging.getLogger(__name__))
# Linux creates the socket close-on-exec atomically; elsewhere (macOS) Python makes every new
# socket non-inheritable anyway (PEP 446).
_SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)

VIRTIO_ID_VSOCK = 19
HOST_CID = 2
DEFAULT_GUEST_CID = 3

RX, TX, EVT = 0, 1, 2

HDR = struct.Struct(
    "<QQIIIHHIII"
)  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
TYPE_STREAM = 1

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

EVENT_TRANSPORT_RESET = 0

BUF_ALLOC = 256 * 1024  # what we let the guest have in flight towards one host socket
MAX_PKT = 64 * 1024  # Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
MAX_PENDING_CTRL = 4096  # control replies queued while the guest gives us no rx buffers
HANDSHAKE_MAX = 64
MAX_CONNECTIONS = 1024  # guest-initiated connections cost the VMM a file descriptor each
FIRST_HOST_PORT = 1 << 30
FLUSH_RETRY_S = 0.01

_CONNECT = re.compile(rb"CONNECT (\d{1,10})\n")
# How long host connections wait for the guest to handle a transport reset (see the docstring).
RESET_GRACE_S = 5.0

# Connection states.
LOCAL_INIT = "local-init"  # host-initiated, OP_REQUEST sent, waiting for OP_RESPONSE
ESTABLISHED = "established"
HALF_CLOSED = (
    "half-closed"  # the host sent EOF and we told the guest (SHUTDOWN SEND); it may still send
)


class EventLoopLike:  # the subset of vmm.eventloop.EventLoop used here (for type hints)
    def add_reader(self, fd: int, cb: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None: ...


@dataclass(eq=False)
class Connection:
    local_port: int
    peer_port: int
    sock: socket.socket
    state: str
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes we sent the guest
    rx_cnt: int = 0  # bytes the guest sent us
    fwd_cnt: int = 0  # of those, written to the host socket
    fwd_cnt_told: int = 0  # the fwd_cnt the guest last heard from us
    to_host: bytearray = field(default_factory=bytearray)
    to_guest: bytearray = field(default_factory=bytearray)
    host_eof: bool = False
    peer_shut_send: bool = False
    peer_shut_rcv: bool = False
    shutdown_pending: bool = False
    credit_update_queued: bool = False
    reading: bool = False
    in_rx_ready: bool = False
    flush_scheduled: bool = False
    closed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def peer_credit(self) -> int:
        """Bytes the guest can still take, by its last advertisement."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF))


@dataclass
class _Ctrl:
    op: int
    local_port: int
    peer_port: int
    flags: int = 0
    conn: Connection | None = None


class VirtioVsock(VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    queue_sizes = (256, 256, 256)

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        loop: EventLoopLike,
        guest_cid: int = DEFAULT_GUEST_CID,
    ):
        super().__init__()
        if guest_cid <= 2 or guest_cid >= 0xFFFF_FFFF:
            raise ValueError(f"guest CID {guest_cid} is reserved")
        self.uds_path = os.fspath(uds_path)
        self.loop = loop
        self.guest_cid = guest_cid
        self.conns: dict[tuple[int, int], Connection] = {}
        self.pending_ctrl: collections.deque[_Ctrl] = collections.deque()
        self.rx_ready: collections.deque[Connection] = collections.deque()
        self.handshakes: dict[int, tuple[socket.socket, bytearray]] = {}
        self.evt_pending = 0
        self._reset_unhandled = False  # a transport reset the guest has not handled yet
        self._restored_idle = False  # the state last loaded had no connection open
        self.deferred: list[tuple[socket.socket, int, bytes]] = []  # (client, port, early data)
        self._notify_pending: set[int] = set()
        self.next_host_port = FIRST_HOST_PORT
        self.closed = False
        try:
            os.unlink(self.uds_path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _SOCK_CLOEXEC)
        self.listener.bind(self.uds_path)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._locked(self._on_accept))

    # -- plumbing --------------------------------------------------------------------------
    def _locked(self, fn: Callable[..., object], *args: object) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                if self.closed:
                    return
                try:
                    fn(*args)
                except Exception:
                    log.exception(
                        "virtio-vsock: %s failed; device keeps serving", getattr(fn, "__name__", fn)
                    )

        return run

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(self._locked(fn, *args))

    def close(self) -> None:
        """Stop serving: close the listener, every connection, and remove the socket file."""

        def shut() -> None:
            with self.lock:
                self.closed = True
                self.loop.remove_reader(self.listener.fileno())
                self.listener.close()
                for sock, _ in self.handshakes.values():
                    self._close_sock(sock)
                self.handshakes.clear()
                for sock, _, _ in self.deferred:
                    self._close_sock(sock)
                self.deferred.clear()
                for conn in list(self.conns.values()):
                    self._drop(conn)
            try:
                os.unlink(self.uds_path)
            except FileNotFoundError:
                pass

        if getattr(self.loop, "running", True):
            self.loop.call_soon_threadsafe(shut)
        else:
            shut()

    def _close_sock(self, sock: socket.socket) -> None:
        try:
            self.loop.remove_reader(sock.fileno())
        except (OSError, ValueError):
            pass
        sock.close()

    # -- virtio device interface (vCPU thread, under the lock) ----------------------------
    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def activate(self) -> bool:
        if not all(q.state.ready for q in self.queues):
            log.warning("virtio-vsock: DRIVER_OK with queues not ready")
            return False
        super().activate()
        self._post(self._process_rx)
        return True

    def reset(self) -> None:
        super().reset()
        old = list(self.conns.values())
        self.conns = {}
        self.pending_ctrl.clear()
        self.rx_ready.clear()
        self.evt_pending = 0

        def drop_old() -> None:
            for conn in old:
                self._drop(conn)

        self._post(drop_old)

    def queue_notify(self, index: int) -> None:
        # Coalesce: a guest hammering QUEUE_NOTIFY must not pile up callbacks on the loop.
        if index not in self._notify_pending:
            self._notify_pending.add(index)
            self._post(self._on_notify, index)

    def send_transport_reset(self) -> None:
        """Post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drop every connection (any thread)."""
        self._post(self._transport_reset)

    def after_restore(self) -> None:
        """The guest now runs from the state last loaded (restore or rollback; any thread).

        From an idle snapshot the guest has no connection: the host's live ones (of the run
        since) are closed without a word to the guest, and new ones go through at once.
        Otherwise the guest holds connections the host no longer has: transport reset."""
        self._post(self._drop_host_side if self._restored_idle else self._transport_reset)

    def idle(self) -> bool:
        """No connection open or being made, nothing queued for the guest (under the lock)."""
        return not (self.conns or self.handshakes or self.deferred or self.pending_ctrl)

    def debug_state(self) -> dict[str, Any]:
        """What the host side holds, for the VMM's probe (under the lock): connections and
        the bytes queued each way, control packets and connections waiting for RX buffers."""
        return {
            "conns": len(self.conns),
            "handshakes": len(self.handshakes),
            "deferred": len(self.deferred),
            "pending_ctrl": len(self.pending_ctrl),
            "rx_ready": len(self.rx_ready),
            "to_guest": sum(len(c.to_guest) for c in self.conns.values()),
            "to_host": sum(len(c.to_host) for c in self.conns.values()),
            "evt_pending": self.evt_pending,
            "reset_unhandled": self._reset_unhandled,
        }

    def state(self) -> dict:
        d = super().state()
        d["guest_cid"] = self.guest_cid
        d["idle"] = self.idle()
        return d

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.guest_cid = int(state["guest_cid"])
        self._restored_idle = state.get("idle") is True  # absent in older snapshots: reset

    # -- queue processing (loop thread) ---------------------------------------------------
    def _on_notify(self, index: int) -> None:
        self._notify_pending.discard(index)
        if not self.active:
            return
        if index == TX:
            self.process_queue(TX, self._tx_packet)
            self._process_rx()
        elif index == RX:
            self._process_rx()
        elif index == EVT:
            self._process_evt()
            if self._reset_unhandled and not self.evt_pending:
                self._release_deferred()  # the guest handled the reset and refilled the queue

    def _drop_host_side(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.pending_ctrl.clear()
        self.rx_ready.clear()

    def _transport_reset(self) -> None:
        self._drop_host_side()
        self.evt_pending += 1
        self._reset_unhandled = True
        call_later = getattr(self.loop, "call_later", None)
        if call_later is not None:
            call_later(RESET_GRACE_S, self._locked(self._release_deferred))
        self._process_evt()

    def _release_deferred(self) -> None:
        """Start the host connections that waited for the guest to handle the reset."""
        self._reset_unhandled = False
        waiting, self.deferred = self.deferred, []
        for sock, port, early in waiting:
            self._connect_guest(sock, port, early)

    def _process_evt(self) -> None:
        if not self.active or not self.evt_pending:
            return
        q, mem = self.queues[EVT], self.mem
        used = 0
        while self.evt_pending:
            chain, bad = q.pop_valid(mem, log, "virtio-vsock: event queue")
            used += bad
            if chain is None:
                break
            if chain.writable_len < 4:
                q.add_used(mem, chain.head, 0)
            else:
                q.add_used(
                    mem, chain.head, chain.write(mem, struct.pack("<I", EVENT_TRANSPORT_RESET))
                )
                self.evt_pending -= 1
            used += 1
        if used:
            self.signal_used(EVT)

    def _tx_packet(self, chain: DescriptorChain) -> int:
        mem = self.mem
        if chain.readable_len < HDR.size:
            log.warning("virtio-vsock: tx chain of %d bytes has no header", chain.readable_len)
            return 0
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc, fwd_cnt) = (
            HDR.unpack(chain.read(mem, 0, HDR.size))
        )
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        problem = None
        if src_cid != self.guest_cid or dst_cid != HOST_CID:
            problem = f"CIDs {src_cid}->{dst_cid}, expected {self.guest_cid}->{HOST_CID}"
        elif length > MAX_PKT or length > chain.readable_len - HDR.size:
            problem = f"len {length} (chain has {chain.readable_len - HDR.size})"
        elif typ != TYPE_STREAM:
            problem = f"socket type {typ}"
        elif op != OP_RW and length:
            problem = f"op {op} with payload"
        if problem:
            log.warning("virtio-vsock: bad packet %d->%d: %s; reset", src_port, dst_port, problem)
            self._reset_conn(conn, dst_port, src_port, reply=op != OP_RST)
            return 0
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            if conn is not None:
                log.warning("virtio-vsock: duplicate REQUEST for %s; reset", key)
                self._reset_conn(conn, dst_port, src_port)
            else:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return 0
        if conn is None:
            if op != OP_RST:
                log.info("virtio-vsock: op %d for unknown connection %s; reset", op, key)
                self._queue_ctrl(_Ctrl(OP_RST, dst_port, src_port))
            return 0
        if op == OP_RST:
            self._drop(conn)
        elif op == OP_RESPONSE:
            if conn.state != LOCAL_INIT:
                log.warning("virtio-vsock: unexpected RESPONSE for %s; reset", key)
                self._reset_conn(conn, dst_port, src_port)
            else:
                self._host_connected(conn)
        elif conn.state == LOCAL_INIT:
            log.warning("virtio-vsock: op %d before RESPONSE on %s; reset", op, key)
            self._reset_conn(conn, dst_port, src_port)
        elif op == OP_RW:
            self._guest_data(conn, chain, length)
        elif op == OP_CREDIT_UPDATE:
            pass  # the credit fields were taken above
        elif op == OP_CREDIT_REQUEST:
            self._queue_credit_update(conn)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        else:
            log.warning("virtio-vsock: unknown op %d on %s; reset", op, key)
            self._reset_conn(conn, dst_port, src_port)
        if not conn.closed:
            self._schedule_rx(conn)
            self._update_reading(conn)
        return 0

    def _process_rx(self) -> None:
        if not self.active or not self.queues[RX].state.ready:
            return
        q, mem = self.queues[RX], self.mem
        used = 0
        while True:
            item = self._next_rx_item()
            if item is None:
                break
            chain, bad = q.pop_valid(mem, log, "virtio-vsock: rx queue")
            used += bad
            if chain is None:
                break
            if chain.writable_len < HDR.size:
                log.warning("virtio-vsock: rx buffer of %d bytes is too small", chain.writable_len)
                q.add_used(mem, chain.head, 0)
                used += 1
                continue
            try:
                n = self._fill_rx(chain, item)
            except GuestMemoryError as e:  # cannot happen for a checked chain; defensive
                log.warning("virtio-vsock: rx: %s", e)
                n = 0
            q.add_used(mem, chain.head, n)
            used += 1
        if used:
            self.signal_used(RX)
            for conn in list(self.conns.values()):
                self._update_reading(conn)

    def _next_rx_item(self) -> _Ctrl | Connection | None:
        while self.pending_ctrl:
            ctrl = self.pending_ctrl[0]
            if ctrl.conn is not None and ctrl.conn.closed and ctrl.op != OP_RST:
                self.pending_ctrl.popleft()
                continue
            return ctrl
        while self.rx_ready:
            conn = self.rx_ready[0]
            if not conn.closed and self._has_rx_work(conn):
                return conn
            self.rx_ready.popleft()
            conn.in_rx_ready = False
        return None

    @staticmethod
    def _has_rx_work(conn: Connection) -> bool:
        if conn.to_guest:
            return conn.peer_credit() > 0
        return conn.shutdown_pending

    def _header(
        self,
        op: int,
        local: int,
        peer: int,
        length: int = 0,
        flags: int = 0,
        conn: Connection | None = None,
    ) -> bytes:
        fwd = 0
        if conn is not None:
            fwd = conn.fwd_cnt & 0xFFFF_FFFF
            conn.fwd_cnt_told = conn.fwd_cnt
        return HDR.pack(
            HOST_CID, self.guest_cid, local, peer, length, TYPE_STREAM, op, flags, BUF_ALLOC, fwd
        )

    def _fill_rx(self, chain: DescriptorChain, item: _Ctrl | Connection) -> int:
        mem = self.mem
        if isinstance(item, _Ctrl):
            self.pending_ctrl.popleft()
            if item.op == OP_CREDIT_UPDATE and item.conn is not None:
                item.conn.credit_update_queued = False
            return chain.write(
                mem,
                self._header(
                    item.op, item.local_port, item.peer_port, flags=item.flags, conn=item.conn
                ),
            )
        conn = item
        self.rx_ready.popleft()
        conn.in_rx_ready = False
        if conn.to_guest:
            n = min(len(conn.to_guest), conn.peer_credit(), chain.writable_len - HDR.size, MAX_PKT)
            payload = bytes(conn.to_guest[:n])
            del conn.to_guest[:n]
            conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFF_FFFF
            written = chain.write(
                mem, self._header(OP_RW, conn.local_port, conn.peer_port, n, conn=conn) + payload
            )
        else:  # shutdown_pending: the host closed and everything it sent is delivered
            conn.shutdown_pending = False
            conn.state = HALF_CLOSED
            written = chain.write(
                mem,
                self._header(
                    OP_SHUTDOWN,
                    conn.local_port,
                    conn.peer_port,
                    # Only SEND: a Unix socket's EOF may be a half-close, so the guest may still
                    # write; if the host really closed, that write fails and resets the stream.
                    flags=SHUTDOWN_SEND,
                    conn=conn,
                ),
            )
        self._schedule_rx(conn)
        return written

    # -- connection events (loop thread) ---------------------------------------------------
    def _queue_ctrl(self, ctrl: _Ctrl) -> None:
        if len(self.pending_ctrl) >= MAX_PENDING_CTRL:
            log.warning(
                "virtio-vsock: %d control packets pending; dropping op %d",
                len(self.pending_ctrl),
                ctrl.op,
            )
            return
        self.pending_ctrl.append(ctrl)

    def _queue_credit_update(self, conn: Connection) -> None:
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self._queue_ctrl(_Ctrl(OP_CREDIT_UPDATE, conn.local_port, conn.peer_port, conn=conn))

    def _schedule_rx(self, conn: Connection) -> None:
        if not conn.in_rx_ready and not conn.closed and self._has_rx_work(conn):
            conn.in_rx_ready = True
            self.rx_ready.append(conn)

    def _reset_conn(
        self, conn: Connection | None, local: int, peer: int, reply: bool = True
    ) -> None:
        if conn is not None:
            self._drop(conn)
        if reply:
            self._queue_ctrl(_Ctrl(OP_RST, local, peer))

    def _drop(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._close_sock(conn.sock)
        conn.reading = False

    def _update_reading(self, conn: Connection) -> None:
        want = (
            not conn.closed
            and conn.state == ESTABLISHED
            and not conn.host_eof
            and not conn.peer_shut_rcv
            and len(conn.to_guest) < MAX_PKT
            and conn.peer_credit() > len(conn.to_guest)
        )
        if want and not conn.reading:
            self.loop.add_reader(conn.sock.fileno(), self._locked(self._on_host_readable, conn))
            conn.reading = True
        elif not want and conn.reading:
            self.loop.remove_reader(conn.sock.fileno())
            conn.reading = False

    def _guest_connect(self, port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            log.warning("virtio-vsock: %d connections open; guest connect refused", len(self.conns))
            self._queue_ctrl(_Ctrl(OP_RST, port, peer_port))
            return
        path = f"{self.uds_path}_{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as e:
            log.info("virtio-vsock: guest connect to port %d (%s) failed: %s", port, path, e)
            sock.close()
            self._queue_ctrl(_Ctrl(OP_RST, port, peer_port))
            return
        conn = Connection(
            port, peer_port, sock, ESTABLISHED, peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt
        )
        self.conns[conn.key] = conn
        self._queue_ctrl(_Ctrl(OP_RESPONSE, port, peer_port, conn=conn))
        self._update_reading(conn)

    def _host_connected(self, conn: Connection) -> None:
        try:
            conn.sock.sendall(f"OK {conn.local_port}\n".encode())
        except OSError as e:
            log.info("virtio-vsock: host client for port %d went away: %s", conn.peer_port, e)
            self._reset_conn(conn, conn.local_port, conn.peer_port)
            return
        conn.state = ESTABLISHED

    def _guest_data(self, conn: Connection, chain: DescriptorChain, length: int) -> None:
        if conn.peer_shut_send:
            log.warning("virtio-vsock: data after SHUTDOWN(SEND) on %s; reset", conn.key)
            self._reset_conn(conn, conn.local_port, conn.peer_port)
            return
        if conn.rx_cnt - conn.fwd_cnt + length > BUF_ALLOC:
            log.warning(
                "virtio-vsock: guest sent %d bytes beyond its credit on %s; reset", length, conn.key
            )
            self._reset_conn(conn, conn.local_port, conn.peer_port)
            return
        conn.to_host += chain.read(self.mem, HDR.size, length)
        conn.rx_cnt += length
        self._flush_to_host(conn)

    def _flush_to_host(self, conn: Connection) -> None:
        conn.flush_scheduled = False
        if conn.closed:
            return
        while conn.to_host:
            try:
                n = conn.sock.send(conn.to_host)
            except BlockingIOError:
                self._retry_flush(conn)
                break
            except OSError as e:
                log.info("virtio-vsock: host socket for %s failed: %s; reset", conn.key, e)
                self._reset_conn(conn, conn.local_port, conn.peer_port)
                return
            del conn.to_host[:n]
            conn.fwd_cnt += n
        if conn.fwd_cnt - conn.fwd_cnt_told >= BUF_ALLOC // 4:
            self._queue_credit_update(conn)
        if not conn.to_host and conn.peer_shut_send:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._process_rx()

    def _retry_flush(self, conn: Connection) -> None:
        # A timer on the event loop; the guest is held back by its credit meanwhile.
        if conn.flush_scheduled:
            return
        conn.flush_scheduled = True
        self.loop.call_later(FLUSH_RETRY_S, lambda: self._post(self._flush_to_host, conn))

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if flags & SHUTDOWN_SEND:
            conn.peer_shut_send = True
        if flags & SHUTDOWN_RCV:
            conn.peer_shut_rcv = True
            conn.to_guest.clear()
        if conn.peer_shut_send and conn.peer_shut_rcv:
            # The guest closed: forward what we still hold, then confirm with RST.
            if conn.to_host:
                try:
                    conn.sock.send(conn.to_host)
                except OSError:
                    pass
            self._reset_conn(conn, conn.local_port, conn.peer_port)
        elif conn.peer_shut_send and not conn.to_host:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _on_host_readable(self, conn: Connection) -> None:
        if conn.closed or not conn.reading:
            return
        room = min(MAX_PKT, conn.peer_credit()) - len(conn.to_guest)
        if room <= 0:
            self._update_reading(conn)
            return
        try:
            data = conn.sock.recv(room)
        except BlockingIOError:
            return
        except OSError as e:
            log.info("virtio-vsock: host socket for %s failed: %s; reset", conn.key, e)
            self._reset_conn(conn, conn.local_port, conn.peer_port)
            self._process_rx()
            return
        if data:
            conn.to_guest += data
        else:
            conn.host_eof = True
            conn.shutdown_pending = True
        self._schedule_rx(conn)
        self._update_reading(conn)
        self._process_rx()

    # -- host clients of uds_path (loop thread) ----------------------------------------------
    def _on_accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("virtio-vsock: accept failed: %s", e)
                return
            sock.setblocking(False)
            self.handshakes[sock.fileno()] = (sock, bytearray())
            self.loop.add_reader(sock.fileno(), self._locked(self._on_handshake, sock))

    def _on_handshake(self, sock: socket.socket) -> None:
        entry = self.handshakes.get(sock.fileno())
        if entry is None or entry[0] is not sock:
            return
        buf = entry[1]
        try:
            data = sock.recv(HANDSHAKE_MAX - len(buf))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        nl = buf.find(b"\n")
        if not data or (nl < 0 and len(buf) >= HANDSHAKE_MAX):
            log.info("virtio-vsock: host client closed or sent no CONNECT line")
            del self.handshakes[sock.fileno()]
            self._close_sock(sock)
            return
        if nl < 0:
            return
        del self.handshakes[sock.fileno()]
        m = _CONNECT.fullmatch(bytes(buf[: nl + 1]))
        port = int(m.group(1)) if m else -1
        if not 0 <= port <= 0xFFFF_FFFF:
            log.info("virtio-vsock: bad handshake %r", bytes(buf[: nl + 1]))
            self._close_sock(sock)
            return
        self.loop.remove_reader(sock.fileno())
        early = bytes(buf[nl + 1 :])  # anything sent ahead of OK goes to the guest once connected
        if self._reset_unhandled and len(self.deferred) < MAX_CONNECTIONS:
            self.deferred.append((sock, port, early))
            return
        self._connect_guest(sock, port, early)

    def _connect_guest(self, sock: socket.socket, port: int, early: bytes) -> None:
        local = self._alloc_host_port(port)
        conn = Connection(local, port, sock, LOCAL_INIT)
        conn.to_guest += early
        self.conns[conn.key] = conn
        self._queue_ctrl(_Ctrl(OP_REQUEST, local, port, conn=conn))
        self._process_rx()

    def _alloc_host_port(self, peer_port: int) -> int:
        while True:
            port = self.next_host_port
            self.next_host_port = FIRST_HOST_PORT + ((port + 1 - FIRST_HOST_PORT) % (1 << 30))
            if (port, peer_port) not in self.conns:
                return port
