"""An interactive terminal on a guest process: the host side of ``shell``, ``attach`` and
``vm.shell()``.

Owns :func:`interact`: it starts a command under a guest pty (:meth:`AgentClient.exec_pty`), puts
the local terminal in raw mode (so Ctrl-C, Ctrl-Z and every other key go to the guest, whose line
discipline turns them into signals), passes the window size on at start and on every SIGWINCH,
copies bytes both ways until the guest process ends, and restores the local terminal on every way
out (the process ending, the agent going away, an exception, SIGTERM/SIGHUP turned into
SystemExit by the caller). Also :func:`suspended_capture`, which hands pytest's captured stdin and
stdout back to the terminal for ``vm.shell()`` (as pytest's own pdb support does).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import termios
import threading
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pytest_ignition.agent import AgentClient, AgentError

__all__ = ["DEFAULT_SHELL", "TerminalLost", "interact", "suspended_capture", "window_size"]

DEFAULT_SHELL = ("/bin/sh", "-l")

# Set by the plugin in pytest_configure: a context manager factory that suspends pytest's capture
# (stdin included) while a terminal runs, or None outside pytest.
capture_suspender: Callable[[], contextlib.AbstractContextManager[Any]] | None = None


class TerminalLost(AgentError):
    """The guest process ended without an exit status (the agent or the guest went away)."""


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; (24, 80) when it is not a terminal."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 24, 80
    return (rows or 24), (cols or 80)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


def interact(
    agent: AgentClient,
    argv: Sequence[str] = DEFAULT_SHELL,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> int:
    """Run ``argv`` under a guest pty wired to this terminal; returns its exit code.

    Raises :class:`TerminalLost` when the guest process ends without an exit status.
    """
    term_fd = stdin_fd if os.isatty(stdin_fd) else (stdout_fd if os.isatty(stdout_fd) else -1)
    rows, cols = window_size(term_fd) if term_fd >= 0 else (24, 80)
    full_env = {"TERM": os.environ.get("TERM") or "xterm"}
    full_env.update(env or {})
    proc = agent.exec_pty(list(argv), env=full_env, cwd=cwd, rows=rows, cols=cols)
    wake_r, wake_w = os.pipe()
    failure: list[BaseException] = []

    def pump_out() -> None:
        try:
            while True:
                data = proc.read(None)
                if data is None:
                    return
                _write_all(stdout_fd, data)
        except BaseException as exc:  # handed to the main loop
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                os.write(wake_w, b"x")

    reader = threading.Thread(target=pump_out, name="ignition-terminal", daemon=True)
    saved = None
    old_winch: Any = None
    winch_set = False
    try:
        if os.isatty(stdin_fd):
            saved = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd, termios.TCSANOW)
        if term_fd >= 0 and threading.current_thread() is threading.main_thread():

            def on_winch(signo: int, frame: Any) -> None:
                with contextlib.suppress(AgentError):
                    proc.resize(*window_size(term_fd))

            old_winch = signal.signal(signal.SIGWINCH, on_winch)
            winch_set = True
        reader.start()
        stdin_open = True
        while not proc.ended:
            fds = [wake_r] + ([stdin_fd] if stdin_open else [])
            try:
                ready, _, _ = select.select(fds, [], [], 1.0)
            except InterruptedError:
                continue
            if wake_r in ready:
                break
            if stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if not data:
                    # Input that is not a terminal ran out: end the guest's input as a person
                    # would (Ctrl-D), then only wait for the process to end.
                    stdin_open = False
                    data = b"\x04"
                try:
                    proc.write(data)
                except AgentError:
                    break  # the reader sees the disconnect and records why
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        if winch_set:
            signal.signal(signal.SIGWINCH, old_winch)
        if not proc.ended:
            proc.close()
        if reader.is_alive():
            reader.join(timeout=5)
        os.close(wake_r)
        os.close(wake_w)
    if failure:
        raise failure[0]
    if proc.exit_code is None:
        raise TerminalLost(f"the guest shell ended without an exit status: {proc.error}")
    return proc.exit_code


@contextlib.contextmanager
def suspended_capture() -> Iterator[None]:
    """pytest's capture suspended (stdin included) for as long as a terminal runs."""
    if capture_suspender is None:
        yield
        return
    with capture_suspender():
        yield


def pytest_capture_suspender(config: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The suspender for a pytest session: like pytest's pdb support, global capture (and a
    capture fixture of the running test) is suspended with stdin, then resumed."""

    @contextlib.contextmanager
    def suspend() -> Iterator[None]:
        capman = config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            yield
            return
        # Only what is capturing now: under pdb, pytest has suspended it already and resumes
        # it itself when the debugger is left.
        fixture = getattr(capman, "_capture_fixture", None)
        fixture_on = bool(fixture is not None and fixture._is_started())
        if fixture_on:
            capman.suspend_fixture()
        glob = getattr(capman, "_global_capturing", None)
        global_on = bool(glob is not None and glob.is_started())
        if global_on:
            capman.suspend_global_capture(in_=True)
        try:
            yield
        finally:
            if global_on:
                capman.resume_global_capture()
            if fixture_on:
                capman.resume_fixture()

    return suspend
