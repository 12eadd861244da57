"""Shared pieces of the benchmarks: the record format, statistics, host description, file I/O.

Every benchmark script writes a JSON list of records to ``benchmarks/results/<name>.json``::

    {"metric", "engine", "where", "params", "median_ms", "p10_ms", "p90_ms", "n", "host"}

``where`` is ``direct`` (this machine's KVM), ``nested`` (inside the nested harness) or ``tcg``
(QEMU TCG on this machine). A record may carry more keys (``min_ms``, ``when``, ...). A record
whose metric could not be measured has ``median_ms`` etc. ``None``, ``n == 0`` and an ``absent``
key with the reason. Scripts may use :func:`record` and :func:`write_records` from here, or
write the same shape themselves.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

METRICS = (
    "guest_boot_time",
    "launch_to_ready",
    "snapshot_time",
    "restore_time_host",
    "process_restore",
    "restore_to_ready",
    "rollback_time",
    "pytest_per_test",
    "hypothesis_rate",
    "session_setup",
    "image_build_time",
    "browser_cold_to_cdp",
    "browser_boot_to_ready",
    "browser_restore_to_cdp",
    "browser_restore_to_paint",
    "host_chromium_cold_to_cdp",
    "host_chromium_cold_to_paint",
    "net_rtt",
    "net_throughput",
    "initcall_time",
    "launch_to_kernel_log",
    "kernel_to_init",
)
# "host": on this machine without any VM (e.g. Chromium started locally, for comparison)
# "nested_arm64": inside the arm64 nested harness (KVM/arm64 under qemu-system-aarch64 TCG)
WHERE = ("direct", "nested", "tcg", "host", "nested_arm64")
ENGINES = ("ignition", "qemu")
REQUIRED_KEYS = (
    "metric",
    "engine",
    "where",
    "params",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "n",
    "host",
)

Record = dict[str, Any]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 1] of an already sorted, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile {q} outside [0, 1]")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(samples_ms: Iterable[float], digits: int = 2) -> dict[str, Any]:
    """Median, p10, p90 and n of millisecond samples (rounded to ``digits`` decimals, 0.01 ms)."""
    ms = sorted(float(s) for s in samples_ms)
    if not ms:
        raise ValueError("no samples")
    if any(math.isnan(s) or s < 0 for s in ms):
        raise ValueError("samples must be non-negative numbers")
    return {
        "median_ms": round(statistics.median(ms), digits),
        "p10_ms": round(percentile(ms, 0.1), digits),
        "p90_ms": round(percentile(ms, 0.9), digits),
        "n": len(ms),
    }


def kvm_kind() -> str:
    """``kvm-pvm`` (PVM: CPL0 guest code emulated), ``kvm``, or ``no-kvm``."""
    if Path("/sys/module/kvm_pvm").exists():
        return "kvm-pvm"
    return "kvm" if Path("/dev/kvm").exists() else "no-kvm"


def host_description() -> str:
    """One-line host identity, the same string the first benchmark scripts wrote."""
    return (
        f"{platform.node()} {platform.machine()} {os.cpu_count()}cpu "
        f"{platform.release()} {kvm_kind()}"
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """What the markdown's header says about the machine."""
    kind = kvm_kind()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "os": platform.system(),
        "kvm": kind,
        "kvm_is_pvm": kind == "kvm-pvm",
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load] if load else None,
    }


def record(
    metric: str,
    engine: str,
    where: str,
    params: dict[str, Any],
    samples_ms: Iterable[float],
    *,
    digits: int = 2,
    **extra: Any,
) -> Record:
    """A record from millisecond samples; ``extra`` keys are added as they are."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    if where not in WHERE:
        raise ValueError(f"unknown where {where!r}")
    return unchecked_record(metric, engine, where, params, samples_ms, digits=digits, **extra)


def unchecked_record(
    metric: str,
    engine: str,
    where: str | None,
    params: dict[str, Any],
    samples_ms: Iterable[float],
    *,
    digits: int = 2,
    **extra: Any,
) -> Record:
    """:func:`record` without the vocabulary check, for scripts whose ``where`` is the
    accelerator they ran on (``kvm``, ``tcg``, ...): the runner maps it onto :data:`WHERE`."""
    rec: Record = {
        "metric": metric,
        "engine": engine,
        "where": where,
        "params": dict(params),
        **summarize_ms(samples_ms, digits),
        "host": host_description(),
    }
    rec.update(extra)
    return rec


def absent_record(metric: str, engine: str, where: str, reason: str, **params: Any) -> Record:
    """A placeholder for a metric that was not measured in this run, and why."""
    return {
        "metric": metric,
        "engine": engine,
        "where": where,
        "params": dict(params),
        "median_ms": None,
        "p10_ms": None,
        "p90_ms": None,
        "n": 0,
        "host": host_description(),
        "absent": reason,
    }


def is_absent(rec: Record) -> bool:
    return rec.get("median_ms") is None


def validate(rec: object) -> list[str]:
    """Problems with one record (empty when it is well formed). Never raises."""
    if not isinstance(rec, dict):
        return [f"not an object: {type(rec).__name__}"]
    problems = [f"missing {k}" for k in REQUIRED_KEYS if k not in rec]
    if problems:
        return problems
    if rec["metric"] not in METRICS:
        problems.append(f"unknown metric {rec['metric']!r}")
    if rec["where"] not in WHERE:
        problems.append(f"unknown where {rec['where']!r}")
    if not isinstance(rec["engine"], str) or not rec["engine"]:
        problems.append("engine must be a non-empty string")
    if not isinstance(rec["params"], dict):
        problems.append("params must be an object")
    if rec["median_ms"] is None:
        if not rec.get("absent"):
            problems.append("median_ms is null without an 'absent' reason")
        return problems
    for k in ("median_ms", "p10_ms", "p90_ms"):
        v = rec[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            problems.append(f"{k} must be a non-negative number")
    if not problems and not rec["p10_ms"] <= rec["median_ms"] <= rec["p90_ms"]:
        problems.append("expected p10 <= median <= p90")
    n = rec["n"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        problems.append("n must be a positive integer")
    return problems


def load_records(path: Path) -> list[Record]:
    """The records in a results file; [] when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    if isinstance(data, dict):
        data = [data]
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_records(path: Path, records: list[Record]) -> None:
    write_json(path, records)


def _identity(rec: Record) -> str:
    keys = ("metric", "engine", "where", "params")
    return json.dumps({k: rec.get(k) for k in keys}, sort_keys=True)


def replace_records(path: Path, records: list[Record]) -> None:
    """Write ``records`` into the results file at ``path`` in place of the records there with
    the same metric, engine, where and params (an earlier run of the same measurement); the
    others stay, in their order, and the new ones go at the end."""
    new = {_identity(r) for r in records}
    kept = [r for r in load_records(path) if _identity(r) not in new]
    write_records(path, kept + list(records))


def replace_part(path: Path, part: str, records: list[Record]) -> None:
    """Write ``records``, each tagged ``"part": part``, into the results file at ``path`` in
    place of the records of an earlier run of the same part; the other parts' records stay.
    For a file several scripts share (``images.json``); a record without ``part`` counts as
    part ``build`` (the first writer's)."""
    kept = [r for r in load_records(path) if r.get("part", "build") != part]
    write_records(path, kept + [{**r, "part": part} for r in records])


def time_calls(
    fn: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; the timings in ms."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1000.0)
    return out


# The default guest's rcS prints this on the serial console when init is done.
BOOT_MARKER = b"ignition: init done"


class ConsoleMarkerWatch(threading.Thread):
    """Poll a console log (a path, or a glob pattern for a file an engine creates) until
    ``marker`` appears in it; ``seen`` is then the seconds since ``t0`` (a ``time.monotonic``
    reading taken just before the launch). Polls every 2 ms: the clock's resolution."""

    def __init__(self, path: Path | str, t0: float, marker: bytes = BOOT_MARKER) -> None:
        super().__init__(daemon=True)
        self.pattern, self.t0, self.marker = str(path), t0, marker
        self.seen: float | None = None
        self.stop = threading.Event()

    def _files(self) -> list[Path]:
        p = Path(self.pattern)
        if not any(c in self.pattern for c in "*?["):
            return [p]
        return sorted(Path(p.anchor).glob(str(p.relative_to(p.anchor))))

    def run(self) -> None:
        while not self.stop.is_set():
            for f in self._files():
                try:
                    if self.marker in f.read_bytes():
                        self.seen = time.monotonic() - self.t0
                        return
                except OSError:
                    pass
            time.sleep(0.002)


def stop_process(proc: Any) -> None:
    """SIGTERM a VMM or QEMU process the benchmark started (a ``Popen`` or a fork-server
    child), SIGKILL after 30 s; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
