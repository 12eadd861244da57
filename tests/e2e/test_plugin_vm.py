"""The plugin's fixtures on real guests: isolation, commands, files, console, marker, factory.

These use ``ignition_vm`` / ``ignition_vm_factory`` directly, so they skip with the reason
when no engine is usable (and fail under IGNITION_REQUIRE=1), like any user's suite.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_ignition._testing import require
from pytest_ignition.fixtures import get_session
from pytest_ignition.vm import CommandTimeout

# Written by the prepare hook in tests/e2e/conftest.py.
PREPARED_PATH = "/etc/ignition-e2e-prepared"
PREPARED_TEXT = "prepared by tests/e2e/conftest.py\n"

# Lists every process whose argv is exactly "sleep 1000" (not the grep/sh that search).
FIND_SLEEPER = (
    "for d in /proc/[0-9]*; do "
    "c=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null); "
    '[ "$c" = "sleep 1000 " ] && echo ${d#/proc/}; '
    "done; true"
)


def _mem_total_mib(vm) -> int:
    for line in vm.read_file("/proc/meminfo").decode().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _cpu_count(vm) -> int:
    text = vm.read_file("/proc/cpuinfo").decode()
    return sum(1 for line in text.splitlines() if line.startswith("processor"))


# -- isolation: the two tests below run in this order in one worker ------------------------


def test_isolation_leaves_state_behind(ignition_vm):
    vm = ignition_vm
    vm.write_file("/root/leftover", b"from the previous test")
    vm.run("echo x > /tmp/leftover-tmp").check()
    vm.run("sleep 1000 >/dev/null 2>&1 &").check()
    assert vm.run(["test", "-e", "/root/leftover"]).exit_code == 0
    assert vm.check_output(FIND_SLEEPER).split(), "the background process should be running"


def test_isolation_next_test_sees_none_of_it(ignition_vm):
    vm = ignition_vm
    assert vm.run(["test", "-e", "/root/leftover"]).exit_code == 1
    assert vm.run(["test", "-e", "/tmp/leftover-tmp"]).exit_code == 1
    assert vm.check_output(FIND_SLEEPER).split() == []


def test_prepare_hook_ran_before_snapshot(ignition_vm):
    assert ignition_vm.read_file(PREPARED_PATH) == PREPARED_TEXT.encode()
    out = ignition_vm.check_output(["stat", "-c", "%a", PREPARED_PATH])
    assert out.strip() == "640"
    assert ignition_vm.read_file("/tmp/prepare-ran") == b"1\n"


def test_prepare_hook_effect_seen_again(ignition_vm):
    # A second test: the prepared file comes from the snapshot, not from the first test.
    ignition_vm.run(["rm", PREPARED_PATH]).check()
    assert ignition_vm.run(["test", "-e", PREPARED_PATH]).exit_code == 1


def test_prepare_hook_effect_back_after_removal(ignition_vm):
    assert ignition_vm.read_file(PREPARED_PATH) == PREPARED_TEXT.encode()


# -- commands ---------------------------------------------------------------------------


def test_exit_codes_and_separate_streams(ignition_vm):
    r = ignition_vm.run("echo out; echo err >&2; exit 3")
    assert r.exit_code == 3 and r.rc == 3 and r.failed and not r.succeeded
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    code, out, err = r
    assert (code, out, err) == (3, "out\n", "err\n")
    assert ignition_vm.run("true").exit_code == 0
    assert ignition_vm.run(["sh", "-c", "exit 42"]).exit_code == 42


def test_argv_is_not_shell_interpreted(ignition_vm):
    args = ["$HOME", "a;b", "*", "`id`", "x > /tmp/nope", "it's"]
    r = ignition_vm.run(["printf", "%s\\n", *args])
    assert r.exit_code == 0
    assert r.stdout.splitlines() == args
    assert ignition_vm.run(["test", "-e", "/tmp/nope"]).exit_code == 1


def test_env_and_cwd(ignition_vm):
    out = ignition_vm.check_output("echo $IGN_X; pwd", env={"IGN_X": "hello"}, cwd="/proc")
    assert out.splitlines() == ["hello", "/proc"]


def test_timeout_kills_the_command_and_vm_stays_usable(ignition_vm):
    vm = ignition_vm
    with pytest.raises(CommandTimeout) as ei:
        vm.run("echo started; sleep 1000", timeout=2)
    assert "sleep 1000" in str(ei.value)
    assert vm.check_output(["echo", "still here"]) == "still here\n"
    assert vm.check_output(FIND_SLEEPER).split() == []


def test_binary_stdin_stdout_round_trip_1mib(ignition_vm):
    data = os.urandom(1 << 20)
    r = ignition_vm.run(["cat"], input=data)
    assert r.exit_code == 0
    assert r.stdout_bytes == data
    digest = ignition_vm.check_output(["sha256sum"], input=data).split()[0]
    assert digest == hashlib.sha256(data).hexdigest()


# -- files --------------------------------------------------------------------------------


def test_directory_tree_copy_both_ways_with_modes(ignition_vm, tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    (src / "secret").write_bytes(b"\x00\xff" * 1000)
    (src / "secret").chmod(0o600)
    (src / "sub" / "deeper" / "note.txt").write_text("deep\n")
    (src / "sub" / "deeper" / "note.txt").chmod(0o444)
    (src / "sub").chmod(0o750)

    vm = ignition_vm
    vm.copy_into(src, "/root/tree")
    listing = vm.check_output(
        "cd /root/tree && find . | sort | while read f; do stat -c '%a %s %n' \"$f\"; done"
    )
    got = {line.split(" ", 2)[2]: line.split(" ", 2)[:2] for line in listing.splitlines()}
    assert got["./run.sh"][0] == "755"
    assert got["./secret"] == ["600", "2000"]
    assert got["./sub"][0] == "750"
    assert got["./sub/deeper/note.txt"] == ["444", "5"]
    assert vm.check_output(["/root/tree/run.sh"]) == "run\n"

    vm.run("echo made-in-guest > /root/tree/sub/new && chmod 710 /root/tree/sub/new").check()
    dst = tmp_path / "back"
    vm.copy_from("/root/tree", dst)
    assert (dst / "secret").read_bytes() == b"\x00\xff" * 1000
    assert stat.S_IMODE((dst / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((dst / "run.sh").stat().st_mode) == 0o755
    assert (dst / "sub" / "deeper" / "note.txt").read_text() == "deep\n"
    assert (dst / "sub" / "new").read_text() == "made-in-guest\n"
    assert stat.S_IMODE((dst / "sub" / "new").stat().st_mode) == 0o710


def test_read_and_write_file(ignition_vm):
    ignition_vm.write_file("/tmp/x.bin", bytes(range(256)), mode=0o604)
    assert ignition_vm.read_file("/tmp/x.bin") == bytes(range(256))
    assert ignition_vm.check_output(["stat", "-c", "%a", "/tmp/x.bin"]).strip() == "604"


# -- console ---------------------------------------------------------------------------------


def test_console_reaches_a_shell(ignition_vm):
    con = ignition_vm.console
    con.sendline("")
    con.sendline("echo $((6 * 7))-console-ok")
    con.expect("42-console-ok", timeout=30)
    # Something typed on the console is visible to the agent: same guest.
    con.sendline("echo via-console > /tmp/from-console")
    con.sendline("echo done-$((1 + 1))")
    con.expect("done-2", timeout=30)
    assert ignition_vm.read_file("/tmp/from-console") == b"via-console\n"


# -- configuration -----------------------------------------------------------------------------


def test_default_configuration(ignition_vm, request):
    settings = get_session(request.config).settings
    total = _mem_total_mib(ignition_vm)
    assert settings.memory_mib * 0.75 < total <= settings.memory_mib
    assert _cpu_count(ignition_vm) == settings.cpus


@pytest.mark.ignition(memory="320M", cpus=2, kernel_args="ignition_e2e_flag=yes")
def test_marker_configuration_is_honoured(ignition_vm):
    total = _mem_total_mib(ignition_vm)
    assert 240 < total <= 320
    assert _cpu_count(ignition_vm) == 2
    assert "ignition_e2e_flag=yes" in ignition_vm.read_file("/proc/cmdline").decode()
    # the prepare hook ran for this configuration's snapshot too
    assert ignition_vm.read_file(PREPARED_PATH) == PREPARED_TEXT.encode()


def test_two_factory_vms_are_independent(ignition_vm_factory, request):
    default_mib = get_session(request.config).settings.memory_mib
    a = ignition_vm_factory()
    b = ignition_vm_factory(memory="384M")
    a.write_file("/root/only-in-a", b"a")
    assert a.run(["test", "-e", "/root/only-in-a"]).exit_code == 0
    assert b.run(["test", "-e", "/root/only-in-a"]).exit_code == 1
    assert 288 < _mem_total_mib(b) <= 384
    assert default_mib * 0.75 < _mem_total_mib(a) <= default_mib
    # Two restores of one snapshot must not share random state.
    c = ignition_vm_factory()
    ra = a.read_file("/proc/sys/kernel/random/uuid")
    rc = c.read_file("/proc/sys/kernel/random/uuid")
    assert ra != rc
    sa = a.check_output("head -c 32 /dev/urandom | od -An -tx1")
    sc = c.check_output("head -c 32 /dev/urandom | od -An -tx1")
    assert sa != sc


# -- the snapshot, reset, other kernels and disks -----------------------------------------------


def test_snapshot_fixture_describes_the_session_guest(ignition_snapshot, ignition_vm):
    snap = ignition_snapshot
    assert snap.key == snap.config.key()
    assert snap.directory.is_dir()
    assert (snap.directory / "READY").is_file()
    # ignition_vm (no marker) is restored from this very snapshot
    assert ignition_vm.snapshot_dir == snap.directory
    assert ignition_vm.config == snap.config


def test_vm_reset_goes_back_to_the_prepared_snapshot(ignition_vm):
    ignition_vm.write_file("/root/before-reset", b"x")
    ignition_vm.run(["rm", PREPARED_PATH]).check()
    ignition_vm.reset()
    assert ignition_vm.run(["test", "-e", "/root/before-reset"]).exit_code == 1
    assert ignition_vm.read_file(PREPARED_PATH) == PREPARED_TEXT.encode()


def test_factory_with_another_kernel_file(ignition_vm_factory, ignition_snapshot, tmp_path):
    # A copy of the kernel is "another kernel" as far as snapshots go: its own key.
    kernel = tmp_path / "other-bzImage"
    shutil.copyfile(ignition_snapshot.config.kernel, kernel)
    initrd = tmp_path / "other-initrd"
    shutil.copyfile(ignition_snapshot.config.initrd, initrd)
    vm = ignition_vm_factory(kernel=str(kernel), initrd=initrd)
    assert vm.config.kernel == kernel.resolve()
    assert vm.config.key() != ignition_snapshot.config.key()
    assert vm.snapshot_dir != ignition_snapshot.directory
    assert vm.read_file(PREPARED_PATH) == PREPARED_TEXT.encode()


def test_factory_rootfs_is_mounted_and_never_written(ignition_vm_factory, tmp_path):
    require(shutil.which("mke2fs"), "mke2fs is not installed (apt-get install e2fsprogs)")
    content = tmp_path / "content"
    (content / "data").mkdir(parents=True)
    (content / "data" / "hello.txt").write_text("from the image\n")
    image = tmp_path / "root.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(content), str(image), "16M"],
        check=True,
        capture_output=True,
    )
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    a = ignition_vm_factory(rootfs=image)
    assert a.read_file("/rootfs/data/hello.txt") == b"from the image\n"
    a.run("echo changed > /rootfs/data/hello.txt && sync").check()
    assert a.read_file("/rootfs/data/hello.txt") == b"changed\n"
    b = ignition_vm_factory(rootfs=image)
    assert b.read_file("/rootfs/data/hello.txt") == b"from the image\n"
    a.close()
    b.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
