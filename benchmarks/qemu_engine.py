"""Benchmark: the QEMU engine's cold boot, snapshot and restore on the default guest.

Metrics (each a record in ``benchmarks/results/qemu.json``, which this script rewrites):

* ``guest_boot_time``: QEMU launched → the guest's init printed ``ignition: init done`` on
  the serial console (``method = "console-marker"``; microvm has no boot-timer device).
* ``launch_to_ready``: QEMU launched → the agent answered a ping (cold boot).
* ``snapshot_time``: QMP stop → migration stream written → disk copied → metadata → cont.
* ``restore_to_ready``: QEMU launched with ``-incoming`` → agent answered, clock and CRNG
  synced, ping confirmed.

Records: ``{"metric", "engine": "qemu", "where": <accelerator>, "params", "median_ms",
"p10_ms", "p90_ms", "n", "host"}``.

With ``--image SPEC [--packages P]`` the guest's root is that image (built or found in the
cache first; ``init=agent``): the records carry ``image`` and ``packages`` in their params, so
they sit beside the initramfs-only guest's in the report. ``--results FILE`` writes elsewhere.

With ``--arch aarch64`` the guest is the arm64 one on ``qemu-system-aarch64 -M virt`` (TCG on
an x86_64 host); records carry ``arch`` in their params (x86_64 records leave it out).

Usage: ``python -m benchmarks.qemu_engine [--boots 5] [--snapshots 20] [--restores 20]
[--memory 512] [--arch aarch64] [--image debian:bookworm --packages python3] [--results FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "qemu.json"


def record(metric: str, where: str, params: dict, seconds: list[float]) -> dict:
    """A QEMU record; ``where`` is the accelerator (the runner maps ``kvm`` onto ``direct``)."""
    return common.unchecked_record(metric, "qemu", where, params, [s * 1000 for s in seconds])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=5, help="cold boots (each takes seconds)")
    ap.add_argument("--snapshots", type=int, default=20)
    ap.add_argument("--restores", type=int, default=20)
    ap.add_argument("--memory", type=int, default=512, help="guest memory, MiB")
    ap.add_argument("--accel", default=None, help="kvm|hvf|tcg (default: as auto-selected)")
    ap.add_argument("--arch", default=None, choices=("x86_64", "aarch64"), help="guest arch")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--image", default=None, help="image spec (e.g. debian:bookworm)")
    ap.add_argument("--packages", default="", help="extra packages of a debian: image")
    ap.add_argument("--results", type=Path, default=RESULTS, help="records file to write")
    args = ap.parse_args(argv)

    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.qemu import QemuEngine
    from pytest_ignition.engines.select import decide, probe_host
    from pytest_ignition.guest import build_guest, find_guest

    guest = find_guest(args.arch) or build_guest(
        progress=lambda m: print(m, file=sys.stderr), arch=args.arch
    )
    accel = args.accel or decide("qemu", probe_host(), args.arch).accelerator
    engine = QemuEngine(accelerator=accel)
    arch_params = {"arch": guest.arch} if guest.arch != "x86_64" else {}
    image_params: dict = {}
    image = None
    if args.image:
        from pytest_ignition.config import parse_image, parse_packages
        from pytest_ignition.guest.image import ensure_image

        packages = parse_packages(args.packages)
        image = ensure_image(parse_image(args.image), packages=packages)
        image_params = {"image": args.image, "packages": ",".join(packages)}
    config = VMConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        memory_mib=args.memory,
        image=image.path if image is not None else None,
        arch=guest.arch,
    )
    # The host is often shared: record how busy it was, the numbers depend on it.
    params = {
        "memory_mib": args.memory,
        "cpus": 1,
        "qemu": engine.version_of(guest.arch),
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
        **arch_params,
        **image_params,
    }
    boots: list[float] = []
    markers: list[float] = []
    snaps: list[float] = []
    restores: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ign-bench-") as d:
        root = Path(d)
        for i in range(args.boots):
            # The engine makes the machine's directory (qemu-*) when it launches QEMU.
            console = root / f"boot{i}" / "qemu-*" / "console.log"
            watch = common.ConsoleMarkerWatch(console, time.monotonic())
            watch.start()
            try:
                m = engine.boot(config, root / f"boot{i}")
            finally:
                watch.join(10)
                watch.stop.set()
            try:
                boots.append(m.ready_seconds)
                if watch.seen is None:
                    raise SystemExit(f"boot {i}: the console never showed {common.BOOT_MARKER!r}")
                markers.append(watch.seen)
                if i == 0:
                    for j in range(args.snapshots):
                        t0 = time.perf_counter()
                        engine.snapshot(m, root / "snap")
                        snaps.append(time.perf_counter() - t0)
                        assert m.agent.exec("true").exit_code == 0, j
            finally:
                m.close()
            print(f"boot {i}: {boots[-1] * 1000:.0f} ms", file=sys.stderr)
        state_bytes = (root / "snap" / "state").stat().st_size
        for i in range(args.restores):
            m = engine.restore(config, root / "snap", root / f"r{i}")
            try:
                restores.append(m.ready_seconds)
                assert m.agent.exec("true").exit_code == 0
            finally:
                m.close()
    accel = engine.accelerator_for(guest.arch)
    records = [
        record("guest_boot_time", accel, {**params, "method": "console-marker"}, markers),
        record("launch_to_ready", accel, params, boots),
        record("snapshot_time", accel, {**params, "state_bytes": state_bytes}, snaps),
        record("restore_to_ready", accel, params, restores),
    ]
    print(json.dumps(records, indent=2))
    if not args.no_write:
        common.write_records(args.results, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
