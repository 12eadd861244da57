"""Signals to a pytest run in the middle of a VM test leave nothing behind (issue 16).

One chain of real pytest runs on the real guest, each a child process with its own TMPDIR (so
that everything the plugin puts in the temp dir is this test's to count): every run's tests sit
in the middle of a test (a VM up, the next test's VM restoring in the background) until told to
go on. Run 1 gets SIGINT while its background restore is stuck (a PATH shim delays that QEMU's
start by ten minutes; the real QEMU is exec'ed after it) and must end long before the boot
timeout. Run 2 gets SIGTERM, run 3 SIGKILL, and in run 4 (``-n 2``) one xdist worker gets
SIGKILL. Each time, once the next run is in the middle of its own test, the killed run must have
left zero VM processes, sockets, overlays and work dirs (counted from ``/proc`` and the file tree).

QEMU here; ``IGNITION_SIGNALS_ENGINE=ignition`` runs the same chain on the bundled VMM (inside the
nested harness: tests/nested/test_signals_ignition.py), where the stuck restore is a
``sitecustomize`` on PYTHONPATH that delays the VMM's ``restore`` command instead of a QEMU shim:
run 1 spawns each VMM process (``IGNITION_VMM_FORKSERVER=0``, so the shim sees the command), the
others fork them from the fork server (the default), whose dir, socket and children count too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_ignition._testing import require, sigint_default
from pytest_ignition.engines import _process
from pytest_ignition.guest.build import cache_dir

QEMU = shutil.which("qemu-system-x86_64")
ENGINE = os.environ.get("IGNITION_SIGNALS_ENGINE", "qemu")
# --ignition-timeout of the inner runs: what a stuck restore would wait for (the bundled VMM in
# the nested harness: a boot there missed 120 s with another harness beside it)
BOOT_TIMEOUT = 120 if ENGINE == "qemu" else 300
MARK_DEADLINE = 900.0  # first boot of a run under TCG on a loaded machine, plus its restore

INNER = """
import os
import time
from pathlib import Path


def _in_the_middle(vm):
    vm.run("true").check()
    marks = Path(os.environ["SIG_MARKS"])
    (marks / str(os.getpid())).write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
    release = Path(os.environ["SIG_RELEASE"])
    deadline = time.monotonic() + 600
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a(ignition_vm):
    _in_the_middle(ignition_vm)


def test_b(ignition_vm):
    _in_the_middle(ignition_vm)
"""

# Delays every QEMU start from a snapshot but the first (test_a's own VM): the background
# restore for test_b is then in progress for ten minutes.
SLOW_RESTORE_SHIM = """#!/bin/sh
case " $* " in
*" -incoming "*)
    n=$(cat "{count}" 2>/dev/null || echo 0)
    n=$((n + 1))
    echo "$n" > "{count}"
    if [ "$n" -ge 2 ]; then sleep 600; fi
    ;;
esac
exec {qemu} "$@"
"""

# The same for the bundled VMM: every ``python -m pytest_ignition.vmm restore`` but the first.
SLOW_RESTORE_SITECUSTOMIZE = """import sys
import time

if sys.orig_argv[1:4] == ["-m", "pytest_ignition.vmm", "restore"]:
    try:
        with open({count!r}) as f:
            n = int(f.read() or 0)
    except OSError:
        n = 0
    n += 1
    with open({count!r}, "w") as f:
        f.write(str(n))
    if n >= 2:
        time.sleep(600)
"""


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    log: Path
    marks: Path
    pids: set[int] = field(default_factory=set)  # pytest (and xdist worker) pids, once marked

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _start(suite: Path, tmpdir: Path, name: str, *args: str, shim: Path | None = None) -> Run:
    """A pytest run of the inner suite; with ``shim``, every restore but the first is stuck."""
    marks = suite / f"marks-{name}"
    marks.mkdir()
    env = dict(os.environ)
    for var in [v for v in env if v.startswith("IGNITION_") or v.startswith("PYTEST_")]:
        del env[var]
    env.update(
        TMPDIR=str(tmpdir),
        IGNITION_CACHE_DIR=str(cache_dir()),
        SIG_MARKS=str(marks),
        SIG_RELEASE=str(suite / "release"),
    )
    if shim is not None:
        var = "PATH" if ENGINE == "qemu" else "PYTHONPATH"
        env[var] = os.pathsep.join(x for x in (str(shim), env.get(var)) if x)
        if ENGINE == "ignition":
            env["IGNITION_VMM_FORKSERVER"] = "0"  # forked VMMs never run a sitecustomize
    log = suite / f"{name}.log"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_inner.py"]
    argv += [f"--ignition-engine={ENGINE}", f"--ignition-timeout={BOOT_TIMEOUT}", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=suite,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=sigint_default,  # run 1 is ended by SIGINT
        )
    return Run(proc, log, marks)


def _wait_marks(run: Run, n: int) -> None:
    deadline = time.monotonic() + MARK_DEADLINE
    while len(list(run.marks.iterdir())) < n:
        if run.proc.poll() is not None:
            pytest.fail(f"the inner run ended ({run.proc.returncode}) early:\n{run.output()}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"no test of the inner run got a VM within {MARK_DEADLINE:g} s:\n{run.output()}"
            )
        time.sleep(0.1)
    run.pids = {run.proc.pid} | {int(p.name) for p in run.marks.iterdir()}


def _dirs(tmpdir: Path) -> dict[Path, int | None]:
    """The plugin's temp dirs in ``tmpdir`` and their owner pid (None: no owner file)."""
    out: dict[Path, int | None] = {}
    for p in tmpdir.iterdir():
        if p.name.startswith(_process.TMP_PREFIXES):
            try:
                out[p] = int(json.loads((p / _process.OWNER_FILE).read_text())["pid"])
            except (OSError, ValueError, KeyError):
                out[p] = None
    return out


def _vm_processes(paths: list[Path]) -> list[int]:
    """Live processes whose command line names a path under one of ``paths`` (the VMs)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(str(p) + "/" in cmdline for p in paths):
            found.append(int(d.name))
    return found


def _files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(sockets, disk overlays) under ``paths``."""
    socks, overlays = [], []
    for root in paths:
        for dirpath, _subdirs, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if p.is_socket():
                    socks.append(p)
                elif name.endswith((".qcow2", ".overlay")):
                    overlays.append(p)
    return socks, overlays


def _counts(paths: list[Path]) -> dict[str, int]:
    socks, overlays = _files([p for p in paths if p.exists()])
    return {
        "processes": len(_vm_processes(paths)),
        "sockets": len(socks),
        "overlays": len(overlays),
        "dirs": sum(p.exists() for p in paths),
    }


def _owned_by(tmpdir: Path, pids: set[int]) -> list[Path]:
    return [p for p, pid in _dirs(tmpdir).items() if pid in pids]


def _check_nothing_left(
    label: str, killed_dirs: list[Path], tmpdir: Path, killed: set[int]
) -> None:
    counts = _counts(killed_dirs)
    late = _owned_by(tmpdir, killed)  # dirs the killed run made after the first count
    print(f"{label}: left behind {counts}, dirs owned by the killed pids {len(late)}")
    assert counts == {"processes": 0, "sockets": 0, "overlays": 0, "dirs": 0}, (label, counts)
    assert late == [], (label, late)


def _kill_and_wait(run: Run, sig: int, pid: int | None = None) -> float:
    t0 = time.monotonic()
    os.kill(run.proc.pid if pid is None else pid, sig)
    if pid is None:
        try:
            run.proc.wait(timeout=BOOT_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            pytest.fail(f"the inner run did not end after signal {sig}:\n{run.output()}")
    return time.monotonic() - t0


def test_signals_to_pytest_and_an_xdist_worker_leave_nothing_behind(tmp_path: Path) -> None:
    if ENGINE == "qemu":
        require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    else:
        from pytest_ignition.engines.ignition import available

        require(*available())
    from pytest_ignition.guest import GuestBuildError, build_guest

    try:
        build_guest()  # from the cache; the initramfs is rebuilt when its sources changed
    except GuestBuildError as e:
        require(False, f"the default guest could not be built: {e}")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_inner.py").write_text(INNER)
    # Short (machine sockets live under it: 108-byte sun_path), so not under tmp_path.
    tmpdir = Path(tempfile.mkdtemp(prefix="igsig-", dir="/tmp"))
    try:
        _chain(suite, tmpdir, tmp_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _chain(suite: Path, tmpdir: Path, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    count = tmp_path / "incoming.count"
    if ENGINE == "qemu":
        (shim / "qemu-system-x86_64").write_text(SLOW_RESTORE_SHIM.format(count=count, qemu=QEMU))
        (shim / "qemu-system-x86_64").chmod(0o755)
    else:
        (shim / "sitecustomize.py").write_text(SLOW_RESTORE_SITECUSTOMIZE.format(count=str(count)))

    def in_the_middle(run: Run, n: int = 1) -> list[Path]:
        _wait_marks(run, n)
        mine = _owned_by(tmpdir, run.pids)
        counts = _counts(mine)
        # the counters see the live run's VMs, sockets and dirs (so zeros later mean something)
        assert counts["processes"] >= 1 and counts["sockets"] >= 1 and counts["dirs"] >= 1, counts
        return mine

    # 1: SIGINT while test_b's VM is still restoring in the background
    r1 = _start(suite, tmpdir, "sigint", shim=shim)
    r1_dirs = in_the_middle(r1)
    seconds = _kill_and_wait(r1, signal.SIGINT)
    print(f"SIGINT during a background restore: pytest ended {seconds:.2f} s after the signal")
    assert seconds < BOOT_TIMEOUT / 4, f"session close waited for the stuck restore:\n{r1.output()}"
    assert "KeyboardInterrupt" in r1.output()

    # 2..3: SIGTERM and SIGKILL; each next run sweeps what the one before left
    previous, previous_dirs, label = r1, r1_dirs, "SIGINT"
    for name, sig in (("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
        run = _start(suite, tmpdir, name)
        dirs = in_the_middle(run)
        _check_nothing_left(label, previous_dirs, tmpdir, previous.pids)
        _kill_and_wait(run, sig)
        previous, previous_dirs, label = run, dirs, name.upper()

    # 4: SIGKILL to one of two xdist workers, both in the middle of a test
    r4 = _start(suite, tmpdir, "xdist", "-n", "2")
    in_the_middle(r4, 2)
    _check_nothing_left(label, previous_dirs, tmpdir, previous.pids)
    victim = min(int(p.name) for p in r4.marks.iterdir())
    victim_dirs = _owned_by(tmpdir, {victim})
    assert victim_dirs, "the worker owns its own session dir"
    _kill_and_wait(r4, signal.SIGKILL, pid=victim)
    deadline = time.monotonic() + 30
    while _vm_processes(victim_dirs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _vm_processes(victim_dirs) == [], "the killed worker's VM outlived it"
    (suite / "release").write_text("go")  # the other worker's test ends; the run finishes
    try:
        r4.proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        r4.proc.kill()
        pytest.fail(f"the xdist run did not finish after one worker was killed:\n{r4.output()}")
    (suite / "release").unlink()

    # 5: the next run sweeps the killed worker's dirs; then it finishes normally
    r5 = _start(suite, tmpdir, "final")
    in_the_middle(r5)
    _check_nothing_left("xdist worker SIGKILL", victim_dirs, tmpdir, {victim})
    (suite / "release").write_text("go")
    assert r5.proc.wait(timeout=600) == 0, r5.output()
    if ENGINE == "ignition":  # the summary names the engine: no quiet fallback to QEMU
        assert "(ignition (bundled VMM" in r5.output(), r5.output()
    # a run that ends normally removes its own dirs; nothing of any run is left
    assert _dirs(tmpdir) == {}, _dirs(tmpdir)
    assert _vm_processes([tmpdir]) == []
