"""pytest-xdist across hosts: what each worker shares with the workers on its own host.

Owns the plugin's side of ``pytest -d --tx ssh=...``: the controller tells each worker whether
it runs on another host (``pytest_configure_node``); a remote worker keeps its snapshots in a
directory private to its host and its test run (the controller's basetemp is not passed to
remote workers, and a remote worker's own basetemp is private to its process), so the workers
of one host make each snapshot once between them and never touch another host's files; and
skips and failures on a remote worker name the host they happened on.

Each host finds or builds its own guest in its own cache (``IGNITION_CACHE_DIR`` on that host,
else ``~/.cache/pytest-ignition`` there): nothing here assumes a controller path exists on a
worker.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from pytest_ignition.budget import boot_id, process_start

REMOTE_KEY = "ignition_remote"  # workerinput: True when the worker is not a local popen
TX_KEY = "ignition_tx"  # workerinput: how the controller reaches the worker ("ssh=root@h")
RUN_PREFIX = "run-"
RUN_KEY = pytest.StashKey[Path]()
LEFT_KEY = pytest.StashKey[bool]()  # this worker has left its run (run_dir() must not rejoin)


def workerinput(config: pytest.Config) -> dict[str, Any]:
    return dict(getattr(config, "workerinput", None) or {})


def is_remote(config: pytest.Config) -> bool:
    """True in an xdist worker the controller started on another host (ssh, socket)."""
    return bool(workerinput(config).get(REMOTE_KEY, False))


def host_label(config: pytest.Config) -> str:
    """``hostname (ssh=root@10.0.0.2, gw1)``: where this worker runs, as both ends know it."""
    wi = workerinput(config)
    parts = [p for p in (wi.get(TX_KEY), wi.get("workerid")) if p]
    return socket.gethostname() + (f" ({', '.join(parts)})" if parts else "")


def where(config: pytest.Config) -> str:
    """A prefix for skip/failure messages on remote workers (empty elsewhere)."""
    return f"on host {host_label(config)}: " if is_remote(config) else ""


def pytest_configure(config: pytest.Config) -> None:
    if is_remote(config):
        config.stash[RUN_KEY] = join_run(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # After the plugin's own sessionfinish closed the VMs, and before xdist's wrapper tells
    # the controller this worker is done: the controller then ends, its ssh connection
    # closes, and sshd's SIGHUP can kill this worker before pytest_unconfigure runs.
    _leave(session.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    _leave(config)


def _leave(config: pytest.Config) -> None:
    run = config.stash.get(RUN_KEY, None)
    if run is not None and not config.stash.get(LEFT_KEY, False):
        config.stash[LEFT_KEY] = True
        leave_run(run)


def run_dir(config: pytest.Config) -> Path:
    """The run directory this remote worker shares with the other workers on its host."""
    if config.stash.get(LEFT_KEY, False):
        raise RuntimeError("pytest-ignition: this worker already left its run directory")
    run = config.stash.get(RUN_KEY, None)
    if run is None:
        run = config.stash[RUN_KEY] = join_run(config)
    return run


def pytest_report_header(config: pytest.Config) -> list[str]:
    """On an xdist controller (which collects nothing, so shows no collection lines): where
    the workers' limits come from."""
    if workerinput(config) or not _distributing(config):
        return []
    from pytest_ignition.budget import header_line
    from pytest_ignition.fixtures import SESSION_KEY

    state = config.stash.get(SESSION_KEY, None)
    settings = getattr(state, "_settings", None) if state is not None else None
    lines = []
    if settings is not None and (getattr(config.option, "numprocesses", None) or 0):
        line = header_line(settings.memory_budget, settings.sources.get("memory_budget", "default"))
        lines.append(f"ignition: {line} (all -n workers on this host share it)")
    if any(not str(tx).startswith("popen") for tx in getattr(config.option, "tx", None) or ()):
        lines.append(
            "ignition: --tx workers on other hosts use their own host's engine, guest cache "
            "(IGNITION_CACHE_DIR there) and memory budget; IGNITION_* variables are not sent"
        )
    return lines


def defers_setting_errors(config: pytest.Config) -> bool:
    """True on a remote worker, and on a controller whose workers are all on other hosts
    (``-d --tx ssh=...``): a setting naming a path is checked where the VM runs."""
    if is_remote(config):
        return True
    if workerinput(config) or getattr(config.option, "numprocesses", None):
        return False
    txs = [str(t) for t in getattr(config.option, "tx", None) or ()]
    return (
        bool(txs)
        and getattr(config.option, "dist", "no") != "no"
        and not any(t.split("*", 1)[-1].startswith("popen") for t in txs)
    )


def _distributing(config: pytest.Config) -> bool:
    return getattr(config.option, "dist", "no") != "no" or bool(
        getattr(config.option, "numprocesses", None)
    )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Controller side: tell each worker whether it is on another host, and how it is reached."""
    spec = node.gateway.spec
    node.workerinput[REMOTE_KEY] = not spec.popen
    reach = ""
    for kind in ("ssh", "socket", "vagrant_ssh"):
        value = getattr(spec, kind, None)
        if value:
            reach = f"{kind}={value}"
            break
    node.workerinput[TX_KEY] = reach


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, Any]:
    report = yield
    if is_remote(item.config) and (report.failed or report.skipped):
        label = host_label(item.config)
        if report.failed:
            report.sections.append(("ignition host", label))
        elif isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            path, lineno, reason = report.longrepr
            if "on host " not in str(reason):
                head, sep, rest = str(reason).partition("Skipped: ")
                reason = (
                    f"{head}{sep}on host {label}: {rest}" if sep else f"on host {label}: {reason}"
                )
                report.longrepr = (path, lineno, reason)
    return report


# ---------------------------------------------------------------------- per-host run directory


def _private_dir(path: Path) -> Path:
    """``path`` as a directory of ours alone (mode 0700, owned by us, not a symlink)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise pytest.UsageError(
            f"pytest-ignition: {path} is not a directory owned by this user; remove it "
            "or set TMPDIR to a private directory"
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def runs_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"pytest-ignition-{os.getuid()}"


def host_key() -> str:
    """Tells hosts apart even where they share /tmp (the cache dir is each host's own)."""
    from pytest_ignition.guest import cache_dir

    blob = f"{socket.gethostname()}\0{cache_dir().resolve()}"
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _me() -> str:
    return f"{os.getpid()}-{process_start(os.getpid()) or 0}-{boot_id()[:8]}"


def _live(workers: Path) -> list[Path]:
    """Worker files whose process is still the one that wrote them."""
    out = []
    for p in workers.glob("*"):
        try:
            pid, start, boot = p.name.split("-", 2)
            alive = boot == boot_id()[:8] and process_start(int(pid)) == int(start)
        except ValueError:
            alive = False
        if alive:
            out.append(p)
    return out


def join_run(config: pytest.Config) -> Path:
    """This remote worker's run directory on this host, registered as one of its users.

    Called at configure, before any test runs: xdist schedules tests only once every worker
    has collected, so no worker can leave (and remove the directory) while another has yet
    to join.
    """
    uid = str(workerinput(config).get("testrunuid", "norun"))
    base = _private_dir(runs_dir())
    run = base / f"{RUN_PREFIX}{uid[:16]}-{host_key()}"
    with FileLock(str(base / ".lock"), timeout=60):
        for sibling in base.glob(f"{RUN_PREFIX}*"):
            # A run whose workers all died (kill -9, a lost ssh connection) left its snapshots.
            if sibling != run and sibling.is_dir() and not _live(sibling / "workers"):
                shutil.rmtree(sibling, ignore_errors=True)
        (run / "workers").mkdir(parents=True, exist_ok=True)
        (run / "workers" / _me()).touch()
    return run


def leave_run(run: Path) -> None:
    """Unregister; the last worker of the run on this host removes the directory."""
    base = run.parent
    try:
        with FileLock(str(base / ".lock"), timeout=60):
            (run / "workers" / _me()).unlink(missing_ok=True)
            if not _live(run / "workers"):
                shutil.rmtree(run, ignore_errors=True)
    except Exception as e:  # leaving must never fail the run; a later run prunes it
        print(f"pytest-ignition: could not clean up {run}: {e!r}", flush=True)
