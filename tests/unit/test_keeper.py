"""The keeper process (pytest_ignition.keeper) with a real child standing in for a VM process
(``sleep``): it dies with its pytest unless kept, a kept one ends at its deadline or on SIGTERM,
and then its files and registry entry are gone. (Real VMs: tests/e2e/test_keep_failed.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_ignition._testing import proc_state
from pytest_ignition.engines import _process


def _alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z")


def _child_pid(keeper: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{keeper.pid}/task/{keeper.pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError("the keeper started no child")


def _wait_gone(pid: int, timeout: float) -> float:
    t0 = time.monotonic()
    while _alive(pid):
        assert time.monotonic() - t0 < timeout, f"pid {pid} still alive after {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture
def keeper_mode() -> object:
    _process.enable_keeper()
    try:
        yield
    finally:
        _process.enable_keeper(False)


def test_unkept_vm_process_dies_when_its_machine_closes(keeper_mode: object) -> None:
    proc = _process.spawn(["sleep", "1000"], stdin=subprocess.DEVNULL)
    child = _child_pid(proc)
    assert "pytest_ignition.keeper" in Path(f"/proc/{proc.pid}/cmdline").read_text()
    _process.kill_process(proc)
    _wait_gone(child, 10)
    assert proc.poll() is not None


def test_pipe_eof_without_an_order_kills_the_child(tmp_path: Path) -> None:
    r, w = os.pipe()
    keeper = subprocess.Popen(
        [sys.executable, "-m", "pytest_ignition.keeper", str(r), "", "--", "sleep", "1000"],
        pass_fds=(r,),
        start_new_session=True,
    )
    os.close(r)
    child = _child_pid(keeper)
    os.close(w)  # what the kernel does when pytest dies
    assert _wait_gone(child, 10) < 10
    assert keeper.wait(timeout=10) == 128 + signal.SIGKILL


def _kept(tmp_path: Path, seconds: float) -> tuple[subprocess.Popen[bytes], int, Path, Path]:
    session_dir = tmp_path / "ignition-session"
    workdir = session_dir / "vm-1"
    workdir.mkdir(parents=True)
    (workdir / "agent.sock").write_text("")
    entry = tmp_path / "kept" / "abc123.json"
    entry.parent.mkdir()
    entry.write_text(json.dumps({"id": "abc123", "cleanup": [str(workdir)]}))
    r, w = os.pipe()
    keeper = subprocess.Popen(
        [sys.executable, "-m", "pytest_ignition.keeper", str(r), "", "--", "sleep", "1000"],
        pass_fds=(r,),
        start_new_session=True,
    )
    os.close(r)
    child = _child_pid(keeper)
    os.write(w, f"keep {time.time() + seconds:.3f} {entry}\n".encode())
    os.close(w)  # pytest exits: a kept VM stays
    return keeper, child, workdir, entry


def test_kept_child_outlives_the_pipe_and_ends_at_its_deadline(tmp_path: Path) -> None:
    keeper, child, workdir, entry = _kept(tmp_path, 2.0)
    time.sleep(0.7)
    assert _alive(child), "a kept VM died with pytest"
    waited = _wait_gone(child, 20)
    assert 0.5 < waited + 0.7 < 20
    keeper.wait(timeout=10)
    assert not workdir.exists() and not entry.exists()
    assert not workdir.parent.exists(), "the emptied session dir is left over"


def test_sigterm_ends_a_kept_child_at_once(tmp_path: Path) -> None:
    keeper, child, workdir, entry = _kept(tmp_path, 600.0)
    time.sleep(0.3)
    assert _alive(child)
    keeper.send_signal(signal.SIGTERM)  # `python -m pytest_ignition kill ID`
    assert _wait_gone(child, 10) < 10
    keeper.wait(timeout=10)
    assert not workdir.exists() and not entry.exists()
