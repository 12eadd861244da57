"""Benchmark: the bundled VMM's host-side restore time and in-place rollback time, directly
on this machine's KVM with CPL3 guests (which run natively even on PVM).

Metrics (records in ``benchmarks/results/vmm.json``, which this script rewrites):

* ``restore_time_host``: ``Machine.restore`` entered → every vCPU handed to its run loop
  (state file read and checked, VM + irqchip + PIT, memory file mapped MAP_PRIVATE, KVM
  and device state loaded, vsock reset posted, vCPU threads started), for guests of
  128 MiB, 512 MiB and 2 GiB. The memory is mapped lazily, so this should be flat in size.
* ``snapshot_time``: ``Machine.snapshot`` of the source VM, ``kind`` ``first`` (booted VM:
  anonymous RAM scanned, zero chunks left as holes) and ``again`` (RAM is a private mapping
  of the last ``memory.bin``: a reflink/copy of it plus the changed pages; 5 samples).
* ``process_restore``: a restore request -> the new VMM process's vCPU running (its control
  socket appears only after the vCPUs were started), 512 MiB CPL3 guest: ``via`` ``fork``
  (a fork of the warm fork server, :mod:`pytest_ignition.vmm.forkserver`, as the ignition
  engine does) or ``spawn`` (a new ``python -m pytest_ignition.vmm restore`` process).
* ``rollback_time``: ``Machine.rollback`` on a running VM whose guest dirtied N pages
  (1, 1k, 10k, 100k) since the snapshot: pause, dirty log, one ``preadv`` from
  ``memory.bin`` per run of adjacent pages, vCPU/VM/device state (regs, sregs and events
  staged in ``kvm_run`` for the resumed vCPU's next KVM_RUN), resume. ``memory_ms`` is
  the page-revert part.

Usage: ``python -m benchmarks.vmm_restore [--restores 20] [--rollbacks 20]
[--sizes 128,512,2048] [--pages 1,1000,10000,100000] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = common.RESULTS_DIR / "vmm.json"
MiB = 1 << 20
FIRST_DIRTY = 0x0100_0000


def record(metric: str, params: dict, samples_ms: list[float], **extra: object) -> dict:
    """A record of the bundled VMM on this machine's KVM; µs resolution (restores are ~ms)."""
    return common.record(
        metric,
        "ignition",
        "direct",
        params,
        samples_ms,
        digits=3,
        loadavg_1m=round(os.getloadavg()[0], 2),  # this host is shared: context for outliers
        **extra,
    )


def _guest_helpers():
    # The CPL3 guest builders live with the VMM's tests (tests/vmm), as for the PIO probe.
    sys.path.insert(0, str(ROOT / "tests" / "vmm"))
    import test_snapshot

    return test_snapshot


def bench_restore(system, tmp: Path, size_mib: int, reps: int) -> list[dict]:
    from pytest_ignition.vmm.machine import Machine

    g = _guest_helpers()
    m = g.cpl3_machine(tmp, [g.counter_loop(g.data_page(0))], mem_size=size_mib * MiB)
    snap_ms: dict[str, list[float]] = {"first": [], "again": []}
    try:
        m.start()
        g.pause_with_progress(m, [1000])
        for i in range(6):
            # first: anonymous RAM scanned for zero chunks; again: RAM is now a private
            # mapping of the last memory.bin, so only its changed pages are written
            t0 = time.perf_counter_ns()
            path = m.snapshot(tmp / "store", f"restore-{size_mib}")
            snap_ms["again" if i else "first"].append((time.perf_counter_ns() - t0) / 1e6)
            m.resume()
            g.pause_with_progress(m, [0])
    finally:
        m.close()
    samples = []
    for i in range(reps + 1):
        r = Machine.restore(path, system=system)
        try:
            if i:  # the first one warms the page cache and Python's imports
                samples.append(r.restore_time_us / 1000)
        finally:
            r.close()
    params = {"memory_mib": size_mib, "cpus": 1}
    return [record("restore_time_host", params, samples)] + [
        record("snapshot_time", {**params, "kind": kind}, ms, note="mostly-zero CPL3 guest RAM")
        for kind, ms in snap_ms.items()
    ]


def bench_process_restore(tmp: Path, reps: int) -> list[dict]:
    import subprocess

    from pytest_ignition.vmm.forkserver import ForkServer

    g = _guest_helpers()
    m = g.cpl3_machine(tmp, [g.counter_loop(g.data_page(0))], mem_size=512 * MiB)
    try:
        path = m.snapshot(tmp / "store", "process")
    finally:
        m.close()
    fs = ForkServer()
    fs.start()
    out: dict[str, list[float]] = {"fork": [], "spawn": []}
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for i in range(reps + 1):
            for via in ("fork", "spawn"):
                ctl = tmp / f"c-{via}-{i}.sock"
                argv = ["restore", "--store", str(path.parent), "--name", path.name]
                argv += ["--console", "none", "--control", str(ctl)]
                t0 = time.perf_counter_ns()
                if via == "fork":
                    p = fs.spawn(argv, stdin=null, stdout=null, stderr=null)
                else:
                    p = subprocess.Popen(
                        [sys.executable, "-m", "pytest_ignition.vmm", *argv],
                        stdin=null,
                        stdout=null,
                        stderr=null,
                    )
                while not ctl.exists():
                    if p.poll() is not None:
                        raise RuntimeError(f"restore via {via} exited with {p.returncode}")
                    time.sleep(0.0002)
                took = (time.perf_counter_ns() - t0) / 1e6
                if i:  # the first of each warms caches (and loads the state in the server)
                    out[via].append(took)
                p.kill()
                p.wait(30)
    finally:
        os.close(null)
        fs.stop()
    return [
        common.record(
            "process_restore",
            "ignition",
            "direct",
            {"memory_mib": 512, "cpus": 1, "via": via},
            ms,
            digits=3,
            loadavg_1m=round(os.getloadavg()[0], 2),
        )
        for via, ms in out.items()
    ]


def bench_rollback(system, tmp: Path, pages: int, reps: int) -> dict:
    g = _guest_helpers()
    mem = 512 * MiB
    m = g.cpl3_machine(tmp, [g.dirty_pages(FIRST_DIRTY, pages)], mem_size=mem)
    samples, memory_ms = [], []
    try:
        m.snapshot(tmp / "store", f"rollback-{pages}")
        m.start()
        for _ in range(reps):
            if not m.done.event.wait(300):
                raise RuntimeError("guest did not finish dirtying its pages")
            m.done.event.clear()
            t0 = time.perf_counter_ns()
            info = m.rollback()  # running VM: pause, revert, resume
            samples.append((time.perf_counter_ns() - t0) / 1e6)
            memory_ms.append(info["memory_us"] / 1000)
            if info["pages"] != pages:
                raise RuntimeError(f"rolled back {info['pages']} pages, expected {pages}")
    finally:
        m.close()
    return record(
        "rollback_time",
        {"dirty_pages": pages, "memory_mib": mem // MiB},
        samples,
        memory_median_ms=round(statistics.median(memory_ms), 3),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--restores", type=int, default=20)
    ap.add_argument("--rollbacks", type=int, default=20)
    ap.add_argument("--sizes", default="128,512,2048", help="guest sizes in MiB")
    ap.add_argument("--pages", default="1,1000,10000,100000", help="dirty page counts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="5 repetitions of everything")
    args = ap.parse_args(argv)
    if args.quick:
        args.restores = min(args.restores, 5)
        args.rollbacks = min(args.rollbacks, 5)

    from pytest_ignition.vmm import kvm
    from pytest_ignition.vmm.vcpu import install_kick_handler

    install_kick_handler()
    system = kvm.System()
    records = []
    with tempfile.TemporaryDirectory(prefix="ignition-bench-") as d:
        tmp = Path(d)
        for size in (int(x) for x in args.sizes.split(",") if x):
            for rec in bench_restore(system, tmp, size, args.restores):
                print(json.dumps(rec), flush=True)
                records.append(rec)
        for rec in bench_process_restore(tmp, args.restores):
            print(json.dumps(rec), flush=True)
            records.append(rec)
        for pages in (int(x) for x in args.pages.split(",") if x):
            rec = bench_rollback(system, tmp, pages, args.rollbacks)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    system.close()
    common.write_records(args.out, records)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
