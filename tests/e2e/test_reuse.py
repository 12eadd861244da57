"""``--ignition-reuse`` on real guests (QEMU): prepared snapshots kept in the cache between runs.

A second run restores the first run's snapshot (no boot, no prepare); editing the prepare hook's
body, or a helper module it imports, makes the next run prepare afresh and the header says why;
two xdist workers of a run with a new key prepare it once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
GUEST_CACHE = cache_dir()
STORE = GUEST_CACHE / "snapshots"


@pytest.fixture(autouse=True)
def _real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))
    monkeypatch.setenv("IGNITION_ENGINE", "qemu")


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path: Path) -> Iterator[Path]:
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import find_guest

    require(find_guest() is not None, "the default guest is not built")
    log = tmp_path / "prepared.log"
    pytester.makepyfile(helpers="VALUE = 'one'\n")
    pytester.makeconftest(
        f"""
        import os
        import helpers

        def pytest_ignition_prepare(vm):
            with open({str(log)!r}, "a") as f:
                f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
            vm.write_file("/etc/prepared", helpers.VALUE)

        def pytest_ignition_snapshot_key(config):
            return os.environ.get("REUSE_TEST_SALT", "")
        """
    )
    pytester.makepyfile(
        test_reuse="""
        import helpers
        import pytest

        @pytest.mark.parametrize("i", range(2))
        def test_prepared(ignition_vm, i):
            assert ignition_vm.read_file("/etc/prepared").decode() == helpers.VALUE
        """
    )
    before = set(STORE.iterdir()) if STORE.exists() else set()
    yield log
    for p in set(STORE.iterdir()) - before if STORE.exists() else ():
        if p.is_dir():
            inputs = p / "inputs.json"
            if inputs.exists() and str(pytester.path) not in inputs.read_text():
                continue  # another project's, made meanwhile
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = pytester.runpytest_subprocess("--ignition-reuse", *args)
    result.assert_outcomes(passed=2)
    return result


def _prepares(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


def test_second_run_reuses_and_source_edits_invalidate(
    pytester: pytest.Pytester, project: Path
) -> None:
    log = project
    first = _run(pytester, "-p", "no:xdist")
    first.stdout.fnmatch_lines(["*reuse on (--ignition-reuse)*: new (*", "*booted and prepared*"])
    assert _prepares(log) == 1

    second = _run(pytester, "-p", "no:xdist")
    second.stdout.fnmatch_lines(["*reuse on (--ignition-reuse)*: reused (same key*"])
    assert "booted and prepared" not in second.stdout.str()
    assert _prepares(log) == 1, "the second run prepared again"

    # the hook's body changes: a new snapshot, and the header names the file
    conftest = pytester.path / "conftest.py"
    conftest.write_text(
        conftest.read_text().replace(
            'vm.write_file("/etc/prepared", helpers.VALUE)',
            'vm.write_file("/etc/prepared", helpers.VALUE)\n    vm.run("true")',
        )
    )
    third = _run(pytester, "-p", "no:xdist")
    third.stdout.fnmatch_lines(["*: new (prepare hook sources changed: conftest.py)*"])
    assert _prepares(log) == 2

    # a helper the hook's module imports changes: new again (and the tests see the new value)
    (pytester.path / "helpers.py").write_text("VALUE = 'two'\n")
    fourth = _run(pytester, "-p", "no:xdist")
    fourth.stdout.fnmatch_lines(["*: new (prepare hook sources changed: helpers.py)*"])
    assert _prepares(log) == 3
    fifth = _run(pytester, "-p", "no:xdist")
    fifth.stdout.fnmatch_lines(
        ["*reuse on (--ignition-reuse)*: reused (same key*", "snapshot * reused (same key*"]
    )
    assert _prepares(log) == 3


def test_two_xdist_workers_build_a_new_key_once(
    pytester: pytest.Pytester, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = project
    monkeypatch.setenv("REUSE_TEST_SALT", "xdist")  # pytest_ignition_snapshot_key joins the key
    result = _run(pytester, "-n", "2", "-p", "xdist")
    assert _prepares(log) == 1, log.read_text()
    # the workers made it; the controller's summary says so
    result.stdout.fnmatch_lines(["*snapshots (--ignition-reuse)*", "snapshot * new (*"])
    entries = [
        p
        for p in STORE.iterdir()
        if p.is_dir()
        and (p / "inputs.json").exists()
        and str(pytester.path) in (p / "inputs.json").read_text()
    ]
    assert len(entries) == 1, entries
    assert json.loads((entries[0] / "inputs.json").read_text())["snapshot_key"] == ["xdist"]
    assert (entries[0] / "READY").exists()
    assert result.ret == 0
