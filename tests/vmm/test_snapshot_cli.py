"""Snapshots through the VMM process: ``boot --store/--name`` + control ``snapshot`` and
``rollback``, ``restore`` in a new process, and its one-line errors (exit status 2)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_ignition.vmm import snapshot as snap
from pytest_ignition.vmm.control import request

sys.path.insert(0, str(Path(__file__).parent))
from test_machine_cli import (  # noqa: E402
    HALT,
    PRINT_OK,
    assert_one_line_error,
    bzimage,
    need_kvm,
    run_vmm,
)

VMM = [sys.executable, "-m", "pytest_ignition.vmm"]


class Proc:
    def __init__(self, args: list[str], control: Path):
        self.control = control
        self.proc = subprocess.Popen(
            [*VMM, *args, "--control", str(control)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate(timeout=10)
                raise AssertionError(f"VMM did not come up: rc={self.proc.returncode} {err!r}")
            time.sleep(0.02)

    def cmd(self, command: str, **kw) -> dict:
        return request(self.control, command, timeout=60, **kw)

    def finish(self) -> tuple[int, str]:
        assert self.cmd("shutdown")["ok"]
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def procs():
    made: list[Proc] = []

    def make(args: list[str], control: Path) -> Proc:
        p = Proc(args, control)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill()


def _disk(tmp_path: Path) -> Path:
    d = tmp_path / "disk.img"
    d.write_bytes(bytes(64 * 1024))
    return d


def test_boot_snapshot_rollback_restore(tmp_path, procs):
    need_kvm()
    store = tmp_path / "store"
    k = bzimage(tmp_path, PRINT_OK + HALT)
    common = ["--console", "none", "--disk", str(_disk(tmp_path))]
    src = procs(
        ["boot", "--kernel", str(k), "--mem", "64M", "--vsock", str(tmp_path / "v1.sock")]
        + ["--store", str(store), "--name", "booted", *common],
        tmp_path / "c1.sock",
    )
    bad = src.cmd("rollback")
    assert not bad["ok"] and "no snapshot to roll back to" in bad["error"]
    reply = src.cmd("snapshot")  # store and name from the command line
    assert reply["ok"], reply
    assert reply["path"] == str(store / "booted") and reply["state"] == "running"
    s = snap.SnapshotStore(store).load("booted")
    assert [d["type"] for d in s.state["devices"]["virtio"]] == [
        "VirtioVsock",
        "VirtioBlk",
        "VirtioRng",
    ]
    assert (store / "booted" / "disk1.overlay").exists()
    rb = src.cmd("rollback")
    assert rb["ok"] and rb["state"] == "running" and rb["pages"] >= 0, rb
    assert src.cmd("status")["rollback_base"] == str(store / "booted")
    for name, needle in (("../evil", "bad snapshot name"), (".x", "bad snapshot name")):
        r = src.cmd("snapshot", name=name)
        assert not r["ok"] and needle in r["error"]
    assert src.finish()[0] == 0

    dst = procs(
        ["restore", "--store", str(store), "--name", "booted"]
        + ["--vsock", str(tmp_path / "v2.sock"), "--console", "none"]
        + ["--kernel", str(k), "--mem", "64M", "--cpus", "1"],
        tmp_path / "c2.sock",
    )
    st = dst.cmd("status")
    assert st["ok"] and st["state"] == "running" and st["restore_time_us"] > 0
    assert (tmp_path / "v2.sock").exists()  # the vsock device listens at the new path
    assert st["cmdline"] == s.state["config"]["cmdline"]
    assert dst.cmd("rollback")["ok"]
    assert dst.cmd("snapshot", store=str(store), name="again")["ok"]
    rc, err = dst.finish()
    assert rc == 0, err
    assert "Restore-time = " in err
    assert not (tmp_path / "v2.sock").exists() and not (tmp_path / "c2.sock").exists()
    assert snap.SnapshotStore(store).names() == ["again", "booted"]


def test_restore_errors_are_one_line(tmp_path):
    need_kvm()
    store = tmp_path / "store"
    k = bzimage(tmp_path, HALT, name="other.bz")
    from test_snapshot import cpl3_machine, kernel_file

    from pytest_ignition.vmm.vcpu import install_kick_handler

    install_kick_handler()
    m = cpl3_machine(tmp_path, [b"\xeb\xfe"], mem_size=32 << 20)
    try:
        m.snapshot(store, "s")
    finally:
        m.close()
    base = ["restore", "--store", str(store), "--console", "none"]
    r = run_vmm(*base, "--name", "nope")
    assert_one_line_error(r, "no such snapshot", "nope")
    r = run_vmm(*base, "--name", "s", "--mem", "64M")
    assert_one_line_error(r, "another configuration", "mem_size")
    r = run_vmm(*base, "--name", "s", "--kernel", str(k))  # a different kernel file
    assert_one_line_error(r, "another configuration", "kernel")
    assert kernel_file(tmp_path) != k  # (the right kernel is accepted: see test_snapshot)
    state = store / "s" / snap.STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])
    r = run_vmm(*base, "--name", "s")
    assert_one_line_error(r, str(state), "truncated")
    r = run_vmm("restore", "--store", str(store))
    assert r.returncode == 2 and b"--name" in r.stderr


def test_restore_paused_then_resume(tmp_path, procs):
    need_kvm()
    store = tmp_path / "store"
    k = bzimage(tmp_path, PRINT_OK + HALT)
    src = procs(
        ["boot", "--kernel", str(k), "--mem", "64M", "--console", "none"],
        tmp_path / "c1.sock",
    )
    assert src.cmd("snapshot", store=str(store), name="s")["ok"]
    assert src.finish()[0] == 0
    out = tmp_path / "console.txt"
    dst = procs(
        ["restore", "--store", str(store), "--name", "s", "--paused", "--console", str(out)],
        tmp_path / "c2.sock",
    )
    st = dst.cmd("status")
    assert st["state"] == "created" and st["restore_time_us"] > 0
    prepared = st["restore_time_us"]
    assert dst.cmd("resume")["state"] == "running"
    assert dst.cmd("status")["restore_time_us"] >= prepared  # now includes the start
    rc, err = dst.finish()
    assert rc == 0 and err.count("Restore-time = ") == 1, err
    assert out.read_bytes() == b""  # the restored guest does not boot again
