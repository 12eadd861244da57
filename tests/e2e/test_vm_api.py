"""The public VM API (:mod:`pytest_ignition.vm`) on VMs restored by the QEMU engine.

Each test gets a fresh restore of one module-wide snapshot, built with the engine directly
(the plugin's fixtures are tested elsewhere). Skips without qemu or a built guest (fails
under IGNITION_REQUIRE=1).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.engines.base import VMConfig
from pytest_ignition.vm import VM, CommandFailed, CommandResult, CommandTimeout

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is not installed")
    from pytest_ignition.engines.qemu import QemuEngine
    from pytest_ignition.engines.select import decide, probe_host
    from pytest_ignition.guest import find_guest

    guest = find_guest()
    require(guest is not None, "no built guest (run: python -m pytest_ignition.guest build)")
    assert guest is not None
    engine = QemuEngine(accelerator=decide("qemu", probe_host()).accelerator)
    config = VMConfig(kernel=guest.kernel, initrd=guest.initrd, memory_mib=256, boot_timeout=180)
    base = tmp_path_factory.mktemp("vm-api")
    machine = engine.boot(config, base / "boot")
    try:
        VM(engine, machine, config).write_file("/root/marker", b"snapshot\n")
        engine.snapshot(machine, base / "snap")
    finally:
        machine.close()
    return engine, config, base / "snap"


@pytest.fixture
def vm(snapshot, tmp_path) -> Iterator[VM]:
    engine, config, snapdir = snapshot
    machine = engine.restore(config, snapdir, tmp_path / "vm")
    v = VM(engine, machine, config, snapshot_dir=snapdir)
    try:
        yield v
    finally:
        v.close()


def test_exit_codes_and_separate_streams(vm):
    r = vm.run("echo out; echo err >&2; exit 3")
    assert isinstance(r, CommandResult)
    assert (r.exit_code, r.rc, r.stdout, r.stderr) == (3, 3, "out\n", "err\n")
    assert r.failed and not r.succeeded
    code, out, err = r
    assert (code, out, err) == (3, "out\n", "err\n")
    assert vm.run("true").succeeded
    with pytest.raises(CommandFailed) as ei:
        r.check()
    msg = str(ei.value)
    assert "exit 3" in msg and "exited with 3" in msg and "err" in msg
    assert vm.history[-2:] == [(r.command, 3, r.duration), ("true", 0, vm.history[-1][2])]


def test_signal_death_uses_the_shell_convention(vm):
    r = vm.run("kill -9 $$")
    assert r.exit_code == 128 + 9 and r.signal == 9


def test_argv_is_never_shell_interpreted(vm):
    assert vm.run(["echo", "$HOME", "a;b", "*", "`id`"]).stdout == "$HOME a;b * `id`\n"
    assert vm.run("echo $((6*7))").stdout == "42\n"
    assert vm.check_output(["printf", "%s|", "two words", ""]) == "two words||"


def test_env_cwd_and_undecodable_output(vm):
    r = vm.run("echo $GREETING; pwd", env={"GREETING": "hi there"}, cwd="/proc")
    assert r.stdout == "hi there\n/proc\n"
    r = vm.run("printf '\\377ok'")
    assert r.stdout_bytes == b"\xffok" and r.stdout == "\ufffdok"


def test_timeout_kills_the_command_and_the_vm_stays_usable(vm):
    with pytest.raises(CommandTimeout) as ei:
        vm.run("echo started; sleep 30", timeout=1)
    assert ei.value.timeout == 1
    assert vm.history[-1][1] is None
    # The whole command is gone and the agent still serves.
    assert vm.run("pidof sleep").exit_code == 1
    assert vm.check_output("echo alive") == "alive\n"


def test_one_mib_binary_stdin_and_stdout(vm):
    data = os.urandom(1 << 20)
    r = vm.run(["cat"], input=data)
    assert r.exit_code == 0 and r.stdout_bytes == data
    assert vm.run("wc -c", input="x" * 1000).stdout.strip() == "1000"
    out = vm.run("head -c 1048576 /dev/urandom | tee /tmp/blob | md5sum; cat /tmp/blob")
    assert len(out.stdout_bytes) == 32 + 4 + (1 << 20)


def test_files_read_and_write_with_modes(vm):
    vm.write_file("/tmp/f.sh", "#!/bin/sh\necho run\n", mode=0o750)
    assert vm.read_file("/tmp/f.sh") == b"#!/bin/sh\necho run\n"
    assert vm.check_output("stat -c %a /tmp/f.sh") == "750\n"
    assert vm.check_output("/tmp/f.sh") == "run\n"
    assert vm.read_file("/root/marker") == b"snapshot\n"


def _make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    (root / "run.sh").write_text("#!/bin/sh\necho tree\n")
    (root / "run.sh").chmod(0o755)
    (root / "sub" / "secret").write_bytes(os.urandom(5000))
    (root / "sub" / "secret").chmod(0o600)
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / "sub").chmod(0o750)


def _listing(root: Path) -> dict[str, tuple[int, bytes | None]]:
    out = {}
    for p in sorted(root.rglob("*")):
        mode = stat.S_IMODE(p.stat().st_mode)
        out[p.relative_to(root).as_posix()] = (mode, p.read_bytes() if p.is_file() else None)
    return out


def test_copy_trees_both_ways_with_modes(vm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src)
    vm.copy_into(src, "/root/tree")
    assert vm.check_output("/root/tree/run.sh") == "tree\n"
    assert vm.check_output("stat -c %a /root/tree/sub /root/tree/sub/secret") == "750\n600\n"
    vm.run("echo made-in-guest > /root/tree/sub/new && chmod 604 /root/tree/sub/new").check()
    back = tmp_path / "back"
    vm.copy_from("/root/tree", back)
    got = _listing(back)
    want = _listing(src)
    want["sub/new"] = (0o604, b"made-in-guest\n")
    assert got == want
    # Single files both ways, onto a directory too.
    vm.copy_into(src / "run.sh", "/tmp/single.sh")
    assert vm.check_output("stat -c %a /tmp/single.sh") == "755\n"
    vm.copy_from("/tmp/single.sh", tmp_path)
    assert (tmp_path / "single.sh").read_text() == "#!/bin/sh\necho tree\n"
    assert stat.S_IMODE((tmp_path / "single.sh").stat().st_mode) == 0o755


def test_console_reaches_a_shell(vm):
    con = vm.console
    con.sendline("echo $((40+2))-console")
    con.expect("42-console")
    con.expect("ignition:.*# ")
    con.sendline("cat /root/marker")
    con.expect("snapshot")
    assert "42-console" in vm.console_tail()


def test_reset_returns_to_the_snapshot_in_the_same_object(vm):
    vm.write_file("/root/scratch", b"x")
    old = vm.machine
    vm.reset()
    assert vm.machine is not old and not old.is_alive()
    assert vm.run("test -e /root/scratch").exit_code == 1
    assert vm.read_file("/root/marker") == b"snapshot\n"


def test_closed_vm_refuses_work(vm):
    vm.close()
    vm.close()
    with pytest.raises(RuntimeError, match="closed"):
        vm.run("true")
