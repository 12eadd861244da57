"""Networking on real guests (QEMU here; the bundled VMM in tests/nested/test_network_ignition.py):
TCP over the agent channel both ways (vm.forward / vm.connect / vm.expose), network=user through
a real passt (the host's loopback as host.ignition.internal), and an ignition_network of three
VMs cut into partitions. Every VM is a restore of one snapshot per configuration, so all clones
carry the same MAC and address inside the snapshot. Servers in the guest are busybox's; servers
on the host listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pytest_ignition._testing import require
from pytest_ignition.vm import VM

PAGE = "served by busybox httpd in the guest\n"


def start_httpd(vm: VM, port: int, addr: str = "127.0.0.1", text: str = PAGE) -> None:
    vm.write_file("/tmp/www/index.html", text)
    # busybox httpd binds before it daemonizes: the port is open when this returns
    vm.run(["httpd", "-p", f"{addr}:{port}", "-h", "/tmp/www"], timeout=30).check()


def recv_all(s: socket.socket, timeout: float = 30.0) -> bytes:
    s.settimeout(timeout)
    out = bytearray()
    while True:
        data = s.recv(65536)
        if not data:
            return bytes(out)
        out += data


class HostServer:
    """An HTTP server on the host's 127.0.0.1 that answers every GET with its path."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = f"host saw {self.path}\n".encode()
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def host_server() -> Iterator[HostServer]:
    s = HostServer()
    yield s
    s.close()


# ------------------------------------------------------------------ over the agent channel


def test_forward_and_connect_reach_a_guest_http_server(ignition_vm: VM) -> None:
    vm = ignition_vm
    start_httpd(vm, 8080)
    port = vm.forward(8080)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
        assert r.read().decode() == PAGE
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:  # again
        assert r.status == 200
    with vm.connect(8080) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = recv_all(s)
    assert reply.startswith(b"HTTP/1.") and reply.endswith(PAGE.encode()), reply[:200]
    with pytest.raises(ConnectionRefusedError):
        vm.connect(8081)


def test_expose_lets_the_guest_fetch_from_the_host(
    ignition_vm: VM, host_server: HostServer
) -> None:
    vm = ignition_vm
    assert vm.expose(host_server.port, 9000) == 9000
    out = vm.check_output(["wget", "-q", "-O", "-", "http://127.0.0.1:9000/from-guest"], timeout=60)
    assert out == "host saw /from-guest\n"
    assert host_server.hits == ["/from-guest"]


def test_forwarders_end_with_the_vm(ignition_vm_factory) -> None:  # type: ignore[no-untyped-def]
    vm = ignition_vm_factory()
    start_httpd(vm, 8080)
    port = vm.forward(8080)
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
    vm.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)


def test_hostile_guest_peers_stall_nothing(ignition_vm: VM) -> None:
    """Guest servers that flood, never read, send garbage and close early: each stalls only
    its own connection; commands and other connections go on."""
    vm = ignition_vm
    vm.run("nc -l -p 7001 < /dev/zero > /dev/null 2>&1 &", timeout=30).check()  # floods
    vm.run("nc -l -p 7002 2>/dev/null | sleep 600 &", timeout=30).check()  # never reads
    vm.run("head -c 300000 /dev/urandom | nc -l -p 7003 >/dev/null 2>&1 &", timeout=30).check()
    vm.run("nc -l -p 7004 < /dev/null > /dev/null 2>&1 &", timeout=30).check()  # closes at once
    time.sleep(0.5)
    flood = vm.connect(7001)  # never read by the test
    stuck = vm.connect(7002)
    stuck.settimeout(2)
    sent = 0
    with contextlib.suppress(TimeoutError, BlockingIOError):
        while sent < (32 << 20):
            sent += stuck.send(b"x" * 65536)
    assert sent < (32 << 20), "32 MiB went into a guest peer that never reads"
    t0 = time.monotonic()
    assert vm.check_output(["echo", "alive"], timeout=60) == "alive\n"
    took = time.monotonic() - t0
    with vm.connect(7003) as g:
        garbage = recv_all(g, 60)
    assert len(garbage) == 300000
    with vm.connect(7004) as e:
        assert recv_all(e, 60) == b""
    vm.write_file("/tmp/big", os.urandom(1 << 20))
    assert len(vm.read_file("/tmp/big")) == 1 << 20
    assert took < 30, f"a command took {took:.1f} s beside a flooding tunnel"
    flood.close()
    stuck.close()


# ------------------------------------------------------------------ network=user (passt)


def test_user_network_reaches_the_host_by_name(  # type: ignore[no-untyped-def]
    ignition_vm_factory, host_server: HostServer
) -> None:
    require(shutil.which("passt") is not None, "passt is not installed (apt-get install passt)")
    vms = [ignition_vm_factory(network="user") for _ in range(2)]  # two clones, one snapshot
    for i, vm in enumerate(vms):
        addr = vm.check_output(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], timeout=60)
        assert "10.0.2.15/24" in addr  # the lease from the snapshot, in every clone
        assert "host.ignition.internal" in vm.read_file("/etc/hosts").decode()
        url = f"http://host.ignition.internal:{host_server.port}/clone{i}"
        out = vm.check_output(["timeout", "20", "wget", "-q", "-O", "-", url], timeout=90)
        assert out == f"host saw /clone{i}\n"
    assert host_server.hits == ["/clone0", "/clone1"]


# ------------------------------------------------------------------ ignition_network


def fetch(vm: VM, host: str, timeout: int = 30) -> bool:
    """One HTTP GET from ``vm`` to member ``host``, given up after ``timeout`` s. A fetch that
    must work gets a generous deadline (its first one also resolves ARP; the nested harness's
    guests are slow), one that must fail a short one (it returns as soon as wget gives up)."""
    # timeout(1), not wget -T: busybox's -T crashes resolving a name (its static glibc)
    r = vm.run(
        ["timeout", str(timeout), "wget", "-q", "-O", "-", f"http://{host}/"],
        timeout=timeout + 60,
    )
    return r.exit_code == 0 and r.stdout == f"I am {host}\n"


def test_three_vms_partition_and_heal(ignition_vm_factory, ignition_network) -> None:  # type: ignore[no-untyped-def]
    """Three restores of one network=segment snapshot (same MAC and no address in each) join a
    segment; [a] | [b, c] cuts a off both ways while b and c still talk; heal() undoes it.
    Also run on the bundled VMM by tests/nested/test_network_ignition.py."""
    net = ignition_network()
    vms = {h: ignition_vm_factory(network=net, hostname=h) for h in ("a", "b", "c")}
    assert net.members == ["a", "b", "c"]
    assert len({net.mac(h) for h in vms}) == 3 and len({net.address(h) for h in vms}) == 3
    for h, vm in vms.items():
        mac = vm.check_output(["cat", "/sys/class/net/eth0/address"], timeout=30).strip()
        assert mac == net.mac(h), f"{h}: eth0 has {mac}, the network gave it {net.mac(h)}"
        start_httpd(vm, 80, addr="0.0.0.0", text=f"I am {h}\n")
        hosts = vm.read_file("/etc/hosts").decode()
        for other in vms:
            assert f"{net.address(other)} {other}" in hosts
        assert vm.check_output("hostname", timeout=30).strip() == h
    a, b, c = vms["a"], vms["b"], vms["c"]
    assert fetch(a, "b") and fetch(b, "c") and fetch(c, "a")
    net.partition(["a"], ["b", "c"])
    assert not fetch(a, "b", timeout=3), "a reached b across the partition"
    assert not fetch(c, "a", timeout=3), "c reached a across the partition"
    assert fetch(b, "c"), "b could not reach c inside its own group"
    assert fetch(c, "b"), "c could not reach b inside its own group"
    assert a.check_output(["echo", "agent fine"], timeout=30) == "agent fine\n"
    net.heal()
    assert fetch(a, "b"), "a did not reach b after heal()"
    assert fetch(c, "a"), "c did not reach a after heal()"
