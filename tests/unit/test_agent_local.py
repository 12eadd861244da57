"""The real guest agent (guest/agent/*.c), compiled for the host, driven through AgentClient
(and VM.run, for its output cap, with the local agent standing in for a guest).

The agent runs here with ``--listen-unix`` (and ``--sync-dry-run``, so the host's clock is never
touched). It is built with AddressSanitizer/UBSan when the compiler supports it, so memory errors
on hostile input fail the run instead of passing silently.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ignition._testing import proc_state, require
from pytest_ignition.agent import (
    AgentClient,
    AgentError,
    AgentOutputLimit,
    AgentTimeout,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from pytest_ignition.vm import VM, CommandError, CommandFailed, CommandOutputTooLarge

REPO = Path(__file__).resolve().parents[2]
AGENT_SRC = REPO / "guest" / "agent"


def _compile(out: Path) -> list[str]:
    sources = sorted(str(p) for p in AGENT_SRC.glob("*.c"))
    gcc = shutil.which("gcc")
    attempts: list[list[str]] = []
    if gcc:
        attempts.append(
            [gcc, "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        )
        attempts.append([gcc, "-O2"])
    if shutil.which("musl-gcc"):
        attempts.append(["musl-gcc", "-static", "-Os"])
    errors = []
    for cmd in attempts:
        r = subprocess.run(
            [*cmd, "-Wall", "-Wextra", "-o", str(out), *sources], capture_output=True, text=True
        )
        if r.returncode == 0:
            return cmd
        errors.append(r.stderr)
    require(False, f"no C compiler could build the agent: {errors}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "ignition-agent"
    _compile(out)
    return out


class LocalAgent:
    def __init__(self, binary: Path, workdir: Path) -> None:
        self.sock = workdir / "agent.sock"
        self.log = workdir / "agent.log"
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [str(binary), "--listen-unix", str(self.sock), "--sync-dry-run"],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=env,
            )
        end = time.monotonic() + 30
        while not self.sock.exists() and self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)

    def client(self) -> AgentClient:
        return AgentClient.connect_unix(self.sock, timeout=10)

    def stop(self) -> None:
        alive = self.proc.poll() is None
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert alive, f"agent died: rc={self.proc.returncode}\n{self.log.read_text()}"


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[LocalAgent]:
    a = LocalAgent(agent_bin, tmp_path)
    yield a
    a.stop()


@pytest.fixture
def client(agent: LocalAgent) -> Iterator[AgentClient]:
    c = agent.client()
    yield c
    c.close()


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a reaper that is not ours."""
    return proc_state(pid) in (None, "Z", "X")


def _wait_gone(pid: int, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


# --------------------------------------------------------------------------- exec


def test_ping_echoes_payload(client: AgentClient) -> None:
    assert client.ping() >= 0
    assert client.ping(b"\x00\xffpayload" * 1000) >= 0


def test_argv_is_not_shell_interpreted(client: AgentClient) -> None:
    r = client.exec(["echo", "$HOME;", "x"])
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"$HOME; x\n", b"")
    r = client.exec("echo $HOME; echo x")
    assert r.stdout == b"/root\nx\n"


def _raw_exchange(agent: LocalAgent, data: bytes, until: int) -> list[Frame]:
    """Send raw bytes on a fresh connection; collect frames until one of type ``until``."""
    frames: list[Frame] = []
    dec = FrameDecoder()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(agent.sock))
        s.sendall(data)
        while not any(f.type == until for f in frames):
            chunk = s.recv(65536)
            assert chunk, "agent closed the connection"
            frames += [f for f in dec.feed(chunk) if isinstance(f, Frame)]
    return frames


def test_shell_extra_args_become_positional(agent: LocalAgent) -> None:
    # SHELL: argv[0] is the script, argv[1:] become $0, $1, ...
    payload = struct.pack("<IIII", 0, 1, 3, 0) + b'echo "$0-$1"\0zero\0one\0\0'
    frames = _raw_exchange(agent, encode_frame(FrameType.EXEC, 4242, payload), FrameType.EXIT)
    assert all(f.chan == 4242 for f in frames)
    out = b"".join(f.payload for f in frames if f.type == FrameType.STDOUT)
    assert out == b"zero-one\n"
    # EOF of both streams precedes EXIT
    types = [f.type for f in frames]
    assert types[-1] == FrameType.EXIT
    assert types.count(FrameType.STDERR) == 1  # just its empty EOF frame
    assert frames[-1].payload == struct.pack("<iiI", 0, 0, 0)


def test_exit_codes_and_signals(client: AgentClient) -> None:
    assert client.exec("exit 3").exit_code == 3
    assert client.exec(["false"]).exit_code == 1
    r = client.exec("kill -TERM $$")
    assert (r.exit_code, r.signal) == (None, 15)
    r = client.exec(["/nonexistent/program", "arg"])
    assert r.exit_code == 127
    assert b"/nonexistent/program" in r.stderr
    r = client.exec(["definitely-not-a-command-xyz"])
    assert r.exit_code == 127


def test_stdout_and_stderr_are_separate(client: AgentClient) -> None:
    r = client.exec("echo out; echo err >&2; echo out2; echo err2 >&2")
    assert r.stdout == b"out\nout2\n"
    assert r.stderr == b"err\nerr2\n"


def test_env_defaults_and_overrides(client: AgentClient) -> None:
    r = client.exec(["sh", "-c", 'echo "$PATH|$HOME|$FOO"'], env={"FOO": "a b=c"})
    assert r.stdout == b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|a b=c\n"
    r = client.exec(["sh", "-c", 'echo "$HOME"'], env={"HOME": "/elsewhere"})
    assert r.stdout == b"/elsewhere\n"
    with pytest.raises(ValueError):
        client.exec(["true"], env={"A=B": "x"})


def test_cwd(client: AgentClient, tmp_path: Path) -> None:
    assert client.exec(["pwd"]).stdout == b"/\n"
    assert client.exec(["pwd"], cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    with pytest.raises(AgentError) as ei:
        client.exec(["pwd"], cwd=str(tmp_path / "missing"))
    assert ei.value.code == errno.ENOENT


def test_stdin_absent_is_dev_null(client: AgentClient) -> None:
    r = client.exec(["cat"])
    assert (r.exit_code, r.stdout) == (0, b"")


def test_one_mib_binary_stdin_to_stdout(client: AgentClient) -> None:
    data = os.urandom(1 << 20)
    r = client.exec(["cat"], input=data)
    assert r.exit_code == 0
    assert r.stdout == data


def test_large_output_and_unread_stdin(client: AgentClient) -> None:
    r = client.exec(["head", "-c", str(8 << 20), "/dev/zero"])
    assert r.stdout == b"\0" * (8 << 20)
    # stdin the command never reads: no hang, no error
    r = client.exec(["true"], input=os.urandom(1 << 20))
    assert r.exit_code == 0


def test_timeout_kills_the_process_group(client: AgentClient) -> None:
    with pytest.raises(AgentTimeout) as ei:
        client.exec("sleep 300 & echo $!; sleep 300", timeout=1)
    res = ei.value.result
    assert res is not None and res.timed_out
    assert res.signal == 9 and res.exit_code is None
    bg = int(res.stdout.split()[0])
    assert _wait_gone(bg), f"background child {bg} survived the timeout"
    assert client.exec(["true"]).exit_code == 0  # the agent is fine afterwards


def test_output_cap_kills_the_group_and_keeps_exactly_the_cap(client: AgentClient) -> None:
    cap = 1 << 20
    with pytest.raises(AgentOutputLimit) as ei:
        client.exec("sleep 300 & echo $!; exec yes", max_output=cap, timeout=120)
    res = ei.value.result
    assert ei.value.limit == cap
    assert len(res.stdout) + len(res.stderr) == cap
    first, rest = res.stdout.split(b"\n", 1)
    assert rest == (b"y\n" * cap)[: cap - len(first) - 1]
    assert res.signal == 9 and res.exit_code is None and not res.timed_out
    assert _wait_gone(int(first)), "a background child survived the SIGKILL for too much output"
    assert client.exec(["echo", "next"], max_output=cap).stdout == b"next\n"


def test_output_cap_counts_stdout_and_stderr_together(client: AgentClient) -> None:
    # head's 300000 bytes on stderr are all read (the pipe holds 64 KiB) before yes starts.
    with pytest.raises(AgentOutputLimit) as ei:
        client.exec("head -c 300000 /dev/zero >&2; exec yes", max_output=200000)
    assert ei.value.stderr == b"\0" * 200000 and ei.value.stdout == b""


def test_output_cap_boundary_and_unlimited(client: AgentClient) -> None:
    r = client.exec(["head", "-c", "100000", "/dev/zero"], max_output=100000)
    assert r.exit_code == 0 and len(r.stdout) == 100000  # exactly the cap is allowed
    with pytest.raises(AgentOutputLimit) as ei:
        client.exec(["head", "-c", "100001", "/dev/zero"], max_output=100000)
    # the process may have finished by itself before the SIGKILL arrived: either ending is fine
    assert ei.value.stdout == b"\0" * 100000
    assert len(client.exec(["head", "-c", str(3 << 20), "/dev/zero"], max_output=0).stdout) == (
        3 << 20
    )
    with pytest.raises(ValueError, match="max_output"):
        client.exec(["true"], max_output=-1)


def test_output_cap_with_stdin_flowing(client: AgentClient) -> None:
    # A big stdin is written from its own thread; it stops once the output cap is hit.
    with pytest.raises(AgentOutputLimit) as ei:
        client.exec(["cat"], input=os.urandom(8 << 20), max_output=1 << 20)
    assert len(ei.value.stdout) == 1 << 20
    assert client.exec(["cat"], input=b"still fine").stdout == b"still fine"


def test_background_process_does_not_hold_exit(client: AgentClient) -> None:
    r = client.exec("sleep 300 & echo $!", timeout=60)
    assert r.exit_code == 0
    bg = int(r.stdout.split()[0])
    assert not _gone(bg)  # still running: only a timeout or a disconnect kills the group
    os.kill(bg, 9)


def test_concurrent_execs(client: AgentClient, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    results: dict[str, object] = {}

    def run(name: str, cmd: str) -> None:
        try:
            results[name] = client.exec(cmd, timeout=60)
        except Exception as e:  # reported below
            results[name] = e

    # The reader blocks until the writer runs: serialised execs would deadlock here.
    threads = [threading.Thread(target=run, args=("reader", f"cat {fifo}"))]
    threads.append(threading.Thread(target=run, args=("writer", f"echo hello > {fifo}")))
    for i in range(8):
        threads.append(threading.Thread(target=run, args=(f"n{i}", f"echo {i}; echo e{i} >&2")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert getattr(results["reader"], "stdout", None) == b"hello\n", results["reader"]
    for i in range(8):
        r = results[f"n{i}"]
        assert (r.stdout, r.stderr) == (f"{i}\n".encode(), f"e{i}\n".encode())  # type: ignore[union-attr]


def test_several_connections(agent: LocalAgent) -> None:
    a, b = agent.client(), agent.client()
    try:
        assert a.exec(["echo", "a"]).stdout == b"a\n"
        assert b.exec(["echo", "b"]).stdout == b"b\n"
    finally:
        a.close()
        b.close()


def test_connect_vsock_uds_handshake(agent: LocalAgent, tmp_path: Path) -> None:
    """Firecracker's host-initiated vsock convention, in front of the real agent: a relay stands
    in for the VMM (CONNECT <port> -> OK <n>, then bytes pass through)."""
    uds = tmp_path / "v.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(uds))
    srv.listen(1)
    seen: list[bytes] = []

    def pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def vmm() -> None:
        conn, _ = srv.accept()
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        seen.append(line)
        conn.sendall(b"OK 1073741824\n")
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.connect(str(agent.sock))
        threading.Thread(target=pump, args=(guest, conn), daemon=True).start()
        pump(conn, guest)

    threading.Thread(target=vmm, daemon=True).start()
    c = AgentClient.connect_vsock_uds(uds, port=52, timeout=10)
    try:
        c.wait_ready(timeout=10)
        assert c.exec(["echo", "via vsock"]).stdout == b"via vsock\n"
    finally:
        c.close()
        srv.close()
    assert seen == [b"CONNECT 52\n"]


def test_disconnect_kills_the_connections_processes(agent: LocalAgent, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    a, b = agent.client(), agent.client()

    def run() -> None:
        try:
            a.exec(f"echo $$ > {pidfile}.t; mv {pidfile}.t {pidfile}; exec sleep 300")
        except AgentError:
            pass  # AgentDisconnected once the connection is closed below

    t = threading.Thread(target=run, daemon=True)
    t.start()
    end = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < end:
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    assert not _gone(pid)
    a.close()
    t.join(timeout=10)
    assert _wait_gone(pid), "the closed connection's process survived"
    assert b.exec(["true"]).exit_code == 0
    b.close()


def test_reset_ends_earlier_work_on_the_connection(agent: LocalAgent) -> None:
    """RESET (sent by wait_ready) drops what an earlier session on a stream left running."""
    exec_payload = struct.pack("<IIII", 0, 1, 1, 0) + b"echo $$; exec sleep 300\0\0"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(agent.sock))
        s.sendall(encode_frame(FrameType.EXEC, 5, exec_payload))
        dec, frames = FrameDecoder(), []
        while not any(f.type == FrameType.STDOUT and f.payload for f in frames):
            frames += [f for f in dec.feed(s.recv(65536)) if isinstance(f, Frame)]
        pid = int(b"".join(f.payload for f in frames if f.type == FrameType.STDOUT))
        assert not _gone(pid)
        s.sendall(encode_frame(FrameType.RESET, 6, b"fresh"))
        while not any(f.type == FrameType.PONG for f in frames):
            frames += [f for f in dec.feed(s.recv(65536)) if isinstance(f, Frame)]
        assert [f for f in frames if f.type == FrameType.PONG] == [
            Frame(FrameType.PONG, 6, b"fresh")
        ]
        assert _wait_gone(pid), "RESET left the earlier session's process running"
        # the old channel is free again, and no EXIT for it ever comes
        s.sendall(encode_frame(FrameType.EXEC, 5, struct.pack("<IIII", 0, 0, 1, 0) + b"true\0\0"))
        while not any(f.type == FrameType.EXIT for f in frames):
            frames += [f for f in dec.feed(s.recv(65536)) if isinstance(f, Frame)]
        exits = [f for f in frames if f.type == FrameType.EXIT]
        assert exits == [Frame(FrameType.EXIT, 5, struct.pack("<iiI", 0, 0, 0))]


# --------------------------------------------------------------------------- files


def test_put_get_one_mib_binary_file(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(1 << 20) + b"\0tail"
    path = str(tmp_path / "new" / "parents" / "blob.bin")
    client.put_file(path, data, mode=0o640)
    assert Path(path).read_bytes() == data
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert client.get_file(path) == data
    mode, size = client.stat(path)
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o640 and size == len(data)
    # overwrite atomically; no temp files left behind
    client.put_file(path, b"short", mode=0o600)
    assert client.get_file(path) == b"short"
    assert sorted(os.listdir(Path(path).parent)) == ["blob.bin"]
    client.put_file(str(tmp_path / "empty"), b"")
    assert client.get_file(str(tmp_path / "empty")) == b""


def test_file_errors(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as ei:
        client.get_file(str(tmp_path / "missing"))
    assert ei.value.code == errno.ENOENT
    with pytest.raises(AgentError) as ei:
        client.stat(str(tmp_path / "missing"))
    assert ei.value.code == errno.ENOENT
    with pytest.raises(AgentError) as ei:
        client.get_file(str(tmp_path))
    assert ei.value.code == errno.EISDIR
    with pytest.raises(AgentError) as ei:
        client.put_file("relative/path", b"x")
    assert ei.value.code == errno.EINVAL
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(AgentError):  # a parent that is a file
        client.put_file(str(tmp_path / "afile" / "child"), os.urandom(300_000))
    assert client.ping() >= 0


def test_tree_round_trip_with_modes(client: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "secret").write_bytes(os.urandom(100_000))
    (src / "sub" / "secret").chmod(0o600)
    (src / "sub" / "deeper" / "z").write_bytes(b"")
    (src / "sub" / "deeper").chmod(0o555)  # read-only dir: must still be filled
    (src / "empty").chmod(0o710)

    guest = tmp_path / "guest"
    client.put_tree(src, str(guest))
    back = tmp_path / "back"
    client.get_tree(str(guest), back)

    def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
        out = {}
        for p in sorted(root.rglob("*")):
            st_ = p.lstat()
            out[str(p.relative_to(root))] = (
                st_.st_mode,
                p.read_bytes() if stat.S_ISREG(st_.st_mode) else None,
            )
        return out

    assert snapshot(guest) == snapshot(src)
    assert snapshot(back) == snapshot(src)
    assert stat.S_IMODE((back / "sub" / "deeper").stat().st_mode) == 0o555
    assert client.exec([str(guest / "run.sh")]).stdout == b"hi\n"
    for root in (src, guest, back):  # let pytest clean up
        for p in root.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)


# --------------------------------------------------------------------------- hostile input


def test_malformed_frames_get_errors_and_the_agent_keeps_serving(client: AgentClient) -> None:
    raw = b"".join(
        [
            b"this is not a frame",
            encode_frame(0x42, 7, b"unknown type"),
            encode_frame(FrameType.EXEC, 8, struct.pack("<IIII", 0, 0, 0xFFFFFFFF, 0)),
            encode_frame(FrameType.EXEC, 9, struct.pack("<IIII", 0, 0, 2, 0) + b"only-one\0\0"),
            encode_frame(FrameType.SIGNAL, 10, b"\x01"),
            encode_frame(FrameType.STDIN, 11, b"nobody"),
            encode_frame(FrameType.PUT, 12, struct.pack("<II", 0o644, 7) + b"/tmp/x\0"),
            encode_frame(FrameType.GET, 13, b"/no-terminator"),
            encode_frame(FrameType.SYNC, 14, b"short"),
            encode_frame(FrameType.DATA, 15, b"no put"),
            encode_frame(FrameType.PONG, 16, b"wrong direction"),
        ]
    )
    client.send_raw(raw)
    # an oversize frame: its declared payload is skipped, whatever it contains
    n = (1 << 20) + 1
    client.send_raw(struct.pack("<HBBII", 0x4749, 1, FrameType.PING, 17, n))
    client.send_raw(encode_frame(FrameType.PING, 99, b"swallowed") + b"\0" * (n - 21))
    assert client.ping(b"still here") >= 0
    deadline = time.monotonic() + 10
    expect = {
        0: ErrorCode.BAD_MAGIC,
        7: ErrorCode.UNKNOWN_TYPE,
        8: ErrorCode.BAD_PAYLOAD,
        9: ErrorCode.BAD_PAYLOAD,
        10: ErrorCode.BAD_PAYLOAD,
        11: ErrorCode.UNKNOWN_CHAN,
        12: ErrorCode.BAD_PAYLOAD,
        13: ErrorCode.BAD_PAYLOAD,
        14: ErrorCode.BAD_PAYLOAD,
        15: ErrorCode.UNKNOWN_CHAN,
        16: ErrorCode.UNKNOWN_TYPE,
        17: ErrorCode.TOO_LARGE,
    }
    while time.monotonic() < deadline:
        got = {chan: code for chan, code, _ in client.protocol_errors}
        if all(got.get(c) == code for c, code in expect.items()):
            break
        time.sleep(0.05)
    got = {chan: code for chan, code, _ in client.protocol_errors}
    assert got == expect
    r = client.exec(["echo", "ok"])
    assert r.stdout == b"ok\n"


def test_truncated_frame_then_disconnect(agent: LocalAgent) -> None:
    c = agent.client()
    c.send_raw(encode_frame(FrameType.EXEC, 1, b"x" * 100)[:50])
    c.close()
    c = agent.client()
    assert c.ping() >= 0
    c.close()


_SAFE_TYPES = [0x00, 0x01, 0x03, 0x04, 0x06, 0x07, 0x08, 0x09, 0x42, 0x81, 0x85, 0xFE, 0xFF]


def _exec_payload() -> st.SearchStrategy[bytes]:
    # Structured enough to reach deep into the EXEC parser; its strings come from an alphabet
    # that names no real program or path.
    body = st.lists(st.sampled_from([b"\0", b"x", b"=", b"y"]), max_size=40).map(b"".join)
    head = st.tuples(
        st.integers(0, 50), st.integers(0, 4), st.integers(0, 6), st.integers(0, 6)
    ).map(lambda t: struct.pack("<IIII", *t))
    return st.tuples(head, body).map(lambda t: t[0] + t[1])


_fuzz_frames = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_SAFE_TYPES), st.integers(0, 20), st.binary(max_size=64)),
        st.tuples(st.just(0x02), st.integers(0, 20), _exec_payload()),
        st.tuples(st.just(-1), st.just(0), st.binary(max_size=32)),  # raw garbage
    ),
    max_size=12,
)


@pytest.fixture(scope="module")
def fuzz_agent(agent_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    a = LocalAgent(agent_bin, tmp_path_factory.mktemp("fuzz"))
    yield a
    a.stop()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_fuzz_frames)
def test_fuzz_agent_survives_hostile_frames(fuzz_agent: LocalAgent, frames: list) -> None:
    c = fuzz_agent.client()
    try:
        data = b""
        for ftype, chan, payload in frames:
            if ftype < 0:
                data += payload.replace(b"I", b"i")
            else:
                data += encode_frame(ftype, chan + 1000, payload)
        c.send_raw(data)
        assert c.ping(b"alive", timeout=20) >= 0
    finally:
        c.close()
    assert fuzz_agent.proc.poll() is None, fuzz_agent.log.read_text()[-2000:]


# --------------------------------------------------------------------------- VM.run's output cap


def _vm_on(client: AgentClient, **kw: object) -> VM:
    """A VM whose machine is only the local agent: VM.run talks to nothing else."""
    machine = SimpleNamespace(agent=client, close=lambda: None)
    return VM(SimpleNamespace(name="local"), machine, None, **kw)  # type: ignore[arg-type]


def test_vm_run_output_cap_per_call_names_the_call(client: AgentClient) -> None:
    vm = _vm_on(client)
    assert vm.max_output == 64 << 20
    with pytest.raises(CommandOutputTooLarge) as ei:
        vm.run("yes", max_output="1K")
    e = ei.value
    assert isinstance(e, CommandError) and not isinstance(e, CommandFailed)
    assert e.stdout_bytes == (b"y\n" * 512) and e.stderr_bytes == b"" and e.max_output == 1024
    assert e.signal == 9
    msg = str(e)
    assert "'yes'" in msg and "1 KiB" in msg and "max_output='1K' of this call" in msg
    assert "--- stdout (head) ---\ny\ny\n" in msg
    assert vm.history[-1][:2] == ("yes", None)
    # a non-zero exit does not matter: the output rule raises first, and the VM goes on
    with pytest.raises(CommandOutputTooLarge):
        vm.run("head -c 5000 /dev/zero; exit 3", max_output=4999)
    assert vm.run(["echo", "ok"]).stdout == "ok\n"
    with pytest.raises(ValueError):
        vm.run("true", max_output=-1)


def test_vm_run_session_cap_names_its_source(client: AgentClient) -> None:
    vm = _vm_on(
        client, max_output=2000, max_output_source="environment variable IGNITION_MAX_OUTPUT"
    )
    with pytest.raises(CommandOutputTooLarge) as ei:
        vm.check_output("head -c 3000 /dev/zero >&2")
    e = ei.value
    assert e.stderr_bytes == b"\0" * 2000 and e.stdout_bytes == b""
    msg = str(e)
    assert "from environment variable IGNITION_MAX_OUTPUT" in msg
    assert "--ignition-max-output" in msg and "max_output=" in msg
    assert "\\x00\\x00" in msg and "\0" not in msg  # NULs shown escaped, not raw
    assert len(vm.run("head -c 3000 /dev/zero", max_output=0).stdout_bytes) == 3000
    vm.max_output = "0"
    assert len(vm.run("head -c 3000 /dev/zero").stdout_bytes) == 3000


def test_ready_and_sync_is_one_round_trip(client: AgentClient, monkeypatch) -> None:
    # the fallback (wait_ready, then sync) must not be what answered
    def no_fallback(*a: object, **k: object) -> None:
        raise AssertionError("ready_and_sync fell back to wait_ready")

    monkeypatch.setattr(client, "wait_ready", no_fallback)
    client.ready_and_sync(10.0, time_ns=1_700_000_000 * 10**9, entropy=b"e" * 64)
    assert client.exec(["echo", "after"]).stdout == b"after\n"
    with pytest.raises(ValueError, match="entropy"):
        client.ready_and_sync(10.0, entropy=b"short")
