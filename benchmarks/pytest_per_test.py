"""Benchmark: pytest wall time per trivial test with the plugin (session setup excluded).

Runs a generated suite of N tests, each ``ignition_vm.run("true")``, in a pytest subprocess.
An inner conftest times every test's whole protocol (setup + call + teardown); the first
test, which carries the session setup (boot, prepare, snapshot), is reported separately and
left out of the per-test statistics. Writes one record per prefetch mode to
``benchmarks/results/pytest_per_test.json``, in place of the record an earlier run wrote for
the same metric, engine, where and params (records of other settings stay):

    {"metric": "pytest_per_test", "engine": "qemu", "where": "tcg", "params": {...},
     "median_ms", "p10_ms", "p90_ms", "n", "host", ...}

Usage: ``python -m benchmarks.pytest_per_test [-n 20] [-- extra pytest args]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "pytest_per_test.json"

INNER_CONFTEST = """
import json, os, time
import pytest

OUT = os.environ["IGNITION_BENCH_OUT"]
_times = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.perf_counter()
    try:
        return (yield)
    finally:
        _times.append((item.name, time.perf_counter() - t0))


def pytest_sessionfinish(session):
    from pytest_ignition.fixtures import get_session

    engine, reason = get_session(session.config).engine_info()
    with open(OUT, "w") as f:
        json.dump({
            "times": _times,
            "engine": getattr(engine, "name", None),
            "accelerator": getattr(engine, "accelerator", None),
            "describe": engine.describe() if engine is not None else reason,
        }, f)
"""

INNER_TESTS = """
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_trivial(ignition_vm, i):
    assert ignition_vm.run("true").exit_code == 0
"""


def run(n: int, extra: list[str], prefetch: bool = True) -> dict:
    """Run the suite once and return its record."""
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="ign-bench-") as d:
        root = Path(d)
        (root / "conftest.py").write_text(INNER_CONFTEST)
        (root / "test_trivial.py").write_text(INNER_TESTS.format(n=n + 1))
        (root / "pytest.ini").write_text("[pytest]\n")
        out = root / "times.json"
        env = dict(os.environ, IGNITION_BENCH_OUT=str(out), IGNITION_PREFETCH=str(int(prefetch)))
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--basetemp={root / 'bt'}", *extra, str(root),
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"the benchmark suite failed (exit {proc.returncode})")
        data = json.loads(out.read_text())
    times = [t for _, t in data["times"]]
    first, rest = times[0], times[1:]
    ms = [t * 1000 for t in rest]
    return common.unchecked_record(
        "pytest_per_test",
        data["engine"],
        data["accelerator"],  # the runner maps kvm onto direct
        {
            "n_tests": n,
            "test": 'ignition_vm.run("true")',
            "pytest_args": extra,
            "prefetch": prefetch,
            "engine_description": data["describe"],
        },
        ms,
        digits=1,
        min_ms=round(min(ms), 1),
        max_ms=round(max(ms), 1),
        session_setup_s=round(first, 2),
        total_wall_s=round(total, 2),
        # Other work on the host skews wall times; record how busy it was.
        load_avg_1m_before=load_before,
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20, help="tests measured (one more runs the setup)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument(
        "--prefetch",
        choices=("on", "off", "both"),
        default="both",
        help="restore the next test's VM in the background (default: measure both ways)",
    )
    p.add_argument("extra", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]
    for prefetch in modes:
        record = run(args.n, args.extra, prefetch)
        print(json.dumps(record, indent=2))
        if not args.no_write:
            # One record per setting, not a growing history; each has its own 'when', so the
            # runner still tells this run's records from those the file held before.
            common.replace_records(RESULTS, [record])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
