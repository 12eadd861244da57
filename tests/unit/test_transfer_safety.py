"""Host safety of guest -> host transfers, against the real C agent running locally.

The agent (guest/agent/*.c, built for the host as in test_agent_local.py) plays a hostile guest:
its "guest filesystem" is a directory here, where the test plants setuid files, device nodes,
FIFOs, sockets and symlink traps. ``copy_from``/``read_file`` must never create a setuid, setgid
or sticky file or a special file on the host, never write through a symlink, and stop at the
transfer cap with host memory bounded. A scripted fake agent covers what the real agent never
sends (names with ``..``, a file that grows past its stat size). Also: the default command
timeout, and the diagnosis of a VM whose agent or process died.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_ignition.agent import (
    AgentClient,
    AgentError,
    AgentTransferLimit,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from pytest_ignition.vm import VM, CommandTimeout, GuestFailure, TransferTooLarge, diagnose

sys.path.insert(0, str(Path(__file__).parent))
from test_agent_local import LocalAgent, _compile  # noqa: E402


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "ignition-agent"
    _compile(out)
    return out


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[LocalAgent]:
    a = LocalAgent(agent_bin, tmp_path)
    yield a
    if a.proc.poll() is None:
        a.stop()


@pytest.fixture
def client(agent: LocalAgent) -> Iterator[AgentClient]:
    c = agent.client()
    yield c
    c.close()


def _vm_on(client: AgentClient, machine: object | None = None, **kw: object) -> VM:
    m = machine or SimpleNamespace(
        agent=client, close=lambda: None, is_alive=lambda: True, console_tail=lambda n=0: ""
    )
    return VM(SimpleNamespace(name="local"), m, None, **kw)  # type: ignore[arg-type]


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_mode for p in sorted(root.rglob("*"))}


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- special bits, files


def test_copy_from_strips_setuid_setgid_sticky_and_skips_specials(
    client: AgentClient, tmp_path: Path
) -> None:
    g = tmp_path / "guest"
    (g / "sticky").mkdir(parents=True)
    os.chmod(g / "sticky", 0o1777)
    (g / "sgid-dir").mkdir()
    os.chmod(g / "sgid-dir", 0o2755)
    for name, mode in (("suid", 0o4755), ("sgid", 0o2711), ("both", 0o6777)):
        (g / name).write_bytes(b"#!/bin/sh\nid\n")
        os.chmod(g / name, mode)
    os.mkfifo(g / "fifo")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(g / "sock"))
    if os.geteuid() == 0:
        os.mknod(g / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(g / "disk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    os.symlink("/etc/passwd", g / "abs-link")
    os.symlink("../../outside", g / "sticky" / "rel-link")

    vm = _vm_on(client)
    back = tmp_path / "back"
    skipped = vm.copy_from(str(g), back)
    srv.close()

    modes = _modes(back)
    assert set(modes) == {"sticky", "sgid-dir", "suid", "sgid", "both"}
    for path, mode in modes.items():
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), (path, oct(mode))
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), path
    assert stat.S_IMODE(modes["suid"]) == 0o755 and stat.S_IMODE(modes["both"]) == 0o777
    assert stat.S_IMODE(modes["sticky"]) == 0o777
    assert (back / "suid").read_bytes() == b"#!/bin/sh\nid\n"
    text = "\n".join(skipped)
    for what in ("fifo (FIFO)", "sock (socket)", "abs-link (symlink)", "rel-link (symlink)"):
        assert what in text, skipped
    if os.geteuid() == 0:
        assert "null (character device)" in text and "disk (block device)" in text

    # one file: the same rule
    one = tmp_path / "one"
    one.mkdir()
    vm.copy_from(str(g / "both"), one)
    assert stat.S_IMODE((one / "both").stat().st_mode) == 0o777
    with pytest.raises(AgentError, match="not a regular file"):
        vm.copy_from(str(g / "fifo"), tmp_path / "fifo-copy")
    assert not (tmp_path / "fifo-copy").exists()


# --------------------------------------------------------------------------- symlink traps


def test_copy_from_never_writes_through_host_symlinks(client: AgentClient, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    g = tmp_path / "guest"
    (g / "sub").mkdir(parents=True)
    (g / "sub" / "victim").write_bytes(b"PWNED-dir")
    (g / "file").write_bytes(b"PWNED-file")
    (g / "deep" / "er").mkdir(parents=True)
    (g / "deep" / "er" / "victim").write_bytes(b"PWNED-deep")

    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "sub")  # a parent of a guest file is a host symlink
    os.symlink(victim, dest / "file")  # a guest file's own name is a host symlink
    os.symlink(outside, dest / "deep")

    vm = _vm_on(client)
    skipped = vm.copy_from(str(g), dest)
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(outside)) == ["victim"]
    # the symlink at the file's name was replaced by the guest's file, not followed
    assert not (dest / "file").is_symlink() and (dest / "file").read_bytes() == b"PWNED-file"
    # the symlinked directories were left alone and their contents skipped
    assert (dest / "sub").is_symlink() and (dest / "deep").is_symlink()
    assert any(s.startswith("sub ") for s in skipped), skipped
    assert any(s.startswith("sub/victim") for s in skipped), skipped
    assert not [p for p in os.listdir(dest) if ".ignition-" in p]  # no temp files left

    # a single file copied onto a symlink replaces the symlink
    link = tmp_path / "link"
    os.symlink(victim, link)
    vm.copy_from(str(g / "file"), link)
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"PWNED-file"


def test_guest_symlink_swapped_in_during_copy_is_not_followed(
    client: AgentClient, tmp_path: Path
) -> None:
    """The guest lists a directory, then turns it into a symlink before its files are fetched:
    the host only ever writes files it created itself under the destination."""
    g = tmp_path / "guest"
    (g / "d").mkdir(parents=True)
    for i in range(50):
        (g / "d" / f"f{i}").write_bytes(b"x" * 1000)
    outside = tmp_path / "outside"
    outside.mkdir()
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            try:
                os.rename(g / "d", g / "d.real")
                os.symlink(outside, g / "d")
                time.sleep(0.001)
                os.unlink(g / "d")
                os.rename(g / "d.real", g / "d")
            except OSError:
                pass

    t = threading.Thread(target=swap)
    t.start()
    try:
        for n in range(5):
            with _maybe():
                _vm_on(client).copy_from(str(g), tmp_path / f"back{n}")
    finally:
        stop.set()
        t.join()
    assert os.listdir(outside) == []
    for n in range(5):
        root = tmp_path / f"back{n}"
        if root.exists():
            for p in root.rglob("*"):
                assert not p.is_symlink(), p


class _maybe:
    """The guest's race may make a fetch fail (ENOENT); that is fine, a write elsewhere is not."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, ev: object, tb: object) -> bool:
        return et is not None and issubclass(et, AgentError)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a scripted hostile agent


class FakeAgent:
    """Answers GET requests with scripted frames over a socketpair (what no real agent sends)."""

    def __init__(self, script: dict[bytes, list[tuple[int, bytes]]]) -> None:
        self.script = script
        self.host, self.guest = socket.socketpair()
        self.sent_data = 0
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = FrameDecoder()
        try:
            while True:
                data = self.guest.recv(65536)
                if not data:
                    return
                for f in dec.feed(data):
                    if f.type == FrameType.SIGNAL:
                        self.cancelled.set()
                        continue
                    if f.type != FrameType.GET:
                        continue
                    path = f.payload.split(b"\0")[0]
                    for ftype, payload in self.script.get(path, []):
                        if ftype == FrameType.DATA:
                            self.sent_data += len(payload)
                        self.guest.sendall(encode_frame(ftype, f.chan, payload))
        except OSError:
            return

    def close(self) -> None:
        self.guest.close()


def _stat(mode: int, size: int) -> tuple[int, bytes]:
    return FrameType.STAT, struct.pack("<IQ", mode, size)


def _entry(mode: int, size: int, name: bytes) -> bytes:
    return struct.pack("<IQ", mode, size) + name + b"\0"


@pytest.mark.parametrize(
    "name", [b"../escape", b"a/../../escape", b"/etc/passwd", b"a//b", b".", b"a/./b"]
)
def test_hostile_listing_names_are_refused(tmp_path: Path, name: bytes) -> None:
    fake = FakeAgent(
        {
            b"/g": [
                _stat(stat.S_IFDIR | 0o755, 0),
                (FrameType.LIST, _entry(stat.S_IFREG | 0o644, 1, name)),
                (FrameType.LIST, b""),
            ]
        }
    )
    client = AgentClient(fake.host)
    try:
        with pytest.raises(AgentError, match="refusing entry path"):
            client.get_tree("/g", tmp_path / "dest", stat.S_IFDIR | 0o755)
        assert not (tmp_path / "escape").exists()
    finally:
        client.close()
        fake.close()


def test_file_growing_past_its_stat_size_stops_at_the_cap(tmp_path: Path) -> None:
    chunk = b"z" * 65536
    fake = FakeAgent(
        {
            b"/f": [_stat(stat.S_IFREG | 0o644, 10)] + [(FrameType.DATA, chunk)] * 64,
        }
    )
    client = AgentClient(fake.host)
    try:
        with pytest.raises(AgentTransferLimit):
            client.get_file("/f", limit=200_000)
        assert fake.cancelled.wait(5)
        with pytest.raises(AgentTransferLimit):
            client.get_tree("/f", tmp_path / "out", stat.S_IFREG | 0o644, limit=200_000)
        assert not (tmp_path / "out").exists()
        assert os.listdir(tmp_path) == []  # the partial temp file is gone
    finally:
        client.close()
        fake.close()


# --------------------------------------------------------------------------- the transfer cap


def test_read_file_cap_stops_before_reading(client: AgentClient, tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(200 << 20)  # 200 MiB, sparse on the "guest" side
    vm = _vm_on(client, max_transfer=8 << 20, max_transfer_source="environment variable X")
    _peak_rss_reset()
    before = _rss()
    t0 = time.monotonic()
    with pytest.raises(TransferTooLarge) as ei:
        vm.read_file(str(big))
    took = time.monotonic() - t0
    grown = _peak_rss() - before
    msg = str(ei.value)
    assert "8 MiB" in msg and "--ignition-max-transfer" in msg and "environment variable X" in msg
    assert "max_size=" in msg
    assert grown < 16 << 20, grown
    assert took < 10
    # the per-call cap, and 0 = none
    (tmp_path / "small").write_bytes(b"s" * 5000)
    with pytest.raises(TransferTooLarge, match="max_size=4096 of this call"):
        vm.read_file(str(tmp_path / "small"), max_size=4096)
    assert vm.read_file(str(tmp_path / "small"), max_size=0) == b"s" * 5000
    assert vm.read_file(str(tmp_path / "small"), max_size="5000") == b"s" * 5000
    assert client.ping() >= 0  # the cancelled transfer left the connection usable


def test_copy_from_tree_total_cap_and_bounded_memory(client: AgentClient, tmp_path: Path) -> None:
    g = tmp_path / "guest"
    g.mkdir()
    for i in range(6):
        (g / f"part{i}").write_bytes(os.urandom(1 << 20))
    vm = _vm_on(client, max_transfer=3 << 20)
    dest = tmp_path / "dest"
    with pytest.raises(TransferTooLarge, match="3 MiB") as ei:
        vm.copy_from(str(g), dest)
    assert "guest tree" in str(ei.value)
    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    assert written <= 3 << 20
    assert not [p for p in os.listdir(dest) if ".ignition-" in p]

    # a large single file is streamed to disk, not held in memory
    (g / "huge").write_bytes(b"")
    with open(g / "huge", "r+b") as f:
        f.truncate(96 << 20)
    vm.max_transfer = 0
    _peak_rss_reset()
    before = _rss()
    vm.copy_from(str(g / "huge"), tmp_path / "huge")
    grown = _peak_rss() - before
    assert (tmp_path / "huge").stat().st_size == 96 << 20
    assert grown < 32 << 20, f"host RSS grew by {grown >> 20} MiB copying 96 MiB"


# --------------------------------------------------------------------------- timeouts and failures


def test_default_command_timeout_names_the_setting(client: AgentClient) -> None:
    vm = _vm_on(client, command_timeout=0.5, command_timeout_source="ini ignition_command_timeout")
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as ei:
        vm.run("sleep 30")
    assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert "0.5s" in msg and "ini ignition_command_timeout" in msg
    assert "--ignition-command-timeout" in msg and "IGNITION_COMMAND_TIMEOUT" in msg
    assert "command_timeout" in msg and "timeout=" in msg
    with pytest.raises(CommandTimeout, match="timeout=0.3 of this call"):
        vm.run("sleep 30", timeout=0.3)
    assert vm.run("sleep 1; echo done", timeout=0).stdout == "done\n"  # 0: no timeout
    assert vm.broken is None
    assert vm.run("echo still").stdout == "still\n"


def test_agent_death_mid_command_is_diagnosed(agent: LocalAgent, client: AgentClient) -> None:
    vm = _vm_on(client, command_timeout=60)

    def kill_soon() -> None:
        time.sleep(0.5)
        agent.proc.kill()

    threading.Thread(target=kill_soon).start()
    t0 = time.monotonic()
    with pytest.raises(GuestFailure) as ei:
        vm.run("sleep 30")
    assert time.monotonic() - t0 < 10
    assert "the guest agent died" in str(ei.value) and "'sleep 30'" in str(ei.value)
    assert vm.broken is not None
    agent.proc.wait()


def test_diagnose_vm_process_exit_and_panic_line() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait()
    tail = (
        "[    1.0] sysrq: Trigger a crash\n"
        "[    1.1] Kernel panic - not syncing: sysrq triggered crash\n"
        "[    1.2] CPU: 0 PID: 1 Comm: sh\n"
    )
    m = SimpleNamespace(proc=proc, is_alive=lambda: False, console_tail=lambda n=0: tail)
    d = diagnose(m, "disconnected")
    assert "the guest kernel panicked: [    1.1] Kernel panic - not syncing: sysrq" in d
    assert "exited with code 3" in d
    m2 = SimpleNamespace(
        proc=SimpleNamespace(returncode=0),
        is_alive=lambda: False,
        console_tail=lambda n=0: "reboot: Power down\n",
    )
    assert diagnose(m2, "disconnected") == (
        "the guest powered off; the VM process exited with code 0"
    )
    m3 = SimpleNamespace(
        proc=SimpleNamespace(returncode=-9), is_alive=lambda: False, console_tail=lambda n=0: ""
    )
    assert diagnose(m3) == "the VM process was killed by signal 9"


def test_diagnose_an_unresponsive_guest_carries_the_vmms_probe() -> None:
    """A running VM whose agent stopped answering: the diagnosis quotes the VMM's probe (the
    bundled VMM's vCPU, timer and queue state), and a probe that fails is said, not raised."""
    asked: list[float] = []

    def probe_text(timeout: float = 10.0) -> str:
        asked.append(timeout)
        return "vcpu0 halted IF=1; vsock rx avail 12 used 12"

    m = SimpleNamespace(
        proc=None, is_alive=lambda: True, console_tail=lambda n=0: "", probe_text=probe_text
    )
    d = diagnose(m, "timeout: no answer for 1 s", wait=0)
    assert d == (
        "the guest is unresponsive (timeout: no answer for 1 s; VM process running); "
        "VM state: vcpu0 halted IF=1; vsock rx avail 12 used 12"
    )
    assert asked and asked[0] <= 10

    def broken_probe(timeout: float = 10.0) -> str:
        raise OSError("control socket gone")

    m.probe_text = broken_probe
    assert "VM state: (no probe: OSError('control socket gone'))" in diagnose(m, "timeout", wait=0)
    # QEMU's machines have no probe: the line is as before
    del m.probe_text
    assert diagnose(m, "timeout", wait=0).endswith("(timeout; VM process running)")


def test_diagnose_a_bundled_vmm_that_exited_because_its_guest_halted() -> None:
    """The bundled VMM's exit status 3 (every vCPU halted with interrupts off: the default
    guest's poweroff) says "powered off or halted" with no console line at all."""
    from pytest_ignition.engines.ignition import VMM_EXIT_HALTED, IgnitionMachine
    from pytest_ignition.vmm.machine import EXIT_HALTED

    assert VMM_EXIT_HALTED == EXIT_HALTED
    m = object.__new__(IgnitionMachine)  # only its process matters here
    m.proc = None
    assert m.exit_cause() is None
    m.proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({EXIT_HALTED})"])
    m.proc.wait()
    m.console_tail = lambda n=0: ""  # type: ignore[method-assign]
    d = diagnose(m, "disconnected", wait=0)
    assert d.startswith("the guest powered off or halted (every vCPU halted"), d
    assert d.endswith("the VM process exited with code 3"), d
    m.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(0)"])
    m.proc.wait()
    assert m.exit_cause() is None
    assert diagnose(m, "disconnected", wait=0) == "the VM process exited with code 0"


def test_diagnose_killed_vm_process() -> None:
    m3 = SimpleNamespace(
        proc=SimpleNamespace(returncode=-9), is_alive=lambda: False, console_tail=lambda n=0: ""
    )
    assert diagnose(m3) == "the VM process was killed by signal 9"
    m4 = SimpleNamespace(
        is_alive=lambda: True,
        console_tail=lambda n=0: "Out of memory: Killed process 77 (ignition-agent)\n",
    )
    d4 = diagnose(m4, "disconnected", wait=0)
    assert "agent died" in d4 and "OOM killer: Out of memory: Killed process 77" in d4


def test_agent_restart_announcement_fails_requests_in_flight() -> None:
    """virtio-serial never shows the guest end closing: a restarted agent's STARTED frame
    (ERROR 1009 on channel 0) must end the requests the dead agent had, at once."""
    host, guest = socket.socketpair()
    client = AgentClient(host)
    dec = FrameDecoder()

    def fake() -> None:
        while True:
            data = guest.recv(65536)
            if not data:
                return
            for f in dec.feed(data):
                if f.type == FrameType.RESET:
                    # a STARTED before the session began (the agent booting) is ignored
                    guest.sendall(encode_frame(FrameType.ERROR, 0, struct.pack("<I", 1009)))
                    guest.sendall(encode_frame(FrameType.PONG, f.chan, f.payload))
                elif f.type == FrameType.EXEC:
                    time.sleep(0.3)
                    guest.sendall(
                        encode_frame(FrameType.ERROR, 0, struct.pack("<I", 1009) + b"started")
                    )

    threading.Thread(target=fake, daemon=True).start()
    try:
        client.wait_ready(5)
        assert client.connected
        t0 = time.monotonic()
        with pytest.raises(AgentError, match="the guest agent restarted"):
            client.exec("sleep 100", timeout=60)
        assert time.monotonic() - t0 < 5
        assert not client.connected
    finally:
        client.close()
        guest.close()


def test_watchdog_fails_a_request_when_the_guest_halts(client: AgentClient) -> None:
    started = time.monotonic()

    def tail(n: int = 0) -> str:
        return "reboot: System halted\n" if time.monotonic() - started > 1.0 else "booted\n"

    m = SimpleNamespace(agent=client, close=lambda: None, is_alive=lambda: True, console_tail=tail)
    vm = _vm_on(client, machine=m, command_timeout=60)
    with pytest.raises(GuestFailure) as ei:
        vm.run("sleep 100")
    assert time.monotonic() - started < 6
    assert "powered off or halted" in str(ei.value) and vm.broken
