"""PTY execs (EXEC flag PTY, WINSIZE frames) on the real agent compiled for the host.

The agent listens on a Unix socket here (as in test_agent_local.py); the shell under the pty is
the host's busybox (the guest's shell) or /bin/sh. What a person at a terminal relies on: a
controlling tty, the window size, Ctrl-C reaching the foreground job, job control, the exit code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition._testing import proc_state, require
from pytest_ignition.agent import AgentClient, AgentError, ErrorCode, PtyProcess

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "ignition-agent"
    sources = sorted(str(p) for p in (REPO / "guest" / "agent").glob("*.c"))
    gcc = shutil.which("gcc")
    require(gcc is not None, "gcc is needed to build the agent for the host")
    r = subprocess.run(
        [gcc, "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        + ["-Wall", "-Wextra", "-o", str(out), *sources],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def client(agent_bin: Path, tmp_path: Path) -> Iterator[AgentClient]:
    sock, log = tmp_path / "agent.sock", tmp_path / "agent.log"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [str(agent_bin), "--listen-unix", str(sock), "--sync-dry-run"],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            env=env,
            start_new_session=True,  # no terminal of ours: the agent's children get their own
        )
    c = AgentClient.connect_unix(sock, timeout=10)
    try:
        yield c
    finally:
        c.close()
        alive = proc.poll() is None
        proc.terminate()
        proc.wait(timeout=10)
        assert alive, f"agent died: rc={proc.returncode}\n{log.read_text()}"


def _shell() -> list[str]:
    bb = shutil.which("busybox")
    return [bb, "sh", "-i"] if bb else ["/bin/sh", "-i"]


def _until(p: PtyProcess, needle: bytes, timeout: float = 10.0) -> bytes:
    """Terminal output up to and including ``needle``; fails naming what arrived instead."""
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"waited {timeout} s for {needle!r}; the terminal showed {out!r}"
        data = p.read(min(0.2, left))
        assert data is not None, f"the process ended ({p.exit_code}) before {needle!r}: {out!r}"
        out += data
    return out


def _exit(p: PtyProcess, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while p.read(0.2) is not None:
        assert time.monotonic() < deadline, "the pty process did not end"
    assert p.exit_code is not None, p.error
    return p.exit_code


def test_pty_shell_has_a_terminal_size_job_control_and_exit_code(client: AgentClient) -> None:
    p = client.exec_pty(_shell(), env={"PS1": "PROMPT> ", "TERM": "dumb"}, rows=33, cols=101)
    _until(p, b"PROMPT> ")
    p.write(b"tty; stty size; echo $(( 6 * 7 ))\n")
    out = _until(p, b"42")
    assert b"/dev/pts/" in out and b"33 101" in out, out
    p.resize(40, 132)
    p.write(b"stty size\n")
    assert b"40 132" in _until(p, b"40 132")
    # Ctrl-C goes to the foreground job through the guest's line discipline, not the shell.
    p.write(b"sleep 100; echo after-sleep-$?\n")
    time.sleep(0.5)
    p.write(b"\x03")
    out = _until(p, b"PROMPT> ")
    # the typed line is echoed back: only the echo command's own output counts
    ran = re.findall(rb"after-sleep-(\d+)", out)
    assert ran in ([], [b"130"]), out
    p.write(b"echo still-here\n")
    _until(p, b"still-here\r\n")
    # Job control: Ctrl-Z stops the foreground job.
    p.write(b"sleep 100\n")
    time.sleep(0.5)
    p.write(b"\x1a")
    assert b"Stopped" in _until(p, b"Stopped")
    p.write(b"kill -9 %1; echo killed\n")
    _until(p, b"killed\r\n")
    p.write(b"sleep 0.2; exit 7\n")  # ash refuses the first exit with "stopped jobs" pending
    p.write(b"exit 7\n")
    assert _exit(p) == 7


def test_winsize_on_a_plain_exec_is_refused_and_bad_payloads_do_not_hurt(
    client: AgentClient,
) -> None:
    from pytest_ignition.agent import FrameType, encode_frame

    # WINSIZE for a channel with no process, and a short one: ERRORs, the agent keeps serving.
    client.send_raw(encode_frame(FrameType.WINSIZE, 4242, b"\x01\x00\x02\x00\x00\x00\x00\x00"))
    client.send_raw(encode_frame(FrameType.WINSIZE, 4243, b"\x01"))
    p = client.exec_pty(["/bin/sh", "-c", "stty size; exit 3"], rows=0, cols=0)
    assert _exit(p) == 3
    assert client.exec("echo ok").stdout == b"ok\n"
    codes = {code for _, code, _ in client.protocol_errors}
    assert ErrorCode.UNKNOWN_CHAN in codes and ErrorCode.BAD_PAYLOAD in codes, codes


def test_closing_a_pty_process_kills_its_session(client: AgentClient) -> None:
    p = client.exec_pty(["/bin/sh", "-c", "echo pid=$$; exec sleep 100"])
    out = _until(p, b"\n")
    pid = int(out.split(b"pid=")[1].split()[0])
    p.close()
    deadline = time.monotonic() + 10
    while True:
        if proc_state(pid) in (None, "Z"):
            break
        assert time.monotonic() < deadline, f"pid {pid} still runs after close()"
        time.sleep(0.05)
    with pytest.raises(AgentError):
        raise p.error or AgentError("no error recorded")
