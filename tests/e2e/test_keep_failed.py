"""``--ignition-keep-failed`` on real guests: a failed test's VM outlives pytest, ``attach``
(driven by pexpect, as a person types) gets a root shell in it with the failed test's files,
``kill`` ends it with nothing left over, and an abandoned one ends on its own after
``--ignition-keep-failed-for``.

The inner runs use QEMU; ``IGNITION_KEEP_TEST_ENGINE=ignition`` runs them on the bundled VMM
instead (tests/nested/test_keep_failed_ignition.py does that inside the nested harness).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from pytest_ignition._testing import proc_state, require
from pytest_ignition.guest import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
ENGINE = os.environ.get("IGNITION_KEEP_TEST_ENGINE", "qemu")
ENGINE_HEADER = {"qemu": "*engine qemu *", "ignition": "*engine ignition (bundled VMM*"}[ENGINE]
CLI = [sys.executable, "-m", "pytest_ignition"]
GUEST_CACHE = cache_dir()  # before pytester moves HOME: kept VMs are registered here
PROMPT = "ignition:/# "
# Inside the nested harness (TCG, a shared 2-core machine) a Python start alone can take tens of
# seconds: the deadlines stretch, and the abandoned VM's keep time must outlast the inner pytest's
# own end (else it expires before this test has looked at it).
SLOW = 4 if os.environ.get("IGNITION_NESTED") == "1" else 1
SHORT_KEEP_S = 4 if SLOW == 1 else 60

TESTS = """
def test_passes(ignition_vm):
    ignition_vm.write_file("/root/from-the-passing-test", "x")

def test_fails(ignition_vm):
    ignition_vm.write_file("/root/evidence.txt", "written by the failed test\\n")
    ignition_vm.run("mkdir -p /srv/state && echo 42 > /srv/state/answer").check()
    assert False, "deliberate failure"
"""


@pytest.fixture(autouse=True)
def _real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))
    monkeypatch.setenv("IGNITION_ENGINE", ENGINE)
    if SLOW > 1:  # a boot deadline, not a speed expectation
        monkeypatch.setenv("IGNITION_TIMEOUT", "600")
    monkeypatch.delenv("CI", raising=False)


@pytest.fixture
def guest() -> None:
    if ENGINE == "ignition":
        from pytest_ignition.engines.ignition import available

        ok, why = available()
        require(ok, why)
    else:
        require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import find_guest

    require(find_guest() is not None, "the default guest is not built")


def _entries(pytester: pytest.Pytester) -> list[dict]:
    """Registry entries of VMs kept by this test's inner runs (their rootdir is pytester's)."""
    out = []
    for p in (GUEST_CACHE / "kept").glob("*.json"):
        try:
            e = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if e.get("rootdir") == str(pytester.path):
            out.append(e)
    return out


def _alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z")


def _vm_pids_of(entry: dict) -> list[int]:
    """The VM processes (QEMU, or the bundled VMM; not their keeper) whose command line names
    one of the kept VM's directories (its work dir, or a short socket dir outside it)."""
    dirs = [p.encode() for p in [entry["workdir"], *entry.get("cleanup", [])] if p]
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmd or b"pytest_ignition.keeper" in cmd:
            continue
        is_vm = b"qemu-system" in cmd[0] or b"pytest_ignition.vmm" in cmd
        if is_vm and any(p in a for a in cmd for p in dirs):
            pids.append(int(d.name))
    return pids


def _cli(*args: str, timeout: float = 60 * SLOW) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


@pytest.fixture
def cleanup(pytester: pytest.Pytester) -> Iterator[None]:
    yield
    for e in _entries(pytester):  # a failed assertion must not leave VMs behind
        _cli("kill", e["id"])


def _kept_ids(result: pytest.RunResult) -> list[str]:
    return re.findall(r"python -m pytest_ignition attach ([0-9a-f]+)", result.stdout.str())


def test_kept_vm_attach_and_kill(pytester: pytest.Pytester, guest: None, cleanup: None) -> None:
    pytester.makepyfile(test_keep=TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--ignition-keep-failed", "--ignition-keep-failed-for=600"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            ENGINE_HEADER,
            "*keep-failed on (--ignition-keep-failed)*",
            "*kept VMs of failed tests*",
            "* test_keep.py::test_fails *python -m pytest_ignition attach *",
        ]
    )
    ids = _kept_ids(result)
    assert len(ids) == 1, result.stdout.str()
    (vid,) = ids
    entries = _entries(pytester)
    assert [e["id"] for e in entries] == [vid], entries  # exactly the failed test's VM
    entry = entries[0]
    assert entry["test"].endswith("test_keep.py::test_fails")
    assert _alive(entry["keeper_pid"])
    vms = _vm_pids_of(entry)
    assert len(vms) == 1, f"one VM process for the kept VM, found {vms}"
    listed = _cli("list")
    assert vid in listed.stdout and "test_fails" in listed.stdout, listed

    child = pexpect.spawn(
        CLI[0],
        [*CLI[1:], "attach", vid],
        dimensions=(30, 100),
        timeout=60 * SLOW,
        encoding="utf-8",
        codec_errors="replace",
    )
    try:
        child.expect_exact(PROMPT)
        child.sendline("cat /root/evidence.txt /srv/state/answer")
        child.expect_exact("written by the failed test\r\n42\r\n")
        child.expect_exact(PROMPT)
        child.sendline("test -e /root/from-the-passing-test || echo fresh-vm-per-test")
        child.expect_exact("fresh-vm-per-test\r\n")
        child.expect_exact(PROMPT)
        child.sendline("exit 6")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 6
    assert _alive(entry["keeper_pid"]), "attach/exit must not end the kept VM"

    killed = _cli("kill", vid)
    assert killed.returncode == 0 and f"killed {vid}" in killed.stdout, killed
    assert not _alive(entry["keeper_pid"])
    assert not any(_alive(p) for p in vms)
    assert not Path(entry["workdir"]).exists(), "the kept VM's work dir is left over"
    assert not Path(entry["workdir"]).parent.exists(), "the run's temp dir is left over"
    assert not (GUEST_CACHE / "kept" / f"{vid}.json").exists()
    assert vid not in _cli("list").stdout


def test_abandoned_kept_vm_ends_after_keep_failed_for(
    pytester: pytest.Pytester, guest: None, cleanup: None
) -> None:
    pytester.makepyfile(test_keep=TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--ignition-keep-failed=1", f"--ignition-keep-failed-for={SHORT_KEEP_S}"
    )
    result.assert_outcomes(passed=1, failed=1)
    (vid,) = _kept_ids(result)
    (entry,) = _entries(pytester)
    vms = _vm_pids_of(entry)
    assert len(vms) == 1, f"one VM process for the kept VM, found {vms}"
    deadline = time.monotonic() + SHORT_KEEP_S + 60 * SLOW
    while _alive(entry["keeper_pid"]) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _alive(entry["keeper_pid"]), "the keeper outlived keep_failed_for"
    assert not any(_alive(p) for p in vms)
    assert not Path(entry["workdir"]).exists()
    assert not Path(entry["workdir"]).parent.exists(), "the run's temp dir is left over"
    assert not (GUEST_CACHE / "kept" / f"{vid}.json").exists()


def test_keep_failed_is_off_under_ci_unless_given(
    pytester: pytest.Pytester, guest: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_keep="def test_fails(ignition_vm):\n    assert False\n")
    result = pytester.runpytest_subprocess("-p", "no:xdist")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*keep-failed off: CI is set*"])
    assert "kept VMs of failed tests" not in result.stdout.str()
    assert _entries(pytester) == []
