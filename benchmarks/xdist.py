"""Benchmark: wall time of a 100-trivial-VM-test suite without xdist, at ``-n 1``, ``-n 2``,
and over two hosts (network namespaces with their own sshd: ``-d --tx ssh=...`` to each).

Each test is ``ignition_vm.run("true")`` (QEMU engine). Per setting and round: the suite's wall
time (pytest start to exit, session setup included), the snapshot boots it made, and the
median per-test protocol time (setup + call + teardown, from junit). The per-test overhead a
setting adds is ``(wall - wall without xdist) / tests``: what xdist (worker start, collection on
each worker, scheduling) and, for the hosts, ssh and one more snapshot cost per test. The two
namespace hosts share this machine's cores, so they show the protocol's overhead, not a
speed-up. Settings are interleaved per round so that load changes hit them alike.

Writes ``benchmarks/results/xdist.json`` (records as in :mod:`benchmarks.common`, metric
``xdist_wall``) and prints a table. Needs root (namespaces), sshd, QEMU and the built guest.

Usage: ``python -m benchmarks.xdist [--tests 100] [--rounds 1] [--settings plain,n1,n2,hosts]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "xdist.json"
SETTINGS = ("plain", "n1", "n2", "hosts")

SUITE = """
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_trivial(ignition_vm, i):
    assert ignition_vm.run("true").exit_code == 0
"""


def _cases(xml: Path) -> list[float]:
    return [float(c.get("time", "nan")) for c in ET.parse(xml).getroot().iter("testcase")]


def run_once(
    setting: str, suite: Path, rig: object | None, py: str = sys.executable
) -> dict[str, object]:
    xml = suite / f"junit-{setting}.xml"
    args = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignition-engine=qemu"]
    args += [f"--junitxml={xml}", "-o", "junit_family=xunit2"]
    if setting == "plain":
        args += ["-p", "no:xdist"]
    elif setting in ("n1", "n2"):
        args += ["-n", setting[1]]
    else:
        assert rig is not None
        args += ["-d"]
        for alias in ("ign-a", "ign-b"):
            spec = f"ssh={alias}//ssh_config={rig.ssh_config}//python={py}//chdir={suite}"  # type: ignore[attr-defined]
            args += ["--tx", spec]
        args = rig.controller(args)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    r = subprocess.run(args, cwd=suite, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{setting}: pytest exited {r.returncode}:\n{out[-3000:]}")
    times = _cases(xml)
    m = re.search(r"(\d+) snapshot\(s\) booted and prepared: boot to agent-ready (.*)", out)
    boots = [float(x.strip().rstrip(" s")) for x in m.group(2).split(",")] if m else []
    return {
        "wall_s": wall,
        "tests": len(times),
        "per_test_median_ms": statistics.median(times) * 1000,
        "boots": boots,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    settings = [s for s in a.settings.split(",") if s]
    bad = set(settings) - set(SETTINGS)
    if bad:
        ap.error(f"unknown settings {sorted(bad)}; choose from {', '.join(SETTINGS)}")

    from pytest_ignition import _netns
    from pytest_ignition.guest import find_guest

    guest = find_guest()
    if guest is None:
        print("the guest is not built: python -m pytest_ignition.guest build", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ign-xdist-bench-"))
    suite = work / "suite"
    suite.mkdir()
    (suite / "test_trivial.py").write_text(SUITE.format(n=a.tests))
    (suite / "pytest.ini").write_text("[pytest]\n")
    rig = None
    results: dict[str, list[dict[str, object]]] = {s: [] for s in settings}
    try:
        if "hosts" in settings:
            rig = _netns.Rig(work / "rig")
            for name in ("ign-a", "ign-b"):
                h = rig.add_host(name)
                _netns.seed_cache(h.cache, guest.kernel, guest.initrd)
        for rnd in range(a.rounds):
            for s in settings:
                res = run_once(s, suite, rig)
                results[s].append(res)
                print(
                    f"round {rnd + 1} {s:6s} wall {res['wall_s']:.1f} s, "
                    f"per test {res['per_test_median_ms']:.0f} ms, boots {res['boots']}",
                    flush=True,
                )
    finally:
        if rig is not None:
            rig.close()
        shutil.rmtree(work, ignore_errors=True)

    records = []
    base = (
        statistics.median(r["wall_s"] for r in results["plain"]) if results.get("plain") else None
    )  # type: ignore[misc]
    print(f"\n{a.tests} trivial VM tests (QEMU engine, TCG), medians of {a.rounds} round(s):")
    base_per = (
        statistics.median(float(r["per_test_median_ms"]) for r in results["plain"])  # type: ignore[arg-type]
        if results.get("plain")
        else None
    )
    print("setting  wall s  per-test median ms  vs plain ms  wall vs plain ms/test  snapshot boots")
    for s in settings:
        walls = [float(r["wall_s"]) for r in results[s]]  # type: ignore[arg-type]
        wall = statistics.median(walls)
        per = statistics.median(float(r["per_test_median_ms"]) for r in results[s])  # type: ignore[arg-type]
        over = (wall - base) / a.tests * 1000 if base is not None else None
        nboots = statistics.median(len(r["boots"]) for r in results[s])  # type: ignore[arg-type]
        delta = per - base_per if base_per is not None else None
        print(
            f"{s:7s} {wall:7.1f}  {per:18.0f}  "
            f"{'' if delta is None else f'{delta:+.0f}':>11s}  "
            f"{'' if over is None else f'{over:+.0f}':>21s}  {nboots:g}"
        )
        records.append(
            common.unchecked_record(
                "xdist_wall",
                "qemu",
                "tcg",
                {"setting": s, "tests": a.tests},
                [w * 1000 for w in walls],
                per_test_median_ms=round(per, 2),
                per_test_vs_plain_ms=None if delta is None else round(delta, 2),
                wall_vs_plain_ms_per_test=None if over is None else round(over, 2),
                snapshot_boots=nboots,
                machine=common.machine_info(),
                when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
        )
    common.write_json(a.results, records)
    print(f"wrote {a.results}")
    print(json.dumps([{k: r[k] for k in ("params", "median_ms")} for r in records]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
