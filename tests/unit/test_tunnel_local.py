"""TCP tunnels (vm.forward / vm.connect / vm.expose) on the real agent compiled for the host.

The agent runs with ``--listen-unix`` and AddressSanitizer (as in test_agent_local.py); its
"guest loopback" is the host's 127.0.0.1 here, so plain host sockets stand in for guest
programs. What is checked: bytes arrive intact both ways (large transfers through the windows),
half-close and refusal propagate, peers that flood, never read or close early stall nothing else
and grow no memory, malformed tunnel frames are refused, and closing the tunnels closes every port.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.agent import AgentClient, ErrorCode, FrameType
from pytest_ignition.tunnel import WINDOW, Tunnels

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "ignition-agent"
    sources = sorted(str(p) for p in (REPO / "guest" / "agent").glob("*.c"))
    gcc = shutil.which("gcc")
    require(gcc is not None, "gcc is needed to build the agent for the host")
    r = subprocess.run(
        [gcc, "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        + ["-Wall", "-Wextra", "-o", str(out), *sources],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


class Agent:
    def __init__(self, binary: Path, tmp: Path) -> None:
        self.sock, self.log = tmp / "agent.sock", tmp / "agent.log"
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [str(binary), "--listen-unix", str(self.sock), "--sync-dry-run"],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
                start_new_session=True,
            )
        self.client = AgentClient.connect_unix(self.sock, timeout=10)
        self.tunnels = Tunnels(self.client, "local")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        self.tunnels.close()
        self.client.close()
        alive = self.proc.poll() is None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert alive, f"agent died: rc={self.proc.returncode}\n{self.log.read_text()}"


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_bin, tmp_path)
    try:
        yield a
    finally:
        a.stop()


class Server:
    """A TCP server on 127.0.0.1 (standing in for a guest or a host service); one thread per
    connection running ``handler(sock)``."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(s)

    def close(self) -> None:
        self.lsock.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        s.close()


def echo(s: socket.socket) -> None:
    while True:
        data = s.recv(65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def recv_all(s: socket.socket, timeout: float = 30.0) -> bytes:
    s.settimeout(timeout)
    out = bytearray()
    while True:
        data = s.recv(1 << 20)
        if not data:
            return bytes(out)
        out += data


def test_connect_echo_and_half_close(agent: Agent, servers: list[Server]) -> None:
    srv = Server(echo)
    servers.append(srv)
    s = agent.tunnels.connect(srv.port)
    s.sendall(b"hello tunnel")
    s.shutdown(socket.SHUT_WR)  # the guest side sees EOF, echoes, closes
    assert recv_all(s) == b"hello tunnel"
    s.close()
    deadline = time.monotonic() + 5
    while agent.tunnels.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.tunnels.active == 0


def test_connect_to_closed_port_is_refused(agent: Agent) -> None:
    with pytest.raises(ConnectionRefusedError):
        agent.tunnels.connect(_free_port())
    assert agent.client.exec(["true"]).exit_code == 0


def test_large_transfer_both_ways(agent: Agent, servers: list[Server]) -> None:
    srv = Server(echo)
    servers.append(srv)
    payload = os.urandom(24 << 20)  # ~100 windows
    s = agent.tunnels.connect(srv.port)
    got = bytearray()

    def reader() -> None:
        got.extend(recv_all(s, 120))

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    t.join(120)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert len(got) == len(payload)


def test_forward_many_connections(agent: Agent, servers: list[Server]) -> None:
    def http(s: socket.socket) -> None:
        req = s.recv(4096)
        body = b"you asked " + req.split(b" ")[1]
        s.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.close()

    srv = Server(http)
    servers.append(srv)
    port = agent.tunnels.forward(srv.port)
    results: dict[int, bytes] = {}

    def fetch(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
            c.sendall(b"GET /%d HTTP/1.0\r\n\r\n" % i)
            results[i] = recv_all(c)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(20))
    for i, r in results.items():
        assert r.endswith(b"you asked /%d" % i), r


def test_forward_to_closed_guest_port_resets(agent: Agent) -> None:
    port = agent.tunnels.forward(_free_port())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert c.recv(10) == b""


def test_expose_reaches_host_service(agent: Agent, servers: list[Server]) -> None:
    srv = Server(echo)
    servers.append(srv)
    gport = agent.tunnels.expose(srv.port, _free_port())
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gport), timeout=10) as c:
            c.sendall(b"ping over expose")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"ping over expose"
    assert srv.accepted == 3


def test_expose_to_closed_host_port_resets_guest_side(agent: Agent) -> None:
    gport = agent.tunnels.expose(_free_port(), _free_port())
    # The reset can beat the handshake's end (then connect itself sees it) or come after it.
    with pytest.raises(ConnectionResetError):
        with socket.create_connection(("127.0.0.1", gport), timeout=10) as c:
            c.settimeout(10)
            c.recv(10)


def test_expose_port_in_use_raises(agent: Agent, servers: list[Server]) -> None:
    busy = Server(echo)
    servers.append(busy)
    with pytest.raises(OSError) as ei:
        agent.tunnels.expose(busy.port, busy.port)
    assert isinstance(ei.value, OSError) and "in use" in str(ei.value).lower()


def test_flooding_peer_never_read_stalls_nothing(agent: Agent, servers: list[Server]) -> None:
    """A guest peer writes without end while the host never reads: its tunnel stops at the
    window, the agent's memory stays flat, commands and other tunnels carry on."""

    def flood(s: socket.socket) -> None:
        chunk = b"x" * 65536
        while True:
            s.sendall(chunk)

    fl, ok = Server(flood), Server(echo)
    servers += [fl, ok]
    stuck = [agent.tunnels.connect(fl.port) for _ in range(4)]
    time.sleep(1.0)
    rss0 = agent.rss_kib()
    time.sleep(1.5)
    t0 = time.monotonic()
    assert agent.client.exec(["echo", "still here"]).stdout == b"still here\n"
    assert time.monotonic() - t0 < 5
    s = agent.tunnels.connect(ok.port)
    s.sendall(b"other tunnel")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"other tunnel"
    assert agent.rss_kib() - rss0 < 8 * 1024, "agent memory grew under a flood"
    for x in stuck:
        x.close()


def test_peer_that_never_reads_stalls_nothing(agent: Agent, servers: list[Server]) -> None:
    hold = threading.Event()

    def never_read(s: socket.socket) -> None:
        hold.wait(60)

    nr, ok = Server(never_read), Server(echo)
    servers += [nr, ok]
    s = agent.tunnels.connect(nr.port)
    s.settimeout(0.5)
    sent = 0
    with contextlib.suppress(TimeoutError, BlockingIOError):
        while sent < (64 << 20):
            sent += s.send(b"y" * 65536)
    assert sent < (64 << 20), "64 MiB went into a peer that never reads: nothing bounded it"
    assert agent.client.exec(["echo", "ok"]).stdout == b"ok\n"
    s2 = agent.tunnels.connect(ok.port)
    s2.sendall(b"z")
    s2.shutdown(socket.SHUT_WR)
    assert recv_all(s2) == b"z"
    hold.set()
    s.close()


def test_peer_closing_early_or_sending_garbage(agent: Agent, servers: list[Server]) -> None:
    def rude(s: socket.socket) -> None:
        s.sendall(os.urandom(100_000))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # reset, mid-stream

    def early(s: socket.socket) -> None:
        s.close()

    r, e = Server(rude), Server(early)
    servers += [r, e]
    for _ in range(5):
        with agent.tunnels.connect(e.port) as c:
            assert recv_all(c, 10) == b""
        try:  # the reset may come before the agent saw its connect complete
            c = agent.tunnels.connect(r.port)
        except ConnectionResetError:
            continue
        with contextlib.suppress(ConnectionResetError):
            recv_all(c, 10)
        c.close()
    assert agent.client.exec(["echo", "fine"]).stdout == b"fine\n"


def test_malformed_tunnel_frames_are_refused(agent: Agent, servers: list[Server]) -> None:
    srv = Server(echo)
    servers.append(srv)
    c = agent.client
    before = len(c.protocol_errors)
    c.send_frame(FrameType.TCP_CONNECT, 7, b"\x01")  # short payload
    c.send_frame(FrameType.TCP_CONNECT, 8, struct.pack("<II", 0, WINDOW))  # port 0
    c.send_frame(FrameType.TCP_LISTEN, 9, struct.pack("<I", 70000))
    c.send_frame(FrameType.TCP_ATTACH, 10, struct.pack("<III", 1, 99, WINDOW))  # no such conn
    c.send_frame(FrameType.TCP_CREDIT, 11, b"")  # malformed, unknown chan
    c.send_frame(0x1F, 12, b"")  # unknown type in the tunnel range
    c.send_frame(FrameType.TCP_DATA, 13, b"data for nobody")  # dropped silently
    c.send_frame(FrameType.TCP_CLOSE, 14, struct.pack("<I", 0))  # dropped silently
    assert c.exec(["true"]).exit_code == 0
    deadline = time.monotonic() + 5
    while len(c.protocol_errors) - before < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    codes = {chan: code for chan, code, _ in list(c.protocol_errors)[before:]}
    assert codes.get(7) == ErrorCode.BAD_PAYLOAD
    assert codes.get(8) == ErrorCode.BAD_PAYLOAD
    assert codes.get(9) == ErrorCode.BAD_PAYLOAD
    assert codes.get(10) == ErrorCode.UNKNOWN_CHAN
    assert codes.get(11) == ErrorCode.BAD_PAYLOAD
    assert codes.get(12) == ErrorCode.UNKNOWN_TYPE
    assert 13 not in codes and 14 not in codes


def test_data_past_the_agents_window_resets_the_tunnel(agent: Agent, servers: list[Server]) -> None:
    hold = threading.Event()
    srv = Server(lambda s: hold.wait(30))
    servers.append(srv)
    c = agent.client
    from pytest_ignition.agent import ChannelSink, Frame

    class Q(ChannelSink):
        def __init__(self) -> None:
            self.items: list[Frame | None] = []

        def put(self, item: Frame | None) -> None:
            self.items.append(item)

    q = Q()
    chan = c.open_channel(q)
    c.send_frame(FrameType.TCP_CONNECT, chan, struct.pack("<II", srv.port, WINDOW))
    deadline = time.monotonic() + 5
    while not q.items and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q.items and q.items[0] is not None and q.items[0].type == FrameType.TCP_CONNECTED
    (agent_window,) = struct.unpack("<I", q.items[0].payload)
    blob = b"w" * 65536
    # Far past the window and the kernel's socket buffers, with the peer not reading.
    for _ in range((48 << 20) // len(blob) + agent_window // len(blob)):
        c.send_frame(FrameType.TCP_DATA, chan, blob)
    while not any(i is not None and i.type == FrameType.TCP_CLOSED for i in q.items):
        assert time.monotonic() < deadline + 10, q.items
        time.sleep(0.02)
    assert c.exec(["true"]).exit_code == 0
    hold.set()
    c.close_channel(chan)


def test_close_stops_listening_and_resets_connections(agent: Agent, servers: list[Server]) -> None:
    srv = Server(echo)
    servers.append(srv)
    port = agent.tunnels.forward(srv.port)
    live = agent.tunnels.connect(srv.port)
    agent.tunnels.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    live.settimeout(5)
    assert live.recv(10) == b""
    with pytest.raises(RuntimeError):
        agent.tunnels.forward(srv.port)
