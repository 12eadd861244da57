"""The temp-dir sweeper (engines/_process.py): dead runs' dirs go, nothing else does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_ignition.engines import _process as P


def _dir(root: Path, name: str, rec: dict | None) -> Path:
    d = root / name
    d.mkdir()
    (d / "console.sock").write_text("x")
    (d / "vm-1").mkdir()
    (d / "vm-1" / "overlay.qcow2").write_bytes(b"\0" * 10)
    if rec is not None:
        (d / P.OWNER_FILE).write_text(json.dumps(rec))
    return d


def _dead_pid_record() -> dict:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rec = P.owner_record(child.pid)
    finally:
        child.kill()
        child.wait()
    assert rec["start"] is not None
    return rec


def test_dead_owner_removed_live_owner_kept(tmp_path: Path) -> None:
    live = _dir(tmp_path, "ignition-live", P.owner_record())
    dead = _dir(tmp_path, "ignition-dead", _dead_pid_record())
    dead_sock = _dir(tmp_path, "ign-dead", _dead_pid_record())
    removed = P.sweep_dead_runs(tmp_path)
    assert sorted(removed) == sorted([dead, dead_sock])
    assert live.is_dir() and (live / "vm-1" / "overlay.qcow2").exists()
    assert not dead.exists() and not dead_sock.exists()


def test_reused_pid_counts_as_dead(tmp_path: Path) -> None:
    rec = P.owner_record()  # this very process...
    rec["start"] -= 1  # ...but started at another time: the pid was reused
    d = _dir(tmp_path, "ignition-reused", rec)
    assert P.sweep_dead_runs(tmp_path) == [d]


def test_zombie_owner_counts_as_dead(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 30  # until it is a zombie (not reaped on purpose)
        while time.monotonic() < deadline:
            st = P._proc_start(pid)
            if st is not None and st[1] == "Z":
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"child {pid} did not become a zombie within 30 s")
        rec = P.owner_record(pid)
        d = _dir(tmp_path, "ignition-zombie", rec)
        assert P.owner_alive(rec) is False
        assert P.sweep_dead_runs(tmp_path) == [d]
    finally:
        os.waitpid(pid, 0)


def test_other_boot_is_dead_other_host_or_pidns_unknown(tmp_path: Path) -> None:
    other_boot = dict(P.owner_record(), boot_id="00000000-0000-0000-0000-000000000000")
    other_host = dict(_dead_pid_record(), host="elsewhere.example")
    other_ns = dict(_dead_pid_record(), pidns="pid:[1]")
    a = _dir(tmp_path, "ignition-oldboot", other_boot)
    b = _dir(tmp_path, "ignition-otherhost", other_host)
    c = _dir(tmp_path, "ignition-otherns", other_ns)
    assert P.sweep_dead_runs(tmp_path) == [a]
    assert b.is_dir() and c.is_dir()


def test_ownerless_foreign_and_malformed_dirs_stay(tmp_path: Path) -> None:
    keep = [
        _dir(tmp_path, "ignition-noowner", None),
        _dir(tmp_path, "pytest-of-root", _dead_pid_record()),  # not our prefix
    ]
    bad = _dir(tmp_path, "ignition-badjson", None)
    (bad / P.OWNER_FILE).write_text("{not json")
    big = _dir(tmp_path, "ignition-bigowner", None)
    (big / P.OWNER_FILE).write_text(json.dumps(_dead_pid_record()) + " " * 5000)
    keep += [bad, big]
    assert P.sweep_dead_runs(tmp_path) == []
    assert all(d.is_dir() for d in keep)


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    target = _dir(outside, "ignition-real", _dead_pid_record())
    # a top-level symlink with our prefix, pointing at a dead run's dir elsewhere
    (tmp_path / "ignition-link").symlink_to(target)
    # a dead run whose dir holds a symlink to a dir outside, and whose owner file is a symlink
    dead = _dir(tmp_path, "ignition-dead", _dead_pid_record())
    (dead / "escape").symlink_to(outside)
    linked_owner = _dir(tmp_path, "ignition-ownerlink", None)
    (linked_owner / P.OWNER_FILE).symlink_to(target / P.OWNER_FILE)
    assert P.sweep_dead_runs(tmp_path) == [dead]
    assert (outside / "precious").read_text() == "keep me"
    assert target.is_dir() and (tmp_path / "ignition-link").is_symlink()
    assert linked_owner.is_dir()


def test_protected_paths_are_spared(tmp_path: Path) -> None:
    kept = _dir(tmp_path, "ignition-kept", _dead_pid_record())
    sock = _dir(tmp_path, "ign-kept", _dead_pid_record())
    gone = _dir(tmp_path, "ignition-gone", _dead_pid_record())
    protect = (str(kept / "vm-1"), str(sock))
    assert P.sweep_dead_runs(tmp_path, protect=protect) == [gone]
    assert kept.is_dir() and sock.is_dir()


def test_owned_tempdir_names_this_process(tmp_path: Path) -> None:
    d = P.owned_tempdir("ignition-", dir=tmp_path)
    rec = json.loads((d / P.OWNER_FILE).read_text())
    assert rec["pid"] == os.getpid() and P.owner_alive(rec) is True
    assert P.sweep_dead_runs(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="procfs")
def test_a_session_sweeps_at_its_first_vm_use(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No VM boots: tmp() is what the first VM use calls before making any machine's dir.
    tmpdir = tmp_path / "systmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    dead = _dir(tmpdir, "ignition-dead", _dead_pid_record())
    pytester.makepyfile(
        """
        import os
        from pytest_ignition.fixtures import get_session

        def test_plain():
            assert os.path.isdir(os.environ["DEAD"])  # a run without VMs sweeps nothing

        def test_first_use(request):
            d = get_session(request.config).tmp()
            assert not os.path.exists(os.environ["DEAD"]) and d.is_dir()
        """
    )
    monkeypatch.setenv("DEAD", str(dead))
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)
