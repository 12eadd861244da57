"""The keeper: a small watchdog process between pytest and a VM process, for ``--ignition-keep-failed``.

``python -m pytest_ignition.keeper CTL_FD PASS_FDS -- VM-ARGV...`` starts the VM process as its
child (SIGKILLed by the kernel if the keeper dies: PR_SET_PDEATHSIG), passes it the descriptors in
``PASS_FDS`` (comma separated, possibly empty) and its own stdin/stdout/stderr, and exits with the
child's status. pytest holds the write end of the pipe ``CTL_FD``:

* EOF on it (pytest exited or closed the machine) without an order: the VM is killed, as if it
  had died with pytest like every other VM process.
* a line ``keep <deadline-epoch-seconds> <registry-entry-path>``: the VM is kept; it ends when
  the deadline passes, on SIGTERM (``python -m pytest_ignition kill``), or when it exits on its
  own. Then the keeper kills what is left of its process group and removes the registry entry and
  the paths it lists under ``cleanup`` (the VM's work and socket directories).

The keeper runs in its own session (no terminal's Ctrl-C reaches it) and imports little: it is
started for every VM of a keep-failed session.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def _die_with_keeper() -> None:  # in the VM child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _cleanup(entry_path: str | None) -> None:
    if not entry_path:
        return
    try:
        with open(entry_path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        entry = {}
    for path in entry.get("cleanup", []):
        if isinstance(path, str) and path.startswith("/") and path != "/":
            shutil.rmtree(path, ignore_errors=True)
            _remove_session_dir(os.path.dirname(path))
    with contextlib.suppress(OSError):
        os.unlink(entry_path)


def _remove_session_dir(parent: str) -> None:
    """The pytest session's temp dir, once this was its last VM and that pytest has exited
    (nothing left in it but its owner file)."""
    from pytest_ignition.engines import _process

    try:
        names = set(os.listdir(parent))
    except OSError:
        return
    if not os.path.basename(parent).startswith(_process.TMP_PREFIXES):
        return
    if names - {_process.OWNER_FILE}:
        return
    rec = _process._read_owner(parent) if names else None
    if rec is not None and _process.owner_alive(rec) is not False:
        return  # the session still runs and will remove it itself
    shutil.rmtree(parent, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m pytest_ignition.keeper CTL_FD PASS_FDS -- ARGV...", file=sys.stderr)
        return 2
    ctl = int(argv[0])
    pass_fds = tuple(int(x) for x in argv[1].split(",") if x)
    stop = {"signal": 0}

    def on_term(signo: int, frame: object) -> None:
        stop["signal"] = signo

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    child = subprocess.Popen(argv[3:], pass_fds=pass_fds, preexec_fn=_die_with_keeper)
    for fd in pass_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    buf = b""
    deadline: float | None = None  # set once kept
    entry: str | None = None
    ctl_open = True
    status: int | None = None
    while True:
        status = child.poll()
        if status is not None or stop["signal"]:
            break
        if deadline is not None and time.time() >= deadline:
            break
        if not ctl_open and deadline is None:
            break  # pytest went away without keeping this VM
        wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.time()))
        try:
            ready, _, _ = select.select([ctl] if ctl_open else [], [], [], wait)
        except InterruptedError:
            continue
        if ready:
            try:
                data = os.read(ctl, 4096)
            except OSError:
                data = b""
            if not data:
                ctl_open = False
                os.close(ctl)
                continue
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                parts = line.decode(errors="replace").split(" ", 2)
                if len(parts) == 3 and parts[0] == "keep":
                    with contextlib.suppress(ValueError):
                        deadline = float(parts[1])
                        entry = parts[2]
    if status is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            status = child.wait(timeout=10)
    _cleanup(entry)
    # Anything the VM process started in our process group goes too (we are its leader).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.killpg(os.getpgrp(), signal.SIGTERM)
    if status is None:
        return 1
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
