"""The ignition_network switch (pytest_ignition.network._Switch) against plain sockets standing in
for member VMMs: learning, flooding, partitions, heal, degraded links, hostile lengths, bounds."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from pytest_ignition.network import MAX_QUEUED, Network, NetworkError, _Switch

MACS = {n: bytes.fromhex(f"5254000000{i:02x}") for i, n in enumerate("abc", 1)}
BCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, tag: bytes = b"") -> bytes:
    return dst + src + b"\x08\x00" + tag.ljust(46, b".")


class Member:
    def __init__(self, sw: _Switch, name: str) -> None:
        self.name = name
        self.vm_end, sw_end = socket.socketpair()
        self.vm_end.settimeout(0.3)
        sw.post("add", (name, sw_end))
        self.buf = b""

    def send(self, f: bytes) -> None:
        self.vm_end.sendall(struct.pack(">I", len(f)) + f)

    def frames(self, wait: float = 0.3) -> list[bytes]:
        out = []
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                data = self.vm_end.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            self.buf += data
            while len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) < 4 + n:
                    break
                out.append(self.buf[4 : 4 + n])
                self.buf = self.buf[4 + n :]
        return out


@pytest.fixture
def lan():  # type: ignore[no-untyped-def]
    sw = _Switch("test")
    members = {n: Member(sw, n) for n in "abc"}
    time.sleep(0.05)
    yield sw, members
    sw.close()


def test_learning_and_flooding(lan) -> None:  # type: ignore[no-untyped-def]
    sw, m = lan
    a, b, c = m["a"], m["b"], m["c"]
    a.send(frame(BCAST, MACS["a"], b"hello"))  # broadcast: b and c
    assert len(b.frames()) == 1 and len(c.frames()) == 1 and a.frames(0.1) == []
    b.send(frame(MACS["a"], MACS["b"], b"reply"))  # a is learnt: only a
    assert [f[14:19] for f in a.frames()] == [b"reply"]
    assert c.frames(0.1) == []
    c.send(frame(MACS["b"], MACS["c"], b"to b"))  # b learnt from its reply
    assert len(b.frames()) == 1 and a.frames(0.1) == []


def test_partition_and_heal(lan) -> None:  # type: ignore[no-untyped-def]
    sw, m = lan
    a, b, c = m["a"], m["b"], m["c"]
    with sw.lock:
        sw.groups = {"a": 0, "b": 1, "c": 1}
    a.send(frame(BCAST, MACS["a"]))
    assert b.frames(0.2) == [] and c.frames(0.2) == []
    b.send(frame(BCAST, MACS["b"]))
    assert len(c.frames()) == 1 and a.frames(0.2) == []
    with sw.lock:
        sw.groups = None
    a.send(frame(MACS["b"], MACS["a"]))
    assert len(b.frames()) == 1


def test_degraded_link_drops_and_delays(lan) -> None:  # type: ignore[no-untyped-def]
    sw, m = lan
    a, b, c = m["a"], m["b"], m["c"]
    with sw.lock:
        sw.links[frozenset("ab")] = (0.0, 1.0)  # a<->b: everything lost
        sw.links[frozenset("ac")] = (0.25, 0.0)  # a<->c: 250 ms
    t0 = time.monotonic()
    a.send(frame(BCAST, MACS["a"]))
    assert b.frames(0.4) == []
    got = c.frames(1.0)
    assert len(got) == 1 and time.monotonic() - t0 >= 0.25


def test_bad_length_disconnects_only_that_port(lan) -> None:  # type: ignore[no-untyped-def]
    sw, m = lan
    a, b, c = m["a"], m["b"], m["c"]
    a.vm_end.sendall(struct.pack(">I", 1 << 20) + b"x" * 64)
    a.vm_end.settimeout(2)
    assert a.vm_end.recv(10) == b""
    b.send(frame(BCAST, MACS["b"]))
    assert len(c.frames()) == 1


def test_output_to_a_stuck_port_is_bounded(lan) -> None:  # type: ignore[no-untyped-def]
    sw, m = lan
    a, b = m["a"], m["b"]  # m["c"] never reads
    big = frame(BCAST, MACS["a"]).ljust(9000, b"z")
    for _ in range((3 * MAX_QUEUED) // len(big)):
        a.send(big)
    time.sleep(0.5)
    while b.frames(0.2):
        pass
    assert sw.ports["c"].dropped > 0
    assert len(sw.ports["c"].outbuf) <= MAX_QUEUED + len(big) + 4
    b.send(frame(MACS["a"], MACS["b"], b"still"))
    assert any(f[14:19] == b"still" for f in a.frames())


def test_network_checks_without_vms() -> None:
    net = Network("t")
    try:
        with pytest.raises(NetworkError):
            net.partition(["a"], ["b"])  # no such members
        with pytest.raises(NetworkError):
            net.address("a")
        assert net.members == []

        class FakeVM:
            machine = object()

        with pytest.raises(NetworkError, match="no segment network device"):
            net.add(FakeVM(), "a")  # type: ignore[arg-type]
        with pytest.raises(NetworkError, match="hostname"):
            net.add(FakeVM(), "bad name!")  # type: ignore[arg-type]
    finally:
        net.close()


def test_factory_keywords_split() -> None:
    from pytest_ignition.network import NetworkFactory, split_factory_kwargs

    nets = NetworkFactory()
    try:
        net = nets()
        kw = {"network": net, "hostname": "a", "memory": "1G"}
        assert split_factory_kwargs(kw) == (net, "a") and kw == {"memory": "1G"}
        kw = {"network": nets}  # the fixture itself stands for its default segment
        got, host = split_factory_kwargs(kw)
        assert got is nets.default and host is None and kw == {}
        kw = {"network": "user"}  # an ordinary setting stays
        assert split_factory_kwargs(kw) == (None, None) and kw == {"network": "user"}
        with pytest.raises(NetworkError, match="hostname"):
            split_factory_kwargs({"hostname": "no spaces"})
        assert nets.members == []  # attribute access goes to the default segment
    finally:
        nets.close()
