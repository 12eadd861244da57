"""Stall reproducer, inside the nested harness: many boots and restores of the bundled VMM, quiet
and beside two busy loops, each timed to agent-ready and checked for stalls.

Through the engine's own API (``IgnitionEngine.boot`` / ``.restore``, what the plugin uses):
``--boots`` boots and ``--restores`` restores of one snapshot, first on a quiet harness host,
then with two ``while :; do :; done`` shell loops running beside them. Each VM is timed from the
VMM's launch to its agent answering (a restore: and its clock synced), its serial console is
searched for kernel complaints (RCU stalls, soft lockups, hung tasks, clocksource watchdog
messages, ``BUG:``/``WARNING:``), and the VMM's ``interrupts_reraised`` counter is read.

A VM is *stalled* when it took longer than ``--factor`` (3) times the median of its kind on the
quiet host, or did not get ready at all within ``--timeout``. While a VM is late (past
``--probe-after`` seconds) its VMM is asked for a ``probe`` (vCPU run state, TSC and
TSC-deadline, LAPIC timer, pending vectors, virtqueue indices, event-loop wakeups: see
:mod:`pytest_ignition.vmm.probe`) every few seconds; probes and console complaints go to
``--log`` (JSON lines).

Records (a JSON list in ``benchmarks/results/nested_stall.json``): one per kind x load with
``metric`` ``stall_ready`` and ``median_ms``/``p10_ms``/``p90_ms``/``n`` of launch -> ready, plus
``stalls``, ``not_ready``, ``console_warnings``, ``interrupts_reraised``, ``limit_ms`` and
``passed`` (no stall, no warning); the script exits 1 unless every group passed.

Usage (from the repository root; ``make bytecode`` first)::

    python -m pytest_ignition.nested run -- .venv/bin/python -m benchmarks.nested_stall \\
        [--boots 20] [--restores 20] [--memory 256]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import common

RESULTS = common.RESULTS_DIR / "nested_stall.json"
# Kernel messages that mean the guest saw time misbehave or got stuck.
WARNING_RE = re.compile(
    rb"rcu: .*(stall|didn't happen|Possible timer)|soft lockup|hung_task|blocked for more than"
    rb"|clocksource.*(unstable|skew)|BUG: |WARNING: |Kernel panic|timekeeping watchdog"
)


def host_description() -> str:
    import platform

    return (
        f"nested host (QEMU TCG, emulated AMD SVM) {platform.machine()} {os.cpu_count()}cpu "
        f"{platform.release()} [{common.cpu_model()}]"
    )


def _control(sock: Path, cmd: str, timeout: float = 30.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


class LateProbe(threading.Thread):
    """While a VM in ``workdir`` is not ready, probe its VMM every ``every`` s after ``after`` s."""

    def __init__(self, workdir: Path, after: float, every: float, log: Any, label: str):
        super().__init__(daemon=True)
        self.workdir, self.after, self.every = workdir, after, every
        self.log, self.label = log, label
        self.done = threading.Event()
        self.probes = 0

    def run(self) -> None:
        t0 = time.monotonic()
        if self.done.wait(self.after):
            return
        while not self.done.is_set():
            socks = list(self.workdir.glob("vmm-*/control.sock"))
            if socks:
                try:
                    reply = _control(socks[0], "probe", timeout=20)
                except (OSError, ValueError) as e:
                    reply = {"ok": False, "error": repr(e)}
                self.probes += 1
                entry = {"label": self.label, "late_s": round(time.monotonic() - t0, 2), **reply}
                self.log.write(json.dumps(entry) + "\n")
                self.log.flush()
            if self.done.wait(self.every):
                return


class Busy:
    """Two shell busy loops, as in the original reproducer."""

    def __init__(self, n: int = 2):
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Busy:
        for _ in range(self.n):
            self.procs.append(subprocess.Popen(["sh", "-c", "while :; do :; done"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(10)


def one(engine: Any, config: Any, kind: str, snap: Path, root: Path, i: int, args, log) -> dict:
    """Boot or restore one VM; returns its timing and what its console and VMM said."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind[0]}{i}-", dir=root))
    probe = LateProbe(workdir, args.probe_after, args.probe_every, log, f"{kind}{i}")
    probe.start()
    t0 = time.monotonic()
    m = None
    out: dict[str, Any] = {"kind": kind, "i": i}
    try:
        if kind == "boot":
            m = engine.boot(config, workdir)
        else:
            m = engine.restore(config, snap, workdir)
        out["ready_s"] = time.monotonic() - t0
        if m.agent.exec(["true"], timeout=60).exit_code != 0:
            raise RuntimeError("the guest cannot run `true`")
        with contextlib.suppress(Exception):
            out["interrupts_reraised"] = m.control("status", timeout=10).get(
                "interrupts_reraised", 0
            )
    except Exception as e:
        out["ready_s"] = None
        out["error"] = repr(e)[:500]
    finally:
        probe.done.set()
        out["probes"] = probe.probes
        console = b""
        for f in workdir.glob("vmm-*/console.log"):
            console = f.read_bytes()
        warnings = [
            line.decode(errors="replace").strip()[:300]
            for line in console.splitlines()
            if WARNING_RE.search(line)
        ]
        out["warnings"] = warnings
        if warnings or out.get("error"):
            log.write(
                json.dumps(
                    {
                        "label": f"{kind}{i}",
                        "console_tail": console[-3000:].decode(errors="replace"),
                        **out,
                    }
                )
                + "\n"
            )
            log.flush()
        if m is not None:
            m.close()
        probe.join(30)
    return out


def many_snapshots(engine: Any, config: Any, root: Path, load: str, args, log) -> list[dict]:
    """Snapshots of one running guest, each taken after a command and a random pause, each
    restored ``--per-snapshot`` times: a stall that belongs to the saved moment shows up as
    every restore of one snapshot being late, while the other snapshots' restores are not."""
    import random

    rng = random.Random(1234)
    runs: list[dict] = []
    base = engine.boot(config, Path(tempfile.mkdtemp(prefix=f"many-{load}-", dir=root)))
    try:
        for s in range(args.snapshots):
            delay = rng.random() * 1.5
            base.agent.exec(["sh", "-c", f"sleep {delay:.2f}; echo x > /tmp/mark"], timeout=60)
            time.sleep(rng.random() * 1.0)
            snap = root / "snaps" / f"{load}-s{s}"
            engine.snapshot(base, snap)
            if base.agent.exec(["true"], timeout=60).exit_code != 0:
                raise RuntimeError("the snapshotted guest cannot run `true` after resume")
            for k in range(args.per_snapshot):
                r = one(engine, config, "many", snap, root, s * 100 + k, args, log)
                r["snapshot"] = s
                runs.append(r)
                ready = f"{r['ready_s']:.2f}s" if r["ready_s"] is not None else "NOT READY"
                print(
                    f"{load} snapshot {s} restore {k}: {ready} warnings={len(r['warnings'])} "
                    f"probes={r['probes']}" + (f" {r['error']}" if r.get("error") else ""),
                    flush=True,
                )
    finally:
        base.close()
    return runs


def summarize(runs: list[dict], kind: str, load: str, limit_s: float | None, **extra: Any) -> dict:
    ready = [r["ready_s"] for r in runs if r["ready_s"] is not None]
    rec: dict[str, Any] = {
        "metric": "stall_ready",
        "engine": "ignition",
        "where": "nested",
        "params": {"kind": kind, "load": load, **extra},
        **(common.summarize_ms([s * 1000 for s in ready]) if ready else {"n": 0}),
        "max_ms": round(max(ready) * 1000, 1) if ready else None,
        "not_ready": sum(1 for r in runs if r["ready_s"] is None),
        "console_warnings": sum(len(r["warnings"]) for r in runs),
        "interrupts_reraised": sum(r.get("interrupts_reraised", 0) for r in runs),
        "host": host_description(),
    }
    if limit_s is not None:
        rec["limit_ms"] = round(limit_s * 1000, 1)
        rec["stalls"] = rec["not_ready"] + sum(1 for s in ready if s > limit_s)
    rec["passed"] = rec.get("stalls", rec["not_ready"]) == 0 and rec["console_warnings"] == 0
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nested_stall", description=__doc__)
    p.add_argument("--boots", type=int, default=20, help="boots per load (default 20)")
    p.add_argument("--restores", type=int, default=20, help="restores per load (default 20)")
    p.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    p.add_argument("--factor", type=float, default=3.0, help="stall = this x quiet median")
    p.add_argument("--timeout", type=float, default=180.0, help="per VM, to agent-ready (s)")
    p.add_argument("--probe-after", type=float, default=20.0, help="probe a VM this late (s)")
    p.add_argument("--probe-every", type=float, default=5.0)
    p.add_argument(
        "--snapshots",
        type=int,
        default=0,
        help="also take this many snapshots of one running guest, each at a different moment, "
        "and restore each --per-snapshot times (a stall can belong to the moment of the save)",
    )
    p.add_argument("--per-snapshot", type=int, default=2)
    p.add_argument("--loads", default="quiet,busy", help="quiet,busy (default both)")
    p.add_argument(
        "--restore-arg",
        action="append",
        default=[],
        help="extra argument for the VMM's restore command (e.g. --no-rollback; repeatable)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--log", type=Path, default=common.RESULTS_DIR / "nested_stall.log")
    p.add_argument("--force", action="store_true", help="run outside the nested harness too")
    args = p.parse_args(argv)

    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.ignition import IgnitionEngine, fork_server_enabled
    from pytest_ignition.guest import find_guest
    from pytest_ignition.nested import inside

    if not inside() and not args.force:
        print("run this inside the nested harness (see --help)", file=sys.stderr)
        return 2
    guest = find_guest()
    if guest is None:
        print("guest not built (python -m pytest_ignition.guest build)", file=sys.stderr)
        return 2
    config = VMConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        memory_mib=args.memory,
        boot_timeout=args.timeout,
    )
    engine = IgnitionEngine()
    if args.restore_arg:
        launch = engine._launch

        def launch_with(m: Any, argv: list[str]) -> float:
            if argv[3:4] == ["restore"]:
                argv = [*argv, *args.restore_arg]
            return launch(m, argv)

        engine._launch = launch_with  # type: ignore[method-assign]
    loads = [x for x in args.loads.split(",") if x]
    records: list[dict] = []
    quiet_median: dict[str, float] = {}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ns-") as tmp, open(args.log, "w") as log:
        root = Path(tmp)
        m = engine.boot(config, root / "base")
        try:
            snap = root / "snaps" / "base"
            engine.snapshot(m, snap)
        finally:
            m.close()
        for load in loads:
            ctx = Busy() if load == "busy" else contextlib.nullcontext()
            with ctx:
                kinds = [("boot", args.boots), ("restore", args.restores)]
                if args.snapshots:
                    kinds.append(("many", args.snapshots * args.per_snapshot))
                for kind, n in kinds:
                    if kind == "many":
                        runs = many_snapshots(engine, config, root, load, args, log)
                        n = 0
                    else:
                        runs = []
                    for i in range(n):
                        r = one(engine, config, kind, snap, root, i, args, log)
                        runs.append(r)
                        ready = f"{r['ready_s']:.2f}s" if r["ready_s"] is not None else "NOT READY"
                        print(
                            f"{load} {kind} {i}: {ready} warnings={len(r['warnings'])} "
                            f"probes={r['probes']} reraised={r.get('interrupts_reraised', '?')}"
                            + (f" {r['error']}" if r.get("error") else ""),
                            flush=True,
                        )
                    ok = [r["ready_s"] for r in runs if r["ready_s"] is not None]
                    if load == "quiet" and ok:
                        quiet_median[kind] = statistics.median(ok)
                    med = quiet_median.get(kind)
                    limit = med * args.factor if med is not None else None
                    more = {"fork_server": fork_server_enabled()}
                    if kind == "restore" and args.restore_arg:
                        more["restore_args"] = args.restore_arg
                    rec = summarize(runs, kind, load, limit, **more)
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
    common.write_json(args.out, records)
    return 0 if records and all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
