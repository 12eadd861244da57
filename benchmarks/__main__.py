"""``python -m benchmarks``: run every benchmark script, merge their records, write the report.

Each benchmark is a script ``benchmarks/<name>.py`` run as a subprocess (``python -m
benchmarks.<name> ...``) that writes its own ``benchmarks/results/<name>.json``. This runner
owns the order, the repeat counts (full or ``--quick``), a warm-up, the time budget, and the
merge: the records a script added in this run go to ``benchmarks/results/latest.json``;
an expected metric that no script produced becomes an ``absent`` record naming the reason (the
script is missing, failed, timed out or was not selected). Then :mod:`benchmarks.report`
writes ``latest.md`` and the plots. A failing script never stops the run.

Usage: ``python -m benchmarks [--quick] [--only NAME,...] [--budget SECONDS] [--update-readme]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common, report

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
LOG_DIR = ROOT / "build" / "bench-logs"
# Accelerator names some scripts put in "where" → the record format's "where".
WHERE_ALIASES = {"kvm": "direct", "hvf": "direct", "whpx": "direct"}


@dataclass
class Expect:
    """A record the run should produce: metric, engine, where, and params it must match."""

    metric: str
    engine: str
    where: str
    params: dict[str, Any] = field(default_factory=dict)

    def matches(self, rec: dict[str, Any]) -> bool:
        if (rec.get("metric"), rec.get("engine"), rec.get("where")) != (
            self.metric,
            self.engine,
            self.where,
        ):
            return False
        p = rec.get("params") or {}
        for k, v in self.params.items():
            # Scripts spell guest memory differently (memory_mib, mem_mib, ...).
            got = report.memory_mib(p) if k == "memory_mib" else p.get(k)
            if got != v:
                return False
        return True


@dataclass
class Unit:
    """One subprocess run of one benchmark script."""

    name: str  # unique, for the log and the report
    group: str  # what --only selects (the script's name)
    module: str  # benchmarks.<module>
    results: str  # file name in benchmarks/results/
    args: list[str]
    quick_args: list[str]
    expects: list[Expect]
    timeout_s: float
    pass_quick_flag: bool = False  # add --quick under --quick when the script's --help has it
    keep: bool = True  # False: a warm-up whose records are discarded
    script: Path | None = None  # run this file instead of benchmarks/<module>.py (tests)
    via: list[str] = field(default_factory=list)  # a wrapper command (the nested harness)

    def script_path(self) -> Path:
        return self.script or BENCH_DIR / f"{self.module}.py"

    def argv(self, args: list[str], wrapped: bool = True) -> list[str]:
        if self.script is not None:
            cmd = [sys.executable, str(self.script), *args]
        else:
            cmd = [sys.executable, "-m", f"benchmarks.{self.module}", *args]
        return [*self.via, *cmd] if wrapped else cmd


def qemu_where() -> str:
    """The ``where`` of QEMU records on this machine (its accelerator, normalized)."""
    try:
        from pytest_ignition.engines.select import decide, probe_host

        accel = decide("qemu", probe_host()).accelerator
    except Exception:  # noqa: BLE001 - the runner must still run without the package's probe
        accel = "tcg"
    return WHERE_ALIASES.get(accel, accel)


NESTED_PER_TEST = [
    "--where", "nested", "--results", "benchmarks/results/pytest_per_test_nested.json",
    "--prefetch", "on",
    "--setting", "ignition:restore", "--setting", "ignition:rollback", "--setting", "qemu:restore",
]  # fmt: skip


NESTED_HYPOTHESIS = [
    "--where", "nested", "--results", "benchmarks/results/hypothesis_rate_nested.json",
    "--setting", "ignition:rollback", "--setting", "ignition:restore", "--setting", "qemu:restore",
]  # fmt: skip


def _harness(timeout_s: float) -> list[str]:
    """The wrapper that runs a script inside the nested harness; the harness's own timeout
    fires before the runner's, so that it can shut its guest down."""
    return [
        sys.executable,
        "-m",
        "pytest_ignition.nested",
        "run",
        "--timeout",
        str(timeout_s - 30),
        "--",
    ]


def plan(quick: bool, qwhere: str) -> list[Unit]:
    """The units of a run, in order (cheap and host-side first, the nested harness last)."""
    sizes = (128, 2048)
    units = [
        Unit(
            "qemu_warmup",
            "qemu_engine",
            "qemu_engine",
            "qemu.json",
            ["--boots", "1", "--snapshots", "1", "--restores", "1", "--no-write"],
            ["--boots", "1", "--snapshots", "1", "--restores", "1", "--no-write"],
            [],
            180,
            keep=False,
        ),
        Unit(
            "vmm_restore",
            "vmm_restore",
            "vmm_restore",
            "vmm.json",
            [],
            [],
            [
                Expect("restore_time_host", "ignition", "direct", {"memory_mib": m})
                for m in (128, 512, 2048)
            ]
            + [
                Expect("rollback_time", "ignition", "direct"),
                Expect("snapshot_time", "ignition", "direct"),
                Expect("process_restore", "ignition", "direct", {"via": "fork"}),
            ],
            300,
            pass_quick_flag=True,
        ),
    ]
    for mib in sizes:
        units.append(
            Unit(
                f"qemu_engine_{mib}M",
                "qemu_engine",
                "qemu_engine",
                "qemu.json",
                ["--boots", "1", "--snapshots", "3", "--restores", "10", "--memory", str(mib)],
                ["--boots", "1", "--snapshots", "1", "--restores", "2", "--memory", str(mib)],
                [Expect("restore_to_ready", "qemu", qwhere, {"memory_mib": mib})],
                240,
            )
        )
    # The 512 MiB run last of the three, so that results/qemu.json keeps the main numbers.
    units.append(
        Unit(
            "qemu_engine_512M",
            "qemu_engine",
            "qemu_engine",
            "qemu.json",
            ["--boots", "5", "--snapshots", "10", "--restores", "15", "--memory", "512"],
            ["--boots", "1", "--snapshots", "2", "--restores", "3", "--memory", "512"],
            [
                Expect(m, "qemu", qwhere, {"memory_mib": 512})
                for m in ("guest_boot_time", "launch_to_ready", "snapshot_time", "restore_to_ready")
            ],
            300,
        )
    )
    # The arm64 guest on qemu-system-aarch64 -M virt (TCG on an x86_64 host: an emulated CPU).
    awhere = qwhere if os.uname().machine in ("aarch64", "arm64") else "tcg"
    units.append(
        Unit(
            "qemu_engine_aarch64",
            "qemu_engine",
            "qemu_engine",
            "qemu_aarch64.json",
            ["--boots", "3", "--snapshots", "3", "--restores", "10", "--memory", "512"]
            + ["--arch", "aarch64", "--results", "benchmarks/results/qemu_aarch64.json"],
            ["--boots", "1", "--snapshots", "1", "--restores", "2", "--memory", "512"]
            + ["--arch", "aarch64", "--results", "benchmarks/results/qemu_aarch64.json"],
            [
                Expect(m, "qemu", awhere, {"memory_mib": 512, "arch": "aarch64"})
                for m in ("guest_boot_time", "launch_to_ready", "restore_to_ready")
            ],
            600,
        )
    )
    # Root images: build (cold) and cache hit, host-side only.
    units.append(
        Unit(
            "images",
            "images",
            "images",
            "images.json",
            [],
            [],
            [
                Expect("image_build_time", "builder", "host", {"image": i, "cache": c})
                for i in ("debian:bookworm", "oci-archive")
                for c in ("cold", "hit")
            ],
            1200,
            pass_quick_flag=True,
        )
    )
    # Boot and restore with a Debian image as the root, beside the initramfs-only guest, one
    # run (images.json, part boot-<where>); the bundled VMM's in the harness below.
    image_expects = [
        Expect(m, "qemu", qwhere, {"memory_mib": 512, "image": "debian:bookworm"})
        for m in ("guest_boot_time", "launch_to_ready", "restore_to_ready")
    ]
    units.append(
        Unit(
            "image_boot",
            "image_boot",
            "image_boot",
            "images.json",
            ["--boots", "5", "--restores", "10"],
            [],
            image_expects,
            600,
            pass_quick_flag=True,
        )
    )
    # The guest kernel before and after the issue-10 additions (images.json, part
    # kernel-cost). Needs the "before" kernel built once (python -m benchmarks.kernel_cost
    # build, ~10 min); without it the script exits 3 and its metrics are marked absent.
    units.append(
        Unit(
            "kernel_cost",
            "kernel_cost",
            "kernel_cost",
            "images.json",
            ["--boots", "10", "--debug-boots", "5"],
            [],
            [
                Expect(m, "qemu", qwhere, {"kernel_fragment": k})
                for m in (
                    "guest_boot_time",
                    "launch_to_ready",
                    "initcall_time",
                    "launch_to_kernel_log",
                    "kernel_to_init",
                )
                for k in ("before", "after")
            ],
            600,
            pass_quick_flag=True,
        )
    )
    # The seed's browser table: cold start vs restore of a warm Chromium guest, vs host Chromium.
    units.append(
        Unit(
            "browser",
            "browser",
            "browser",
            "browser.json",
            ["--boots", "1", "--restores", "8", "--host-starts", "5"],
            ["--boots", "1", "--restores", "2", "--host-starts", "1"],
            [
                Expect(m, "qemu", qwhere)
                for m in (
                    "browser_cold_to_cdp",
                    "browser_boot_to_ready",
                    "browser_restore_to_cdp",
                    "browser_restore_to_paint",
                )
            ]
            + [
                Expect("host_chromium_cold_to_cdp", "host", "host"),
                Expect("host_chromium_cold_to_paint", "host", "host"),
            ],
            1200,
        )
    )
    units.append(
        Unit(
            "pytest_per_test",
            "pytest_per_test",
            "pytest_per_test",
            "pytest_per_test.json",
            ["-n", "20", "--prefetch", "both"],
            ["-n", "3", "--prefetch", "on"],
            [Expect("pytest_per_test", "qemu", qwhere)],
            420,
        )
    )
    units.append(
        Unit(
            "hypothesis_rate",
            "hypothesis_rate",
            "hypothesis_rate",
            "hypothesis_rate.json",
            ["--examples", "30", "--setting", "qemu:restore"],
            ["--examples", "5", "--setting", "qemu:restore"],
            [Expect("hypothesis_rate", "qemu", qwhere)],
            420,
        )
    )
    units.append(
        Unit(
            "session_setup",
            "session_setup",
            "session_setup",
            "session_setup.json",
            ["--rounds", "3"],
            ["--rounds", "1"],
            [
                Expect("session_setup", "qemu", qwhere, {"mode": m})
                for m in ("off", "reuse_new", "reuse_hit")
            ],
            600,
        )
    )
    # Networking: TCP over the agent channel (and QEMU's slirp beside it), guest <-> guest.
    units.append(
        Unit(
            "network",
            "network",
            "network",
            "network.json",
            ["--rtts", "200", "--mib", "16", "--repeats", "3"],
            ["--rtts", "20", "--mib", "2", "--repeats", "1"],
            [
                Expect(m, "qemu", qwhere, {"path": p})
                for m, p in (
                    ("net_rtt", "agent-forward"),
                    ("net_throughput", "agent-forward"),
                    ("net_rtt", "qemu-slirp-hostfwd"),
                    ("net_rtt", "segment"),
                )
            ],
            900,
        )
    )
    nested_timeout = 720
    units.append(
        Unit(
            "nested_boot",
            "nested_boot",
            "nested_boot",
            "nested.json",
            # 15 restores a side: at 5 the restore ratio's median moved by a few % run to run
            ["--runs", "5", "--restores", "15"],
            ["--runs", "1"],
            [
                Expect(m, e, "nested")
                for m in ("guest_boot_time", "launch_to_ready", "restore_to_ready")
                for e in ("ignition", "qemu")
            ],
            nested_timeout,
            pass_quick_flag=True,
            via=_harness(nested_timeout),
        )
    )
    # The bundled VMM runs Linux guests only in the harness here (PVM), so its pytest wall time
    # is measured there, interleaved with QEMU+KVM in the same harness. 20 tests a run: with 6
    # the first tests (TCG still translating new code paths) weigh more in the median (harness
    # runs of f1eb6d0, 2026-12-04: rollback 70 ms a test at n=6, 60 at n=20; restore 204, 154).
    per_test_timeout = 900
    units.append(
        Unit(
            "pytest_per_test_nested",
            "pytest_per_test",
            "pytest_per_test",
            "pytest_per_test_nested.json",
            [*NESTED_PER_TEST, "-n", "20", "--rounds", "2"],
            [*NESTED_PER_TEST, "-n", "2", "--rounds", "1"],
            [
                Expect("pytest_per_test", "ignition", "nested", {"reset": "restore"}),
                Expect("pytest_per_test", "ignition", "nested", {"reset": "rollback"}),
                Expect("pytest_per_test", "qemu", "nested", {"reset": "restore"}),
            ],
            per_test_timeout,
            via=_harness(per_test_timeout),
        )
    )
    # Hypothesis examples on a pristine guest each: in-place rollback vs restores, same harness.
    hyp_timeout = 900
    units.append(
        Unit(
            "hypothesis_rate_nested",
            "hypothesis_rate",
            "hypothesis_rate",
            "hypothesis_rate_nested.json",
            [*NESTED_HYPOTHESIS, "--examples", "30"],
            [*NESTED_HYPOTHESIS, "--examples", "5"],
            [
                Expect("hypothesis_rate", "ignition", "nested", {"reset": "rollback"}),
                Expect("hypothesis_rate", "ignition", "nested", {"reset": "restore"}),
                Expect("hypothesis_rate", "qemu", "nested", {"reset": "restore"}),
            ],
            hyp_timeout,
            via=_harness(hyp_timeout),
        )
    )
    # Boot and restore with a Debian image in the harness: bundled VMM and QEMU+KVM.
    image_timeout = 900
    units.append(
        Unit(
            "image_boot_nested",
            "image_boot",
            "image_boot",
            "images.json",
            ["--boots", "3", "--restores", "5"],
            [],
            [
                Expect(m, e, "nested", {"image": "debian:bookworm"})
                for m in ("guest_boot_time", "launch_to_ready", "restore_to_ready")
                for e in ("ignition", "qemu")
            ],
            image_timeout,
            pass_quick_flag=True,
            via=_harness(image_timeout),
        )
    )
    # The bundled VMM's tunnels and virtio-net (segment) in the harness, beside QEMU+KVM in the
    # same harness run (network.json, where=nested).
    net_args = ["--engine", "both", "--parts", "tunnels,segment"]
    units.append(
        Unit(
            "network_nested",
            "network",
            "network",
            "network.json",
            [*net_args, "--rtts", "100", "--mib", "4", "--repeats", "2"],
            [*net_args, "--rtts", "10", "--mib", "1", "--repeats", "1"],
            [
                Expect(m, e, "nested", {"path": p})
                for e in ("ignition", "qemu")
                for m, p in (
                    ("net_rtt", "agent-forward"),
                    ("net_throughput", "agent-forward"),
                    ("net_rtt", "segment"),
                )
            ],
            nested_timeout,
            via=_harness(nested_timeout),
        )
    )
    return units


def _canon(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True)


def new_records(before: list[dict], after: list[dict]) -> list[dict]:
    """Records in ``after`` that were not in ``before`` (scripts append or rewrite)."""
    seen: dict[str, int] = {}
    for r in before:
        seen[_canon(r)] = seen.get(_canon(r), 0) + 1
    out = []
    for r in after:
        c = _canon(r)
        if seen.get(c, 0) > 0:
            seen[c] -= 1
        else:
            out.append(r)
    return out


def normalize(rec: dict[str, Any], unit: str, when: str) -> dict[str, Any]:
    """A copy with ``where`` in the record format's vocabulary and the producing unit noted."""
    rec = dict(rec)
    where = rec.get("where")
    if where in WHERE_ALIASES:
        rec["params"] = {**(rec.get("params") or {}), "accel": where}
        rec["where"] = WHERE_ALIASES[where]
    rec.setdefault("when", when)
    rec["unit"] = unit
    return rec


def _short(arg: str) -> str:
    """An argument as the report shows it: the interpreter as ``python``, paths relative."""
    if arg == sys.executable:
        return "python"
    try:
        return str(Path(arg).relative_to(ROOT)) if arg.startswith("/") else arg
    except ValueError:
        return arg


def _has_flag(unit: Unit, flag: str) -> bool:
    try:
        out = subprocess.run(
            unit.argv(["--help"], wrapped=False),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out.stdout


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-400:]


def run_unit(
    unit: Unit,
    quick: bool,
    timeout_s: float,
    results_dir: Path | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Run one unit; return its status and the records it added to its results file."""
    status: dict[str, Any] = {"unit": unit.name, "group": unit.group, "records": []}
    try:  # the machine is shared: how busy it was when this script started
        status["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if not unit.script_path().exists():
        status.update(ok=False, seconds=0.0, reason=f"{unit.script_path().name} does not exist")
        return status
    args = list(unit.quick_args if quick else unit.args)
    if quick and unit.pass_quick_flag and _has_flag(unit, "--quick"):
        args.append("--quick")
    results = (results_dir or common.RESULTS_DIR) / unit.results
    before = common.load_records(results)
    log_dir = log_dir or LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{unit.name}.log"
    cmd = unit.argv(args)
    status["command"] = " ".join(_short(a) for a in cmd)
    env = dict(os.environ, PYTHONUNBUFFERED="1", IGNITION_BENCH_QUICK="1" if quick else "0")
    t0 = time.monotonic()
    with open(log, "w") as out:
        # A session of its own so that a timeout can end the script and everything it started.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            rc = None
        except KeyboardInterrupt:
            _kill_session(proc)
            raise
    status["seconds"] = round(time.monotonic() - t0, 1)
    if rc is None:
        status.update(ok=False, reason=f"timed out after {timeout_s:.0f} s (log {log})")
        return status
    if rc != 0:
        status.update(ok=False, reason=f"exit {rc}: {_tail(log)}")
        return status
    if not unit.keep:
        status.update(ok=True, reason="warm-up, records discarded")
        return status
    added = new_records(before, common.load_records(results))
    if not added:
        status.update(ok=False, reason=f"exit 0 but no new records in results/{unit.results}")
        return status
    status.update(ok=True, records=added)
    return status


def _kill_session(proc: subprocess.Popen) -> None:
    """End the script we started and its children (its own process group), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def warm_page_cache() -> None:
    """Read the guest kernel/initrd and QEMU once, so that the first timed boot is not cold."""
    paths: list[Path] = []
    try:
        from pytest_ignition.guest import find_guest

        g = find_guest()
        if g is not None:
            paths += [Path(g.kernel), Path(g.initrd)]
    except Exception:  # noqa: BLE001 - a warm-up is best effort
        pass
    paths.append(Path("/usr/bin/qemu-system-x86_64"))
    for p in paths:
        try:
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        except OSError:
            pass


def compile_bytecode() -> None:
    """Write the .pyc files the nested units' Python would otherwise compile under TCG on
    every VMM start (the harness sees this tree read-only; PYTHONDONTWRITEBYTECODE is common)."""
    import compileall

    for d in ("pytest_ignition", "benchmarks"):
        compileall.compile_dir(ROOT / d, quiet=1)


def merge(
    statuses: list[dict[str, Any]], units: list[Unit], selected: set[str] | None, when: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """All kept records of this run plus an absent record for each unmet expectation."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    by_unit = {s["unit"]: s for s in statuses}
    for unit in units:
        st = by_unit.get(unit.name)
        for rec in (st or {}).get("records", []):
            if rec.get("metric") == "ratio":
                continue  # a script's own ratio line: the report computes ratios itself
            bad = common.validate(rec)
            if bad:
                problems.append(f"{unit.name}: dropped a record ({'; '.join(bad)}): {rec}")
                continue
            records.append(normalize(rec, unit.name, when))
    for unit in units:
        st = by_unit.get(unit.name)
        for exp in unit.expects:
            if any(exp.matches(r) for r in records):
                continue
            if selected is not None and unit.group not in selected:
                reason = "not selected (--only)"
            elif st is None:
                reason = "not run (time budget exhausted)"
            elif not st.get("ok"):
                reason = f"{unit.name}: {st.get('reason')}"
            else:
                reason = f"{unit.name} ran but produced no such record"
            rec = common.absent_record(exp.metric, exp.engine, exp.where, reason, **exp.params)
            rec.update(when=when, unit=unit.name)
            records.append(rec)
    return records, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--only", default="", help="comma-separated script names to run")
    ap.add_argument(
        "--budget", type=float, default=3600.0, help="seconds for all scripts (default 60 min)"
    )
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument(
        "--update-readme", action="store_true", help="also put the table into README.md"
    )
    args = ap.parse_args(argv)

    units = plan(args.quick, qemu_where())
    groups = {u.group for u in units}
    selected = None
    if args.only:
        selected = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = selected - groups
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {sorted(groups)}")
    if args.list:
        for u in units:
            cmd = u.argv(u.quick_args if args.quick else u.args)
            print(f"{u.group:16} {u.name:20} {' '.join(_short(a) for a in cmd)}")
        return 0

    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = common.machine_info()
    deadline = time.monotonic() + args.budget
    t_start = time.monotonic()
    warm_page_cache()
    compile_bytecode()
    statuses: list[dict[str, Any]] = []
    for unit in units:
        if selected is not None and unit.group not in selected:
            continue
        if unit.name == "qemu_warmup" and args.quick:
            continue
        left = deadline - time.monotonic()
        if left < 5:
            print(f"==> {unit.name}: skipped, time budget exhausted", file=sys.stderr)
            continue
        print(f"==> {unit.name} ...", file=sys.stderr, flush=True)
        st = run_unit(unit, args.quick, min(unit.timeout_s, left))
        statuses.append(st)
        outcome = f"{len(st['records'])} records" if st.get("ok") else f"FAILED: {st['reason']}"
        print(f"    {unit.name}: {st.get('seconds', 0)} s, {outcome}", file=sys.stderr, flush=True)

    records, problems = merge(statuses, units, selected, when)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    meta = {
        "date": when,
        "command": "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else ""),
        "quick": args.quick,
        "machine": machine,
        "host": common.host_description(),
        "total_seconds": round(time.monotonic() - t_start, 1),
        "units": [{k: v for k, v in s.items() if k != "records"} for s in statuses],
        "problems": problems,
    }
    common.write_records(common.RESULTS_DIR / "latest.json", records)
    outputs = report.generate(records, meta, common.RESULTS_DIR)
    if args.update_readme:
        report.update_readme(ROOT / "README.md", report.readme_section(records, meta))
        outputs.append(ROOT / "README.md")
    for p in [common.RESULTS_DIR / "latest.json", *outputs]:
        print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
