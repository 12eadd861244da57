"""The output cap (``max_output``) on real guests: a command that writes too much is killed,
``CommandOutputTooLarge`` carries the head of its output, and the VM goes on serving.

Uses the plugin's ``ignition_vm`` (skips without an engine, fails under IGNITION_REQUIRE=1) and,
for the session setting, a whole pytest run in a pytester subprocess.
"""

from __future__ import annotations

import shutil

import pytest

from pytest_ignition import CommandError, CommandOutputTooLarge
from pytest_ignition._testing import require
from pytest_ignition.fixtures import get_session
from pytest_ignition.guest import cache_dir, find_guest

MIB = 1 << 20
# Taken now: pytester points HOME at a temporary directory, and the inner run must find the real
# guest cache (not build a guest of its own there).
GUEST_CACHE = cache_dir()


def test_fifty_mib_of_zeros_past_a_one_mib_cap(ignition_vm):
    # busybox head takes no "50M" suffix: 50 MiB spelled out
    vm = ignition_vm
    with pytest.raises(CommandOutputTooLarge) as ei:
        vm.run("head -c 52428800 /dev/zero", max_output="1M", timeout=300)
    e = ei.value
    assert isinstance(e, CommandError)
    assert e.stdout_bytes == b"\0" * MIB and e.stderr_bytes == b""  # exactly the cap, no more
    assert e.max_output == MIB and e.signal == 9  # killed, not finished
    msg = str(e)
    assert "'head -c 52428800 /dev/zero'" in msg and "1 MiB" in msg and "max_output='1M'" in msg
    assert vm.history[-1][:2] == ("head -c 52428800 /dev/zero", None)
    # the VM stays usable and nothing of the command is left
    assert vm.run("echo ok").stdout == "ok\n"
    assert vm.run("pidof head").exit_code == 1


def test_infinite_output_on_both_streams_and_stdin(ignition_vm):
    vm = ignition_vm
    with pytest.raises(CommandOutputTooLarge) as ei:
        vm.run("yes err >&2 & yes out", max_output=300_000, timeout=300)
    e = ei.value
    assert len(e.stdout_bytes) + len(e.stderr_bytes) == 300_000
    assert set(e.stdout_bytes.split(b"\n")) <= {b"out", b"o", b"ou", b""}
    assert set(e.stderr_bytes.split(b"\n")) <= {b"err", b"e", b"er", b""}
    assert vm.run("pidof yes").exit_code == 1  # the whole process group was killed
    with pytest.raises(CommandOutputTooLarge):
        vm.run(["cat"], input=b"x" * (2 * MIB), max_output=MIB, timeout=300)
    assert vm.check_output(["cat"], input="still here") == "still here"


def test_fixture_vms_carry_the_session_setting(ignition_vm, request):
    settings = get_session(request.config).settings
    assert ignition_vm.max_output == settings.max_output
    assert ignition_vm.max_output_source == settings.sources["max_output"]


def test_session_option_caps_every_command(pytester: pytest.Pytester, monkeypatch) -> None:
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is not installed")
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))
    require(find_guest() is not None, "no built guest (run: python -m pytest_ignition.guest build)")
    monkeypatch.setenv("IGNITION_MAX_OUTPUT", "0")  # the command line wins over it
    pytester.makepyfile(
        """
        import pytest
        from pytest_ignition import CommandOutputTooLarge

        def test_capped(ignition_vm):
            with pytest.raises(CommandOutputTooLarge) as ei:
                ignition_vm.run("yes")
            assert len(ignition_vm.run("head -c 102400 /dev/zero").stdout_bytes) == 100 * 1024
            assert len(ei.value.stdout_bytes) == 100 * 1024
            print("MESSAGE", str(ei.value).splitlines()[0])
            # per call beats the session setting
            assert len(ignition_vm.run("head -c 204800 /dev/zero", max_output=0).stdout_bytes) == (
                200 * 1024
            )

        def test_reported(ignition_vm):
            ignition_vm.run("yes")
        """
    )
    result = pytester.runpytest_subprocess(
        "-s", "-p", "no:cacheprovider", "--ignition-max-output=100K"
    )
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "MESSAGE" in out and "from --ignition-max-output" in out
    # the failing test's report names the exception, the limit and how to raise it
    result.stdout.fnmatch_lines(
        ["*CommandOutputTooLarge: command 'yes' wrote more than 100 KiB of output*"]
    )
    assert "IGNITION_MAX_OUTPUT" in out and "ignition_max_output" in out
