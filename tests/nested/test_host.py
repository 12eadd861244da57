"""Inside the nested harness: the hypervisor host has a real /dev/kvm, and QEMU+KVM boots the guest."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_ignition._testing import require

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_NR_VCPUS = 9
KVM_API_VERSION = 12


def test_harness_environment() -> None:
    assert os.environ["IGNITION_NESTED"] == "1"
    assert os.environ["PYTHONDONTWRITEBYTECODE"] == "1"
    # The caller's directory is shared writable at the same path.
    probe = Path.cwd() / f".nested-probe-{os.getpid()}"
    probe.write_text("x")
    try:
        assert probe.read_text() == "x"
    finally:
        probe.unlink()


def test_cpu_is_amd_with_svm() -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert "AuthenticAMD" in cpuinfo
    assert " svm" in cpuinfo


def test_dev_kvm_is_amd_svm_not_pvm() -> None:
    assert Path("/dev/kvm").exists()
    assert Path("/sys/module/kvm_amd").is_dir()
    assert not Path("/sys/module/kvm_pvm").exists()
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) == KVM_API_VERSION
        assert fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS) >= 1
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        assert vm >= 0
        os.close(vm)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Guest:
    kernel: Path
    initrd: Path


@pytest.fixture(scope="module")
def guest() -> _Guest:
    """The default guest, or IGNITION_KERNEL + IGNITION_INITRD when both are set."""
    from pytest_ignition.guest import find_guest

    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 not installed")
    kernel, initrd = os.environ.get("IGNITION_KERNEL"), os.environ.get("IGNITION_INITRD")
    if kernel and initrd:
        return _Guest(Path(kernel), Path(initrd))
    found = find_guest()
    require(found is not None, "guest not built (python -m pytest_ignition.guest build)")
    assert found is not None
    return _Guest(found.kernel, found.initrd)


def test_qemu_kvm_boots_default_guest_to_agent(
    guest: _Guest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_ignition.agent import AgentClient
    from pytest_ignition.guest import DEFAULT_CMDLINE

    sock = tmp_path / "agent.sock"
    console = tmp_path / "console.log"
    argv = [
        "qemu-system-x86_64",
        "-M",
        "microvm,acpi=off",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        DEFAULT_CMDLINE,
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,path={sock},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=org.ignition.agent",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            client = AgentClient.connect_unix(sock, timeout=60)
            client.wait_ready(timeout=180)
        except Exception as e:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            pytest.fail(
                f"agent never answered ({e}); QEMU status {proc.returncode}, stderr:\n"
                f"{err.decode(errors='replace')}\nconsole tail:\n{tail}"
            )
        ready = time.monotonic() - t0
        with client:
            res = client.exec(["uname", "-r"], timeout=60)
        assert res.exit_code == 0, res
        assert res.stdout.strip()
        with capsys.disabled():
            print(f"\n[nested] QEMU+KVM launch -> agent ready: {ready:.2f} s")
    finally:
        proc.kill()
        proc.communicate(timeout=30)
