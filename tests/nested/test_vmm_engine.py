"""Inside the nested harness: the ignition engine (``pytest_ignition.engines.ignition``) end to end.

Boot, agent, console (tail and interactive), snapshot -> restore in a new VMM process, and
in-place rollback, all on the default guest over the nested host's real /dev/kvm.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ignition._testing import require


@pytest.fixture(scope="module")
def config():
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.guest import find_guest

    g = find_guest()
    require(g is not None, "guest not built (python -m pytest_ignition.guest build)")
    return VMConfig(kernel=g.kernel, initrd=g.initrd, memory_mib=256, boot_timeout=300)


@pytest.fixture(scope="module")
def engine():
    from pytest_ignition.engines.ignition import IgnitionEngine, available

    ok, why = available()
    require(ok, why)
    return IgnitionEngine()


@pytest.fixture
def machine(engine, config, tmp_path: Path):
    m = engine.boot(config, tmp_path / "work")
    yield m
    m.close()


def test_available_here(engine) -> None:
    from pytest_ignition.engines.ignition import available

    assert available() == (True, "KVM runs guest kernels natively")


def test_boot_runs_commands_and_has_a_console(machine) -> None:
    assert machine.is_alive()
    assert machine.ready_seconds > 0
    res = machine.agent.exec(["uname", "-s"], timeout=60)
    assert (res.exit_code, res.stdout) == (0, b"Linux\n")
    assert machine.agent.exec("exit 3", timeout=60).exit_code == 3
    assert "ignition: init done" in machine.console_tail()
    assert (machine.boot_time_us() or 0) > 0
    con = machine.console
    con.sendline("echo con$((6*7))sole")
    con.expect("con42sole", timeout=60)


def test_close_kills_the_vmm_and_removes_its_files(engine, config, tmp_path: Path) -> None:
    m = engine.boot(config, tmp_path / "work")
    proc, d = m.proc, m.dir
    m.close()
    m.close()  # idempotent
    assert proc.poll() is not None
    assert not d.exists()
    assert not m.vsock_sock.exists() and not m.control_sock.exists()


def test_snapshot_restore_and_rollback(engine, config, machine, tmp_path: Path) -> None:
    from pytest_ignition.engines.base import SnapshotMismatch, VMConfig

    a = machine.agent
    assert a.exec("echo before > /tmp/state", timeout=60).exit_code == 0
    snap = tmp_path / "snaps" / "s1"
    engine.snapshot(machine, snap)
    assert (snap / "meta.json").exists()
    # The snapshotted machine keeps running; its agent is a new client (the snapshot was
    # taken with the old one disconnected), as after a rollback.
    assert machine.agent is not a
    assert machine.agent.exec("cat /tmp/state", timeout=60).stdout == b"before\n"

    r = engine.restore(config, snap, tmp_path / "work2")
    try:
        ra = r.agent
        assert ra.exec("cat /tmp/state", timeout=60).stdout == b"before\n"
        rand1 = ra.exec("head -c 16 /dev/urandom | od -An -tx1", timeout=60).stdout
        assert ra.exec("echo after > /tmp/state; echo x > /tmp/new", timeout=60).exit_code == 0
        engine.rollback(r)
        ra = r.agent
        res = ra.exec("cat /tmp/state; ls /tmp/new", timeout=60)
        assert res.stdout.startswith(b"before\n") and res.exit_code != 0, res
    finally:
        r.close()
    r2 = engine.restore(config, snap, tmp_path / "work3")
    try:
        rand2 = r2.agent.exec("head -c 16 /dev/urandom | od -An -tx1", timeout=60).stdout
        assert rand1 != rand2  # the CRNG was reseeded on each restore
    finally:
        r2.close()
    other = VMConfig(kernel=config.kernel, initrd=config.initrd, memory_mib=128)
    with pytest.raises(SnapshotMismatch, match="meta.json"):
        engine.restore(other, snap, tmp_path / "work4")
