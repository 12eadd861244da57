"""``python -m pytest_ignition run`` and ``shell`` on real guests (QEMU), driven as a person would.

``run`` boots a fresh VM per call: its exit code is the command's; a guest that panics mid-command
is the infrastructure exit code (125) with the console tail. ``shell`` is driven through a real
pty by pexpect: typing, the window size (at start and on SIGWINCH), Ctrl-C reaching the guest's
foreground job, job control, and the shell's exit code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pexpect
import pytest

from pytest_ignition._testing import require
from pytest_ignition.cli import EXIT_INFRA

QEMU = shutil.which("qemu-system-x86_64")
CLI = [sys.executable, "-m", "pytest_ignition"]
PROMPT = "ignition:/# "


@pytest.fixture(scope="module")
def guest() -> None:
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import find_guest

    require(
        find_guest() is not None,
        "the default guest is not built (python -m pytest_ignition.guest build)",
    )


def _env() -> dict[str, str]:
    return {**os.environ, "IGNITION_ENGINE": "qemu"}


def test_run_streams_output_and_exits_with_the_commands_code(guest: None) -> None:
    r = subprocess.run(
        [*CLI, "run", "--", "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == 3, r
    assert r.stdout == "to-stdout\n"
    assert "to-stderr\n" in r.stderr


def test_a_guest_that_panics_mid_command_is_the_infrastructure_code(guest: None) -> None:
    r = subprocess.run(
        [
            *CLI,
            "run",
            "--",
            "sh",
            "-c",
            "echo about-to-panic; sleep 1; echo c > /proc/sysrq-trigger; sleep 60",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == EXIT_INFRA, r
    assert r.stdout.startswith("about-to-panic"), r.stdout
    assert "the guest went away while the command ran" in r.stderr, r.stderr
    assert "--- console tail ---" in r.stderr
    assert "sysrq" in r.stderr.lower() or "Kernel panic" in r.stderr, r.stderr[-3000:]


def test_a_guest_that_does_not_boot_is_the_infrastructure_code(guest: None) -> None:
    r = subprocess.run(
        [*CLI, "run", "--kernel-args", "rdinit=/nonexistent", "--timeout", "60", "--", "true"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert r.returncode == EXIT_INFRA, r
    assert "the guest did not boot" in r.stderr
    assert "--- console tail ---" in r.stderr and "Kernel panic" in r.stderr, r.stderr[-3000:]


def test_shell_is_a_real_terminal(guest: None) -> None:
    child = pexpect.spawn(
        CLI[0],
        CLI[1:] + ["shell"],
        env=_env(),
        dimensions=(33, 101),
        timeout=120,
        encoding="utf-8",
        codec_errors="replace",
    )
    try:
        child.expect_exact(PROMPT)
        child.sendline("tty; stty size")
        child.expect(r"/dev/pts/\d+\r\n33 101\r\n")
        child.expect_exact(PROMPT)
        # a resize of the local terminal reaches the guest's (SIGWINCH -> WINSIZE frame)
        child.setwinsize(40, 132)
        time.sleep(0.5)
        child.sendline("stty size")
        child.expect_exact("40 132\r\n")
        child.expect_exact(PROMPT)
        # Ctrl-C interrupts the guest's foreground job, not the shell or the CLI
        child.sendline("sleep 100; echo status=$?")
        time.sleep(1.0)
        started = time.monotonic()
        child.sendcontrol("c")
        child.expect_exact(PROMPT, timeout=20)
        assert time.monotonic() - started < 20
        assert child.isalive()
        # job control: a background job and `jobs`
        child.sendline("sleep 100 & jobs")
        child.expect(r"\[1\]\+? +Running")
        child.expect_exact(PROMPT)
        child.sendline("kill %1; exit 4")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 4, (child.exitstatus, child.signalstatus)
