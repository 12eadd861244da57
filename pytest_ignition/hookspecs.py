"""Hooks users implement in a ``conftest.py`` (pluggy hookspecs, added by ``pytest_addhooks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

    from pytest_ignition.vm import VM


def pytest_ignition_prepare(vm: VM) -> None:
    """Prepare a freshly booted guest before its session snapshot is taken.

    Called once per guest configuration (per snapshot), with the booted ``vm``. Whatever
    it leaves in the guest (files installed, services started, sysctls set) is in the
    snapshot, so every test using that configuration starts from the prepared guest.
    Every implementation runs; an exception fails the tests that need the snapshot.
    """


def pytest_ignition_snapshot_key(config: pytest.Config) -> str | list[str] | None:
    """Extra inputs of the reusable snapshots' key (``--ignition-reuse``).

    Prepared snapshots kept between runs are keyed by the configuration, the engine and the
    source of the ``pytest_ignition_prepare`` implementations (and the project modules they
    import). Return what else your prepare step depends on and the source does not show: the
    hash of a file it copies into the guest, a tool's version, an environment variable. Every
    implementation's strings join the key; a change makes the next run prepare afresh.
    """
