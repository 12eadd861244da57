"""Fixtures for the bundled VMM's tests: a shared /dev/kvm handle (skipped where absent)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pytest_ignition._testing import require


def kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist (no KVM on this machine)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, ""


@pytest.fixture(scope="session")
def kvm_system() -> Iterator[object]:
    """A :class:`pytest_ignition.vmm.kvm.System`; skips (or fails under IGNITION_REQUIRE=1)
    when /dev/kvm cannot be used."""
    ok, reason = kvm_usable()
    require(ok, reason)
    from pytest_ignition.vmm import kvm
    from pytest_ignition.vmm.vcpu import install_kick_handler

    install_kick_handler()  # must happen on the main thread, before any vCPU thread starts
    system = kvm.System()
    yield system
    system.close()
