"""virtio-net against real Unix sockets (passt's stream protocol) and the VMM's EventLoop; the
guest's driver is played by the test. No vCPU, no KVM."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.devices.virtio.net import (
    HDR_SIZE,
    MAX_FRAME,
    RX,
    RX_BACKLOG,
    TX,
    VIRTIO_NET_F_MAC,
    VirtioNet,
    parse_mac,
)
from pytest_ignition.vmm.eventloop import EventLoop
from pytest_ignition.vmm.memory import GuestMemory

MEM = 16 << 20
RX_BUF = HDR_SIZE + 1514
DEADLINE = 10.0


def wait_for(cond, what: str):  # type: ignore[no-untyped-def]
    end = time.monotonic() + DEADLINE
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def frame(n: int, tag: int = 0) -> bytes:
    eth = bytes.fromhex("525400123456") + bytes.fromhex("02000000aa01") + b"\x08\x00"
    body = bytes((tag + i) & 0xFF for i in range(n - len(eth)))
    return eth + body


class Guest:
    """The guest's virtio-net driver, reduced to what the tests need."""

    def __init__(self, backend: str, rx_prefill: int = 16) -> None:
        self.mem = GuestMemory.anonymous(MEM)
        self.loop = EventLoop("test-net")
        self.loop.start()
        self.dev = VirtioNet(backend, self.loop, mac="52:54:00:ab:cd:ef")
        self.t = mmio.MmioTransport(self.dev, self.mem, lambda: None)
        self.d = Driver(self.t, self.mem, Arena(0x10_0000, MEM))
        assert self.d.init() & mmio.DRIVER_OK
        self.rxq, self.txq = self.d.queues[RX], self.d.queues[TX]
        self.rx_bufs: dict[int, tuple[int, int]] = {}
        for _ in range(rx_prefill):
            self.post_rx()
        self.tx_bufs = [self.d.arena.alloc(HDR_SIZE + MAX_FRAME) for _ in range(16)]
        self.tx_i = 0
        self.got: list[bytes] = []

    def post_rx(self, size: int = RX_BUF) -> None:
        buf = self.d.arena.alloc(size)
        self.rx_bufs[self.rxq.post([(buf, size, True)])] = (buf, size)
        self.d.notify(RX)

    def send(self, data: bytes, header: bytes | None = None) -> None:
        buf = self.tx_bufs[self.tx_i % len(self.tx_bufs)]
        self.tx_i += 1
        payload = (bytes(HDR_SIZE) if header is None else header) + data
        self.mem.write(buf, payload)
        self.txq.post([(buf, len(payload), False)])
        self.d.notify(TX)

    def receive(self) -> list[bytes]:
        for head, length in self.rxq.take_used():
            buf, _ = self.rx_bufs.pop(head)
            if length:
                data = self.mem.read(buf, length)
                assert data[:HDR_SIZE] == bytes(10) + struct.pack("<H", 1)
                self.got.append(data[HDR_SIZE:])
        return self.got

    def close(self) -> None:
        self.dev.close()
        time.sleep(0.05)
        self.loop.stop()


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    sock.settimeout(DEADLINE)
    buf = b""
    out = []
    while len(out) < count:
        data = sock.recv(65536)
        assert data, "backend closed"
        buf += data
        while len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) < 4 + n:
                break
            out.append(buf[4 : 4 + n])
            buf = buf[4 + n :]
    return out


def put(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(struct.pack(">I", len(f)) + f for f in frames))


@pytest.fixture
def passt_like(tmp_path):  # type: ignore[no-untyped-def]
    """A listening socket standing in for passt; the device connects to it."""
    path = str(tmp_path / "passt.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    yield path, ls
    ls.close()


def test_mac_and_link_status_in_config_space(passt_like) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}")
    try:
        assert g.d.config(0, 6) == bytes.fromhex("525400abcdef")
        assert struct.unpack("<H", g.d.config(6, 2))[0] == 1
        assert g.d.device_features() & VIRTIO_NET_F_MAC
    finally:
        g.close()


def test_frames_both_ways_over_connect(passt_like) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}")
    peer, _ = ls.accept()
    try:
        sent = [frame(60, 1), frame(1514, 2), frame(342, 3)]
        for f in sent:
            g.send(f)
        assert read_frames(peer, 3) == sent
        back = [frame(64, 7), frame(1500, 8)]
        put(peer, *back)
        wait_for(lambda: len(g.receive()) == 2, "two rx frames")
        assert g.got == back
    finally:
        peer.close()
        g.close()


def test_listen_mode_takes_the_newest_peer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "net.sock")
    g = Guest(f"listen:{path}")
    try:
        g.send(frame(60))  # no peer yet: dropped like on an unplugged cable
        wait_for(lambda: g.dev.backend.dropped == 1, "a drop")
        a = socket.socket(socket.AF_UNIX)
        a.connect(path)
        wait_for(lambda: g.dev.backend.peer is not None, "a peer")
        b = socket.socket(socket.AF_UNIX)
        b.connect(path)
        time.sleep(0.2)
        g.send(frame(100, 5))
        assert read_frames(b, 1) == [frame(100, 5)]
        a.settimeout(DEADLINE)
        assert a.recv(10) == b""  # replaced
        put(b, frame(80, 9))
        wait_for(lambda: g.receive(), "rx frame")
        assert g.got == [frame(80, 9)]
        a.close()
        b.close()
    finally:
        g.close()
    assert not os.path.exists(path)


def test_hostile_tx_chains_are_dropped(passt_like, caplog) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}")
    peer, _ = ls.accept()
    caplog.set_level(logging.WARNING)
    try:
        g.send(b"", header=b"\x01\x02")  # shorter than the header
        g.send(b"x" * 5)  # a runt
        g.txq.post([(0x10_0000, 64, True)])  # write-only chain: nothing to send
        g.d.notify(TX)
        g.send(frame(60, 4))
        assert read_frames(peer, 1) == [frame(60, 4)]
        assert g.dev.backend.frames_out == 1
    finally:
        peer.close()
        g.close()


def test_small_rx_buffers_and_backlog_are_bounded(passt_like) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}", rx_prefill=0)
    peer, _ = ls.accept()
    try:
        g.post_rx(size=HDR_SIZE + 10)  # too small for any frame
        put(peer, frame(200, 1))
        wait_for(lambda: g.rxq.take_used() or None, "the small buffer back")
        # No guest buffers: the device stops reading after RX_BACKLOG frames.
        peer.setblocking(False)
        sent = 0
        chunk = b"".join(struct.pack(">I", 1514) + frame(1514) for _ in range(64))
        try:
            for _ in range(2000):
                sent += peer.send(chunk)
        except BlockingIOError:
            pass
        time.sleep(0.3)
        assert len(g.dev.rx_frames) <= RX_BACKLOG
        assert sent < 2000 * len(chunk), "nothing pushed back on a peer flooding the device"
        for _ in range(32):
            g.post_rx()
        wait_for(lambda: len(g.receive()) >= 32, "frames once buffers come")
        assert all(f == frame(1514) for f in g.got)
    finally:
        peer.close()
        g.close()


def test_oversize_length_prefix_disconnects_the_peer(passt_like) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}")
    peer, _ = ls.accept()
    try:
        peer.sendall(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        peer.settimeout(DEADLINE)
        assert peer.recv(10) == b""
        wait_for(lambda: g.dev.backend.peer is None, "peer dropped")
    finally:
        peer.close()
        g.close()


def test_state_round_trip_keeps_mac(passt_like) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}")
    try:
        st_ = g.t.state()
        g2 = VirtioNet(f"connect:{path}", g.loop, mac="52:54:00:00:00:01")
        t2 = mmio.MmioTransport(g2, g.mem, lambda: None)
        t2.set_state(st_)
        assert g2.config_space()[:6] == bytes.fromhex("525400abcdef")
        g2.close()
    finally:
        g.close()


def test_bad_backend_specs_and_macs() -> None:
    loop = EventLoop("x")
    with pytest.raises(ValueError):
        VirtioNet("tcp:1.2.3.4", loop)
    with pytest.raises(OSError):
        VirtioNet("connect:/nonexistent/passt.sock", loop)
    for bad in ("01:00:5e:00:00:01", "52:54:00", "zz:54:00:12:34:56"):
        with pytest.raises(ValueError):
            parse_mac(bad)


@settings(
    max_examples=int(os.environ.get("IGNITION_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    junk=st.lists(
        st.tuples(st.integers(0, 0x20_0000), st.integers(0, 0x20000), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_hostile_descriptors_then_a_good_frame(passt_like, junk) -> None:  # type: ignore[no-untyped-def]
    path, ls = passt_like
    g = Guest(f"connect:{path}", rx_prefill=0)
    peer, _ = ls.accept()
    try:
        for addr, n, write in junk:  # arbitrary chains on both queues
            g.txq.post([(addr, n, write)])
            g.rxq.post([(addr, n, True)])
        g.d.notify(TX)
        g.d.notify(RX)
        g.rxq.take_used()
        g.send(frame(60, 3))
        got = read_frames(
            peer, 1 + sum(1 for a, n, w in junk if not w and 26 <= n <= MAX_FRAME + 12)
        )
        assert got[-1] == frame(60, 3)
    finally:
        peer.close()
        g.close()
