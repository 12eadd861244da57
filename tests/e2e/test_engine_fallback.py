"""`auto` falls back to QEMU when the bundled VMM fails to boot; `ignition` never does (issue 16).

The VMM is made to fail on purpose (``IGNITION_VMM_FAULT=boot``: it exits 1 after setting the VM
up, before KVM_RUN), and ``IGNITION_ASSUME_NATIVE_KVM=1`` makes this PVM host look native so
that ``auto`` picks the bundled VMM at all. The guest then really boots under QEMU.
"""

from __future__ import annotations

import os
import shutil

import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest.build import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
GUEST_CACHE = cache_dir()  # taken before pytester moves HOME

SUITE = """
def test_guest_runs(ignition_vm):
    assert ignition_vm.run("echo fine").check().stdout.strip() in ("fine", b"fine")
    print("ENGINE", ignition_vm.engine.name)
"""


@pytest.fixture
def broken_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import GuestBuildError, build_guest

    # The VMM sets a VM up before it fails on purpose: a usable /dev/kvm, PVM or not, will do.
    require(os.access("/dev/kvm", os.R_OK | os.W_OK), "needs a usable /dev/kvm")
    # pytester has moved HOME already: the real cache first, or a build would start from scratch
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))
    try:
        build_guest()  # from the cache; the initramfs is rebuilt when its sources changed
    except GuestBuildError as e:
        require(False, f"the default guest could not be built: {e}")
    monkeypatch.setenv("IGNITION_ASSUME_NATIVE_KVM", "1")
    monkeypatch.setenv("IGNITION_VMM_FAULT", "boot")
    monkeypatch.delenv("IGNITION_ENGINE", raising=False)


def test_auto_falls_back_to_qemu_with_the_reason(
    pytester: pytest.Pytester, broken_vmm: None
) -> None:
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    out = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1)
    # auto chose the bundled VMM, which failed; the run went on under QEMU
    result.stdout.fnmatch_lines(["ignition: engine ignition (bundled VMM*auto: /dev/kvm runs*"])
    assert "ENGINE qemu" in out
    result.stdout.fnmatch_lines(
        [
            "*pytest-ignition: engine fallback*",
            "auto fell back from the bundled VMM to QEMU: the bundled VMM exited with 1 (the VM "
            "broke): *IGNITION_VMM_FAULT=boot: failing before KVM_RUN",
        ]
    )


def test_explicit_ignition_engine_never_falls_back(
    pytester: pytest.Pytester, broken_vmm: None
) -> None:
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ignition-engine=ignition")
    out = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(errors=1)
    assert "the VMM exited with 1" in out and "IGNITION_VMM_FAULT=boot" in out
    assert "fell back" not in out and "ENGINE qemu" not in out
