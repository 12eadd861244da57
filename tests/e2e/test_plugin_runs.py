"""The plugin as users run it: whole pytest runs (pytester subprocesses) against real guests.

Covers what only shows in a whole run: one snapshot shared by ``pytest -n 2``, a kernel that
panics or hangs while booting, the failure report (console tail + command history), the
report header, and "no usable engine" (skip, or error under IGNITION_REQUIRE=1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
# pytester points HOME at a temporary directory; the inner runs must find the real guest cache.
GUEST_CACHE = cache_dir()


@pytest.fixture(autouse=True)
def _real_guest_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))


@pytest.fixture
def needs_guest() -> None:
    """qemu present and the default guest built (from the cache; built now if its inputs changed)."""
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import GuestBuildError, build_guest

    problem = None
    try:
        build_guest()
    except GuestBuildError as e:
        problem = f"the default guest cannot be built: {e}"
    require(problem is None, str(problem))


def _out(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def test_xdist_two_workers_share_one_snapshot(
    pytester: pytest.Pytester, needs_guest: None, tmp_path: Path
) -> None:
    log = tmp_path / "prepare.log"
    seen = tmp_path / "seen.log"
    pytester.makeconftest(
        f"""
        import os

        def pytest_ignition_prepare(vm):
            with open({str(log)!r}, "a") as f:
                f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
            vm.write_file("/etc/prepared-by", os.environ.get("PYTEST_XDIST_WORKER", "main"))
        """
    )
    pytester.makepyfile(
        f"""
        import os
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_vm(ignition_vm, i):
            who = ignition_vm.read_file("/etc/prepared-by").decode()
            with open({str(seen)!r}, "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + " " + who + "\\n")
            # each test gets a fresh guest: nothing from the other tests
            assert ignition_vm.run(["test", "-e", "/root/mine"]).exit_code == 1
            ignition_vm.write_file("/root/mine", b"x")
        """
    )
    basetemp = tmp_path / "bt"
    result = pytester.runpytest_subprocess("-n", "2", "-p", "xdist", f"--basetemp={basetemp}")
    result.assert_outcomes(passed=4)
    preparers = log.read_text().split()
    assert len(preparers) == 1, f"prepare ran {len(preparers)} times: {preparers}"
    rows = [line.split() for line in seen.read_text().splitlines()]
    assert len(rows) == 4
    assert {w for w, _ in rows} == {"gw0", "gw1"}, "both workers should have run tests"
    assert {p for _, p in rows} == {preparers[0]}, "every test saw the one prepared snapshot"
    snaps = basetemp / "ignition-snapshots"
    boots = [json.loads(x) for x in (snaps / "boots.log").read_text().splitlines()]
    assert len(boots) == 1
    assert len([d for d in snaps.iterdir() if d.is_dir()]) == 1
    result.stdout.fnmatch_lines(
        ["*pytest-ignition*", "*4 VM(s) restored*median*", "1 snapshot(s) booted and prepared: *"]
    )


def test_kernel_panic_at_boot_is_a_clear_error(
    pytester: pytest.Pytester, needs_guest: None
) -> None:
    pytester.makepyfile(
        """
        def test_one(ignition_vm):
            pass

        def test_two(ignition_vm):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--ignition-kernel-args=rdinit=/nonexistent root=/dev/nothing",
        "--ignition-timeout=60",
    )
    result.assert_outcomes(errors=2)
    out = _out(result)
    assert "the guest did not boot" in out
    assert "console tail" in out
    assert "Kernel panic" in out
    # the second test reuses the recorded failure instead of booting again
    assert out.count("Kernel panic - not syncing") >= 2


def test_guest_that_hangs_at_boot_errors_within_the_timeout(
    pytester: pytest.Pytester, needs_guest: None
) -> None:
    # rdinit=/bin/sh: a shell instead of init; the agent never starts.
    pytester.makepyfile("def test_one(ignition_vm):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--ignition-kernel-args=rdinit=/bin/sh", "--ignition-timeout=20"
    )
    result.assert_outcomes(errors=1)
    out = _out(result)
    assert "the guest did not boot" in out
    assert "timeout 20 s" in out
    assert "console tail" in out


def test_failing_test_report_has_console_tail_and_commands(
    pytester: pytest.Pytester, needs_guest: None
) -> None:
    pytester.makepyfile(
        """
        def test_fails(ignition_vm):
            ignition_vm.run("echo to-the-console-$((3*3)) > /dev/console")
            ignition_vm.run(["echo", "first-command"])
            ignition_vm.run("exit 5")
            assert False, "deliberate"
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    out = _out(result)
    assert "ignition ignition_vm: commands" in out
    assert "$ echo first-command" in out
    assert "-> exit 5" in out
    assert "ignition ignition_vm: console tail" in out
    assert "to-the-console-9" in out


def test_report_header_names_engine_accelerator_kernel_and_reason(
    pytester: pytest.Pytester,
) -> None:
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    # the marker makes it a VM test (the lines follow collection only when one is collected)
    pytester.makepyfile("import pytest\n\n@pytest.mark.ignition()\ndef test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--ignition-engine=qemu", "--ignition-max-output=3M")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "ignition: engine qemu*accelerator *: requested with --ignition-engine=qemu*",
            "ignition: kernel *",
            "ignition: * MiB, 1 CPU(s), reset *, max output 3 MiB",
        ]
    )


def _no_qemu_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_no_engine_skips_with_reason_and_hint(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_qemu_env(monkeypatch, tmp_path)
    monkeypatch.delenv("IGNITION_REQUIRE", raising=False)
    pytester.makepyfile(
        """
        def test_vm(ignition_vm):
            pass

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--ignition-engine=qemu", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    out = _out(result)
    assert "qemu-system-x86_64 was not found" in out
    assert "apt-get install qemu-system-x86" in out
    result.stdout.fnmatch_lines(["ignition: no usable VM engine*"])


def test_no_engine_is_an_error_under_ignition_require(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_qemu_env(monkeypatch, tmp_path)
    monkeypatch.setenv("IGNITION_REQUIRE", "1")
    pytester.makepyfile("def test_vm(ignition_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("--ignition-engine=qemu")
    result.assert_outcomes(errors=1)
    out = _out(result)
    assert "IGNITION_REQUIRE=1 but: no usable VM engine" in out
    assert "qemu-system-x86_64 was not found" in out


def test_factory_bad_setting_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_f(ignition_vm_factory):
            with pytest.raises(pytest.UsageError, match="unknown setting 'mem'"):
                ignition_vm_factory(mem="1G")
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_failing_prepare_hook_is_a_clear_error_for_every_test(
    pytester: pytest.Pytester, needs_guest: None
) -> None:
    pytester.makeconftest(
        """
        def pytest_ignition_prepare(vm):
            vm.run(["sh", "-c", "exit 9"]).check()
        """
    )
    pytester.makepyfile(
        """
        def test_one(ignition_vm):
            pass

        def test_two(ignition_vm):
            pass

        def test_no_vm():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=2)
    out = _out(result)
    assert out.count("pytest_ignition_prepare failed on the booted guest") >= 2
    assert "CommandFailed" in out
    assert "exited with 9" in out
    assert "0 snapshot" not in out


def test_rollback_falls_back_to_restore_where_unsupported(
    pytester: pytest.Pytester, needs_guest: None
) -> None:
    pytester.makepyfile(
        """
        def test_a(ignition_vm):
            ignition_vm.write_file("/root/a", b"a")

        def test_b(ignition_vm):
            assert ignition_vm.run(["test", "-e", "/root/a"]).exit_code == 1
        """
    )
    result = pytester.runpytest_subprocess("--ignition-engine=qemu", "--ignition-reset=rollback")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["ignition: qemu cannot roll back in place; restoring per test*"])
