"""Benchmark, inside the nested harness: cold boot of the default guest, bundled VMM vs QEMU+KVM.

Both engines boot the same kernel (bzImage) and initramfs with the same memory, on the
nested host's real /dev/kvm (AMD SVM emulated by TCG), interleaved run by run (the engine
that goes first alternates), so that drifts in the shared machine hit both alike.

Metrics (a JSON list in ``benchmarks/results/nested.json``, which this script rewrites):

* ``guest_boot_time``: process launch -> the guest's rcS reached its boot marker. For the
  bundled VMM this is its boot-timer device (the rcS's ``devmem 0xd0000000 8 123``,
  ``params.method = "boot-timer"``). QEMU's microvm has no such device, so for both engines
  it is also taken as launch -> ``ignition: init done`` (printed by the same rcS a few
  commands later) appearing in the serial console file (``method = "console-marker"``,
  polled every 2 ms); the ratio uses that method.
* ``launch_to_ready``: process launch -> the guest agent answered a ping (vsock for the
  bundled VMM, virtio-serial for QEMU: each engine's own agent channel).
* ``restore_to_ready``: through the engines' own API, in the same run: each engine boots the
  guest once (``engine.boot``) and snapshots it (``engine.snapshot``), then ``--restores``
  times, interleaved, ``engine.restore`` -> the restored guest's agent answered (clock and
  entropy synced) is timed around the call, and the machine closed. ``IgnitionEngine`` vs
  ``QemuEngine(accelerator="kvm")`` (the nested host's /dev/kvm is real KVM, not PVM, which is
  what :mod:`pytest_ignition.engines.select` picks KVM on).

Both clocks start at process launch, so the bundled VMM's numbers include its Python start-up,
which in the nested host runs under TCG (interpreter ~0.7 s, boot-path imports ~2 s with .pyc
files, ~3 s without), while QEMU is a native binary.

Records: ``{"metric", "engine": "ignition"|"qemu", "where": "nested", "params", "median_ms",
"p10_ms", "p90_ms", "n", "host"}``, plus one ``{"metric": "ratio", ...}`` line per metric.

Usage (from the repository root)::

    python -m pytest_ignition.nested run -- .venv/bin/python -m benchmarks.nested_boot \
        [--runs 5] [--restores N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

RESULTS = Path(__file__).resolve().parent / "results" / "nested.json"
BOOT_TIMEOUT = 300.0


def host_description() -> str:
    return (
        f"nested host (QEMU TCG, emulated AMD SVM) {platform.machine()} {os.cpu_count()}cpu "
        f"{platform.release()} [{common.cpu_model()}]"
    )


def record(metric: str, engine: str, params: dict, seconds: list[float]) -> dict:
    return {
        "metric": metric,
        "engine": engine,
        "where": "nested",
        "params": params,
        **common.summarize_ms([s * 1000 for s in seconds]),
        "host": host_description(),
    }


_FORK_SERVER = None  # one warm VMM process forks each VM (unless IGNITION_VMM_FORKSERVER=0)


def forking() -> bool:
    """Whether the bundled VMM's boots are forked, as the engine's are (its rule)."""
    from pytest_ignition.engines.ignition import fork_server_enabled

    return fork_server_enabled()


def _fork_server():
    """Started (and warm) before any clock runs: the engine starts it once per session."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        from pytest_ignition.vmm.forkserver import ForkServer

        _FORK_SERVER = ForkServer()
        _FORK_SERVER.start()
    return _FORK_SERVER


def run_ignition(guest, mem_mib: int, d: Path) -> dict[str, float]:
    from pytest_ignition.agent import AgentClient

    console, log, vsock = d / "console.log", d / "vmm.log", d / "v.sock"
    tail = ["boot", "--kernel", str(guest.kernel)]
    tail += ["--initrd", str(guest.initrd), "--mem", f"{mem_mib}M", "--vsock", str(vsock)]
    tail += ["--boot-timer", "--console", str(console)]
    fs = _fork_server() if forking() else None
    with open(log, "wb") as err, open(os.devnull, "rb") as null:
        t0 = time.monotonic()
        if fs is not None:
            proc = fs.spawn(tail, stdin=null.fileno(), stdout=err.fileno(), stderr=err.fileno())
        else:
            argv = [sys.executable, "-m", "pytest_ignition.vmm", *tail]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    watch = common.ConsoleMarkerWatch(console, t0)
    watch.start()
    try:
        client = AgentClient.connect_vsock_uds(vsock, 52, timeout=BOOT_TIMEOUT)
        with client:
            client.wait_ready(timeout=BOOT_TIMEOUT)
            ready = time.monotonic() - t0
        watch.join(10)
        m = re.search(rb"Guest-boot-time = +(\d+) us", log.read_bytes())
        if m is None or watch.seen is None:
            raise RuntimeError(f"no boot time (log: {log.read_bytes()[-500:]!r})")
        return {"boot_timer": int(m.group(1)) / 1e6, "marker": watch.seen, "ready": ready}
    finally:
        watch.stop.set()
        common.stop_process(proc)


def run_qemu(guest, mem_mib: int, d: Path) -> dict[str, float]:
    from pytest_ignition.agent import AgentClient
    from pytest_ignition.guest import DEFAULT_CMDLINE

    console, sock = d / "console.log", d / "agent.sock"
    argv = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host"]
    argv += ["-m", str(mem_mib), "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-no-reboot", "-serial", f"file:{console}", "-kernel", str(guest.kernel)]
    argv += ["-initrd", str(guest.initrd), "-append", DEFAULT_CMDLINE]
    argv += ["-device", "virtio-serial-device"]
    argv += ["-chardev", f"socket,id=agent,path={sock},server=on,wait=off"]
    argv += ["-device", "virtserialport,chardev=agent,name=org.ignition.agent"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = common.ConsoleMarkerWatch(console, t0)
    watch.start()
    try:
        client = AgentClient.connect_unix(sock, timeout=60)
        with client:
            client.wait_ready(timeout=BOOT_TIMEOUT)
            ready = time.monotonic() - t0
        watch.join(10)
        if watch.seen is None:
            raise RuntimeError("QEMU: the console marker never appeared")
        return {"marker": watch.seen, "ready": ready}
    finally:
        watch.stop.set()
        common.stop_process(proc)


def measure_restores(guest, mem_mib: int, d: Path, n: int) -> dict[str, list[float]]:
    """Boot + snapshot once per engine, then ``n`` interleaved restores each; seconds per restore."""
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.ignition import IgnitionEngine
    from pytest_ignition.engines.qemu import QemuEngine

    config = VMConfig(
        kernel=guest.kernel, initrd=guest.initrd, memory_mib=mem_mib, boot_timeout=BOOT_TIMEOUT
    )
    engines = {"ignition": IgnitionEngine(), "qemu": QemuEngine(accelerator="kvm")}
    snaps = {}
    for name, eng in engines.items():
        m = eng.boot(config, d / f"boot-{name}")
        try:
            snaps[name] = d / "snaps" / name
            eng.snapshot(m, snaps[name])
        finally:
            m.close()
    out: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(n):
        order = ["ignition", "qemu"] if i % 2 == 0 else ["qemu", "ignition"]
        for name in order:
            t0 = time.monotonic()
            # as in the plugin's restore mode: no dirty-page log (no rollback will be asked)
            m = engines[name].restore(
                config, snaps[name], d / f"restore-{name}-{i}", rollback=False
            )
            took = time.monotonic() - t0
            try:
                # Proof that the restored guest runs commands, outside the clock.
                if m.agent.exec(["true"], timeout=60).exit_code != 0:
                    raise RuntimeError(f"{name}: the restored guest cannot run `true`")
            finally:
                m.close()
            out[name].append(took)
            print(f"restore {i} {name}: {took:.3f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nested_boot", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="boots per engine (default 5)")
    p.add_argument(
        "--restores", type=int, default=None, help="restores per engine (default: --runs)"
    )
    p.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--force", action="store_true", help="run outside the nested harness too")
    args = p.parse_args(argv)

    from pytest_ignition.guest import find_guest
    from pytest_ignition.nested import inside

    if not inside() and not args.force:
        print(
            "run this inside the nested harness: python -m pytest_ignition.nested run -- "
            ".venv/bin/python -m benchmarks.nested_boot",
            file=sys.stderr,
        )
        return 2
    guest = find_guest()
    if guest is None:
        print("guest not built (python -m pytest_ignition.guest build)", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, float]]] = {"ignition": [], "qemu": []}
    fns = {"ignition": run_ignition, "qemu": run_qemu}
    with tempfile.TemporaryDirectory(prefix="nested-bench-") as tmp:
        for i in range(args.runs):
            order = ["ignition", "qemu"] if i % 2 == 0 else ["qemu", "ignition"]
            for eng in order:
                d = Path(tmp) / f"{eng}-{i}"
                d.mkdir()
                r = fns[eng](guest, args.memory, d)
                runs[eng].append(r)
                print(
                    f"run {i} {eng}: " + " ".join(f"{k}={v:.3f}s" for k, v in r.items()), flush=True
                )
        n_restores = args.runs if args.restores is None else args.restores
        restores = measure_restores(guest, args.memory, Path(tmp) / "restore", n_restores)
    base = {"memory_mib": args.memory, "kernel": "bzImage", "cpus": 1}
    if _FORK_SERVER is not None:
        _FORK_SERVER.stop()
    via = {"vmm": "fork-server" if forking() else "spawn"}
    recs = [
        record(
            "guest_boot_time",
            "ignition",
            {**base, **via, "method": "boot-timer"},
            [r["boot_timer"] for r in runs["ignition"]],
        ),
    ]
    for eng in ("ignition", "qemu"):
        recs.append(
            record(
                "guest_boot_time",
                eng,
                {**base, **(via if eng == "ignition" else {}), "method": "console-marker"},
                [r["marker"] for r in runs[eng]],
            )
        )
        params = {**base, **(via if eng == "ignition" else {})}
        recs.append(record("launch_to_ready", eng, params, [r["ready"] for r in runs[eng]]))
    for eng in ("ignition", "qemu"):
        params = {**base, "method": "engine.restore"}
        if eng == "ignition":
            params.update(via, dirty_log=False)
        if eng == "qemu":
            params["accelerator"] = "kvm"
        recs.append(record("restore_to_ready", eng, params, restores[eng]))
    for metric, method in (
        ("guest_boot_time", "console-marker"),
        ("launch_to_ready", None),
        ("restore_to_ready", "engine.restore"),
    ):
        ign = next(
            r
            for r in recs
            if r["engine"] == "ignition"
            and r["metric"] == metric
            and r["params"].get("method") == method
        )
        qem = next(r for r in recs if r["engine"] == "qemu" and r["metric"] == metric)
        recs.append(
            {
                "metric": "ratio",
                "of": metric,
                "where": "nested",
                "ignition_over_qemu": round(ign["median_ms"] / qem["median_ms"], 3),
                "params": dict(base),
                "host": host_description(),
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(recs, indent=2) + "\n")
    for r in recs:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
