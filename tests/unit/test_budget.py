"""Host memory admission (pytest_ignition.budget): accounting across processes, no VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_ignition import budget as bmod
from pytest_ignition.budget import BudgetBusy, BudgetError, HostBudget

HOLDER = """
import sys, time
from pathlib import Path
from pytest_ignition.budget import HostBudget
b = HostBudget(int(sys.argv[2]), Path(sys.argv[1]))
r = b.reserve(int(sys.argv[3]), "child VM", timeout=30)
print("held", flush=True)
sys.stdin.readline()  # hold until told (or until the parent closes the pipe)
if sys.argv[4] == "release":
    r.release()
"""


def _child(tmp: Path, budget: int, mib: int, then: str = "release") -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp), str(budget), str(mib), then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "held"
    return p


def test_resolve_percentage_and_size() -> None:
    assert bmod.resolve_mib("75%", host_mib=24000) == 18000
    assert bmod.resolve_mib("100%", host_mib=1000) == 1000
    assert bmod.resolve_mib("16G") == 16384
    assert bmod.resolve_mib("512M") == 512
    assert "18000 MiB (75% of 24000 MiB host memory; default)" in bmod.describe(
        "75%", host_mib=24000
    )


def test_host_memory_is_memtotal_or_lower() -> None:
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) // 1024
    assert 0 < bmod.host_memory_mib() <= total


def test_reserve_and_release_within_one_process(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path)
    r1 = b.reserve(600, "a")
    assert b.used_mib() == 600 and b.own_mib() == 600
    with pytest.raises(BudgetBusy):
        b.reserve(600, "b", wait=False)
    r2 = b.reserve(400, "c", wait=False)  # exactly full is allowed
    assert b.used_mib() == 1000
    r1.release()
    r1.release()  # idempotent
    assert b.used_mib() == 400
    r2.release()
    assert b.used_mib() == 0
    assert not list(tmp_path.glob("*.json"))


def test_larger_than_the_whole_budget_names_the_setting(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path, setting="4%", source="IGNITION_MEMORY_BUDGET")
    with pytest.raises(BudgetError) as e:
        b.reserve(1001, "boot of a 960 MiB guest")
    msg = str(e.value)
    assert "1001 MiB" in msg and "1000 MiB" in msg
    assert "memory_budget=4% (IGNITION_MEMORY_BUDGET)" in msg
    assert "--ignition-memory-budget" in msg
    assert b.used_mib() == 0


def test_other_processes_count_and_a_dead_one_does_not(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path)
    live = _child(tmp_path, 1000, 300)
    dead = _child(tmp_path, 1000, 500, then="die")
    try:
        assert b.used_mib() == 800
        with pytest.raises(BudgetBusy, match="800/1000"):
            b.reserve(300, "x", wait=False)
        # A worker that crashes without releasing: its reservation becomes stale.
        assert dead.stdin is not None
        dead.stdin.write("\n")
        dead.stdin.close()
        assert dead.wait(10) == 0
        assert len(list(tmp_path.glob("*.json"))) == 2  # still on disk...
        r = b.reserve(700, "after the crash", wait=False)  # ...but not counted
        assert len(list(tmp_path.glob("*.json"))) == 2  # the stale one was removed
        assert b.used_mib() == 1000
        r.release()
    finally:
        for p in (live, dead):
            if p.poll() is None:
                assert p.stdin is not None
                p.stdin.close()
                p.wait(10)
    assert b.used_mib() == 0  # the live child released when its stdin closed


def _fake(tmp: Path, **fields: object) -> Path:
    d = {"pid": os.getpid(), "start": bmod.process_start(os.getpid()), "boot": bmod.boot_id()}
    d.update({"mib": 100, "what": "fake"})
    d.update(fields)
    p = tmp / f"fake-{len(list(tmp.glob('*.json')))}.json"
    p.write_text(json.dumps(d))
    return p


def test_stale_reservations_are_ignored(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path)
    ok = _fake(tmp_path, mib=100)
    reused_pid = _fake(tmp_path, start=(bmod.process_start(os.getpid()) or 0) + 12345)
    other_boot = _fake(tmp_path, boot="00000000-0000-0000-0000-000000000000")
    no_such_pid = _fake(tmp_path, pid=2**22 + 17)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    (tmp_path / "half.tmp").write_text("{")
    assert b.used_mib() == 100
    assert ok.exists()
    for p in (reused_pid, other_boot, no_such_pid, garbage, tmp_path / "half.tmp"):
        assert not p.exists(), p


def test_process_start_parses_names_with_parens_and_spaces(tmp_path: Path) -> None:
    # comm may be anything: a process renamed to ") 1 2 3 (" must not shift the fields.
    script = tmp_path / ") 1 2 3 ("
    script.write_text("#!/bin/sh\nread x\n")
    script.chmod(0o755)
    p = subprocess.Popen([str(script)], stdin=subprocess.PIPE)
    try:
        for _ in range(100):
            if ") 1 2" in Path(f"/proc/{p.pid}/stat").read_text():
                break
            time.sleep(0.01)
        start = bmod.process_start(p.pid)
        own = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        assert start == int(own)
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(10)
    assert bmod.process_start(p.pid) is None


def test_waits_for_room_and_says_what_it_waits_for(tmp_path: Path) -> None:
    notes: list[str] = []
    b = HostBudget(1000, tmp_path, setting="1000M", progress=notes.append, poll=0.05)
    holder = _child(tmp_path, 1000, 800)
    released_at: list[float] = []

    def let_go() -> None:
        time.sleep(0.5)
        released_at.append(time.monotonic())
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()

    t = threading.Thread(target=let_go)
    t.start()
    try:
        r = b.reserve(400, "restore of a 336 MiB guest", timeout=20)
        got = time.monotonic()
    finally:
        t.join()
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert released_at and got >= released_at[0]
    assert notes, "a waiting reservation prints a progress line"
    assert "restore of a 336 MiB guest needs 400 MiB" in notes[0]
    assert "1 VM(s) of 1 process(es) hold 800 MiB of the 1000 MiB budget" in notes[0]
    assert "memory_budget=1000M" in notes[0]
    r.release()


def test_wait_has_a_deadline(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path, poll=0.05)
    holder = _child(tmp_path, 1000, 900)
    try:
        t0 = time.monotonic()
        with pytest.raises(BudgetError, match=r"waited \d+ s for host memory for late VM"):
            b.reserve(200, "late VM", timeout=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


def test_own_vms_blocking_is_an_error_at_once_not_a_wait(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path)
    mine = b.reserve(700, "test VM")
    t0 = time.monotonic()
    with pytest.raises(BudgetError, match="this process's own VMs already hold 700"):
        b.reserve(400, "factory VM", timeout=60)
    assert time.monotonic() - t0 < 5
    # A VM being closed in the background no longer counts as ours: that one is waited for.
    mine.retire()
    threading.Timer(0.3, mine.release).start()
    r = b.reserve(400, "factory VM", timeout=20)
    r.release()


def test_on_wait_runs_once_and_may_make_room(tmp_path: Path) -> None:
    b = HostBudget(1000, tmp_path)
    spare = b.reserve(700, "prefetched VM")
    calls: list[int] = []

    def drop_spares() -> None:
        calls.append(1)
        spare.release()

    r = b.reserve(700, "test VM", on_wait=drop_spares, timeout=5)
    assert calls == [1]
    r.release()


def test_threads_of_one_process_do_not_overbook(tmp_path: Path) -> None:
    budgets = [HostBudget(1000, tmp_path) for _ in range(2)]
    got: list[object] = []
    errors: list[BaseException] = []

    def grab(b: HostBudget) -> None:
        for _ in range(50):
            try:
                got.append(b.reserve(100, "t", wait=False))
            except BudgetBusy:
                pass
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

    ts = [threading.Thread(target=grab, args=(b,)) for b in budgets for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert len(got) == 10
    assert budgets[0].used_mib() == 1000


def test_processes_racing_do_not_overbook(tmp_path: Path) -> None:
    racer = (
        "import sys; from pathlib import Path\n"
        "from pytest_ignition.budget import HostBudget, BudgetBusy\n"
        "b = HostBudget(1000, Path(sys.argv[1])); n = 0\n"
        "for _ in range(40):\n"
        "    try: b.reserve(100, 'r', wait=False); n += 1\n"
        "    except BudgetBusy: pass\n"
        "print(n, flush=True); sys.stdin.readline()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", racer, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        counts = [int(p.stdout.readline()) for p in procs if p.stdout is not None]
        assert sum(counts) == 10
        assert HostBudget(1000, tmp_path).used_mib() == 1000
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(10)
    assert HostBudget(1000, tmp_path).used_mib() == 0  # all exited: all stale


def test_vm_mib_adds_the_engine_overhead() -> None:
    assert bmod.vm_mib(512, "qemu") == 512 + bmod.OVERHEAD_MIB["qemu"]
    assert bmod.vm_mib(512, "other") == 512 + bmod.DEFAULT_OVERHEAD_MIB


def _unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache dir nothing can be created in, even by root: its parent is a regular file
    (mkdir fails with ENOTDIR, as it fails with EROFS on a read-only mount)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cache = blocker / "cache"
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(cache))
    return cache


def test_state_directory_is_the_cache_dir_when_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(tmp_path / "cache"))
    directory, why = bmod.state_directory()
    assert why is None
    assert directory.parent == tmp_path / "cache"
    assert directory.name.startswith("budget-")
    assert (directory / ".lock").exists()


def test_read_only_cache_falls_back_to_a_private_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _unwritable_cache(tmp_path, monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(bmod, "fallback_roots", lambda: [run / "pytest-ignition"])
    directory, why = bmod.state_directory()
    assert directory.parent == run / "pytest-ignition"
    assert (run / "pytest-ignition").stat().st_mode & 0o777 == 0o700
    assert why is not None and str(cache) in why and str(directory) in why
    # The budget works there, and the reason is told once through progress.
    notes: list[str] = []
    b = HostBudget.for_settings("1000M", progress=notes.append)
    assert b.directory == directory
    assert len(notes) == 1 and "cannot be written" in notes[0]
    with b.reserve(300, "vm"):
        assert b.used_mib() == 300
        assert len(list(directory.glob("*.json"))) == 1
    assert b.used_mib() == 0
    line = bmod.header_line("1000M", "cli")
    assert "1000 MiB" in line and str(directory) in line


def test_fallback_skips_a_root_that_is_not_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _unwritable_cache(tmp_path, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = tmp_path / "planted"
    planted.symlink_to(elsewhere)  # someone else's link in a shared /tmp
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    good = tmp_path / "good"
    monkeypatch.setattr(bmod, "fallback_roots", lambda: [planted, shared, good])
    directory, _ = bmod.state_directory()
    assert directory.parent == good
    assert list(elsewhere.iterdir()) == [] and list(shared.iterdir()) == []


def test_no_writable_place_is_an_error_naming_every_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = _unwritable_cache(tmp_path, monkeypatch)
    also = tmp_path / "blocker" / "run"
    monkeypatch.setattr(bmod, "fallback_roots", lambda: [also])
    with pytest.raises(BudgetError) as e:
        bmod.state_directory()
    assert str(cache) in str(e.value) and str(also) in str(e.value)
    assert "IGNITION_CACHE_DIR" in str(e.value)
    assert "memory budget unknown" in bmod.header_line("75%")


def test_fallback_roots_are_per_user_and_fixed() -> None:
    roots = bmod.fallback_roots()
    assert roots and all(str(os.getuid()) in str(r) for r in roots)
    assert roots == bmod.fallback_roots()
