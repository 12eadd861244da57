"""virtio-vsock against real Unix sockets and the VMM's EventLoop, the guest played by the test."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio import vsock as vsock_module
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.devices.virtio.queue import Queue
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
from pytest_ignition.vmm.memory import MMIO_START, GuestMemory

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

    def __init__(self, uds_path, cid=CID, rx_prefill=16):
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
        for _ in range(rx_prefill):
            self.post_rx()
        self.ev_bufs = {}
        for _ in range(4):
            buf = self.d.arena.alloc(4)
            self.ev_bufs[self.evq.post([(buf, 4, True)])] = buf
        self.d.notify(EVT)
        self.inbox = []
        self.bad_rx = []
        self.fwd_cnt = 0
        self.tx_bufs = [self.d.arena.alloc(HDR.size + 65536) for _ in range(8)]
        self.tx_i = 0

    def _irq(self):
        self.irqs += 1

    def handle_events(self):
        """What Linux's event worker does: take the used event buffers, post them again,
        notify the event queue. Returns the events read."""
        events = []
        for head, length in self.evq.take_used():
            buf = self.ev_bufs.pop(head)
            events.append(struct.unpack("<I", self.mem.read(buf, 4))[0] if length == 4 else None)
            self.ev_bufs[self.evq.post([(buf, 4, True)])] = buf
        self.d.notify(EVT)
        return events

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
        fwd_cnt=None,
    ):
        n = len(payload) if length is None else length
        hdr = HDR.pack(
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            n,
            typ,
            op,
            flags,
            buf_alloc,
            self.fwd_cnt if fwd_cnt is None else fwd_cnt,
        )
        buf = self.tx_bufs[self.tx_i % len(self.tx_bufs)]
        self.tx_i += 1
        self.mem.write(buf, hdr + payload)
        head = self.txq.post([(buf, len(hdr) + len(payload), False)])
        self.d.notify(TX)
        self.barrier()
        assert (head, 0) in self.txq.take_used()

    def barrier(self):
        """Wait until the device's loop has run everything handed to it so far."""
        done = threading.Event()
        self.loop.call_soon_threadsafe(done.set)
        assert done.wait(DEADLINE), "device loop stuck"

    def poll(self):
        for head, length in self.rxq.take_used():
            if head not in self.rx_bufs:  # a hostile buffer the test posted raw
                self.bad_rx.append((head, length))
                if length:  # ...that was valid after all: read the packet out of it
                    chain = Queue.from_dict(self.dev.queues[RX].to_dict())._walk(self.mem, head)
                    raw = b"".join(self.mem.read(a, n) for a, n in chain.writable)[:length]
                    self.inbox.append((HDR.unpack(raw[: HDR.size]), raw[HDR.size :]))
                continue
            buf, size = self.rx_bufs.pop(head)
            raw = self.mem.read(buf, length)
            f = HDR.unpack(raw[: HDR.size])
            self.inbox.append((f, raw[HDR.size :]))
            self.rxq.next_desc = head  # reuse that descriptor slot
            new_head = self.rxq.post([(buf, size, True)])
            self.rx_bufs[new_head] = (buf, size)
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
    while True:  # skip anything still in flight for earlier connections
        op, hport, gport, _, _, buf_alloc, _ = guest.recv("OP_REQUEST")
        if op != OP_RST:
            break
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
    assert (op, flags) == (OP_SHUTDOWN, SHUTDOWN_SEND)
    guest.send(OP_RST, 52, hport)
    wait_for(lambda: not guest.dev.conns, "connection dropped")


def test_host_half_close(guest, uds):
    host, hport = host_initiated(guest, uds)
    host.sendall(b"request")
    host.shutdown(socket.SHUT_WR)
    op, *_, payload, _f, _b, _c = guest.recv("data")
    assert (op, payload) == (OP_RW, b"request")
    op, *_, flags, _b, _c = guest.recv("SHUTDOWN")
    assert (op, flags) == (OP_SHUTDOWN, SHUTDOWN_SEND)
    guest.send(OP_RW, 52, hport, b"response")  # the guest may still answer
    assert recv_exact(host, 8) == b"response"
    guest.send(OP_SHUTDOWN, 52, hport, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    op, *_ = guest.recv("RST")
    assert op == OP_RST
    assert host.recv(16) == b""


def test_guest_write_after_host_close_resets(guest, uds):
    host, hport = host_initiated(guest, uds)
    host.close()
    op, *_ = guest.recv("SHUTDOWN")
    assert op == OP_SHUTDOWN
    guest.send(OP_RW, 52, hport, b"anyone?")
    op, *_ = guest.recv("RST")
    assert op == OP_RST
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
    guest.barrier()  # the loop posted the event
    assert guest.handle_events() == [0]  # TRANSPORT_RESET
    assert host.recv(16) == b""  # the stale connection is gone
    assert not guest.dev.conns
    # And a new connection works afterwards.
    host2, _ = host_initiated(guest, uds)
    host2.close()


def test_state_says_whether_a_connection_was_open(guest, uds):
    guest.barrier()
    assert guest.t.state()["device"]["idle"] is True
    host, hport = host_initiated(guest, uds)
    guest.barrier()
    assert guest.t.state()["device"]["idle"] is False
    host.close()
    op, *_ = guest.recv("SHUTDOWN")  # the host's EOF, told to the guest
    assert op == OP_SHUTDOWN
    assert guest.t.state()["device"]["idle"] is False  # until the guest closed its side
    guest.send(OP_RST, 52, hport)
    guest.barrier()
    assert guest.t.state()["device"]["idle"] is True


def test_after_restore_of_an_idle_state_closes_host_side_without_a_reset(guest, uds):
    """A rollback to a snapshot taken with no connection: the guest has nothing to lose, so no
    TRANSPORT_RESET is posted; the host's live connections are closed, and a new one reaches
    the guest at once (not held back for a reset the guest will never see)."""
    guest.barrier()
    assert guest.t.state()["device"]["idle"] is True  # the base
    host, _ = host_initiated(guest, uds)
    guest.barrier()
    # What a rollback loads: the base's device state. This test's guest memory does not
    # revert, so the queues stay where the driver has them; only the base's flag is taken.
    now = guest.t.state()
    now["device"]["idle"] = True
    guest.t.set_state(now)
    guest.dev.after_restore()
    guest.barrier()
    assert host.recv(16) == b""  # the test's connection is gone on the host side
    assert not guest.dev.conns and not guest.dev.deferred
    assert guest.handle_events() == []  # and nothing was said to the guest
    host2, _ = host_initiated(guest, uds)  # straight to OP_REQUEST
    host2.close()


def test_after_restore_of_a_busy_state_posts_the_reset(guest, uds):
    host, _ = host_initiated(guest, uds)
    guest.barrier()
    busy = guest.t.state()
    assert busy["device"]["idle"] is False
    guest.t.set_state(busy)
    guest.dev.after_restore()
    guest.barrier()
    assert guest.handle_events() == [0]  # TRANSPORT_RESET
    assert host.recv(16) == b""


def test_state_without_idle_is_treated_as_busy(guest, uds):
    """Snapshots from before ``idle`` was recorded keep the reset."""
    guest.barrier()
    old = guest.t.state()
    del old["device"]["idle"]
    guest.t.set_state(old)
    guest.dev.after_restore()
    guest.barrier()
    assert guest.handle_events() == [0]


def test_host_connect_waits_until_the_guest_handled_the_reset(guest, uds):
    """A client connecting between a transport reset and the guest's handling of it is not
    offered to the guest yet (Linux handles rx before the event queue and would accept it, then
    reset it with the stale ones): it starts once the guest refilled the event queue."""
    guest.barrier()
    guest.dev.send_transport_reset()
    guest.barrier()
    host = host_connect(uds, 52)
    guest.barrier()
    time.sleep(0.2)
    guest.poll()
    assert not guest.inbox and len(guest.dev.deferred) == 1  # held back
    assert guest.handle_events() == [0]
    op, hport, gport, *_ = guest.recv("OP_REQUEST")
    assert (op, gport) == (OP_REQUEST, 52)
    guest.send(OP_RESPONSE, 52, hport)
    assert read_line(host) == f"OK {hport}\n".encode()
    assert not guest.dev.deferred
    host.close()


def test_deferred_host_connect_starts_after_the_grace_period(guest, uds, monkeypatch):
    """A guest that never handles the event (no notify) delays clients only RESET_GRACE_S."""
    import pytest_ignition.vmm.devices.virtio.vsock as vs

    monkeypatch.setattr(vs, "RESET_GRACE_S", 0.3)
    guest.dev.send_transport_reset()
    guest.barrier()
    host = host_connect(uds, 52)
    op, _, gport, *_ = guest.recv("OP_REQUEST")
    assert (op, gport) == (OP_REQUEST, 52)
    host.close()


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
    vsock_module.log.reset()  # earlier tests may have used up the warning budget
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


# -- hostile guests (hypothesis) ---------------------------------------------------------------
HOSTILE = settings(
    max_examples=int(os.environ.get("IGNITION_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
u32 = st.integers(0, 2**32 - 1)
header_fields = st.fixed_dictionaries(
    {
        "src_cid": st.one_of(st.just(CID), st.just(CID), st.integers(0, 2**64 - 1)),
        "dst_cid": st.one_of(st.just(HOST_CID), st.just(HOST_CID), st.integers(0, 2**64 - 1)),
        "src_port": st.one_of(st.just(52), u32),
        "dst_port": st.one_of(st.just("conn"), st.just(1234), u32),
        "length": st.one_of(st.none(), u32, st.integers(0, 70000)),
        "typ": st.one_of(st.just(TYPE_STREAM), st.integers(0, 0xFFFF)),
        "op": st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),
        "flags": st.one_of(st.integers(0, 3), u32),
        "buf_alloc": st.one_of(st.just(GUEST_BUF_ALLOC), u32),
        "fwd_cnt": st.one_of(st.just(0), u32),
    }
)
packets = st.lists(st.tuples(header_fields, st.binary(max_size=300)), max_size=8)
raw_descs = st.dictionaries(
    st.integers(200, 215),
    st.tuples(
        st.one_of(
            st.integers(0x80_0000, 0x80_1000),
            st.integers(MMIO_START - 64, MMIO_START + 64),
            st.integers(0, 2**64 - 1),
        ),
        st.one_of(st.integers(0, 100), st.integers(0, 2**32 - 1)),
        st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 0xFFFF)),
        st.one_of(st.integers(200, 215), st.integers(0, 0xFFFF)),
    ),
    max_size=8,
)
raw_heads = st.lists(st.one_of(st.integers(200, 215), st.integers(0, 0xFFFF)), max_size=8)


def _errors_during(fn):
    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = H(logging.ERROR)
    root = logging.getLogger()
    root.addHandler(h)
    try:
        fn()
    finally:
        root.removeHandler(h)
    assert not records, [r.getMessage() + (r.exc_text or "") for r in records]


def _serves(g, uds):
    """A fresh host connection is accepted and carries data both ways."""
    host, hport = host_initiated(g, uds, port=77)
    host.sendall(b"alive?")
    got = b""
    while len(got) < 6:
        op, src, dst, payload, *_ = g.recv("RW")
        if (src, dst) == (hport, 77) and op == OP_RW:
            got += payload
    assert got == b"alive?"
    g.send(OP_RW, 77, hport, b"yes")
    assert recv_exact(host, 3) == b"yes"
    host.close()


@HOSTILE
@given(pkts=packets, descs=raw_descs, heads=raw_heads)
def test_hostile_tx_packets_and_chains(tmp_path_factory, pkts, descs, heads):
    uds = str(tmp_path_factory.mktemp("vs") / "v.sock")
    g = Guest(uds)

    def body():
        host, hport = host_initiated(g, uds)
        for fields, payload in pkts:
            f = dict(fields)
            if f["dst_port"] == "conn":
                f["dst_port"] = hport
            g.inbox.clear()
            g.send(payload=payload, **f)
            g.poll()
        # Raw chains: junk descriptors and heads on the tx queue.
        g.txq.post_raw(descs, heads)
        g.d.notify(TX)
        g.barrier()
        g.txq.take_used()
        g.txq.next_desc = 0
        g.inbox.clear()
        _serves(g, uds)

    try:
        _errors_during(body)
    finally:
        g.close()


@HOSTILE
@given(descs=raw_descs, heads=raw_heads)
def test_hostile_rx_buffers(tmp_path_factory, descs, heads):
    uds = str(tmp_path_factory.mktemp("vs") / "v.sock")
    g = Guest(uds, rx_prefill=0)

    def body():
        g.rxq.post_raw(descs, heads)
        g.d.notify(RX)
        for _ in range(16):
            g.post_rx(RX_BUF)
        _serves(g, uds)
        for head, length in g.bad_rx:
            assert head < 256 and (length == 0 or head in descs)

    try:
        _errors_during(body)
    finally:
        g.close()


def test_reset_with_live_connections_then_reinit(guest, uds):
    host, _ = host_initiated(guest, uds)
    guest.d.write(mmio.STATUS, 0)
    assert host.recv(16) == b""
    assert not guest.dev.conns


def test_restore_from_state_then_transport_reset(guest, uds, tmp_path):
    """The snapshot path: rebuild the device from state on a new socket, reset the transport,
    and the guest's still-posted event buffer carries TRANSPORT_RESET; new connections work."""
    host, _ = host_initiated(guest, uds)
    guest.barrier()
    state = guest.t.state()
    guest.dev.close()  # the old VMM goes away
    uds2 = str(tmp_path / "restored.sock")
    dev2 = VirtioVsock(uds2, guest.loop, guest_cid=CID)
    t2 = mmio.MmioTransport(dev2, guest.mem, guest._irq)
    t2.set_state(state)
    assert state["device"]["idle"] is False  # a connection was open
    again = t2.state()
    assert again["device"].pop("idle") is True  # idle describes the live device, not the state
    state["device"].pop("idle")
    assert again == state
    guest.dev, guest.t, guest.d.t = dev2, t2, t2
    dev2.after_restore()
    guest.barrier()
    assert guest.handle_events() == [0]
    host2, _ = host_initiated(guest, uds2)
    host2.close()


def test_debug_state_counts_what_the_host_side_holds(guest, uds):
    """The probe's view of the device after a host connection is made: one connection,
    nothing queued either way, nothing deferred."""
    host, _ = host_initiated(guest, uds)
    guest.barrier()
    d = guest.dev.debug_state()
    assert d == {
        "conns": 1,
        "handshakes": 0,
        "deferred": 0,
        "pending_ctrl": 0,
        "rx_ready": 0,
        "to_guest": 0,
        "to_host": 0,
        "evt_pending": 0,
        "reset_unhandled": False,
    }
    host.close()
    guest.barrier()
