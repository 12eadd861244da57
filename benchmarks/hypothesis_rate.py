"""Benchmark: Hypothesis examples per second when every example gets a pristine guest.

The seed's snapshot-fuzzing loop as a pytest user writes it: one ``@given`` test whose every
example first calls ``ignition_vm.reset()`` (in rollback mode an in-place dirty-page rollback;
where the engine cannot roll back, a fresh restore), checks that the marker file the previous
example left is gone, and leaves one of its own. The per-example time is taken inside the test
(reset + the example's two agent round trips), so pytest's session setup (boot, prepare,
snapshot) is not in it. One record per setting in ``benchmarks/results/hypothesis_rate.json``
(``median_ms`` per example, ``examples_per_s`` = 1000 / median).

Usage: ``python -m benchmarks.hypothesis_rate [--examples 30] [--setting ENGINE[:RESET] ...]
[--rounds 1] [--where nested] [--results FILE]``; inside the nested harness for the bundled
VMM: ``python -m pytest_ignition.nested run -- .venv/bin/python -m benchmarks.hypothesis_rate
--setting ignition:rollback --setting qemu:restore --where nested``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.pytest_per_test import Setting

RESULTS = common.RESULTS_DIR / "hypothesis_rate.json"

INNER_TEST = """
import json, os, time

from hypothesis import HealthCheck, given, settings, strategies as st

OUT = os.environ["IGNITION_BENCH_OUT"]
_times = []


@settings(
    max_examples={n}, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.binary(min_size=1, max_size=64))
def test_pristine_every_example(ignition_vm, data):
    t0 = time.perf_counter()
    ignition_vm.reset()
    r = ignition_vm.run("test ! -e /root/marker && cat > /root/marker", input=data)
    assert r.exit_code == 0, "the guest was not pristine: the last example's marker is there"
    assert ignition_vm.read_file("/root/marker") == data
    _times.append(time.perf_counter() - t0)


def teardown_module(module):
    with open(OUT, "w") as f:
        json.dump({{"times": _times, "mode": None}}, f)
"""

INNER_CONFTEST = """
import json, os
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    vm = item.funcargs.get("ignition_vm")
    if vm is not None:
        with open(os.environ["IGNITION_BENCH_OUT"] + ".mode", "w") as f:
            json.dump({"mode": vm.reset_mode, "engine": vm.engine.name,
                       "accelerator": vm.engine.accelerator,
                       "describe": vm.engine.describe()}, f)
"""


def run_once(setting: Setting, examples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ign-hyp-") as d:
        root = Path(d)
        (root / "conftest.py").write_text(INNER_CONFTEST)
        (root / "test_hyp.py").write_text(INNER_TEST.format(n=examples))
        (root / "pytest.ini").write_text("[pytest]\n")
        out = root / "times.json"
        env = dict(os.environ, IGNITION_BENCH_OUT=str(out))
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--basetemp={root / 'bt'}", *setting.pytest_args(), str(root),
        ]  # fmt: skip
        load = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"the benchmark suite failed (exit {proc.returncode}): {cmd}")
        data = json.loads(out.read_text())
        info = json.loads((root / "times.json.mode").read_text())
    return {"times": data["times"], "wall_s": wall, "load": load, **info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=30, help="Hypothesis examples per run")
    p.add_argument(
        "--setting",
        dest="settings",
        action="append",
        type=Setting.parse,
        help="ENGINE[:RESET], repeatable (default: auto:rollback)",
    )
    p.add_argument("--rounds", type=int, default=1, help="runs per setting, interleaved")
    p.add_argument("--where", choices=common.WHERE, help="the 'where' of every record")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    settings = args.settings or [Setting("auto", "rollback")]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    for rnd in range(args.rounds):
        for i, s in enumerate(settings):
            r = run_once(s, args.examples)
            runs[i].append(r)
            med = statistics.median(r["times"]) * 1000
            print(
                f"round {rnd + 1} {s.engine}:{s.reset or '-'} ({r['describe']}, mode "
                f"{r['mode']}): {len(r['times'])} examples, median {med:.0f} ms, "
                f"{1000 / med:.2f} examples/s",
                file=sys.stderr,
                flush=True,
            )
    records = []
    for i, s in enumerate(settings):
        rs = runs[i]
        ms = [t * 1000 for r in rs for t in r["times"]]
        med = statistics.median(ms)
        params = {"examples": args.examples, "reset": rs[0]["mode"], "setting": s.pytest_args()}
        records.append(
            common.unchecked_record(
                "hypothesis_rate",
                rs[0]["engine"],
                # an accelerator name unless told: the runner maps kvm onto direct
                args.where or rs[0]["accelerator"],
                params,
                ms,
                digits=1,
                examples_per_s=round(1000 / med, 2),
                engine_description=rs[0]["describe"],
                wall_s=[round(r["wall_s"], 1) for r in rs],
                load_avg_1m_before=[r["load"] for r in rs],
                when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
        )
    print(json.dumps(records, indent=2))
    if not args.no_write:
        common.replace_records(args.results, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
