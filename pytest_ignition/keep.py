"""Kept VMs (``--ignition-keep-failed``): the registry and what ``attach``, ``list`` and ``kill`` do.

A kept VM is a failed test's VM that pytest did not close. Its process runs under a keeper
(:mod:`pytest_ignition.keeper`, started by ``engines._process`` for every VM of a keep-failed
session), which ends it after ``keep_failed_for`` seconds, on ``kill``, or when it exits on its
own, and then removes its files. The registry is one JSON file per kept VM in
``<cache dir>/kept/`` (``$IGNITION_CACHE_DIR`` or ``~/.cache/pytest-ignition``): id, keeper pid,
engine, the agent's socket, expiry, the test's node id, the VM's work directory, the paths the
keeper removes at the end. An entry whose keeper is gone is stale and is removed when listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KeptVM", "KeepError", "connect_agent", "keep_vm", "kill", "list_kept", "registry_dir"]

KEEPER_MODULE = "pytest_ignition.keeper"
_ID = re.compile(r"[0-9a-f]{6,32}")


class KeepError(Exception):
    """A kept VM could not be kept, found, reached or ended; the message says what to do."""


@dataclass(frozen=True)
class KeptVM:
    id: str
    keeper_pid: int
    engine: str
    agent: dict[
        str, Any
    ]  # {"kind": "unix", "path": ...} or {"kind": "vsock", "path": ..., "port": N}
    expires: float  # epoch seconds
    test: str
    workdir: str
    console_log: str | None
    created: float
    path: Path  # the registry entry

    @property
    def attach_command(self) -> str:
        return f"python -m pytest_ignition attach {self.id}"


def registry_dir() -> Path:
    from pytest_ignition.guest.build import cache_dir

    d = cache_dir() / "kept"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _agent_endpoint(machine: Any) -> dict[str, Any] | None:
    if getattr(machine, "agent_sock", None) is not None:  # QEMU: a chardev socket server
        return {"kind": "unix", "path": str(machine.agent_sock)}
    if getattr(machine, "vsock_sock", None) is not None:  # the bundled VMM: Firecracker vsock
        from pytest_ignition.agent import DEFAULT_VSOCK_PORT

        return {"kind": "vsock", "path": str(machine.vsock_sock), "port": DEFAULT_VSOCK_PORT}
    return None


def keep_vm(
    vm: Any, test: str, seconds: float, workdir: Path | None, rootdir: str | None = None
) -> KeptVM:
    """Keep ``vm`` running for ``seconds`` after its test failed; raises KeepError if it cannot be.

    The caller stops tracking the VM (it must not be closed). pytest's agent connection is
    closed here: QEMU's agent socket takes one client at a time, and ``attach`` needs it.
    """
    from pytest_ignition.engines import _process

    machine = vm.machine
    proc = getattr(machine, "proc", None)
    endpoint = _agent_endpoint(machine)
    if proc is None or endpoint is None or getattr(proc, "_ignition_ctl", None) is None:
        raise KeepError(
            f"the {vm.engine.name} VM was not started under a keeper (keep-failed was off "
            "when it started): it is closed as usual"
        )
    if not machine.is_alive():
        raise KeepError("the VM had already stopped (see the console tail): nothing to keep")
    vid = secrets.token_hex(3)
    now = time.time()
    cleanup = []
    if workdir is not None:
        cleanup.append(str(workdir))
    for attr in ("dir", "sockdir"):  # engine dirs outside the workdir (short socket dirs)
        p = getattr(machine, attr, None)
        if p is not None and (workdir is None or not str(p).startswith(str(workdir) + "/")):
            cleanup.append(str(p))
    console_log = getattr(machine, "console_log", None)
    entry = {
        "id": vid,
        "keeper_pid": proc.pid,
        "engine": vm.engine.name,
        "agent": endpoint,
        "expires": now + seconds,
        "test": test,
        "rootdir": rootdir,
        "workdir": str(workdir) if workdir is not None else None,
        "console_log": str(console_log) if console_log is not None else None,
        "created": now,
        "cleanup": cleanup,
    }
    path = registry_dir() / f"{vid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=1) + "\n")
    os.replace(tmp, path)
    if not _process.keep_process(proc, now + seconds, path):
        path.unlink(missing_ok=True)
        raise KeepError("the VM's keeper did not take the order (the VM stopped meanwhile)")
    with contextlib.suppress(Exception):
        machine.agent.close()
    _process.untrack(machine)
    return _load(path)  # type: ignore[return-value]


def _load(path: Path) -> KeptVM | None:
    try:
        e = json.loads(path.read_text())
        return KeptVM(
            id=str(e["id"]),
            keeper_pid=int(e["keeper_pid"]),
            engine=str(e["engine"]),
            agent=dict(e["agent"]),
            expires=float(e["expires"]),
            test=str(e["test"]),
            workdir=str(e.get("workdir") or ""),
            console_log=e.get("console_log"),
            created=float(e["created"]),
            path=path,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keeper_alive(pid: int) -> bool:
    """True when ``pid`` is a running keeper (not a reused pid, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and KEEPER_MODULE.encode() in cmdline


def list_kept() -> list[KeptVM]:
    """The kept VMs whose keeper runs, oldest first; stale entries are removed."""
    out = []
    for path in sorted(registry_dir().glob("*.json")):
        kept = _load(path)
        if kept is None or not _keeper_alive(kept.keeper_pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(kept)
    return sorted(out, key=lambda k: k.created)


def find(vid: str) -> KeptVM:
    if not _ID.fullmatch(vid):
        raise KeepError(f"{vid!r} is not a kept VM id (see `python -m pytest_ignition list`)")
    for kept in list_kept():
        if kept.id == vid:
            return kept
    raise KeepError(
        f"no kept VM {vid!r} (it may have expired or been killed); "
        "`python -m pytest_ignition list` shows the kept VMs"
    )


def kill(kept: KeptVM, timeout: float = 15.0) -> None:
    """End a kept VM and wait until its keeper has removed its files; SIGKILL if it will not."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(kept.keeper_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _keeper_alive(kept.keeper_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _keeper_alive(kept.keeper_pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(kept.keeper_pid, signal.SIGKILL)
        # The keeper could not clean up after itself: do it here.
        from pytest_ignition.keeper import _cleanup

        _cleanup(str(kept.path))
    kept.path.unlink(missing_ok=True)


def connect_agent(kept: KeptVM, timeout: float = 15.0) -> Any:
    """A fresh agent connection to a kept VM (a new session: the test's requests are gone)."""
    from pytest_ignition.agent import AgentClient, AgentError

    ep = kept.agent
    try:
        if ep.get("kind") == "vsock":
            client = AgentClient.connect_vsock_uds(ep["path"], int(ep["port"]), timeout=timeout)
        else:
            client = AgentClient.connect_unix(ep["path"], timeout=timeout)
        client.wait_ready(timeout)
    except (AgentError, OSError) as e:
        raise KeepError(
            f"cannot reach the agent of kept VM {kept.id} at {ep.get('path')}: {e} "
            f"(is another `attach {kept.id}` running? QEMU's agent socket takes one client)"
        ) from None
    return client


def console_tail(kept: KeptVM, max_chars: int = 4000) -> str:
    if not kept.console_log:
        return ""
    from pytest_ignition.console import read_tail

    return read_tail(Path(kept.console_log), max_chars)
