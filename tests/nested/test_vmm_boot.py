"""Inside the nested harness: the bundled VMM boots the default guest to its agent.

Each test starts ``python -m pytest_ignition.vmm boot`` as a separate process, as a user
would, with the serial console in a file and the VMM's log on stderr in another, and talks
to the guest agent over virtio-vsock (Firecracker's Unix-socket convention, port 52).
The same guest under QEMU+KVM in the same harness is ``test_host.py``'s
``test_qemu_kvm_boots_default_guest_to_agent``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.engines.ignition import early_triple_fault

AGENT_PORT = 52
BOOT_TIMEOUT = 240.0  # generous: CPL0 code runs ~15x slower than native in here


@pytest.fixture(scope="module")
def guest():
    from pytest_ignition.guest import find_guest

    found = find_guest()
    require(found is not None, "guest not built (python -m pytest_ignition.guest build)")
    require(Path("/dev/kvm").exists(), "no /dev/kvm in the nested host")
    return found


@dataclass
class Vmm:
    proc: subprocess.Popen[bytes]
    vsock: Path
    control: Path
    console: Path
    log: Path
    started: float
    restart: Callable[[], Vmm] | None = None  # a fresh boot of the same command, once

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def diagnostics(self) -> str:
        return (
            f"VMM status {self.proc.poll()}\n--- VMM log ---\n{self.log_text()[-3000:]}\n"
            f"--- console ---\n{self.console_text()[-3000:]}"
        )

    def agent(self, timeout: float = BOOT_TIMEOUT):
        from pytest_ignition.agent import AgentClient

        try:
            client = AgentClient.connect_vsock_uds(self.vsock, AGENT_PORT, timeout=timeout)
            client.wait_ready(timeout=60)
        except Exception as e:
            if (
                self.restart is not None
                and self.proc.poll() is not None
                and early_triple_fault(self.log_text(), self.console_text())
            ):  # the engine's rule (IgnitionEngine.boot): once, and said
                warnings.warn(
                    f"the guest triple-faulted before its init ran; booting once more\n"
                    f"{self.diagnostics()}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                again = self.restart()
                self.__dict__.update(again.__dict__)
                self.restart = None
                return self.agent(timeout)
            pytest.fail(f"agent never answered over vsock ({e})\n{self.diagnostics()}")
        return client


def start_vmm(guest, tmp_path: Path, *extra: str, kernel: Path | None = None) -> Vmm:
    vsock = tmp_path / "v.sock"
    control = tmp_path / "c.sock"
    console = tmp_path / "console.log"
    log = tmp_path / "vmm.log"
    argv = [
        sys.executable,
        "-m",
        "pytest_ignition.vmm",
        "boot",
        "--kernel",
        str(kernel or guest.kernel),
        "--initrd",
        str(guest.initrd),
        "--vsock",
        str(vsock),
        "--control",
        str(control),
        "--boot-timer",
        "--console",
        str(console),
        *extra,
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return Vmm(proc, vsock, control, console, log, time.monotonic())


@pytest.fixture
def vmm_factory(guest, tmp_path: Path) -> Iterator:
    started: list[Vmm] = []

    def make(*extra: str, kernel: Path | None = None, retry: bool = True) -> Vmm:
        d = tmp_path / f"vm{len(started)}"
        d.mkdir()
        v = start_vmm(guest, d, *extra, kernel=kernel)
        started.append(v)
        if retry:
            v.restart = lambda: make(*extra, kernel=kernel, retry=False)
        return v

    yield make
    for v in started:
        if v.proc.poll() is None:
            v.proc.kill()
        v.proc.wait(30)


def wait_exit(v: Vmm, timeout: float = 60.0) -> int:
    try:
        return v.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"VMM did not exit within {timeout}s\n{v.diagnostics()}")


@pytest.mark.parametrize("kind", ["bzImage", "vmlinux"])
def test_boots_to_agent_with_boot_timer(guest, vmm_factory, kind: str, capsys) -> None:
    kernel = guest.kernel if kind == "bzImage" else guest.vmlinux
    require(kernel is not None and Path(kernel).exists(), f"no {kind} in the guest build")
    v = vmm_factory(kernel=Path(kernel))
    with v.agent() as client:
        ready = time.monotonic() - v.started
        res = client.exec(["uname", "-a"], timeout=60)
        assert res.exit_code == 0, (res, v.diagnostics())
        assert res.stdout.startswith(b"Linux "), res.stdout
        failing = client.exec("echo oops >&2; exit 7", timeout=60)
        assert failing.exit_code == 7, failing
        assert failing.stderr == b"oops\n"
        missing = client.exec(["/no/such/program"], timeout=60)
        assert missing.exit_code != 0
        # The guest's rcS wrote the boot-timer byte before init started the agent.
        m = re.search(r"Guest-boot-time = +(\d+) us +(\d+) ms", v.log_text())
        assert m, v.diagnostics()
        assert int(m.group(1)) > 0 and int(m.group(2)) == int(m.group(1)) // 1000
    with capsys.disabled():
        print(f"\n[nested] bundled VMM ({kind}): {m.group(0)}; launch -> agent ready {ready:.2f} s")
    v.proc.terminate()
    assert wait_exit(v) == 0, v.diagnostics()
    assert not v.vsock.exists() and not v.control.exists()


@pytest.fixture
def ext4_image(tmp_path: Path) -> Path:
    require(shutil.which("mke2fs"), "mke2fs not installed (apt-get install e2fsprogs)")
    src = tmp_path / "disk-src"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the host\n")
    (src / "sub").mkdir()
    (src / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64)
    img = tmp_path / "disk.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-F", "-L", "ignition", "-d", str(src), str(img), "16M"],
        check=True,
        capture_output=True,
    )
    return img


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_virtio_blk_reads_and_writes_without_touching_the_base(vmm_factory, ext4_image) -> None:
    from pytest_ignition.guest import DEFAULT_CMDLINE

    before = sha256(ext4_image)
    mtime = ext4_image.stat().st_mtime_ns
    v = vmm_factory(
        "--disk", str(ext4_image), "--cmdline", DEFAULT_CMDLINE + " ignition.rootfs=/dev/vda"
    )
    with v.agent() as client:
        res = client.exec("cat /rootfs/hello.txt && md5sum /rootfs/sub/data.bin", timeout=60)
        assert res.exit_code == 0, (res, v.diagnostics())
        expected_md5 = hashlib.md5(bytes(range(256)) * 64).hexdigest()
        assert res.stdout == f"hello from the host\n{expected_md5}  /rootfs/sub/data.bin\n".encode()
        script = (
            "set -e; head -c 300000 /dev/urandom > /rootfs/written.bin; "
            "echo changed > /rootfs/hello.txt; sync; "
            "echo 3 > /proc/sys/vm/drop_caches; "
            "cat /rootfs/hello.txt; wc -c < /rootfs/written.bin; "
            "umount /rootfs && mount /dev/vda /rootfs && cat /rootfs/hello.txt"
        )
        res = client.exec(script, timeout=120)
        assert res.exit_code == 0, (res, v.diagnostics())
        assert res.stdout.split() == [b"changed", b"300000", b"changed"]
    v.proc.terminate()
    assert wait_exit(v) == 0, v.diagnostics()
    assert sha256(ext4_image) == before
    assert ext4_image.stat().st_mtime_ns == mtime


def test_guest_reboot_ends_the_vmm_cleanly(vmm_factory) -> None:
    v = vmm_factory()
    with v.agent() as client:
        # busybox reboot asks init, which syncs and calls reboot(2): reboot=k -> the i8042.
        client.exec(["sh", "-c", "(sleep 0.2; reboot) >/dev/null 2>&1 &"], timeout=30)
    assert wait_exit(v, 120) == 0, v.diagnostics()
    assert not v.vsock.exists() and not v.control.exists()
    assert "reset" in v.log_text() or "reboot" in v.log_text(), v.log_text()


@pytest.mark.parametrize(("cmd", "cpus"), [("poweroff -f", "1"), ("halt -f", "2")])
def test_guest_poweroff_or_halt_ends_the_vmm_with_status_3(vmm_factory, cmd, cpus) -> None:
    """The default guest has no ACPI: its poweroff is a halt (every CPU in cli; hlt, which
    KVM keeps to itself); the VMM's halt watch ends the VM with status 3 within seconds."""
    v = vmm_factory("--cpus", cpus)
    with v.agent() as client:
        client.exec(["sh", "-c", f"(sleep 0.2; {cmd}) >/dev/null 2>&1 &"], timeout=30)
        t0 = time.monotonic()
        code = wait_exit(v, 60)
    took = time.monotonic() - t0
    assert code == 3, v.diagnostics()
    assert "halted: every vCPU halted with interrupts disabled" in v.log_text(), v.log_text()
    assert "reboot: System halted" in v.console_text()
    assert not v.vsock.exists() and not v.control.exists()
    assert took < 30, took


def test_control_status_reports_the_running_guest(vmm_factory) -> None:
    import json
    import socket

    v = vmm_factory()
    with v.agent() as client:
        assert client.exec(["true"], timeout=30).exit_code == 0
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(os.fspath(v.control))
            s.sendall(b'{"cmd": "status"}\n')
            reply = json.loads(s.makefile("rb").readline())
    assert reply["ok"] and reply["state"] == "running"
    assert reply["boot_time_us"] > 0
    assert any(d["type"] == "VirtioVsock" for d in reply["virtio"])
    v.proc.terminate()
    assert wait_exit(v) == 0
