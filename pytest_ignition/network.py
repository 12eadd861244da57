"""Private L2 segments between VMs: the ``ignition_network`` fixture's :class:`Network`.

Owns the switch (one selector thread per network, in the test process) and the addressing of
its members. Every member VM comes from a snapshot of ``network=segment`` (see
:mod:`pytest_ignition.netdev`): its VMM listens on ``<machine sockdir>/net.sock`` with passt's
stream protocol (4-byte big-endian length + Ethernet frame) and the switch connects to it after
the restore. All clones of that snapshot share one MAC and no address, so :meth:`Network.add`
gives each member its own MAC and IPv4 address through the agent (``ip link set eth0 address``,
``ip addr add``) and writes every member's ``/etc/hosts`` with the others' names.

The switch learns source MACs per port, floods broadcast/multicast and unknown destinations,
and forwards only between ports that share a partition group (:meth:`Network.partition`),
optionally delaying or dropping frames per link (:meth:`Network.degrade`). Output to a port is
bounded (frames past ``MAX_QUEUED`` bytes are dropped, as a real switch would), frame lengths
are checked, and a port that sends a bad length is disconnected. The segment's addresses exist
only inside the guests and this switch: nothing is configured on a host interface, and the
agent channel (virtio-serial / vsock) never crosses the switch, so partitions never affect it.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import itertools
import logging
import random
import re
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_ignition.vm import VM

__all__ = ["Network", "NetworkError"]

log = logging.getLogger(__name__)

SUBNET = ipaddress.ip_network("10.213.0.0/24")
FIRST_HOST = 11  # member n (from 0) gets .11 + n
MAX_MEMBERS = 200
MAX_FRAME = 65535 + 14
MAX_QUEUED = 4 << 20  # bytes waiting for one port before frames to it are dropped
HOSTS_MARK = "# ignition-network"
CONNECT_TIMEOUT = 30.0
_LEN = struct.Struct(">I")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ids = itertools.count(1)


class NetworkError(Exception):
    """A member could not join, or a partition names unknown members."""


class _Port:
    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.writing = False
        self.frames_in = self.frames_out = self.dropped = 0


class _Switch:
    """The learning switch; every method but the control ones runs on its thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.ports: dict[str, _Port] = {}
        self.macs: dict[bytes, str] = {}
        self.groups: dict[str, int] | None = None  # partition: member -> group index
        self.links: dict[frozenset[str], tuple[float, float]] = {}  # -> (delay s, loss)
        self.delayed: list[tuple[float, int, str, bytes]] = []
        self.seq = itertools.count()
        self.inbox: list[tuple[str, Any]] = []
        self.closed = False
        self.rng = random.Random()
        self.thread = threading.Thread(
            target=self._run, name=f"ignition-switch-{name}", daemon=True
        )
        self.thread.start()

    # -- control (any thread)

    def post(self, op: str, arg: Any) -> None:
        with self.lock:
            self.inbox.append((op, arg))
        with contextlib.suppress(BlockingIOError, OSError):
            self.wake_w.send(b"x")

    def close(self) -> None:
        self.post("close", None)
        self.thread.join(timeout=10)

    # -- the thread

    def _run(self) -> None:
        try:
            while not self.closed:
                timeout = 1.0
                if self.delayed:
                    timeout = max(0.0, min(timeout, self.delayed[0][0] - time.monotonic()))
                for key, mask in self.sel.select(timeout):
                    port = key.data
                    if port is None:
                        with contextlib.suppress(BlockingIOError, OSError):
                            while self.wake_r.recv(4096):
                                pass
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._flush(port)
                    if mask & selectors.EVENT_READ and port.name in self.ports:
                        self._read(port)
                self._release_delayed()
                with self.lock:
                    ops, self.inbox = self.inbox, []
                for op, arg in ops:
                    self._control(op, arg)
        except Exception:
            log.exception("network %s: switch failed", self.name)
        finally:
            for p in list(self.ports.values()):
                self._drop(p, "switch closed")
            self.sel.close()
            self.wake_r.close()
            self.wake_w.close()

    def _control(self, op: str, arg: Any) -> None:
        if op == "add":
            name, sock = arg
            old = self.ports.get(name)
            if old is not None:
                self._drop(old, "replaced")
            sock.setblocking(False)
            port = _Port(name, sock)
            self.ports[name] = port
            self.sel.register(sock, selectors.EVENT_READ, port)
        elif op == "remove":
            p = self.ports.get(arg)
            if p is not None:
                self._drop(p, "removed")
        elif op == "close":
            self.closed = True

    def _drop(self, port: _Port, why: str) -> None:
        if self.ports.get(port.name) is port:
            del self.ports[port.name]
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(port.sock)
        port.sock.close()
        for mac in [m for m, n in self.macs.items() if n == port.name]:
            del self.macs[mac]
        log.debug("network %s: port %s gone (%s)", self.name, port.name, why)

    def _read(self, port: _Port) -> None:
        try:
            data = port.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._drop(port, f"recv: {e}")
        if not data:
            return self._drop(port, "the VM went away")
        buf = port.inbuf
        buf += data
        pos = 0
        while len(buf) - pos >= _LEN.size:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME or n < 14:
                log.warning(
                    "network %s: %s sent a frame length of %d; disconnected",
                    self.name,
                    port.name,
                    n,
                )
                return self._drop(port, "bad frame length")
            if len(buf) - pos - _LEN.size < n:
                break
            frame = bytes(buf[pos + _LEN.size : pos + _LEN.size + n])
            pos += _LEN.size + n
            port.frames_in += 1
            self._switch(port, frame)
        del buf[:pos]

    def _allowed(self, a: str, b: str) -> bool:
        g = self.groups
        return g is None or (a in g and b in g and g[a] == g[b])

    def _switch(self, src: _Port, frame: bytes) -> None:
        dst_mac, src_mac = frame[0:6], frame[6:12]
        if not src_mac[0] & 1:
            self.macs[src_mac] = src.name
        if dst_mac[0] & 1:
            targets = [n for n in self.ports if n != src.name]
        else:
            known = self.macs.get(dst_mac)
            if known is not None:
                targets = [known] if known != src.name else []
            else:
                targets = [n for n in self.ports if n != src.name]
        now = time.monotonic()
        for t in targets:
            if not self._allowed(src.name, t):
                continue
            delay, loss = self.links.get(frozenset((src.name, t)), (0.0, 0.0))
            if loss and self.rng.random() < loss:
                continue
            if delay > 0:
                heapq.heappush(self.delayed, (now + delay, next(self.seq), t, frame))
            else:
                self._send(t, frame)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, t, frame = heapq.heappop(self.delayed)
            self._send(t, frame)

    def _send(self, name: str, frame: bytes) -> None:
        port = self.ports.get(name)
        if port is None:
            return
        if len(port.outbuf) > MAX_QUEUED:
            port.dropped += 1
            return
        port.outbuf += _LEN.pack(len(frame))
        port.outbuf += frame
        port.frames_out += 1
        self._flush(port)

    def _flush(self, port: _Port) -> None:
        while port.outbuf:
            try:
                n = port.sock.send(port.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                return self._drop(port, f"send: {e}")
            del port.outbuf[:n]
        want = bool(port.outbuf)
        if want != port.writing and port.name in self.ports:
            ev = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(port.sock, ev, port)
            port.writing = want


class Network:
    """A private L2 segment; VMs join with ``ignition_vm_factory(network=net, hostname=...)``.

    ``members`` lists hostnames in joining order; ``address(name)`` and ``mac(name)`` give a
    member's IPv4 address and MAC. Every member's ``/etc/hosts`` names all the others.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"net{next(_ids)}"
        self._switch = _Switch(self.name)
        self._members: dict[str, tuple[VM, str, str]] = {}  # name -> (vm, ip, mac)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def members(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def address(self, hostname: str) -> str:
        return self._member(hostname)[1]

    def mac(self, hostname: str) -> str:
        return self._member(hostname)[2]

    def _member(self, hostname: str) -> tuple[VM, str, str]:
        with self._lock:
            if hostname not in self._members:
                raise NetworkError(
                    f"network {self.name}: no member {hostname!r} (members: {', '.join(self._members) or 'none'})"
                )
            return self._members[hostname]

    # -- joining ----------------------------------------------------------------------

    def add(self, vm: VM, hostname: str) -> None:
        """Connect ``vm`` (restored from a ``network=segment`` snapshot) to the switch and give
        it its address, MAC and hostname; refresh every member's /etc/hosts."""
        if self._closed:
            raise NetworkError(f"network {self.name} is closed")
        if not _HOSTNAME.match(hostname):
            raise NetworkError(f"hostname {hostname!r}: letters, digits and '-' only (at most 63)")
        sock_path = getattr(vm.machine, "net_socket", None)
        if sock_path is None:
            raise NetworkError(
                f"{vm!r} has no segment network device: make it with "
                f"ignition_vm_factory(network=net, hostname={hostname!r})"
            )
        with self._lock:
            if hostname in self._members:
                raise NetworkError(f"network {self.name}: hostname {hostname!r} is taken")
            n = len(self._members)
            if n >= MAX_MEMBERS:
                raise NetworkError(f"network {self.name}: at most {MAX_MEMBERS} members")
            ip = str(SUBNET.network_address + FIRST_HOST + n)
            mac = f"52:54:00:d5:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"
            self._members[hostname] = (vm, ip, mac)
        try:
            self._switch.post("add", (hostname, _connect(Path(sock_path))))
            self._configure(vm, hostname, ip, mac)
            self._write_hosts()
        except BaseException:
            with self._lock:
                self._members.pop(hostname, None)
            self._switch.post("remove", hostname)
            raise

    def _configure(self, vm: VM, hostname: str, ip: str, mac: str) -> None:
        script = f"""
set -e
IP=ip
command -v ip >/dev/null 2>&1 || IP="/proc/1/root/bin/busybox ip"
$IP link set eth0 down
$IP link set eth0 address {mac}
$IP -4 addr flush dev eth0
$IP addr add {ip}/{SUBNET.prefixlen} dev eth0
$IP link set eth0 up
echo {hostname} > /proc/sys/kernel/hostname
echo {hostname} > /etc/hostname
"""
        res = vm.run(script, timeout=60)
        if res.exit_code != 0:
            raise NetworkError(
                f"network {self.name}: configuring {hostname} ({ip}, {mac}) failed "
                f"(exit {res.exit_code}): {res.stderr.strip()[-500:]}"
            )

    def _write_hosts(self) -> None:
        with self._lock:
            members = list(self._members.items())
        lines = [f"{ip} {name} {HOSTS_MARK}" for name, (_, ip, _) in members]
        for _name, (vm, _, _) in members:
            try:
                old = vm.read_file("/etc/hosts").decode("utf-8", "replace")
            except Exception:
                old = "127.0.0.1 localhost\n"
            kept = [ln for ln in old.splitlines() if not ln.endswith(HOSTS_MARK)]
            vm.write_file("/etc/hosts", "\n".join(kept + lines) + "\n")

    # -- faults -----------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the segment: frames pass only between members of the same group (a member in
        no group is cut off from everyone). ``net.partition(["a"], ["b", "c"])``."""
        names = self.members
        mapping: dict[str, int] = {}
        for i, group in enumerate(groups):
            for m in [group] if isinstance(group, str) else group:
                if m not in names:
                    raise NetworkError(
                        f"network {self.name}: partition names {m!r}, not a member ({', '.join(names)})"
                    )
                if m in mapping:
                    raise NetworkError(f"network {self.name}: {m!r} is in two partition groups")
                mapping[m] = i
        with self._switch.lock:
            self._switch.groups = mapping

    def heal(self) -> None:
        """Undo :meth:`partition` and :meth:`degrade`: every member reaches every other."""
        with self._switch.lock:
            self._switch.groups = None
            self._switch.links = {}

    def degrade(self, a: str, b: str, delay_ms: float = 0, loss: float = 0.0) -> None:
        """Delay (``delay_ms``, each way) and drop (``loss``, 0..1, each frame) on the link
        between members ``a`` and ``b``; 0 and 0 restores it."""
        for m in (a, b):
            self._member(m)
        if delay_ms < 0 or not 0 <= loss <= 1:
            raise ValueError("delay_ms must be >= 0 and loss between 0 and 1")
        with self._switch.lock:
            key = frozenset((a, b))
            if delay_ms or loss:
                self._switch.links[key] = (delay_ms / 1000.0, float(loss))
            else:
                self._switch.links.pop(key, None)

    def stats(self) -> dict[str, dict[str, int]]:
        """Frames in/out and dropped per member port (for tests and debugging)."""
        with self._switch.lock:
            ports = dict(self._switch.ports)
        return {
            n: {"in": p.frames_in, "out": p.frames_out, "dropped": p.dropped}
            for n, p in ports.items()
        }

    def close(self) -> None:
        """Stop the switch (members keep running, cut off). Idempotent."""
        if not self._closed:
            self._closed = True
            self._switch.close()

    def __repr__(self) -> str:
        return f"<Network {self.name} members={self.members}>"


def _connect(path: Path) -> socket.socket:
    """Connect to a member VMM's listening net socket (it exists once the restore is done)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            if time.monotonic() > deadline:
                raise NetworkError(
                    f"the VM's network socket {path} did not accept within {CONNECT_TIMEOUT:g} s: {e}"
                ) from None
            time.sleep(0.02)
        except BaseException:
            s.close()
            raise


class NetworkFactory:
    """What the ``ignition_network`` fixture gives: ``ignition_network() -> Network`` (each call
    a new segment, all closed at teardown). Used as a network itself (``network=ignition_network``,
    ``ignition_network.partition(...)``), it stands for one default segment made on first use."""

    def __init__(self) -> None:
        self._nets: list[Network] = []
        self._default: Network | None = None

    def __call__(self, name: str | None = None) -> Network:
        net = Network(name)
        self._nets.append(net)
        return net

    @property
    def default(self) -> Network:
        if self._default is None:
            self._default = self()
        return self._default

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.default, attr)

    def close(self) -> None:
        for net in self._nets:
            net.close()
        self._nets.clear()


def split_factory_kwargs(config: dict[str, Any]) -> tuple[Network | None, str | None]:
    """Take ``network=<Network>`` and ``hostname=`` out of ``ignition_vm_factory`` keywords
    (``network="none"``/``"user"`` stay: they are ordinary settings)."""
    hostname = config.pop("hostname", None)
    if hostname is not None and not (isinstance(hostname, str) and _HOSTNAME.match(hostname)):
        raise NetworkError(f"hostname={hostname!r}: letters, digits and '-' only (at most 63)")
    net = config.get("network")
    if isinstance(net, NetworkFactory):
        net = net.default
    if isinstance(net, Network):
        del config["network"]
        return net, hostname
    return None, hostname


def set_hostname(vm: VM, hostname: str) -> None:
    """The guest's hostname (kernel and /etc/hostname), for VMs outside a network."""
    vm.run(
        f"echo {hostname} > /proc/sys/kernel/hostname && echo {hostname} > /etc/hostname",
        timeout=60,
    ).check()
