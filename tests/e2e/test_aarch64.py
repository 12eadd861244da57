"""The e2e suite on an arm64 guest: ``--ignition-arch=aarch64`` on QEMU (TCG on this x86 host).

One whole pytest run (a pytester subprocess, ``-n 2``) of ``test_plugin_vm.py`` and this tier's
conftest with the arch option: isolation, exit codes and streams, the command timeout, files
both ways, the console shell, the prepare hook, marker and factory configurations, reset, a
rootfs disk; plus a check that the guest really is arm64. The session's boots log shows each
configuration booted and prepared once, shared by both workers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest import cache_dir

HERE = Path(__file__).parent
GUEST_CACHE = cache_dir()  # pytester moves HOME; the inner run must use the real guest cache

ARCH_PROBE = """
import pytest


def test_guest_is_arm64(ignition_vm, request):
    assert request.config.getoption("ignition_arch") == "aarch64"
    assert ignition_vm.check_output(["uname", "-m"]).strip() == "aarch64"
    # the agent and busybox are arm64 binaries; the host is not
    assert ignition_vm.read_file("/sbin/ignition-agent")[18:20] == (183).to_bytes(2, "little")
    cpuinfo = ignition_vm.read_file("/proc/cpuinfo").decode()
    assert "CPU architecture: 8" in cpuinfo
    assert "virtio-mmio" in ignition_vm.check_output("ls /sys/bus/platform/drivers")


def test_console_is_the_pl011(ignition_vm):
    # QEMU virt's UART: console=ttyAMA0, and the console shell's ttyS0 names it
    assert "console=ttyAMA0" in ignition_vm.read_file("/proc/cmdline").decode()
    assert ignition_vm.check_output(["readlink", "/dev/ttyS0"]).strip() == "ttyAMA0"
"""


@pytest.fixture
def arm64_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    # before anything looks the guest up: pytester points HOME elsewhere
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))
    require(
        shutil.which("qemu-system-aarch64"),
        "qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)",
    )
    from pytest_ignition.guest import GuestBuildError, find_guest

    problem = None
    if find_guest("aarch64") is None:
        problem = (
            "the arm64 guest is not built (python -m pytest_ignition.guest build --arch aarch64)"
        )
    else:
        from pytest_ignition.guest import build_guest

        try:
            build_guest(arch="aarch64")  # the initramfs again if its inputs changed; no kernel
        except GuestBuildError as e:
            problem = f"the arm64 guest cannot be built: {e}"
    require(problem is None, str(problem))


def test_e2e_suite_on_aarch64(
    pytester: pytest.Pytester, arm64_guest: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGNITION_REQUIRE", "1")  # nothing inside may skip
    pytester.makeconftest((HERE / "conftest.py").read_text())
    suite = (HERE / "test_plugin_vm.py").read_text()
    pytester.makepyfile(test_plugin_vm=suite, test_arch=ARCH_PROBE)
    basetemp = tmp_path / "bt"
    result = pytester.runpytest_subprocess(
        "-n",
        "2",
        "-p",
        "xdist",
        "--ignition-arch=aarch64",
        "--ignition-engine=qemu",
        f"--basetemp={basetemp}",
        "-q",
        timeout=900,
    )
    out = result.stdout.str()
    outcomes = result.parseoutcomes()
    expected = sum(t.count("\ndef test_") for t in (suite, ARCH_PROBE))
    assert outcomes.get("passed", 0) == expected and not {"failed", "error", "skipped"} & set(
        outcomes
    ), out[-6000:]
    snaps = basetemp / "ignition-snapshots"
    boots = [json.loads(x) for x in (snaps / "boots.log").read_text().splitlines()]
    dirs = [d for d in snaps.iterdir() if d.is_dir()]
    # one boot per configuration (default, marker, factory memory, other kernel, rootfs, the
    # probe's kernel_args), never one per worker
    assert len(boots) == len(dirs) >= 5, boots
    assert len({b["key"] for b in boots}) == len(boots), "a configuration was booted twice"
    assert {b["worker"] for b in boots} <= {"gw0", "gw1"}
    secs = sorted(b["boot_seconds"] for b in boots)
    print(f"aarch64 tier: {outcomes}; {len(boots)} snapshot boots, boot+prepare s: {secs}")
