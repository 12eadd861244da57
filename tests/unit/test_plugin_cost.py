"""The plugin costs nothing to a pytest run that uses no VM (issue 16).

Every run spawns a child pytest (pytester) with a fake ``qemu-system-x86_64``/``qemu-img`` first
on PATH that records each call: a run without VM tests must never start it, and a malformed
``IGNITION_*`` variable must not break it. The positive controls show the shim does get called
(and the variable does get reported) as soon as a collected test uses a VM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PLAIN_TESTS = """
def test_one():
    assert 1 + 1 == 2

def test_two(tmp_path):
    (tmp_path / "f").write_text("x")
"""

SHIM = """#!/bin/sh
echo "$0 $*" >> {log}
echo "QEMU emulator version 7.2.99 (shim)"
"""


@pytest.fixture
def qemu_shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH-first fake QEMU; returns the log file it appends one line per call to."""
    bindir = tmp_path / "shim-bin"
    bindir.mkdir()
    log = tmp_path / "qemu-calls.log"
    for name in ("qemu-system-x86_64", "qemu-system-aarch64", "qemu-img"):
        exe = bindir / name
        exe.write_text(SHIM.format(log=log))
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in [v for v in os.environ if v.startswith("IGNITION_")]:
        monkeypatch.delenv(var)
    return log


def test_bad_env_var_does_not_touch_a_suite_without_vms(
    pytester: pytest.Pytester, qemu_shim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGNITION_MEMORY", "banana")
    monkeypatch.setenv("IGNITION_ENGINE", "qemu")  # would probe QEMU if anything did
    pytester.makepyfile(PLAIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert result.ret == 0
    out = result.stdout.str() + result.stderr.str()
    assert "ignition:" not in out and "pytest-ignition" not in out, out
    assert not qemu_shim.exists(), f"QEMU was started: {qemu_shim.read_text()}"


def test_bad_ini_key_does_not_touch_a_suite_without_vms(
    pytester: pytest.Pytester, qemu_shim: Path
) -> None:
    pytester.makeini("[pytest]\nignition_cpus = many\n")
    pytester.makepyfile(PLAIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert not qemu_shim.exists()


def test_bad_env_var_is_a_usage_error_once_a_test_uses_a_vm(
    pytester: pytest.Pytester, qemu_shim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGNITION_MEMORY", "banana")
    pytester.makepyfile(PLAIN_TESTS + "\ndef test_vm(ignition_vm):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "environment variable IGNITION_MEMORY = 'banana'" in err, err
    result.assert_outcomes()  # nothing ran
    assert not qemu_shim.exists()


def test_bad_env_var_fails_a_vm_fixture_requested_at_run_time(
    pytester: pytest.Pytester, qemu_shim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGNITION_MEMORY", "banana")
    pytester.makepyfile(
        PLAIN_TESTS + "\ndef test_dynamic(request):\n    request.getfixturevalue('ignition_vm')\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "IGNITION_MEMORY = 'banana'" in out
    assert "Traceback" not in out
    assert not qemu_shim.exists()


def test_bad_cli_flag_still_fails_at_start(pytester: pytest.Pytester, qemu_shim: Path) -> None:
    pytester.makepyfile(PLAIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ignition-memory=banana")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ignition-memory = 'banana'" in result.stderr.str()
    assert not qemu_shim.exists()


def test_control_the_shim_is_called_when_a_test_uses_a_vm(
    pytester: pytest.Pytester, qemu_shim: Path
) -> None:
    # The marker alone marks a VM test; no VM boots (no fixture), but the engine lines appear.
    pytester.makepyfile(
        PLAIN_TESTS
        + "\nimport pytest\n\n@pytest.mark.ignition(memory='256M')\ndef test_m():\n    pass\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ignition-engine=qemu")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["ignition: engine qemu 7.2.99*"])
    assert "qemu-system-x86_64 --version" in qemu_shim.read_text()


def test_quiet_run_shows_no_engine_lines(pytester: pytest.Pytester, qemu_shim: Path) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.ignition()\ndef test_m():\n    pass\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--ignition-engine=qemu")
    result.assert_outcomes(passed=1)
    assert "ignition: engine" not in result.stdout.str()
