"""Benchmark: session setup to the first test's VM, without and with ``--ignition-reuse``.

Runs a one-test suite (a trivial ``pytest_ignition_prepare`` and ``ignition_vm.run("true")``) in
pytest subprocesses. An inner conftest takes the time from ``pytest_sessionstart`` to the start of
the first test's call, when its ``ignition_vm`` is in hand: the session setup a user waits for.
Three modes per round, interleaved so that machine load hits them alike:

* ``off``: the default, a run boots, prepares and snapshots its guest, then restores;
* ``reuse_new``: ``--ignition-reuse`` with a key no cached snapshot has (a fresh salt through
  ``pytest_ignition_snapshot_key``): the same work plus storing the snapshot in the cache;
* ``reuse_hit``: the next run with the same key: restore only.

Writes one ``session_setup`` record per engine and mode to ``benchmarks/results/session_setup.json``
(in place of earlier records of the same engine/where/mode), with ``ratio_vs_off`` on the reused
ones and, with both engines in one run, ``ratio_vs_qemu`` on the bundled VMM's. The cached
snapshots it made are removed at the end.

Usage: ``python -m benchmarks.session_setup [--rounds 3] [--engine qemu|ignition|qemu,ignition]
[--where tcg|nested|direct] [--results FILE]``. Both engines in the nested harness (the bundled
VMM runs Linux guests only there on this machine; QEMU uses the harness's real KVM)::

    python -m pytest_ignition.nested run -- .venv/bin/python -m benchmarks.session_setup \
        --engine qemu,ignition --where nested --rounds 2 \
        --results benchmarks/results/session_setup_nested.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "session_setup.json"
MODES = ("off", "reuse_new", "reuse_hit")

INNER_CONFTEST = """
import json, os, time
import pytest

OUT = os.environ["IGNITION_BENCH_OUT"]
_t = {}


def pytest_sessionstart(session):
    _t["start"] = time.perf_counter()


def pytest_ignition_prepare(vm):
    vm.run("echo prepared > /etc/bench-prepared").check()


def pytest_ignition_snapshot_key(config):
    return os.environ.get("IGNITION_BENCH_SALT", "")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    if "first_vm" not in _t:
        _t["first_vm"] = time.perf_counter()


def pytest_sessionfinish(session):
    from pytest_ignition.fixtures import get_session

    engine, reason = get_session(session.config).engine_info()
    with open(OUT, "w") as f:
        json.dump({
            "setup_s": _t.get("first_vm", 0) - _t.get("start", 0) if "first_vm" in _t else None,
            "engine": getattr(engine, "name", None),
            "describe": engine.describe() if engine is not None else reason,
        }, f)
"""

INNER_TESTS = """
def test_first(ignition_vm):
    assert ignition_vm.run("cat /etc/bench-prepared").stdout == "prepared\\n"
"""


class _Missed(RuntimeError):
    """The reused run found no snapshot to reuse."""


def _run_once(
    suite: Path, engine: str, mode: str, salt: str, boot_timeout: float
) -> tuple[float, str]:
    out = suite / f"out-{uuid.uuid4().hex[:8]}.json"
    env = {
        **os.environ,
        "IGNITION_BENCH_OUT": str(out),
        "IGNITION_BENCH_SALT": salt,
        "IGNITION_ENGINE": engine,
        "IGNITION_PREFETCH": "0",
        "IGNITION_TIMEOUT": f"{boot_timeout:g}",  # a deadline only: the clock is the hooks'
    }
    env.pop("IGNITION_REUSE", None)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]
    if mode != "off":
        args.append("--ignition-reuse")
    r = subprocess.run(
        [*args, str(suite)],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=boot_timeout + 900,
    )
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"{mode}: pytest exited {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
        )
    data = json.loads(out.read_text())
    if data["setup_s"] is None:
        raise RuntimeError(f"{mode}: the test never ran:\n{r.stdout[-3000:]}")
    if mode == "reuse_hit" and "reused (same key" not in r.stdout:
        raise _Missed(f"reuse_hit did not reuse: {r.stdout[-1500:]}")
    return float(data["setup_s"]), str(data["describe"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--engine",
        default="qemu",
        help="qemu, ignition, or both comma separated (qemu,ignition: interleaved per round, "
        "the engine that goes first alternating)",
    )
    ap.add_argument("--where", default=None, help="tcg | nested | direct (default: QEMU's here)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument(
        "--boot-timeout",
        type=float,
        default=900,
        help="the inner runs' --ignition-timeout (seconds; the nested harness under load "
        "has taken over 120 s, the default, to boot the bundled VMM's guest)",
    )
    ns = ap.parse_args()
    engines = [e.strip() for e in ns.engine.split(",") if e.strip()]
    if not engines or any(e not in ("qemu", "ignition") for e in engines):
        ap.error(f"--engine: qemu, ignition or qemu,ignition (not {ns.engine!r})")
    wheres: dict[str, str] = {}
    for engine in engines:
        if ns.where is not None:
            wheres[engine] = ns.where
        elif engine == "qemu":
            from benchmarks.__main__ import qemu_where

            wheres[engine] = qemu_where()
        else:
            wheres[engine] = "direct"
    from pytest_ignition import reuse

    store = reuse.store_dir()
    before = set(store.iterdir()) if store.exists() else set()
    samples = {e: {m: [] for m in MODES} for e in engines}
    describe = dict.fromkeys(engines, "")
    load = {"loadavg_1m_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="bench-setup-") as d:
        suite = Path(d)
        (suite / "conftest.py").write_text(INNER_CONFTEST)
        (suite / "test_first.py").write_text(INNER_TESTS)
        try:
            retries = 2  # a guest rebuilt between two runs (its sources edited) misses the hit
            i = 0
            while i < ns.rounds:
                order = engines if i % 2 == 0 else engines[::-1]
                got: dict[str, dict[str, float]] = {}
                try:
                    for engine in order:
                        salt = f"bench-{uuid.uuid4().hex}"
                        got[engine] = {}
                        for mode in MODES:
                            t0 = time.monotonic()
                            secs, describe[engine] = _run_once(
                                suite, engine, mode, salt, ns.boot_timeout
                            )
                            got[engine][mode] = secs * 1000
                            print(
                                f"round {i + 1}/{ns.rounds} {engine:<8} {mode:<10} setup to "
                                f"first VM {secs:7.2f} s (run {time.monotonic() - t0:.1f} s)",
                                flush=True,
                            )
                except _Missed as e:
                    if retries == 0:
                        raise
                    retries -= 1
                    print(f"round {i + 1}: {e}; the round is repeated", flush=True)
                    continue
                for engine, modes in got.items():
                    for mode, ms in modes.items():
                        samples[engine][mode].append(ms)
                i += 1
        finally:
            for p in (set(store.iterdir()) - before) if store.exists() else ():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    load["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    records = []
    medians: dict[tuple[str, str], float] = {}
    for engine in engines:
        off = common.summarize_ms(samples[engine]["off"])["median_ms"]
        for mode in MODES:
            extra: dict[str, object] = {
                "engine_describe": describe[engine],
                "rounds": ns.rounds,
                **load,
            }
            if len(engines) > 1:
                extra["same_run_as"] = [e for e in engines if e != engine]
            med = common.summarize_ms(samples[engine][mode])["median_ms"]
            medians[engine, mode] = med
            if mode != "off" and off:
                extra["ratio_vs_off"] = round(med / off, 3)
            if engine == "ignition" and ("qemu", mode) in medians and medians["qemu", mode]:
                extra["ratio_vs_qemu"] = round(med / medians["qemu", mode], 3)
            records.append(
                common.unchecked_record(
                    "session_setup",
                    engine,
                    wheres[engine],
                    {"mode": mode},
                    samples[engine][mode],
                    **extra,
                )
            )
    for r in records:
        print(
            f"{r['engine']}/{r['where']} {r['params']['mode']:<10} median {r['median_ms'] / 1000:.2f} s"
            + (f" ({r['ratio_vs_off']}x of off)" if "ratio_vs_off" in r else "")
            + (f" ({r['ratio_vs_qemu']}x of QEMU's)" if "ratio_vs_qemu" in r else "")
        )
    common.replace_records(ns.results, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
