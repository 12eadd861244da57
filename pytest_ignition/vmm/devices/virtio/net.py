"""virtio-net (device id 1) with a backend speaking passt's stream protocol.

The backend is one Unix stream socket carrying Ethernet frames, each preceded by its length as a
4-byte big-endian integer: what passt (``network=user``) and QEMU's ``-netdev stream`` speak, and
what the ``ignition_network`` switch accepts. :class:`StreamBackend` either connects to a path
(passt listens) or listens on one and takes the newest peer (the switch connects after a
restore). Without a peer, frames the guest sends are dropped, as on an unplugged cable.

Features: VERSION_1, MAC, STATUS (link always up); no offloads and no mergeable buffers, so every
frame is at most ``MAX_FRAME`` bytes (the guest's MTU must stay at 1500: passt is told so by the
host side) and every RX buffer holds one 12-byte header plus one whole frame.

Threading as in vsock: the vCPU thread only posts queue notifications to the VM's EventLoop;
queues and the socket are served on the loop thread under the device lock.

Everything the guest sends is hostile: a TX chain without a header or longer than a frame can
be, or an RX buffer too small for the frame at hand, is logged (rate-limited) and dropped; the
device keeps serving. The backend is bounded too: at most ``MAX_BACKLOG`` bytes are queued
towards it (TX stops popping until it drains: back-pressure on the guest) and at most
``RX_BACKLOG`` frames wait for guest buffers (the socket is not read meanwhile: back-pressure on
the peer); a length prefix larger than a frame disconnects the peer. Frames in flight are not
part of :meth:`VirtioNet.state`: after a restore the new process starts with an empty backlog.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable

from pytest_ignition.vmm.devices.virtio.mmio import VirtioDevice
from pytest_ignition.vmm.devices.virtio.queue import DescriptorChain
from pytest_ignition.vmm.devices.virtio.ratelimit import GuestLog

log = GuestLog(logging.getLogger(__name__))
# Linux creates the socket close-on-exec atomically; elsewhere (macOS) Python makes every new
# socket non-inheritable anyway (PEP 446).
_SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)

VIRTIO_ID_NET = 1
RX, TX = 0, 1

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

HDR_SIZE = 12  # struct virtio_net_hdr_v1 (num_buffers included with VERSION_1)
MIN_FRAME = 14  # an Ethernet header
MAX_FRAME = 65535 + 14  # passt's own limit (a 16-bit IP length plus the Ethernet header)
MAX_BACKLOG = 1 << 20  # bytes queued towards the backend before TX stops popping
RX_BACKLOG = 256  # frames from the backend waiting for guest buffers
_LEN = struct.Struct(">I")


class EventLoopLike:  # the subset of vmm.eventloop.EventLoop used here
    def add_reader(self, fd: int, cb: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def add_writer(self, fd: int, cb: Callable[[], object]) -> None: ...
    def remove_writer(self, fd: int) -> None: ...
    def call_soon_threadsafe(self, fn: Callable[[], object]) -> None: ...


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r}: write six hex pairs, e.g. 52:54:00:12:34:56")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r}: not hexadecimal") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {text}: a multicast address cannot be a NIC's")
    return mac


class StreamBackend:
    """The host end: ``connect:PATH`` (to passt) or ``listen:PATH`` (for the network switch).

    Runs on the device's event loop (every method but :meth:`close` is called there, under the
    device lock). ``on_frame(frame)`` gets each complete frame; ``wants_frames()`` says whether
    more may be read now.
    """

    def __init__(self, spec: str, loop: EventLoopLike) -> None:
        mode, sep, path = spec.partition(":")
        if not sep or mode not in ("connect", "listen") or not path:
            raise ValueError(f"net backend {spec!r}: write connect:PATH or listen:PATH")
        self.mode, self.path, self.loop = mode, path, loop
        self.peer: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.reading = False
        self.writing = False
        self.on_frame: Callable[[bytes], None] = lambda frame: None
        self.wants_frames: Callable[[], bool] = lambda: True
        self.on_drained: Callable[[], None] = lambda: None
        self.lock_wrap: Callable[[Callable[[], None]], Callable[[], None]] = lambda fn: fn
        self.frames_in = self.frames_out = self.dropped = 0

    def start(self) -> None:
        if self.mode == "connect":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _SOCK_CLOEXEC)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                raise
            self._set_peer(s)
        else:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _SOCK_CLOEXEC)
            ls.bind(self.path)
            ls.listen(4)
            ls.setblocking(False)
            self.listener = ls
            self.loop.add_reader(ls.fileno(), self.lock_wrap(self._on_accept))

    # -- peer management

    def _set_peer(self, s: socket.socket) -> None:
        s.setblocking(False)
        self.peer = s
        self.inbuf.clear()
        self.outbuf.clear()
        self.reading = self.writing = False
        self.update()

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            s, _ = self.listener.accept()  # non-blocking listener: never waits
        except (BlockingIOError, InterruptedError):
            return
        if self.peer is not None:  # the newest peer wins (a switch that reconnects)
            self._drop_peer("replaced by a new connection")
        self._set_peer(s)

    def _drop_peer(self, why: str) -> None:
        s, self.peer = self.peer, None
        if s is None:
            return
        log.info("virtio-net: backend peer gone (%s)", why)
        if self.reading:
            self.loop.remove_reader(s.fileno())
        if self.writing:
            self.loop.remove_writer(s.fileno())
        self.reading = self.writing = False
        s.close()
        self.inbuf.clear()
        self.outbuf.clear()

    def update(self) -> None:
        """(Un)register for reading and writing as the buffers and the guest allow."""
        s = self.peer
        if s is None:
            return
        if self.inbuf and self.wants_frames() and not self._split():
            return  # frames read ahead of the guest's buffers, handed on now; or a bad one
        want_read = self.wants_frames()
        if want_read != self.reading:
            if want_read:
                self.loop.add_reader(s.fileno(), self.lock_wrap(self._on_readable))
            else:
                self.loop.remove_reader(s.fileno())
            self.reading = want_read
        want_write = bool(self.outbuf)
        if want_write != self.writing:
            if want_write:
                self.loop.add_writer(s.fileno(), self.lock_wrap(self._on_writable))
            else:
                self.loop.remove_writer(s.fileno())
            self.writing = want_write

    # -- towards the peer

    def can_send(self) -> bool:
        return len(self.outbuf) < MAX_BACKLOG

    def send(self, frame: bytes) -> None:
        if self.peer is None:
            self.dropped += 1
            return
        self.outbuf += _LEN.pack(len(frame))
        self.outbuf += frame
        self.frames_out += 1

    def flush(self) -> None:
        s = self.peer
        while s is not None and self.outbuf:
            try:
                n = s.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._drop_peer(f"send: {e}")
                return
            del self.outbuf[:n]
        self.update()

    def _on_writable(self) -> None:
        self.flush()
        if self.can_send():
            self.on_drained()

    # -- from the peer

    def _on_readable(self) -> None:
        s = self.peer
        if s is None:
            return
        for _ in range(16):
            if not self.wants_frames():
                break
            try:
                data = s.recv(256 * 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return self._drop_peer(f"recv: {e}")
            if not data:
                return self._drop_peer("end of stream")
            self.inbuf += data
            if not self._split():
                return
        self.update()

    def _split(self) -> bool:
        buf = self.inbuf
        pos = 0
        # Frames past the backlog stay here, undecoded (at most one read's worth): update()
        # hands them on once the guest posts buffers.
        while len(buf) - pos >= _LEN.size and self.wants_frames():
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME:
                self._drop_peer(f"frame length {n} exceeds {MAX_FRAME}")
                return False
            if len(buf) - pos - _LEN.size < n:
                break
            start = pos + _LEN.size
            frame = bytes(buf[start : start + n])
            pos = start + n
            self.frames_in += 1
            self.on_frame(frame)
        del buf[:pos]
        return True

    def close(self) -> None:
        self._drop_peer("closed")
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class VirtioNet(VirtioDevice):
    device_type = VIRTIO_ID_NET
    queue_sizes = (256, 256)

    def __init__(self, backend: str, loop: EventLoopLike, mac: str = "52:54:00:12:34:56") -> None:
        super().__init__()
        self.mac = parse_mac(mac)
        self.loop = loop
        self.avail_features |= VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        self.rx_frames: collections.deque[bytes] = collections.deque()
        self.closed = False
        self._notify_pending: set[int] = set()
        self.backend = StreamBackend(backend, loop)
        self.backend.on_frame = self._from_backend
        self.backend.wants_frames = lambda: len(self.rx_frames) < RX_BACKLOG
        self.backend.on_drained = lambda: self._on_notify(TX)
        self.backend.lock_wrap = self._locked
        try:
            self.backend.start()
        except OSError as e:
            raise OSError(
                e.errno or errno.EIO, f"net backend {backend}: {e.strerror or e}"
            ) from None

    # -- plumbing -------------------------------------------------------------------------
    def _locked(self, fn: Callable[..., object], *args: object) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                if self.closed:
                    return
                try:
                    fn(*args)
                except Exception:
                    log.exception("virtio-net: %s failed; device keeps serving", fn)

        return run

    def close(self) -> None:
        def shut() -> None:
            with self.lock:
                self.closed = True
                self.backend.close()

        if getattr(self.loop, "running", True):
            self.loop.call_soon_threadsafe(shut)
        else:
            shut()

    # -- virtio device interface (vCPU thread) ------------------------------------------
    def config_space(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP)

    def activate(self) -> bool:
        if not all(q.state.ready for q in self.queues):
            log.warning("virtio-net: DRIVER_OK with queues not ready")
            return False
        super().activate()
        self.loop.call_soon_threadsafe(self._locked(self._after_activate))
        return True

    def reset(self) -> None:
        super().reset()
        self.rx_frames.clear()

    def queue_notify(self, index: int) -> None:
        if index in (RX, TX) and index not in self._notify_pending:
            self._notify_pending.add(index)
            self.loop.call_soon_threadsafe(self._locked(self._on_notify, index))

    def state(self) -> dict:
        d = super().state()
        d["mac"] = self.mac.hex(":")
        return d

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.mac = parse_mac(str(state["mac"]))

    # -- queues (loop thread, under the lock) ---------------------------------------------
    def _after_activate(self) -> None:
        self._process_rx()
        self._process_tx()
        self.backend.update()

    def _on_notify(self, index: int) -> None:
        self._notify_pending.discard(index)
        if not self.active:
            return
        if index == TX:
            self._process_tx()
        else:
            self._process_rx()
        self.backend.update()

    def _process_tx(self) -> None:
        q, mem = self.queues[TX], self.mem
        if not q.state.ready or mem is None:
            return
        used = 0
        while self.backend.can_send():
            chain, bad = q.pop_valid(mem, log, "virtio-net: tx queue", publish=False)
            used += bad
            if chain is None:
                break
            self._tx_chain(chain)
            q.add_used(mem, chain.head, 0, publish=False)
            used += 1
        if used:
            q.publish_used(mem)
            self.signal_used(TX)
        self.backend.flush()

    def _tx_chain(self, chain: DescriptorChain) -> None:
        n = chain.readable_len - HDR_SIZE
        if n < MIN_FRAME or n > MAX_FRAME:
            log.warning("virtio-net: tx chain of %d bytes dropped", chain.readable_len)
            return
        self.backend.send(chain.read(self.mem, HDR_SIZE, n))  # type: ignore[arg-type]

    def _from_backend(self, frame: bytes) -> None:
        if len(frame) < MIN_FRAME:
            log.warning("virtio-net: runt frame of %d bytes from the backend dropped", len(frame))
            return
        self.rx_frames.append(frame)
        self._process_rx()

    def _process_rx(self) -> None:
        q, mem = self.queues[RX], self.mem
        if not self.active or not q.state.ready or mem is None:
            return
        used = 0
        header = bytes(10) + struct.pack("<H", 1)  # no offloads; num_buffers = 1
        while self.rx_frames:
            chain, bad = q.pop_valid(mem, log, "virtio-net: rx queue", publish=False)
            used += bad
            if chain is None:
                break
            frame = self.rx_frames.popleft()
            if chain.writable_len < HDR_SIZE + len(frame):
                log.warning(
                    "virtio-net: rx buffer of %d bytes too small for a %d-byte frame; dropped",
                    chain.writable_len,
                    len(frame),
                )
                q.add_used(mem, chain.head, 0, publish=False)
            else:
                n = chain.write(mem, header) + chain.write(mem, frame, offset=HDR_SIZE)
                q.add_used(mem, chain.head, n, publish=False)
            used += 1
        if used:
            q.publish_used(mem)
            self.signal_used(RX)
