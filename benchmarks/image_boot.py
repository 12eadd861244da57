"""Benchmark: boot and restore to agent-ready with a root image beside the initramfs-only guest.

Two guests, the same kernel, initramfs and memory: the initramfs-only default guest, and the
same with a root image (default ``debian:bookworm`` + ``python3``, ``init=agent``: the bundled
init stays PID 1, the agent runs chrooted in the overlay over the image). Boots, snapshots and
restores go through the engines' own API, interleaved (guest and engine order alternate run by
run), so that drifts of the shared machine hit all alike.

Where it runs decides the engines:

* on this machine: the QEMU engine (``where`` = its accelerator: ``tcg`` here, where KVM is
  PVM);
* inside the nested harness (``IGNITION_NESTED=1``): the bundled VMM (the image is its first
  ``--disk``) and QEMU with ``accelerator=kvm``, ``where = "nested"``; ratios come from there.

Records (``benchmarks/results/images.json``, part ``boot-<where>``; the other parts stay),
params ``memory_mib``, ``cpus`` and, for the image guest, ``image`` and ``packages``:

* ``guest_boot_time``: launch → the init's ``ignition: init done`` on the console
  (``method = "console-marker"``, polled every 2 ms).
* ``launch_to_ready``: launch → the agent answered (the engine's ``ready_seconds``).
* ``restore_to_ready``: ``engine.restore`` of a snapshot taken after the first boot → the
  restored agent answered, clock and entropy synced (the engine's ``ready_seconds``).

Usage: ``python -m benchmarks.image_boot [--boots 5] [--restores 10] [--memory 512]
[--image debian:bookworm --packages python3]``; in the harness:
``python -m pytest_ignition.nested run -- .venv/bin/python -m benchmarks.image_boot``.
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

RESULTS = common.RESULTS_DIR / "images.json"
BOOT_TIMEOUT = 300.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def boot_once(engine, config, workdir: Path) -> tuple[object, float, float]:
    """Boot; returns (machine, launch->console marker s, launch->ready s). The machine is
    left running (the caller snapshots or closes it)."""
    # Each engine makes its machine's directory (qemu-*, vmm-*) under workdir.
    watch = common.ConsoleMarkerWatch(workdir / "*" / "console.log", time.monotonic())
    watch.start()
    try:
        m = engine.boot(config, workdir)
    finally:
        watch.join(10)
        watch.stop.set()
    try:
        if watch.seen is None:
            raise SystemExit(f"{workdir}: the console never showed {common.BOOT_MARKER!r}")
        if m.agent.exec(["true"], timeout=60).exit_code != 0:
            raise SystemExit(f"{workdir}: the booted guest cannot run `true`")
    except BaseException:
        m.close()
        raise
    return m, watch.seen, m.ready_seconds


def run(args, engines, configs, pairs, root: Path, marker, ready, restored) -> None:
    """The interleaved boots (a snapshot after each pair's first) and restores."""
    snaps: dict[tuple[str, str], Path] = {}
    for i in range(args.boots):
        order = pairs if i % 2 == 0 else pairs[::-1]
        for e, g in order:
            m, seen, rdy = boot_once(engines[e], configs[g], root / f"boot-{e}-{g}-{i}")
            try:
                if (e, g) not in snaps:
                    snaps[(e, g)] = root / "snap" / f"{e}-{g}"
                    engines[e].snapshot(m, snaps[(e, g)])
            finally:
                m.close()
            marker[(e, g)].append(seen)
            ready[(e, g)].append(rdy)
            _say(f"boot {i} {e} {g}: marker {seen:.3f}s ready {rdy:.3f}s")
    for i in range(args.restores):
        order = pairs if i % 2 == 0 else pairs[::-1]
        for e, g in order:
            m = engines[e].restore(configs[g], snaps[(e, g)], root / f"r-{e}-{g}-{i}")
            try:
                if m.agent.exec(["true"], timeout=60).exit_code != 0:
                    raise SystemExit(f"{e} {g}: the restored guest cannot run `true`")
            finally:
                m.close()
            restored[(e, g)].append(m.ready_seconds)
            _say(f"restore {i} {e} {g}: {m.ready_seconds:.3f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.image_boot", description=__doc__)
    ap.add_argument("--boots", type=int, default=5, help="cold boots per engine and guest")
    ap.add_argument("--restores", type=int, default=10, help="restores per engine and guest")
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--image", default="debian:bookworm", help="image spec")
    ap.add_argument("--packages", default="python3", help="extra packages of a debian: image")
    ap.add_argument("--quick", action="store_true", help="1 boot and 2 restores each")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.boots, args.restores = 1, 2

    from pytest_ignition.config import parse_image, parse_packages
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.qemu import QemuEngine
    from pytest_ignition.engines.select import decide, probe_host
    from pytest_ignition.guest import find_guest
    from pytest_ignition.guest.image import ensure_image
    from pytest_ignition.nested import inside

    guest = find_guest()
    if guest is None:
        _say("guest not built: python -m pytest_ignition.guest build")
        return 2
    packages = parse_packages(args.packages)
    image = ensure_image(parse_image(args.image), packages=packages, progress=_say)
    nested = inside()
    if nested:
        from benchmarks.nested_boot import host_description
        from pytest_ignition.engines.ignition import IgnitionEngine

        engines = {"ignition": IgnitionEngine(), "qemu": QemuEngine(accelerator="kvm")}
        where, host = "nested", host_description()
    else:
        accel = decide("qemu", probe_host()).accelerator
        engines = {"qemu": QemuEngine(accelerator=accel)}
        where, host = engines["qemu"].accelerator_for("x86_64"), common.host_description()
    guests = {
        "initramfs": {},
        "image": {"image": args.image, "packages": ",".join(packages)},
    }
    configs = {
        g: VMConfig(
            kernel=guest.kernel,
            initrd=guest.initrd,
            memory_mib=args.memory,
            image=image.path if g == "image" else None,
            boot_timeout=BOOT_TIMEOUT,
        )
        for g in guests
    }
    base = {
        "memory_mib": args.memory,
        "cpus": 1,
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }
    pairs = [(e, g) for g in guests for e in engines]
    marker: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    ready: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    restored: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    with tempfile.TemporaryDirectory(prefix="ign-imgboot-") as d:
        root = Path(d)
        # A failed boot raises BootError with the VMM's output and the console tail in it.
        run(args, engines, configs, pairs, root, marker, ready, restored)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_after = round(os.getloadavg()[0], 2)
    extra = {
        "when": when,
        "loadavg_1m_after": load_after,
        "host": host,
        "note": f"1-min load average {base['loadavg_1m_before']} at the start, {load_after} at "
        "the end" + (" (of the nested host, not of the machine)" if nested else ""),
    }
    records = []
    for e, g in pairs:
        p = {**base, **guests[g]}
        if e == "qemu":
            p["qemu"] = engines["qemu"].version_of("x86_64")
            if nested:
                p["accelerator"] = "kvm"
        for metric, samples, mp in (
            ("guest_boot_time", marker[(e, g)], {"method": "console-marker"}),
            ("launch_to_ready", ready[(e, g)], {}),
            ("restore_to_ready", restored[(e, g)], {"method": "engine.restore"}),
        ):
            if samples:
                rec = common.unchecked_record(
                    metric, e, where, {**p, **mp}, [s * 1000 for s in samples], digits=3
                )
                rec.update(extra)
                records.append(rec)
    for r in records:
        print(json.dumps(r))
    if not args.no_write:
        common.replace_part(args.results, f"boot-{where}", records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
