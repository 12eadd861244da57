"""virtio-vsock against real Unix sockets and the VMM's EventLoop, the guest played by the test."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.devices.virtio.vsock import (
    BUF_ALLOC,
    EVT,
    HDR,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RX,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TX,
    TYPE_STREAM,
    VirtioVsock,
)
from pytest_ignition.vmm.eventloop import EventLoop
from pytest_ignition.vmm.memory import GuestMemory

MEM = 16 << 20
CID = 3
RX_BUF = 4096
GUEST_BUF_ALLOC = 64 * 1024
DEADLINE = 10.0  # generous: this is a liveness bound, not a speed assertion


def wait_for(cond, what: str):
    end = time.monotonic() + DEADLINE
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Guest:
    """The guest's vsock driver, reduced to what the tests need."""

    def __init__(self, uds_path, cid=CID):
        self.mem = GuestMemory.anonymous(MEM)
        self.loop = EventLoop("test-vsock")
        self.loop.start()
        self.dev = VirtioVsock(uds_path, self.loop, guest_cid=cid)
        self.irqs = 0
        self.t = mmio.MmioTransport(self.dev, self.mem, self._irq)
        self.d = Driver(self.t, self.mem, Arena(0x10_0000, MEM))
        assert self.d.init() & mmio.DRIVER_OK
        self.rxq, self.txq, self.evq = (self.d.queues[i] for i in (RX, TX, EVT))
        self.rx_bufs = {}
        for _ in range(16):
            self.post_rx()
        self.ev_bufs = {}
        for _ in range(4):
            buf = self.d.arena.alloc(4)
            self.ev_bufs[self.evq.post([(buf, 4, True)])] = buf
        self.d.notify(EVT)
        self.inbox = []
        self.fwd_cnt = 0
        self.tx_bufs = [self.d.arena.alloc(HDR.size + 65536) for _ in range(8)]
        self.tx_i = 0

    def _irq(self):
        self.irqs += 1

    def post_rx(self, size=RX_BUF):
        buf = self.d.arena.alloc(size)
        self.rx_bufs[self.rxq.post([(buf, size, True)])] = (buf, size)
        self.d.notify(RX)

    def send(
        self,
        op,
        src_port,
        dst_port,
        payload=b"",
        flags=0,
        length=None,
        src_cid=CID,
        dst_cid=HOST_CID,
        typ=TYPE_STREAM,
        buf_alloc=GUEST_BUF_ALLOC,
    ):
        n = len(payload) if length is None else length
        hdr = HDR.pack(
            src_cid, dst_cid, src_port, dst_port, n, typ, op, flags, buf_alloc, self.fwd_cnt
        )
        buf = self.tx_bufs[self.tx_i % len(self.tx_bufs)]
        self.tx_i += 1
        self.mem.write(buf, hdr + payload)
        done = len(self.txq.completed)
        head = self.txq.post([(buf, len(hdr) + len(payload), False)])
        self.d.notify(TX)
        wait_for(lambda: self.txq.take_used() is not None and len(self.txq.completed) > done, "tx")
        assert self.txq.completed[done] == (head, 0)

    def poll(self):
        for head, length in self.rxq.take_used():
            buf, size = self.rx_bufs.pop(head)
            raw = self.mem.read(buf, length)
            f = HDR.unpack(raw[: HDR.size])
            self.inbox.append((f, raw[HDR.size :]))
            self.rxq.next_desc = head  # reuse that descriptor slot
            self.rx_bufs[self.rxq.post([(buf, size, True)])] = (buf, size)
            self.d.notify(RX)

    def recv(self, what="packet"):
        def got():
            self.poll()
            return self.inbox

        wait_for(got, what)
        f, payload = self.inbox.pop(0)
        src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc, fwd_cnt = f
        assert (src_cid, dst_cid, typ) == (HOST_CID, CID, TYPE_STREAM)
        assert len(payload) == length
        if op == OP_RW:
            self.fwd_cnt += length
        return op, src_port, dst_port, payload, flags, buf_alloc, fwd_cnt

    def close(self):
        self.dev.close()
        self.loop.stop()
        self.mem.close()


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def guest(uds):
    g = Guest(uds)
    yield g
    g.close()


def host_connect(uds, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    return s


def read_line(s):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"EOF after {buf!r}"
        buf += chunk
    return buf


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} bytes"
        buf += chunk
    return buf


def host_initiated(guest, uds, port=52):
    host = host_connect(uds, port)
    op, hport, gport, _, _, buf_alloc, _ = guest.recv("OP_REQUEST")
    assert (op, gport) == (OP_REQUEST, port)
    assert buf_alloc == BUF_ALLOC
    guest.send(OP_RESPONSE, port, hport)
    assert read_line(host) == f"OK {hport}\n".encode()
    return host, hport


def test_config_space_has_guest_cid(guest):
    assert struct.unpack("<Q", guest.d.config(0, 8))[0] == CID
    assert guest.d.read(mmio.DEVICE_ID) == 19


def test_host_connect_data_both_ways_and_close(guest, uds):
    host, hport = host_initiated(guest, uds)
    host.sendall(b"ping")
    op, src, dst, payload, *_ = guest.recv("RW to guest")
    assert (op, src, dst, payload) == (OP_RW, hport, 52, b"ping")
    guest.send(OP_RW, 52, hport, b"pong" * 1000)
    assert recv_exact(host, 4000) == b"pong" * 1000
    # The host closes: the guest is told SHUTDOWN, confirms with RST.
    host.close()
    op, src, dst, _, flags, *_ = guest.recv("SHUTDOWN")
    assert (op, flags) == (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
    guest.send(OP_RST, 52, hport)
    wait_for(lambda: not guest.dev.conns, "connection dropped")


def test_guest_refuses_host_connect(guest, uds):
    host = host_connect(uds, 99)
    op, hport, gport, *_ = guest.recv("OP_REQUEST")
    guest.send(OP_RST, gport, hport)
    assert host.recv(16) == b""  # closed, no OK


def test_guest_close_gets_rst(guest, uds):
    host, hport = host_initiated(guest, uds)
    guest.send(OP_RW, 52, hport, b"last words")
    guest.send(OP_SHUTDOWN, 52, hport, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    op, *_ = guest.recv("RST after guest shutdown")
    assert op == OP_RST
    assert recv_exact(host, 10) == b"last words"
    assert host.recv(16) == b""


def test_guest_initiated_connect(guest, uds):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_1234")
    listener.listen(1)
    listener.settimeout(DEADLINE)
    guest.send(OP_REQUEST, 40000, 1234)
    op, src, dst, *_ = guest.recv("OP_RESPONSE")
    assert (op, src, dst) == (OP_RESPONSE, 1234, 40000)
    peer, _ = listener.accept()
    peer.settimeout(DEADLINE)
    guest.send(OP_RW, 40000, 1234, b"hello host")
    assert recv_exact(peer, 10) == b"hello host"
    peer.sendall(b"hello guest")
    op, src, dst, payload, *_ = guest.recv("RW")
    assert (op, payload) == (OP_RW, b"hello guest")
    # No listener on the other port: refused with RST.
    guest.send(OP_REQUEST, 40001, 4321)
    op, src, dst, *_ = guest.recv("RST")
    assert (op, src, dst) == (OP_RST, 4321, 40001)


def test_flow_control_respects_guest_credit(guest, uds):
    host, hport = host_initiated(guest, uds)
    blob = bytes(range(256)) * 1024  # 256 KiB, 4x the guest's buf_alloc
    host.sendall(blob[: GUEST_BUF_ALLOC + 4096])
    got = b""
    while len(got) < GUEST_BUF_ALLOC:
        op, *_, payload, _f, _b, _c = guest.recv("data")
        assert op == OP_RW
        got += payload
    time.sleep(0.05)  # would anything beyond the credit arrive? (no timing assertion on speed)
    guest.poll()
    assert not guest.inbox, "device sent beyond the guest's credit"
    guest.send(OP_CREDIT_UPDATE, 52, hport)  # guest.fwd_cnt now says all was consumed
    while len(got) < GUEST_BUF_ALLOC + 4096:
        op, *_, payload, _f, _b, _c = guest.recv("more data")
        got += payload
    assert got == blob[: GUEST_BUF_ALLOC + 4096]
    # Credit request is answered with our counters.
    guest.send(OP_CREDIT_REQUEST, 52, hport)
    op, *_, buf_alloc, fwd_cnt = guest.recv("credit update")
    assert (op, buf_alloc, fwd_cnt) == (OP_CREDIT_UPDATE, BUF_ALLOC, 0)


def test_guest_data_gets_credit_updates(guest, uds):
    host, hport = host_initiated(guest, uds)
    sent = 0
    chunk = b"x" * 60000
    fwd_seen = 0
    # Push 4x our buf_alloc, never exceeding the credit the device has advertised.
    while sent < 4 * BUF_ALLOC:
        while sent + len(chunk) - fwd_seen > BUF_ALLOC:
            op, *_, fwd = guest.recv("credit update")
            assert op == OP_CREDIT_UPDATE
            fwd_seen = fwd
        guest.send(OP_RW, 52, hport, chunk)
        sent += len(chunk)
        # The host reads concurrently so forwarding can progress.
        host.settimeout(DEADLINE)
        recv_exact(host, len(chunk))
    assert not guest.dev.conns[(hport, 52)].to_host


def test_transport_reset_event(guest, uds):
    host, hport = host_initiated(guest, uds)
    guest.dev.send_transport_reset()
    used = wait_for(guest.evq.take_used, "event")
    head, length = used[0]
    assert length == 4
    assert struct.unpack("<I", guest.mem.read(guest.ev_bufs[head], 4))[0] == 0  # TRANSPORT_RESET
    assert host.recv(16) == b""  # the stale connection is gone
    assert not guest.dev.conns
    # And a new connection works afterwards.
    host2, _ = host_initiated(guest, uds)
    host2.close()


@pytest.mark.parametrize(
    "mutation",
    [
        {"length": 70000},  # longer than the buffer and MAX_PKT
        {"src_cid": 7},
        {"dst_cid": 9},
        {"typ": 2},
        {"op": 42},
        {"op": 0},
    ],
    ids=lambda m: next(iter(m)) + "=" + str(next(iter(m.values()))),
)
def test_hostile_header_resets_connection(guest, uds, mutation):
    host, hport = host_initiated(guest, uds)
    kw = {"op": OP_RW, "src_port": 52, "dst_port": hport, "payload": b"abc"}
    kw.update(mutation)
    guest.send(**kw)
    op, src, dst, *_ = guest.recv("RST")
    assert (op, src, dst) == (OP_RST, hport, 52)
    assert host.recv(16) == b""
    host2, hport2 = host_initiated(guest, uds)  # still serving
    guest.send(OP_RW, 52, hport2, b"ok")
    assert recv_exact(host2, 2) == b"ok"


def test_data_beyond_credit_resets(guest, uds, caplog):
    host, hport = host_initiated(guest, uds)
    # The host never reads; the guest ignores credit and keeps sending.
    chunk = b"y" * 65536
    for _ in range(BUF_ALLOC // len(chunk) + 64):
        guest.send(OP_RW, 52, hport, chunk)
        guest.poll()
        if any(f[6] == OP_RST for f, _ in guest.inbox):
            break
    assert any(f[6] == OP_RST for f, _ in guest.inbox)
    wait_for(lambda: not guest.dev.conns, "connection dropped")
    assert "beyond its credit" in caplog.text


def test_unknown_connection_and_bad_handshake(guest, uds):
    guest.send(OP_RW, 52, 777, b"who?")
    op, src, dst, *_ = guest.recv("RST")
    assert (op, src, dst) == (OP_RST, 777, 52)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    s.connect(uds)
    s.sendall(b"HELLO 52\n")
    assert s.recv(16) == b""
    host, _ = host_initiated(guest, uds)


def test_state_round_trip(guest):
    st = guest.t.state()
    assert st["device"]["guest_cid"] == CID
    assert len(st["device"]["queues"]) == 3
