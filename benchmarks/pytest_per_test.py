"""Benchmark: pytest wall time per trivial test with the plugin (session setup excluded).

Runs a generated suite of N tests, each ``ignition_vm.run("true")``, in a pytest subprocess.
An inner conftest times every test's whole protocol (setup + call + teardown); the first
test, which carries the session setup (boot, prepare, snapshot), is reported separately and
left out of the per-test statistics. Writes one record per prefetch mode to
``benchmarks/results/pytest_per_test.json``, in place of the record an earlier run wrote for
the same metric, engine, where and params (records of other settings stay):

    {"metric": "pytest_per_test", "engine": "qemu", "where": "tcg", "params": {...},
     "median_ms", "p10_ms", "p90_ms", "n", "host", ...}

``--setting ENGINE[:RESET]`` (repeatable) measures named engines and reset modes instead of the
plugin's choice; ``--rounds R`` runs the suite R times per setting, interleaving the settings so
that a change in machine load hits them alike; ``--where nested`` labels records measured inside
the nested harness (the engines there see the harness's KVM).

Usage: ``python -m benchmarks.pytest_per_test [-n 20] [--setting ignition:rollback ...]
[--rounds 1] [--where nested] [--results FILE] [-- extra pytest args]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "pytest_per_test.json"

INNER_CONFTEST = """
import json, os, time
import pytest

OUT = os.environ["IGNITION_BENCH_OUT"]
_times = []
_modes = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.perf_counter()
    try:
        return (yield)
    finally:
        _times.append((item.name, time.perf_counter() - t0))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    vm = item.funcargs.get("ignition_vm")
    if vm is not None:
        _modes.add(vm.reset_mode)


def pytest_sessionfinish(session):
    from pytest_ignition.fixtures import get_session

    engine, reason = get_session(session.config).engine_info()
    with open(OUT, "w") as f:
        json.dump({
            "times": _times,
            "engine": getattr(engine, "name", None),
            "accelerator": getattr(engine, "accelerator", None),
            "describe": engine.describe() if engine is not None else reason,
            "reset_modes": sorted(_modes),
        }, f)
"""

INNER_TESTS = """
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_trivial(ignition_vm, i):
    assert ignition_vm.run("true").exit_code == 0
"""


@dataclass
class Setting:
    """One engine setting to measure: ``auto`` (what the plugin picks) or an engine name, and
    a reset mode (``None``: the plugin's default)."""

    engine: str = "auto"
    reset: str | None = None

    @classmethod
    def parse(cls, text: str) -> Setting:
        engine, _, reset = text.partition(":")
        if engine not in ("auto", "ignition", "qemu") or reset not in ("", "restore", "rollback"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected ENGINE[:RESET], ENGINE one of auto, ignition, qemu and "
                "RESET one of restore, rollback"
            )
        return cls(engine, reset or None)

    def pytest_args(self) -> list[str]:
        args = [] if self.engine == "auto" else [f"--ignition-engine={self.engine}"]
        return args + ([f"--ignition-reset={self.reset}"] if self.reset else [])


@dataclass
class Suite:
    """What one pytest run of the generated suite measured."""

    times_s: list[float]  # per test, in order; the first carries the session setup
    engine: str | None
    accelerator: str | None
    describe: str
    reset_modes: list[str]
    total_s: float
    load_before: float


def run_suite(n: int, extra: list[str], prefetch: bool = True) -> Suite:
    """Run the generated suite of ``n + 1`` tests once in a pytest subprocess."""
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
            raise SystemExit(f"the benchmark suite failed (exit {proc.returncode}): {cmd}")
        data = json.loads(out.read_text())
    return Suite(
        [t for _, t in data["times"]],
        data["engine"],
        data["accelerator"],
        data["describe"],
        data.get("reset_modes", []),
        total,
        load_before,
    )


def to_record(
    suites: list[Suite], n: int, extra: list[str], prefetch: bool, where: str | None
) -> dict:
    """One record from the suites of one setting (each suite's first test left out)."""
    first = suites[0]
    ms = [t * 1000 for s in suites for t in s.times_s[1:]]
    modes = sorted({m for s in suites for m in s.reset_modes})
    params = {
        "n_tests": n,
        "test": 'ignition_vm.run("true")',
        "pytest_args": extra,
        "prefetch": prefetch,
        "engine_description": first.describe,
    }
    if len(modes) == 1:
        params["reset"] = modes[0]
    if where is not None:
        params["accel"] = first.accelerator
    return common.unchecked_record(
        "pytest_per_test",
        first.engine,
        where or first.accelerator,  # an accelerator name: the runner maps kvm onto direct
        params,
        ms,
        digits=1,
        min_ms=round(min(ms), 1),
        max_ms=round(max(ms), 1),
        runs=len(suites),
        session_setup_s=[round(s.times_s[0], 2) for s in suites],
        total_wall_s=[round(s.total_s, 2) for s in suites],
        # Other work on the host skews wall times; record how busy it was.
        load_avg_1m_before=[s.load_before for s in suites],
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20, help="tests measured per run (one more: setup)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument(
        "--prefetch",
        choices=("on", "off", "both"),
        default="both",
        help="restore the next test's VM in the background (default: measure both ways)",
    )
    p.add_argument(
        "--setting",
        dest="settings",
        action="append",
        type=Setting.parse,
        help="ENGINE[:RESET] to measure, repeatable (default: auto, the plugin's choice)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of the suite per setting, the settings interleaved round by round",
    )
    p.add_argument(
        "--where", choices=common.WHERE, help="record this 'where' (e.g. nested) for every record"
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file to update")
    p.add_argument("extra", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.prefetch]
    settings = args.settings or [Setting()]
    combos = [(s, pf) for s in settings for pf in modes]
    suites: dict[int, list[Suite]] = {i: [] for i in range(len(combos))}
    for rnd in range(args.rounds):
        for i, (setting, prefetch) in enumerate(combos):
            suite = run_suite(args.n, [*setting.pytest_args(), *args.extra], prefetch)
            suites[i].append(suite)
            per = sorted(suite.times_s[1:])
            print(
                f"round {rnd + 1}/{args.rounds} {setting.engine}:{setting.reset or '-'} "
                f"prefetch={prefetch}: setup {suite.times_s[0]:.2f} s, "
                f"per test median {per[len(per) // 2] * 1000:.0f} ms ({suite.describe})",
                file=sys.stderr,
                flush=True,
            )
    records = [
        to_record(suites[i], args.n, [*s.pytest_args(), *args.extra], pf, args.where)
        for i, (s, pf) in enumerate(combos)
    ]
    print(json.dumps(records, indent=2))
    if not args.no_write:
        # One record per setting, not a growing history; each has its own 'when', so the
        # runner still tells this run's records from those the file held before.
        common.replace_records(args.results, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
