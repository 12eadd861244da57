"""--ignition-keep-failed with rollback reset: a failed test's VM is kept, never rolled back for
the next test, which gets a new VM (stand-in VMs and pool, as in test_fixtures_pool.py)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_ignition import config as cfgmod
from pytest_ignition import fixtures as fx
from pytest_ignition import keep


class StubVM:
    def __init__(self, n: int) -> None:
        self.n = n
        self.resets = 0
        self.history: list[Any] = []

    def reset(self) -> None:
        self.resets += 1

    def run(self, *args: Any, **kwargs: Any) -> None:
        pass


class StubSession:
    release = fx.IgnitionSession.release
    drop_spares = fx.IgnitionSession.drop_spares
    keep_if_failed = fx.IgnitionSession.keep_if_failed

    def __init__(self) -> None:
        self.settings = cfgmod.Settings(keep_failed=True, keep_failed_for=60.0)
        self.restorer = ThreadPoolExecutor(1)
        self.lock = threading.RLock()
        self.restores = 0
        self.closed_vms: list[StubVM] = []
        self.pools: dict[Any, Any] = {}
        self.live: set[Any] = set()
        self.kept_dirs: list[Path] = []

    def restore_vm(self, snap: Any, reset: str, wait: bool = True) -> tuple[StubVM, float]:
        self.restores += 1
        return StubVM(self.restores), 0.1

    def close_vm(self, vm: StubVM, background: bool = True) -> None:
        self.closed_vms.append(vm)

    def _progress(self, message: str) -> None:
        raise AssertionError(message)


def _request(failed: bool) -> Any:
    node = SimpleNamespace(stash={fx.FAILED_KEY: True} if failed else {}, nodeid="t.py::x")
    node.user_properties = []
    return SimpleNamespace(node=node, config=SimpleNamespace(rootpath=Path("/proj")))


def test_failed_tests_vm_is_kept_not_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[StubVM] = []

    def fake_keep(vm: StubVM, test: str, seconds: float, wd: Any, rootdir: Any = None) -> Any:
        kept.append(vm)
        return SimpleNamespace(id="abc123", test=test, expires=0.0, engine="stub")

    monkeypatch.setattr(keep, "keep_vm", fake_keep)
    session = StubSession()
    snap = SimpleNamespace(engine=SimpleNamespace(supports_rollback=True))
    pool = fx.Pool(session, snap, "rollback")  # type: ignore[arg-type]
    outcomes = [False, True, False]  # the second test fails
    handed = []
    for failed in outcomes:
        vm, _ = pool.acquire(prefetch=True)
        handed.append(vm)
        request = _request(failed)
        # what the ignition_vm fixture does at teardown
        if not session.keep_if_failed(request, vm):  # type: ignore[arg-type]
            session.release(vm, pool)  # type: ignore[arg-type]
    pool.close()
    session.restorer.shutdown(wait=True)
    assert kept == [handed[1]]
    assert handed[0] is handed[1], "the first test's VM was rolled back for the second"
    assert handed[2] is not handed[1], "the kept VM was handed to the next test"
    assert session.restores == 2
    resets_when_kept = handed[1].resets
    assert resets_when_kept == 1  # once, after the first (passing) test; never after failing
    assert handed[1] not in session.closed_vms
