"""The restore pool's hand-over logic (fixtures.Pool), with stand-in VMs: no guest runs here."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_ignition.fixtures import IgnitionSession, Pool


class StubVM:
    def __init__(self, n: int) -> None:
        self.n = n
        self.resets = 0
        self.history: list[Any] = []

    def reset(self) -> None:
        self.resets += 1

    def run(self, *args: Any, **kwargs: Any) -> None:
        self.history.append(("true", 0, 0.0))


class StubSession:
    """What Pool and IgnitionSession.release use of the session."""

    release = IgnitionSession.release
    drop_spares = IgnitionSession.drop_spares

    def __init__(self) -> None:
        self.restorer = ThreadPoolExecutor(1)
        self.lock = threading.RLock()
        self.restores = 0
        self.closed_vms: list[StubVM] = []
        self.pools: dict[Any, Pool] = {}
        self.waits: list[bool] = []

    def restore_vm(self, snap: Any, reset: str, wait: bool = True) -> tuple[StubVM, float]:
        self.waits.append(wait)
        self.restores += 1
        return StubVM(self.restores), 0.1

    def close_vm(self, vm: StubVM, background: bool = True) -> None:
        self.closed_vms.append(vm)


def run_tests(supports_rollback: bool, n: int = 5) -> tuple[StubSession, list[StubVM]]:
    """``n`` tests in a row, each with a VM from the pool (prefetch on, as by default)."""
    session = StubSession()
    snap = SimpleNamespace(engine=SimpleNamespace(supports_rollback=supports_rollback))
    pool = Pool(session, snap, "rollback")  # type: ignore[arg-type]
    handed: list[StubVM] = []
    for _ in range(n):
        vm, _seconds = pool.acquire(prefetch=True)
        assert vm.history == []  # no earlier test's commands in this test's report
        handed.append(vm)
        vm.history.append(("a test's command", 0, 0.0))
        session.release(vm, pool)  # type: ignore[arg-type]
    pool.close()
    session.restorer.shutdown(wait=True)
    return session, handed


def test_rollback_pool_hands_the_rolled_back_vm_to_the_next_test() -> None:
    session, handed = run_tests(supports_rollback=True)
    assert session.restores == 1
    assert all(vm is handed[0] for vm in handed)
    assert handed[0].resets >= 4  # rolled back after each test (the last one may be cancelled)


def test_rollback_without_engine_support_restores_for_every_test() -> None:
    session, handed = run_tests(supports_rollback=False)
    assert [vm.n for vm in handed] == [1, 2, 3, 4, 5]
    assert all(vm.resets == 0 for vm in handed)
    assert set(session.closed_vms) >= set(handed)


@pytest.mark.parametrize("supports_rollback", [True, False])
def test_a_failed_rollback_is_replaced_by_a_restore(supports_rollback: bool) -> None:
    session = StubSession()
    snap = SimpleNamespace(engine=SimpleNamespace(supports_rollback=supports_rollback))
    pool = Pool(session, snap, "rollback")  # type: ignore[arg-type]
    vm, _ = pool.acquire(prefetch=True)

    def broken() -> None:
        raise RuntimeError("rollback failed")

    vm.reset = broken  # type: ignore[method-assign]
    session.release(vm, pool)  # type: ignore[arg-type]
    nxt, _ = pool.acquire(prefetch=False)
    assert nxt is not vm and vm in session.closed_vms
    pool.close()
    session.restorer.shutdown(wait=True)


def test_prefetch_never_waits_for_host_memory_and_spares_can_be_dropped() -> None:
    session = StubSession()
    snap = SimpleNamespace(engine=SimpleNamespace(supports_rollback=False))
    pool = Pool(session, snap, "restore")  # type: ignore[arg-type]
    session.pools[("k", "restore")] = pool
    vm, _ = pool.acquire(prefetch=True)
    assert pool.pending is not None
    spare, _ = pool.pending.result()
    assert session.waits == [True, False]  # the foreground waits, the prefetch does not
    session.drop_spares()  # a VM elsewhere waits for memory: the idle prefetched VM goes
    assert pool.pending is None and session.closed_vms == [spare]
    nxt, _ = pool.acquire(prefetch=False)
    assert nxt is not spare and session.waits[-1] is True
    pool.close()
    session.restorer.shutdown(wait=True)


class StubMachine:
    def __init__(self) -> None:
        self.killed = threading.Event()

    def close(self) -> None:
        self.killed.set()


class ClosingSession:
    """What IgnitionSession.close uses of the session."""

    close = IgnitionSession.close

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.closed = False
        self.pools: dict[Any, Pool] = {}
        self._inflight: list[list[Any]] = []
        self.live: set[Any] = set()
        self.restorer = ThreadPoolExecutor(1)
        self.closer = ThreadPoolExecutor(1)
        self._tmp = None
        self.kept_dirs: list[Any] = []

    def close_vm(self, vm: Any, background: bool = True) -> None:
        pass


def test_close_kills_a_machine_that_a_restore_makes_after_close_began() -> None:
    """Ctrl-C right after a background restore started: the restore makes its machine only
    once close() is under way. close() must still kill it, not wait for its guest."""
    import time

    session = ClosingSession()
    made: list[Any] = []
    machine = StubMachine()
    started = threading.Event()

    def restore() -> bool:
        with session.lock:
            session._inflight.append(made)
        started.set()
        while not session.closed:  # the machine appears only after close() began
            time.sleep(0.01)
        time.sleep(0.2)
        made.append(machine)
        waited = machine.killed.wait(30)  # a guest that would take the boot timeout
        with session.lock:
            session._inflight.remove(made)
        return waited

    fut = session.restorer.submit(restore)
    assert started.wait(10)
    t0 = time.monotonic()
    session.close()
    took = time.monotonic() - t0
    assert machine.killed.is_set()
    assert fut.result(timeout=1) is True
    assert took < 10, took  # not the 30 s the restore would have waited
