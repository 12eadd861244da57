"""``vm.shell()`` on a real guest (QEMU), driven by pexpect as a person at the terminal would: called
by a test (pytest's capture and ``capsys`` suspended meanwhile, resumed after), and from a failed
test under ``--pdb`` (exiting the shell returns to the debugger)."""

from __future__ import annotations

import os
import shutil
import sys

import pexpect
import pytest

from pytest_ignition._testing import require
from pytest_ignition.guest import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
GUEST_CACHE = cache_dir()


def test_vm_shell_from_pdb(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(GUEST_CACHE))  # pytester moved HOME
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from pytest_ignition.guest import find_guest

    require(find_guest() is not None, "the default guest is not built")
    pytester.makepyfile(
        test_dbg="""
        def test_direct(ignition_vm, capsys):
            print("captured before")
            assert ignition_vm.shell() == 3  # capture (global and capsys) suspended meanwhile
            print("captured after")
            assert "captured before" in capsys.readouterr().out

        def test_fails(ignition_vm):
            ignition_vm.write_file("/root/state", "left by the test\\n")
            print("captured output of the test")
            assert False, "look inside"
        """
    )
    env = {**os.environ, "IGNITION_CACHE_DIR": str(GUEST_CACHE), "IGNITION_ENGINE": "qemu"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "--pdb", "test_dbg.py"],
        cwd=str(pytester.path),
        env=env,
        dimensions=(30, 120),
        timeout=180,
        encoding="utf-8",
        codec_errors="replace",
    )
    try:
        child.expect_exact("ignition:/# ")  # test_direct's shell
        child.sendline("echo direct-$((1+1)); exit 3")
        child.expect_exact("direct-2\r\n")
        child.expect_exact("(Pdb) ")
        child.sendline("rc = ignition_vm.shell()")
        child.expect_exact("ignition:/# ")
        child.sendline("cat /root/state; stty size")
        child.expect_exact("left by the test\r\n30 120\r\n")
        child.expect_exact("ignition:/# ")
        child.sendline("exit 9")
        child.expect_exact("(Pdb) ")
        child.sendline("p ('rc', rc)")
        child.expect_exact("('rc', 9)")
        child.expect_exact("(Pdb) ")
        child.sendline("c")
        child.expect(r"1 failed, 1 passed")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
