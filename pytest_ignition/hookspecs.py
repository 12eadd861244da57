"""Hooks users implement in a ``conftest.py`` (pluggy hookspecs, added by ``pytest_addhooks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_ignition.vm import VM


def pytest_ignition_prepare(vm: VM) -> None:
    """Prepare a freshly booted guest before its session snapshot is taken.

    Called once per guest configuration (per snapshot), with the booted ``vm``. Whatever
    it leaves in the guest (files installed, services started, sysctls set) is in the
    snapshot, so every test using that configuration starts from the prepared guest.
    Every implementation runs; an exception fails the tests that need the snapshot.
    """
