"""End to end: the built guest boots under QEMU (microvm, TCG) and its agent answers over
virtio-serial: ping, ``uname -a``, exit codes, a 1 MiB binary file both ways, clock sync.

QEMU is started here directly with the flags the QEMU engine uses for the agent channel, so this
test checks the guest image and the agent, not the engine.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.agent import AgentClient, AgentError, AgentTimeout

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 180.0


class Guest:
    def __init__(
        self, proc: subprocess.Popen[bytes], log: Path, sock: Path, client: AgentClient
    ) -> None:
        self.proc = proc
        self.log = log
        self.sock = sock
        self.client = client

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    qemu = shutil.which("qemu-system-x86_64")
    require(qemu, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import DEFAULT_CMDLINE, find_guest

    image = find_guest()
    require(
        image is not None,
        "no built guest image: run `python -m pytest_ignition.guest build` first",
    )
    assert image is not None and qemu is not None
    tmp = tmp_path_factory.mktemp("qemu-agent")
    sock = tmp / "agent.sock"
    log = tmp / "console.log"
    # virtio-serial on microvm: the virtio-mmio variant of the bus, one named port on a chardev
    # socket that QEMU listens on (wait=off: the guest boots whether or not we are connected).
    args = [
        qemu,
        "-M",
        "microvm,acpi=off",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        DEFAULT_CMDLINE,
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,path={sock},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=org.ignition.agent",
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    client = None
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"QEMU did not start (rc={proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        client = AgentClient.connect_unix(sock, timeout=30)
        try:
            client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        except AgentTimeout:
            pytest.fail(f"the agent did not answer a ping:\n{log.read_text()[-3000:]}")
        g = Guest(proc, log, sock, client)
        yield g
        client = g.client
    finally:
        if client is not None:
            client.close()
        proc.kill()
        proc.wait(timeout=30)


def test_ping(guest: Guest) -> None:
    assert guest.client.ping(b"hello guest") > 0


def test_uname(guest: Guest) -> None:
    r = guest.client.exec(["uname", "-a"], timeout=60)
    assert r.exit_code == 0, r
    out = r.stdout.decode()
    fields = out.split()
    assert fields[0] == "Linux" and "x86_64" in fields, out
    # the release is the one the guest pipeline built
    from pytest_ignition.guest import find_guest

    image = find_guest()
    assert image is not None
    m = re.search(r"Linux/\S+ (\S+) Kernel Configuration", image.config.read_text())
    assert m, "no version line in the kernel .config"
    assert fields[2].startswith(m.group(1)), (out, m.group(1))
    assert r.stderr == b""


def test_failing_commands(guest: Guest) -> None:
    c = guest.client
    assert c.exec("exit 42", timeout=60).exit_code == 42
    r = c.exec(["ls", "/does-not-exist"], timeout=60)
    assert r.exit_code != 0 and b"does-not-exist" in r.stderr
    assert c.exec(["no-such-program-xyz"], timeout=60).exit_code == 127
    r = c.exec(["echo", "$HOME;", "x"], timeout=60)
    assert r.stdout == b"$HOME; x\n"


def test_one_mib_file_round_trip(guest: Guest) -> None:
    c = guest.client
    data = os.urandom(1 << 20)
    c.put_file("/tmp/e2e/blob.bin", data, mode=0o640)
    mode, size = c.stat("/tmp/e2e/blob.bin")
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o640 and size == len(data)
    r = c.exec(["sha256sum", "/tmp/e2e/blob.bin"], timeout=120)
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert c.get_file("/tmp/e2e/blob.bin") == data


def test_one_mib_stdin_to_stdout(guest: Guest) -> None:
    data = os.urandom(1 << 20)
    r = guest.client.exec(["cat"], input=data, timeout=120)
    assert r.exit_code == 0
    assert r.stdout == data


def test_timeout_kills_the_group_in_the_guest(guest: Guest) -> None:
    c = guest.client
    with pytest.raises(AgentTimeout) as ei:
        c.exec("sleep 300 & echo $!; sleep 300", timeout=2)
    assert ei.value.result is not None and ei.value.result.signal == 9
    bg = ei.value.result.stdout.split()[0].decode()
    # the background sleep went with the group (init reaps it)
    end = time.monotonic() + 30
    while c.exec(["kill", "-0", bg], timeout=60).exit_code == 0 and time.monotonic() < end:
        time.sleep(0.2)
    assert c.exec(["kill", "-0", bg], timeout=60).exit_code != 0


def test_sync_sets_clock_and_reseeds(guest: Guest) -> None:
    c = guest.client
    target = 1_900_000_000  # 2030-03-17
    c.sync(time_ns=target * 10**9)
    now = int(c.exec(["date", "+%s"], timeout=60).stdout)
    assert target <= now < target + 600
    c.sync()  # back to the host's clock
    assert abs(int(c.exec(["date", "+%s"], timeout=60).stdout) - time.time()) < 600
    with pytest.raises(ValueError):
        c.sync(entropy=b"short")


def test_tree_round_trip(guest: Guest, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "x").write_bytes(b"x" * 1000)
    (src / "d" / "x").chmod(0o600)
    (src / "run").write_bytes(b"#!/bin/sh\necho ran\n")
    (src / "run").chmod(0o755)
    guest.client.put_tree(src, "/tmp/tree")
    assert guest.client.exec(["/tmp/tree/run"], timeout=60).stdout == b"ran\n"
    back = tmp_path / "back"
    guest.client.get_tree("/tmp/tree", back)
    assert (back / "d" / "x").read_bytes() == b"x" * 1000
    assert stat.S_IMODE((back / "d" / "x").stat().st_mode) == 0o600
    assert stat.S_IMODE((back / "run").stat().st_mode) == 0o755
    with pytest.raises(AgentError):
        guest.client.get_file("/tmp/tree/missing")


def test_reconnect_starts_a_fresh_session(guest: Guest) -> None:
    """virtio-serial: when the host side goes away, the agent ends the session (killing its
    processes) and serves the next connection from a clean state."""
    c = guest.client

    def run() -> None:
        try:
            c.exec("echo $$ > /tmp/held.t; mv /tmp/held.t /tmp/held.pid; exec sleep 300")
        except AgentError:
            pass  # disconnected below

    t = threading.Thread(target=run, daemon=True)
    t.start()
    end = time.monotonic() + 60
    pid = None
    while pid is None and time.monotonic() < end:
        try:
            pid = c.get_file("/tmp/held.pid").decode().strip()
        except AgentError:
            time.sleep(0.1)
    assert pid, "the held process did not start"
    c.close()
    t.join(timeout=30)
    new = AgentClient.connect_unix(guest.sock, timeout=30)
    guest.client = new
    new.wait_ready(timeout=60)
    assert new.exec(["echo", "fresh"], timeout=60).stdout == b"fresh\n"
    end = time.monotonic() + 30
    while new.exec(["kill", "-0", pid], timeout=60).exit_code == 0 and time.monotonic() < end:
        time.sleep(0.2)
    assert new.exec(["kill", "-0", pid], timeout=60).exit_code != 0, "process outlived its session"
