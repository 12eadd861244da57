"""The VMM fork server on this machine's KVM: children are real VMM processes (tiny synthetic
bzImages whose few CPL0 instructions PVM emulates quickly), and every way a child, the
server or the client can go away leaves no process, socket or fd behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from test_machine_cli import HALT, PRINT_OK, RESET, bzimage, need_kvm

from pytest_ignition._testing import proc_state
from pytest_ignition.vmm.control import request
from pytest_ignition.vmm.forkserver import ForkServer, ForkServerError


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def children_of(pid: int) -> set[int]:
    out = set()
    for p in Path("/proc").glob("[0-9]*"):
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(p.name))
    return out


def gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc_state(pid) in (None, "Z"):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def server():
    need_kvm()
    fds = open_fds()
    fs = ForkServer()
    yield fs
    fs.stop()
    assert open_fds() <= fds, "fds leaked"


def spawn(fs: ForkServer, tmp_path: Path, code: bytes, *extra: str):
    k = bzimage(tmp_path, code)
    argv = ["boot", "--kernel", str(k), "--mem", "64M", "--console", "stdio", *extra]
    return spawn_argv(fs, tmp_path, argv)


def spawn_argv(fs: ForkServer, tmp_path: Path, argv: list[str]):
    """Fork ``argv`` with stdin /dev/null and stdout/stderr to tmp_path/out, err (the fds
    are the server's child's own after the call: closed here)."""
    fds = [
        os.open(os.devnull, os.O_RDONLY),
        os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ]
    try:
        return fs.spawn(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2])
    finally:
        for fd in fds:
            os.close(fd)


def test_child_is_a_vmm_process_with_its_exit_code(server, tmp_path):
    p = spawn(server, tmp_path, PRINT_OK + RESET + HALT)
    assert p.wait(60) == 0  # the guest reset itself: a clean stop
    assert (tmp_path / "out").read_bytes() == b"OK\n"
    assert b"reset" in (tmp_path / "err").read_bytes()
    # a setup error is exit status 2 with its one line, as for a spawned VMM
    q = spawn_argv(server, tmp_path, ["boot", "--kernel", str(tmp_path / "nope")])
    assert q.wait(60) == 2
    assert b"no such file" in (tmp_path / "err").read_bytes()
    assert server.starts == 1  # one warm server for both


def test_control_socket_and_killed_child(server, tmp_path):
    ctl = tmp_path / "c.sock"
    p = spawn(server, tmp_path, HALT, "--control", str(ctl))
    end = time.monotonic() + 60
    while not ctl.exists():
        assert p.poll() is None and time.monotonic() < end
        time.sleep(0.02)
    assert request(ctl, "status")["state"] == "running"
    assert os.getpgid(p.pid) == p.pid  # its own session and group, as spawned VMMs
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(30) == -signal.SIGKILL
    assert gone(p.pid)
    assert server.alive()  # a child's death does not touch the server


def test_server_killed_takes_children_and_restarts(server, tmp_path):
    p = spawn(server, tmp_path, HALT)
    first = server.proc.pid
    os.kill(first, signal.SIGKILL)
    assert p.wait(30) is not None
    assert gone(p.pid), "the child outlived its server"
    q = spawn(server, tmp_path, PRINT_OK + RESET + HALT)  # restarted on demand
    assert q.wait(60) == 0 and server.proc.pid != first and server.starts == 2


def test_client_going_away_kills_its_child(server, tmp_path):
    p = spawn(server, tmp_path, HALT)
    p._conn.close()  # what a dead or interrupted client leaves: a closed connection
    assert gone(p.pid, 15), "a child without its client kept running"
    assert children_of(server.proc.pid) == set()


def test_ctrl_c_during_a_fork_leaves_nothing(server, tmp_path):
    server.start()
    before = children_of(server.proc.pid)
    k = bzimage(tmp_path, HALT)
    t = threading.Timer(
        0.001, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    )
    t.start()
    try:
        for _ in range(200):  # until the interrupt lands inside spawn()
            p = server.spawn(
                ["boot", "--kernel", str(k), "--mem", "64M", "--console", "none"],
                stdin=0,
                stdout=1,
                stderr=2,
            )
            p.kill()
            p.wait(30)
    except KeyboardInterrupt:
        pass
    t.join()
    end = time.monotonic() + 15
    while children_of(server.proc.pid) - before and time.monotonic() < end:
        time.sleep(0.05)
    assert children_of(server.proc.pid) - before == set()


def test_server_in_a_broken_environment(tmp_path):
    """No usable /dev/kvm (here: a Python that cannot import the VMM is the same path): a
    clear error, at once, never a hang."""
    fs = ForkServer(python=sys.executable)
    env_broken = tmp_path / "py"
    env_broken.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.stderr.write(\"no kvm here\\\\n\"); sys.exit(2)'\n"
    )
    env_broken.chmod(0o755)
    fs.python = str(env_broken)
    t0 = time.monotonic()
    with pytest.raises(ForkServerError, match="exited with 2 before it was ready: no kvm here"):
        fs.spawn(["boot"], stdin=0, stdout=1, stderr=2)
    assert time.monotonic() - t0 < 30
    fs.stop()


def test_server_dies_with_its_parent(tmp_path):
    need_kvm()
    code = (
        "import sys, time\n"
        "from pytest_ignition.vmm.forkserver import ForkServer\n"
        "fs = ForkServer(); fs.start(); print(fs.proc.pid, flush=True); time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        pid = int(parent.stdout.readline())
        # the server's PDEATHSIG is relative to the thread that forked it: the main one here
        parent.kill()
        parent.wait(10)
        assert gone(pid, 10), "the fork server outlived its parent"
    finally:
        parent.kill()
        parent.stdout.close()


def test_engine_launches_through_the_fork_server(tmp_path, monkeypatch):
    """The ignition engine's VMs come from its fork server: console relay, exit status and
    the error report work as with a spawned VMM, and closing leaves no fd open."""
    need_kvm()
    from pytest_ignition.engines.base import BootError, VMConfig
    from pytest_ignition.engines.ignition import IgnitionEngine
    from pytest_ignition.vmm.forkserver import ForkedVmm

    monkeypatch.setenv("IGNITION_VMM_FORKSERVER", "1")
    k = bzimage(tmp_path, PRINT_OK + RESET + HALT)
    config = VMConfig(kernel=k, initrd=None, memory_mib=64, boot_timeout=60)
    eng = IgnitionEngine()
    eng.boot  # noqa: B018 - the engine exists before the fds are counted
    fds = open_fds()
    seen = []
    real = eng._launch

    def launch(m, argv):
        started = real(m, argv)
        seen.append(m.proc)
        return started

    monkeypatch.setattr(eng, "_launch", launch)
    for _ in range(2):
        with pytest.raises(BootError) as e:
            eng.boot(config, tmp_path / "w")
        assert "exited with 0" in str(e.value) and "OK" in e.value.console_tail
    assert all(isinstance(p, ForkedVmm) for p in seen) and eng._fs.starts == 1
    server_fds = {fd for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    eng._fs.stop()
    assert open_fds() <= fds | server_fds and open_fds() <= fds, open_fds() - fds


def test_the_engines_server_dir_has_an_owner_and_goes_on_stop(tmp_path, monkeypatch):
    """The engine's fork server dir (its socket) carries an owner file, so that the session
    sweeper removes it after a killed run (without one it was left in TMPDIR for ever); a
    normal stop removes it, owner file and all."""
    need_kvm()
    from pytest_ignition.engines import _process

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fs = ForkServer(spawn=_process.spawn, mkdtemp=_process.owned_tempdir)
    fs.start()
    d = fs.dir
    assert d is not None and d.parent == tmp_path and (d / "fork.sock").is_socket()
    rec = _process._read_owner(str(d))
    assert rec is not None and rec["pid"] == os.getpid()
    fs.stop()
    assert not d.exists()
    # the sweeper removes such a dir once its owner is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = _process.owned_tempdir("ign-fs-", tmp_path)
    rec = {**_process.owner_record(), "pid": dead.pid, "start": None}
    (orphan / _process.OWNER_FILE).write_text(json.dumps(rec))
    assert _process.sweep_dead_runs(tmp_path) == [orphan]


def test_pid_and_exit_in_one_read_are_both_kept(tmp_path, monkeypatch):
    """A child that exits at once has its exit line sent right after its pid line: the client
    must take the pid from the first line and the exit status from the rest, not fail to parse
    both as one reply (a race the engine test above hit now and then). No KVM needed."""
    import socket

    sock_path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)

    def fake_server() -> None:
        conn, _ = listener.accept()
        with conn:
            buf = b""
            while b"\n" not in buf:
                buf += conn.recv(4096)
            conn.sendall(b'{"pid": 4242}\n{"exit": 3}\n')  # both in one segment

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    fs = ForkServer()
    fs.sock = sock_path
    monkeypatch.setattr(fs, "alive", lambda: True)
    r, w = os.pipe()
    try:
        vmm = fs.spawn(["boot"], stdin=r, stdout=w, stderr=w)
    finally:
        os.close(r)
        os.close(w)
        t.join(10)
        listener.close()
    assert vmm.pid == 4242
    assert vmm.wait(5) == 3
