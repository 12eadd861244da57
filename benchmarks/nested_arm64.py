"""Benchmark, inside the arm64 nested harness: the aarch64 guest on the bundled VMM vs QEMU+KVM.

The arm64 harness (``python -m pytest_ignition.nested run --arch aarch64``) is Debian's arm64
kernel under ``qemu-system-aarch64`` TCG at EL2 on this x86_64 machine: a real arm64
``/dev/kvm`` (VHE, vGICv3) whose guests run ~20-40x slower than native. Both engines boot the
same arm64 ``Image`` and initramfs with the same memory on it, interleaved (the engine that
goes first alternates), so drifts of the shared machine hit both alike. QEMU is Debian's arm64
``qemu-system-arm`` added to the harness's root (:func:`pytest_ignition.nested_arm64.ensure_qemu`).

Metrics (records in ``benchmarks/results/nested_arm64.json``, ``where = "nested_arm64"``):

* ``guest_boot_time``: launch -> the guest's rcS boot marker. Bundled VMM: its boot-timer device
  (``method = "boot-timer"``) and, for both engines, ``ignition: init done`` in the console file
  (``method = "console-marker"``, polled every 2 ms); the ratio uses the console marker.
* ``launch_to_ready``: launch -> the guest agent answered. Bundled VMM: ``python3 -m
  pytest_ignition.vmm boot`` launched -> vsock ping answered; QEMU: ``QemuEngine.boot`` (launch
  -> virtio-serial agent ready), i.e. the QEMU engine's own path, its QMP set-up included.
* ``snapshot_time``: bundled VMM: the control ``snapshot`` reply's ``snapshot_ms``; QEMU:
  ``QemuEngine.snapshot``.
* ``restore_time_host``: the bundled VMM's ``Restore-time`` log line (memory mapped, vCPU and vGIC
  state loaded, vCPUs entering their loops). QEMU logs nothing comparable: absent.
* ``restore_to_ready``: bundled VMM: ``restore --sync-agent`` launched -> the agent answered;
  QEMU: ``QemuEngine.restore`` (launch with ``-incoming``, agent ready, clock/entropy synced).
* ``rollback_time``: the bundled VMM's in-place rollback (control ``rollback``'s
  ``rollback_us``) after the guest wrote 4 MiB; QEMU's engine has no in-place rollback: absent.

Every clock starts at a process launch, so the bundled VMM's numbers include its Python
start-up under TCG, while QEMU is a native (arm64, emulated) binary.

Usage (from the repository root; the outer part adds QEMU to the harness root once, then runs
the inner part in the harness)::

    flock /tmp/ignition-bench.lock .venv/bin/python -m benchmarks.nested_arm64 [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
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

RESULTS = Path(__file__).resolve().parent / "results" / "nested_arm64.json"
WHERE = "nested_arm64"
BOOT_TIMEOUT = 400.0
AGENT_PORT = 52


OUTER_CPU = os.environ.get("IGNITION_BENCH_OUTER_CPU", "")  # the x86 CPU, named by the outer part


def host_description() -> str:
    return (
        f"arm64 nested host (qemu-system-aarch64 TCG, EL2, KVM/arm64 VHE) {platform.machine()} "
        f"{os.cpu_count()}cpu {platform.release()}, on x86_64 [{OUTER_CPU or 'CPU not named'}]"
    )


def record(metric: str, engine: str, params: dict, seconds: list[float], note: str) -> dict:
    rec = common.record(metric, engine, WHERE, params, [s * 1000 for s in seconds], note=note)
    rec["host"] = host_description()
    return rec


def absent(metric: str, engine: str, reason: str, params: dict) -> dict:
    rec = common.absent_record(metric, engine, WHERE, reason, **params)
    rec["host"] = host_description()
    return rec


def _guest() -> tuple[str, str]:
    kernel, initrd = (
        os.environ.get("IGNITION_ARM64_KERNEL"),
        os.environ.get("IGNITION_ARM64_INITRD"),
    )
    if kernel and initrd:
        return kernel, initrd
    from pytest_ignition.guest import find_guest

    g = find_guest("aarch64")
    if g is None:
        raise SystemExit(
            "arm64 guest not built (python -m pytest_ignition.guest build --arch aarch64)"
        )
    return str(g.kernel), str(g.initrd)


def _vmm(d: Path, *args: str) -> tuple[subprocess.Popen[bytes], float]:
    d.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pytest_ignition.vmm", *args, "--vsock", str(d / "v.sock")]
    argv += ["--control", str(d / "c.sock"), "--console", str(d / "console.log")]
    with open(d / "vmm.log", "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    return proc, t0


def _agent_ready(d: Path, proc: subprocess.Popen[bytes], t0: float) -> float:
    from pytest_ignition.agent import AgentClient

    deadline = t0 + BOOT_TIMEOUT
    while not (d / "v.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"VMM gone or no vsock socket: {(d / 'vmm.log').read_bytes()[-800:]!r}"
            )
        time.sleep(0.01)
    client = AgentClient.connect_vsock_uds(d / "v.sock", AGENT_PORT, timeout=BOOT_TIMEOUT)
    with client:
        client.wait_ready(timeout=BOOT_TIMEOUT)
        return time.monotonic() - t0


def _log_us(d: Path, what: str) -> float:
    m = re.search(rf"{what} = +(\d+) us".encode(), (d / "vmm.log").read_bytes())
    if m is None:
        raise RuntimeError(f"no {what} in {d / 'vmm.log'}")
    return int(m.group(1)) / 1e6


def ignition_boot(kernel: str, initrd: str, mem: int, d: Path) -> dict[str, float]:
    args = ["boot", "--kernel", kernel, "--initrd", initrd, "--mem", f"{mem}M", "--boot-timer"]
    proc, t0 = _vmm(d, *args)
    watch = common.ConsoleMarkerWatch(d / "console.log", t0)
    watch.start()
    try:
        ready = _agent_ready(d, proc, t0)
        watch.join(10)
        if watch.seen is None:
            raise RuntimeError("bundled VMM: the console marker never appeared")
        return {"boot_timer": _log_us(d, "Guest-boot-time"), "marker": watch.seen, "ready": ready}
    finally:
        watch.stop.set()
        common.stop_process(proc)


def qemu_boot(engine, config, d: Path) -> dict[str, float]:
    t0 = time.monotonic()
    watch = common.ConsoleMarkerWatch(str(d / "qemu-*" / "console.log"), t0)
    watch.start()
    try:
        m = engine.boot(config, d)
        ready = time.monotonic() - t0
        try:
            watch.join(10)
            if watch.seen is None:
                raise RuntimeError("QEMU: the console marker never appeared")
            if m.agent.exec(["uname", "-m"], timeout=60).stdout != b"aarch64\n":
                raise RuntimeError("QEMU: the guest is not aarch64")
        finally:
            m.close()
        return {"marker": watch.seen, "ready": ready}
    finally:
        watch.stop.set()


def _control(d: Path, cmd: str, **args) -> dict:
    from pytest_ignition.vmm.control import request

    rep = request(d / "c.sock", cmd, timeout=300, **args)
    if not rep.get("ok"):
        raise RuntimeError(f"control {cmd}: {rep}")
    return rep


def ignition_snapshot_restore(kernel: str, initrd: str, mem: int, d: Path, n: int, n_rb: int):
    """One boot, ``n`` snapshots of it; ``n`` restores (new processes) of the first, and in the
    last restored VM ``n_rb`` rounds of (write 4 MiB, rollback)."""
    out: dict[str, list[float]] = {"snapshot": [], "restore_time": [], "restore_ready": []}
    out["rollback"], out["rollback_pages"] = [], []
    boot = d / "boot"
    proc, t0 = _vmm(boot, "boot", "--kernel", kernel, "--initrd", initrd, "--mem", f"{mem}M")
    try:
        _agent_ready(boot, proc, t0)
        for i in range(n):
            out["snapshot"].append(
                _control(boot, "snapshot", store=str(d / "store"), name=f"s{i}")["snapshot_ms"]
                / 1000
            )
    finally:
        common.stop_process(proc)
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for i in range(n):
            r = d / f"restore{i}"
            rproc, rt0 = _vmm(
                r, "restore", "--store", str(d / "store"), "--name", "s0", "--sync-agent"
            )
            started.append((rproc, r))
            out["restore_ready"].append(_agent_ready(r, rproc, rt0))
            out["restore_time"].append(_log_us(r, "Restore-time"))
            if i < n - 1:
                common.stop_process(rproc)
            print(f"ignition restore {i}: {out['restore_ready'][-1]:.3f}s", flush=True)
        from pytest_ignition.agent import AgentClient

        rproc, r = started[-1]
        for _ in range(n_rb):
            with AgentClient.connect_vsock_uds(r / "v.sock", AGENT_PORT, timeout=BOOT_TIMEOUT) as c:
                res = c.exec("dd if=/dev/zero of=/tmp/dirty bs=1M count=4 2>/dev/null", timeout=120)
                if res.exit_code != 0:
                    raise RuntimeError(f"dd in the restored guest: {res}")
            rb = _control(r, "rollback")
            out["rollback"].append(rb["rollback_us"] / 1e6)
            out["rollback_pages"].append(rb["pages"])
        with AgentClient.connect_vsock_uds(r / "v.sock", AGENT_PORT, timeout=BOOT_TIMEOUT) as c:
            if c.exec("test -e /tmp/dirty", timeout=120).exit_code == 0:
                raise RuntimeError("rollback left the written file in the guest")
    finally:
        for rproc, _ in started:
            common.stop_process(rproc)
    return out


def qemu_snapshot_restore(engine, config, d: Path, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"snapshot": [], "restore_ready": []}
    m = engine.boot(config, d / "boot")
    try:
        for i in range(n):
            t0 = time.monotonic()
            engine.snapshot(m, d / "snaps" / f"s{i}")
            out["snapshot"].append(time.monotonic() - t0)
    finally:
        m.close()
    for i in range(n):
        t0 = time.monotonic()
        r = engine.restore(config, d / "snaps" / "s0", d / f"restore{i}")
        out["restore_ready"].append(time.monotonic() - t0)
        try:
            if r.agent.exec(["true"], timeout=60).exit_code != 0:
                raise RuntimeError("QEMU: the restored guest cannot run `true`")
        finally:
            r.close()
        print(f"qemu restore {i}: {out['restore_ready'][-1]:.3f}s", flush=True)
    return out


def _qemu_version(engine) -> str:
    try:
        return str(engine.version)
    except Exception as e:  # a missing QEMU is reported by its absent records
        return f"unknown ({e})"


def inner(args: argparse.Namespace) -> int:
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.qemu import QemuEngine

    kernel, initrd = _guest()
    engine = QemuEngine(accelerator="kvm")
    config = VMConfig(
        kernel=Path(kernel), initrd=Path(initrd), memory_mib=args.memory,
        boot_timeout=BOOT_TIMEOUT, arch="aarch64",
    )  # fmt: skip
    load0 = os.getloadavg()
    boots: dict[str, list[dict[str, float]]] = {"ignition": [], "qemu": []}
    qemu_error: str | None = None  # QEMU failing in here must not cost the bundled VMM's numbers
    qem: dict[str, list[float]] = {"snapshot": [], "restore_ready": []}
    with tempfile.TemporaryDirectory(prefix="nested-arm64-bench-") as tmp:
        for i in range(args.runs):
            for eng in ("ignition", "qemu") if i % 2 == 0 else ("qemu", "ignition"):
                d = Path(tmp) / f"{eng}-{i}"
                if eng == "ignition":
                    r = ignition_boot(kernel, initrd, args.memory, d)
                elif qemu_error is not None:
                    continue
                else:
                    try:
                        r = qemu_boot(engine, config, d)
                    except Exception as e:
                        qemu_error = f"QEMU+KVM boot failed: {type(e).__name__}: {e}"[:600]
                        print(qemu_error, flush=True)
                        continue
                boots[eng].append(r)
                print(f"boot {i} {eng}: " + " ".join(f"{k}={v:.3f}s" for k, v in r.items()),
                      flush=True)  # fmt: skip
        ign = ignition_snapshot_restore(
            kernel, initrd, args.memory, Path(tmp) / "ign", args.restores, args.rollbacks
        )
        if qemu_error is None:
            try:
                qem = qemu_snapshot_restore(engine, config, Path(tmp) / "qemu", args.restores)
            except Exception as e:
                qemu_error = f"QEMU+KVM snapshot/restore failed: {type(e).__name__}: {e}"[:600]
                print(qemu_error, flush=True)
    load1 = os.getloadavg()
    note = (
        f"harness-internal loadavg {load0[0]:.2f} -> {load1[0]:.2f}; outer {args.outer_load}; "
        f"QEMU {_qemu_version(engine)} -accel kvm -M virt,gic-version=max; interleaved"
    )
    base = {"memory_mib": args.memory, "kernel": "Image", "cpus": 1, "arch": "aarch64"}

    def rec(metric: str, engine_name: str, params: dict, seconds: list[float]) -> dict:
        if seconds:
            return record(metric, engine_name, params, seconds, note)
        return absent(metric, engine_name, qemu_error or "not measured", params)

    recs = [rec("guest_boot_time", "ignition", {**base, "method": "boot-timer"},
                [b["boot_timer"] for b in boots["ignition"]])]  # fmt: skip
    for eng in ("ignition", "qemu"):
        recs.append(rec("guest_boot_time", eng, {**base, "method": "console-marker"},
                        [b["marker"] for b in boots[eng]]))  # fmt: skip
        recs.append(rec("launch_to_ready", eng, dict(base), [b["ready"] for b in boots[eng]]))
    recs.append(rec("snapshot_time", "ignition", dict(base), ign["snapshot"]))
    recs.append(
        rec("snapshot_time", "qemu", {**base, "method": "engine.snapshot"}, qem["snapshot"])
    )
    recs.append(rec("restore_time_host", "ignition", dict(base), ign["restore_time"]))
    recs.append(absent("restore_time_host", "qemu", "QEMU logs no restore time of its own", base))
    recs.append(rec("restore_to_ready", "ignition", {**base, "method": "vmm restore --sync-agent"},
                    ign["restore_ready"]))  # fmt: skip
    recs.append(rec("restore_to_ready", "qemu", {**base, "method": "engine.restore"},
                    qem["restore_ready"]))  # fmt: skip
    pages = sorted(ign["rollback_pages"])[len(ign["rollback_pages"]) // 2]
    recs.append(rec("rollback_time", "ignition", {**base, "dirty_pages": pages, "write": "4 MiB"},
                    ign["rollback"]))  # fmt: skip
    recs.append(absent("rollback_time", "qemu", "the QEMU engine has no in-place rollback", base))
    for metric, method in (
        ("guest_boot_time", "console-marker"),
        ("launch_to_ready", None),
        ("restore_to_ready", None),
        ("snapshot_time", None),
    ):
        i_rec = next(r for r in recs if r["engine"] == "ignition" and r["metric"] == metric
                     and (method is None or r["params"].get("method") == method))  # fmt: skip
        q_rec = next(r for r in recs if r["engine"] == "qemu" and r["metric"] == metric)
        if not q_rec["median_ms"] or not i_rec["median_ms"]:
            continue
        recs.append({
            "metric": "ratio", "of": metric, "where": WHERE,
            "ignition_over_qemu": round(i_rec["median_ms"] / q_rec["median_ms"], 3),
            "params": dict(base), "host": host_description(),
        })  # fmt: skip
    common.write_json(args.out, recs)
    for r in recs:
        print(json.dumps(r))
    return 0


def outer(args: argparse.Namespace) -> int:
    from pytest_ignition import nested, nested_arm64

    nested_arm64.ensure_qemu()
    kernel, initrd = _guest()
    cmd = ["env", f"IGNITION_ARM64_KERNEL={kernel}", f"IGNITION_ARM64_INITRD={initrd}"]
    cmd += [f"IGNITION_BENCH_OUTER_CPU={common.cpu_model()}"]
    cmd += ["python3", "-m", "benchmarks.nested_arm64", "--inner", "--runs", str(args.runs)]
    cmd += ["--restores", str(args.restores), "--rollbacks", str(args.rollbacks)]
    cmd += ["--memory", str(args.memory), "--out", str(args.out.resolve())]
    cmd += ["--outer-load", " ".join(f"{x:.2f}" for x in os.getloadavg())]

    def stream(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    with contextlib.suppress(KeyboardInterrupt):
        res = nested.run(cmd, arch="aarch64", mem_mb=args.host_memory, stream=stream,
                         keep_output=False, timeout=3600)  # fmt: skip
        print(
            f"harness: host boot {res.boot_time:.1f} s, total {res.duration:.1f} s, rc {res.exit_code}"
        )
        return res.exit_code
    return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nested_arm64", description=__doc__)
    p.add_argument("--runs", type=int, default=5, help="boots per engine (default 5)")
    p.add_argument("--restores", type=int, default=5, help="snapshots and restores per engine")
    p.add_argument("--rollbacks", type=int, default=5, help="in-place rollbacks (bundled VMM)")
    p.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    p.add_argument("--host-memory", type=int, default=2048, help="harness host MiB")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--outer-load", default="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        return inner(args)
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
