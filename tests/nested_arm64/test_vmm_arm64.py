"""Inside the arm64 nested harness: the bundled VMM's aarch64 machine boots the arm64 guest.

Each VM is a ``python3 -m pytest_ignition.vmm boot|restore`` process, as a user would start
it, with the console in a file and the VMM's log in another; the guest agent answers over
virtio-vsock (port 52, Firecracker's Unix-socket convention). One VM is booted per module and
then snapshotted, restored in a second process and rolled back in place there, so the module
costs one boot (the slow part under TCG) and one restore.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_ignition._testing import require

AGENT_PORT = 52
BOOT_TIMEOUT = 400.0  # an arm64 guest under KVM under TCG on a shared 2-core machine


def _guest() -> tuple[str, str]:
    kernel = os.environ.get("IGNITION_ARM64_KERNEL")
    initrd = os.environ.get("IGNITION_ARM64_INITRD")
    if not kernel or not initrd:
        from pytest_ignition.guest import find_guest

        g = find_guest("aarch64")
        require(
            g is not None,
            "arm64 guest not built (python -m pytest_ignition.guest build --arch aarch64)",
        )
        assert g is not None
        kernel, initrd = str(g.kernel), str(g.initrd)
    return kernel, initrd


@dataclass
class Vmm:
    proc: subprocess.Popen[bytes]
    dir: Path
    started: float

    @property
    def vsock(self) -> Path:
        return self.dir / "v.sock"

    @property
    def control(self) -> Path:
        return self.dir / "c.sock"

    def log_text(self) -> str:
        p = self.dir / "vmm.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def console_text(self) -> str:
        p = self.dir / "console.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def diagnostics(self) -> str:
        return (
            f"VMM status {self.proc.poll()}\n--- VMM log ---\n{self.log_text()[-3000:]}\n"
            f"--- console ---\n{self.console_text()[-3000:]}"
        )

    def agent(self, timeout: float = BOOT_TIMEOUT):
        from pytest_ignition.agent import AgentClient

        deadline = time.monotonic() + timeout
        while not self.vsock.exists():  # the VMM creates it before the guest runs
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the vsock socket never appeared\n{self.diagnostics()}")
            time.sleep(0.1)
        try:
            client = AgentClient.connect_vsock_uds(self.vsock, AGENT_PORT, timeout=timeout)
            client.wait_ready(timeout=120)
        except Exception as e:
            pytest.fail(f"agent never answered over vsock ({e})\n{self.diagnostics()}")
        return client

    def control_request(self, cmd: str, **args):
        from pytest_ignition.vmm.control import request

        return request(self.control, cmd, timeout=120, **args)

    def wait_socket(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the control socket never appeared\n{self.diagnostics()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"VMM did not exit within {timeout}s\n{self.diagnostics()}")


def _spawn(d: Path, *args: str) -> Vmm:
    d.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "pytest_ignition.vmm",
        *args,
        "--vsock",
        str(d / "v.sock"),
        "--control",
        str(d / "c.sock"),
        "--console",
        str(d / "console.log"),
    ]
    with open(d / "vmm.log", "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return Vmm(proc, d, time.monotonic())


@pytest.fixture(scope="module")
def booted(tmp_path_factory) -> Iterator[Vmm]:
    require(Path("/dev/kvm").exists(), "no /dev/kvm in the arm64 harness")
    kernel, initrd = _guest()
    d = tmp_path_factory.mktemp("arm64vm")
    v = _spawn(d / "boot", "boot", "--kernel", kernel, "--initrd", initrd, "--mem", "256M",
               "--boot-timer")  # fmt: skip
    v.store = d / "store"  # type: ignore[attr-defined]
    try:
        yield v
    finally:
        if v.proc.poll() is None:
            v.proc.kill()
        v.proc.wait(30)


def test_boots_to_agent_ready_and_runs_commands(booted: Vmm, capsys) -> None:
    with booted.agent() as client:
        ready = time.monotonic() - booted.started
        res = client.exec(["uname", "-m"], timeout=120)
        assert (res.exit_code, res.stdout) == (0, b"aarch64\n"), (res, booted.diagnostics())
        failing = client.exec("echo oops >&2; exit 7", timeout=120)
        assert (failing.exit_code, failing.stderr) == (7, b"oops\n"), failing
        # the device tree's devices as the guest sees them
        res = client.exec("cat /proc/interrupts; ls /sys/bus/virtio/devices", timeout=120)
        assert res.exit_code == 0, res
        assert b"GICv3" in res.stdout and b"virtio" in res.stdout, res.stdout
    m = re.search(r"Guest-boot-time = +(\d+) us +(\d+) ms", booted.log_text())
    assert m, booted.diagnostics()
    assert int(m.group(1)) > 0 and int(m.group(2)) == int(m.group(1)) // 1000
    st = booted.control_request("status")
    assert st["ok"] and st["state"] == "running" and st["arch"] == "aarch64", st
    assert "ignition: init done" in booted.console_text(), booted.diagnostics()
    with capsys.disabled():
        print(f"\n[nested arm64] bundled VMM: {m.group(0)}; launch -> agent ready {ready:.2f} s")


def test_snapshot_restore_in_a_new_process_and_rollback(booted: Vmm, capsys) -> None:
    store = booted.store  # type: ignore[attr-defined]
    with booted.agent() as client:
        assert client.exec("echo before > /tmp/state", timeout=120).exit_code == 0
    snap = booted.control_request("snapshot", store=str(store), name="s1")
    assert snap["ok"], (snap, booted.diagnostics())
    assert (store / "s1" / "vmstate").exists() and (store / "s1" / "memory.bin").exists()
    # the snapshotted VM keeps running
    with booted.agent() as client:
        assert client.exec("cat /tmp/state", timeout=120).stdout == b"before\n"
    assert booted.stop() == 0, booted.diagnostics()

    r = _spawn(booted.dir.parent / "restore", "restore", "--store", str(store), "--name", "s1",
               "--sync-agent")  # fmt: skip
    try:
        with r.agent() as client:
            ready = time.monotonic() - r.started
            res = client.exec("cat /tmp/state; uname -m", timeout=120)
            assert res.stdout == b"before\naarch64\n", (res, r.diagnostics())
            assert (
                client.exec("echo after > /tmp/state; echo x > /tmp/new", timeout=120).exit_code
                == 0
            )
        m = re.search(r"Restore-time = +(\d+) us +(\d+) ms", r.log_text())
        assert m, r.diagnostics()
        rb = r.control_request("rollback")
        assert rb["ok"] and rb["pages"] > 0, (rb, r.diagnostics())
        with r.agent() as client:
            res = client.exec("cat /tmp/state; ls /tmp/new", timeout=120)
            assert res.stdout.startswith(b"before\n") and res.exit_code != 0, (res, r.diagnostics())
            # a second round: the base stays the snapshot
            assert client.exec("echo again > /tmp/state", timeout=120).exit_code == 0
        rb2 = r.control_request("rollback")
        assert rb2["ok"], rb2
        with r.agent() as client:
            assert client.exec("cat /tmp/state", timeout=120).stdout == b"before\n"
        m2 = re.search(r"Rollback-time = +(\d+) us", r.log_text())
        assert m2, r.diagnostics()
        with capsys.disabled():
            print(
                f"\n[nested arm64] bundled VMM: {m.group(0)}; launch -> agent ready "
                f"{ready:.2f} s; rollback {rb['rollback_us']} us ({rb['pages']} pages)"
            )
        # the guest powers off through PSCI SYSTEM_OFF: the VMM ends cleanly
        with r.agent() as client:
            try:
                client.exec("poweroff -f", timeout=30)
            except Exception:
                pass  # the connection may die with the guest
        assert r.proc.wait(120) == 0, r.diagnostics()
        assert not r.vsock.exists() and not r.control.exists()
    finally:
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait(30)
