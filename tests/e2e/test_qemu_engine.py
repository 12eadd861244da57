"""The QEMU engine on the real default guest: boot, snapshot, restore, isolation, errors, cleanup.

Drives :class:`pytest_ignition.engines.qemu.QemuEngine` directly (no plugin fixtures), so a
failure here points at the engine. Skips without qemu or a built guest (fails under
IGNITION_REQUIRE=1).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pytest_ignition._testing import proc_state, require, sigint_default
from pytest_ignition.engines.base import BootError, SnapshotMismatch, VMConfig

pytestmark = pytest.mark.vm

PREPARED = "/root/prepared-before-snapshot"
# A clock far in the past: the restore must put the guest back on the host's time.
OLD_EPOCH = 1_000_000_000


def _accel() -> str:
    from pytest_ignition.engines.select import decide, probe_host

    try:
        return decide("qemu", probe_host()).accelerator
    except Exception:
        return "tcg"


@pytest.fixture(scope="module")
def engine():
    require(shutil.which("qemu-system-x86_64"), "qemu-system-x86_64 is not installed")
    require(shutil.which("qemu-img"), "qemu-img is not installed")
    from pytest_ignition.engines.qemu import QemuEngine

    return QemuEngine(accelerator=_accel())


@pytest.fixture(scope="module")
def config() -> VMConfig:
    from pytest_ignition.guest import find_guest

    guest = find_guest()
    require(guest is not None, "no built guest (run: python -m pytest_ignition.guest build)")
    assert guest is not None
    return VMConfig(kernel=guest.kernel, initrd=guest.initrd, memory_mib=256, boot_timeout=180)


@dataclass
class Booted:
    machine: object
    snapdir: Path
    host_time_at_snapshot: float


@pytest.fixture(scope="module")
def booted(engine, config, tmp_path_factory) -> Iterator[Booted]:
    """One cold boot, prepared and snapshotted; the machine keeps running for more checks."""
    base = tmp_path_factory.mktemp("qemu-engine")
    m = engine.boot(config, base / "boot")
    try:
        r = m.agent.exec(f"echo prepared > {PREPARED} && date -s @{OLD_EPOCH} >/dev/null && sync")
        assert r.exit_code == 0, r.stderr
        snapdir = base / "snap"
        engine.snapshot(m, snapdir)
        yield Booted(m, snapdir, time.time())
    finally:
        m.close()


def _restore(engine, config, booted, tmp_path, name):
    return engine.restore(config, booted.snapdir, tmp_path / name)


def _sh(machine, cmd: str) -> str:
    r = machine.agent.exec(cmd, timeout=60)
    assert r.exit_code == 0, f"{cmd!r} exited {r.exit_code}: {r.stderr!r}"
    return r.stdout.decode()


def test_boot_runs_commands_with_exit_codes(booted):
    m = booted.machine
    assert "Linux" in _sh(m, "uname -a")
    assert m.agent.exec("exit 7").exit_code == 7
    assert m.ready_seconds > 0
    assert "ignition: init done" in m.console_tail()


def test_machine_keeps_running_after_snapshot(booted):
    assert booted.machine.is_alive()
    assert _sh(booted.machine, f"cat {PREPARED}") == "prepared\n"
    snap = booted.snapdir
    assert (snap / "state").stat().st_size > 0
    meta = (snap / "meta.json").read_text()
    assert '"config_key"' in meta and '"qemu_version"' in meta


def test_two_restores_are_independent(engine, config, booted, tmp_path):
    a = _restore(engine, config, booted, tmp_path, "a")
    try:
        b = _restore(engine, config, booted, tmp_path, "b")
        try:
            for m in (a, b):
                assert _sh(m, f"cat {PREPARED}") == "prepared\n"
            # `a && b &` would background the echo too and race the cat below.
            _sh(a, "echo only-in-a > /root/isolation; sleep 1000 >/dev/null 2>&1 &")
            assert _sh(a, "cat /root/isolation") == "only-in-a\n"
            assert b.agent.exec("test -e /root/isolation").exit_code == 1
            assert b.agent.exec("pidof sleep").exit_code == 1
        finally:
            b.close()
    finally:
        a.close()


def test_restores_hand_out_different_random_bytes(engine, config, booted, tmp_path):
    seen = []
    for name in ("r1", "r2"):
        m = _restore(engine, config, booted, tmp_path, name)
        try:
            uuid = _sh(m, "cat /proc/sys/kernel/random/uuid").strip()
            raw = _sh(m, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").strip()
            assert len(raw) == 64
            seen.append((uuid, raw))
        finally:
            m.close()
    assert seen[0][0] != seen[1][0]
    assert seen[0][1] != seen[1][1]


def test_restore_sets_the_guest_clock_from_the_host(engine, config, booted, tmp_path):
    # The snapshot was taken with the guest clock at 2001-09-09: only the sync fixes it.
    m = _restore(engine, config, booted, tmp_path, "clock")
    try:
        guest = int(_sh(m, "date +%s"))
    finally:
        m.close()
    assert abs(guest - time.time()) < 60, f"guest clock {guest} vs host {time.time():.0f}"


def test_restore_into_a_fresh_vm_then_close_leaves_nothing(engine, config, booted, tmp_path):
    m = _restore(engine, config, booted, tmp_path, "leak")
    pid = m.pid
    files = [m.agent_sock, m.console_sock, m.qmp_sock, m.console_log]
    assert all(p.exists() for p in files)
    assert m.console is not None  # connect the console too: its socket must go as well
    m.close()
    m.close()  # idempotent
    assert not _pid_alive(pid)
    assert not any(p.exists() for p in files)
    assert not m.dir.exists()
    assert list((tmp_path / "leak").iterdir()) == []


def test_long_workdir_paths_still_get_short_sockets(engine, config, booted, tmp_path):
    deep = tmp_path.joinpath(*(["d" * 30] * 5))  # beyond the 108-byte socket path limit
    m = _restore(engine, config, booted, deep, "vm")
    try:
        assert len(str(m.agent_sock)) < 108
        assert _sh(m, f"cat {PREPARED}") == "prepared\n"
        sockdir = m.agent_sock.parent
    finally:
        m.close()
    assert not sockdir.exists()
    assert list((deep / "vm").iterdir()) == []


def test_unbootable_kernel_file_is_a_boot_error_naming_qemu(engine, config, tmp_path):
    junk = tmp_path / "not-a-kernel"
    junk.write_bytes(b"this is not a kernel image\n" * 100)
    with pytest.raises(BootError) as ei:
        engine.boot(replace(config, kernel=junk), tmp_path / "junk")
    assert "QEMU exited" in str(ei.value) and "QEMU said" in str(ei.value)


def test_snapshot_of_another_config_is_refused(engine, config, booted, tmp_path):
    other = replace(config, memory_mib=config.memory_mib * 2)
    with pytest.raises(SnapshotMismatch) as ei:
        engine.restore(other, booted.snapdir, tmp_path / "x")
    assert str(booted.snapdir / "meta.json") in str(ei.value)
    assert not (tmp_path / "x").exists() or list((tmp_path / "x").iterdir()) == []


def test_panicking_kernel_is_a_boot_error_with_console_tail(engine, config, tmp_path):
    bad = replace(config, kernel_args="rdinit=/nonexistent root=/dev/nonexistent")
    with pytest.raises(BootError) as ei:
        engine.boot(bad, tmp_path / "panic")
    # It failed because the guest died (QEMU exits on panic=-1 + -no-reboot), not a timeout.
    assert "panic" in ei.value.console_tail.lower()
    assert "QEMU exited" in str(ei.value)
    assert list((tmp_path / "panic").iterdir()) == []


def test_hanging_guest_is_a_boot_error_after_the_timeout(engine, config, tmp_path):
    # A shell as init: the guest runs but no agent ever answers.
    bad = replace(config, kernel_args="rdinit=/bin/sh", boot_timeout=20)
    with pytest.raises(BootError) as ei:
        engine.boot(bad, tmp_path / "hang")
    assert "did not answer within 20s" in str(ei.value)
    assert list((tmp_path / "hang").iterdir()) == []


def test_rootfs_is_copy_on_write_and_snapshotted(engine, config, tmp_path):
    require(shutil.which("mke2fs"), "mke2fs (e2fsprogs) is not installed")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("from the image\n")
    image = tmp_path / "rootfs.ext4"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), "16M"], check=True
    )
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    cfg = replace(config, rootfs=image)
    m = engine.boot(cfg, tmp_path / "boot")
    try:
        assert _sh(m, "cat /rootfs/hello") == "from the image\n"
        _sh(m, "echo written > /rootfs/new && sync")
        engine.snapshot(m, tmp_path / "snap")
    finally:
        m.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "the base image was written"
    r1 = engine.restore(cfg, tmp_path / "snap", tmp_path / "r1")
    try:
        assert _sh(r1, "cat /rootfs/new") == "written\n"
        _sh(r1, "echo r1 > /rootfs/only-r1 && sync")
        r2 = engine.restore(cfg, tmp_path / "snap", tmp_path / "r2")
        try:
            assert _sh(r2, "cat /rootfs/new") == "written\n"
            assert r2.agent.exec("test -e /rootfs/only-r1").exit_code == 1
        finally:
            r2.close()
        # A snapshot of a restored machine stands alone: it outlives the first snapshot.
        engine.snapshot(r1, tmp_path / "snap2")
    finally:
        r1.close()
    shutil.rmtree(tmp_path / "snap")
    r3 = engine.restore(cfg, tmp_path / "snap2", tmp_path / "r3")
    try:
        assert _sh(r3, "cat /rootfs/new /rootfs/only-r1 /rootfs/hello") == (
            "written\nr1\nfrom the image\n"
        )
    finally:
        r3.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


CHILD = """
import sys, threading, time
from pathlib import Path
from pytest_ignition.engines.base import VMConfig
from pytest_ignition.engines.qemu import QemuEngine
cfg = VMConfig(kernel=sys.argv[1], initrd=sys.argv[2], memory_mib=256, boot_timeout=300)
engine = QemuEngine(accelerator=sys.argv[4])
# Booted from a short-lived thread: QEMU must outlive the thread, not the process.
box = {}
t = threading.Thread(target=lambda: box.update(m=engine.boot(cfg, Path(sys.argv[3]))))
t.start()
t.join()
print("ready", box["m"].pid, flush=True)
time.sleep(600)
"""


def _qemu_pids_under(path: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(path).encode() in cmd and _pid_alive(int(d.name)):
            pids.append(int(d.name))
    return pids


def _wait_for(pred, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _child(engine, config, workdir: Path) -> subprocess.Popen[str]:
    import sys

    argv = [sys.executable, "-c", CHILD, str(config.kernel), str(config.initrd), str(workdir)]
    return subprocess.Popen(
        [*argv, engine.accelerator],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )


def test_ctrl_c_during_boot_kills_qemu_and_removes_files(engine, config, tmp_path):
    import signal

    workdir = tmp_path / "wd"
    child = _child(engine, config, workdir)
    try:
        # Interrupt while the guest is still booting: QEMU has started, the agent not yet.
        assert _wait_for(lambda: bool(_qemu_pids_under(workdir)), 60), "QEMU never started"
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert _wait_for(lambda: not _qemu_pids_under(workdir), 10)
    assert list(workdir.iterdir()) == []


def test_qemu_dies_with_its_parent_process(engine, config, tmp_path):
    workdir = tmp_path / "wd"
    child = _child(engine, config, workdir)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("ready "), line
        pid = int(line.split()[1])
        assert _pid_alive(pid)  # survived the exit of the thread that started it
        child.kill()  # SIGKILL: no finally, no atexit in the parent
        child.wait()
    finally:
        child.kill()
        child.wait()
    assert _wait_for(lambda: not _pid_alive(pid), 10)


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie would still answer kill(0): check it is not one.
    return proc_state(pid) not in (None, "Z")
