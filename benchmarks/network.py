"""Benchmark: networking to, from and between guests.

Metrics (records in ``benchmarks/results/network.json``, rewritten per engine and ``where``):

* ``net_rtt``: one byte to a guest echo server (busybox ``nc -ll -e cat``) and back, on one
  open connection; ``params.path`` says how the connection got there:
  ``agent-forward`` (``vm.forward``: host TCP -> agent channel -> guest loopback),
  ``agent-connect`` (``vm.connect``: a socketpair, no host TCP), ``qemu-slirp-hostfwd``
  (QEMU's own user networking, ``-netdev user,hostfwd=...``, beside it for comparison: QEMU
  engine only), ``passt-forward`` (passt's ``-t`` port forwarding on network=user: absent, see
  below) and ``segment`` (guest a -> guest b on an ``ignition_network``: the host times an echo
  on b through a relay on a; ``guest_to_guest_ms`` is that minus a's own echo, since the
  guests' clock is too coarse under TCG).
* ``net_throughput``: the time to move ``params.mib`` MiB host -> guest (``direction: in``,
  into ``cat > /dev/null``) or guest -> host (``direction: out``, from ``head -c``); the record
  also carries ``mib_per_s``.

Every VM is a restore of one snapshot per configuration. ``--engine ignition`` needs real KVM
(the nested harness here): run it inside ``python -m pytest_ignition.nested run -- ...``;
``--engine both`` measures the bundled VMM and QEMU (on the accelerator the product would pick:
KVM in the harness) in one run, the engine that goes first alternating part by part. Inside the
harness every record's ``where`` is ``nested``; each carries a ``note`` with the load average
(and ``--note``). A part that fails becomes an absent record, and its VMs' console, VMM and
passt logs are copied to ``build/bench-logs/network-<part>-<engine>/``.

Usage: ``python -m benchmarks.network [--engine qemu|ignition|both] [--parts tunnels,slirp,segment]
[--rtts 200] [--mib 16] [--repeats 3] [--note TEXT] [--no-write] [--results FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import common

RESULTS = common.RESULTS_DIR / "network.json"
LOG_DIR = Path(__file__).resolve().parent.parent / "build" / "bench-logs"
ECHO, SINK, SOURCE = 7000, 7001, 7002
SEGMENT_METHOD = "relay-on-a-minus-local-echo"


def _setup_servers(vm: Any, mib: int) -> None:
    vm.write_file("/tmp/sink.sh", "#!/bin/sh\ncat > /dev/null\n", mode=0o755)
    vm.write_file("/tmp/source.sh", f"#!/bin/sh\nhead -c {mib << 20} /dev/zero\n", mode=0o755)
    for port, prog in ((ECHO, "cat"), (SINK, "/tmp/sink.sh"), (SOURCE, "/tmp/source.sh")):
        vm.run(f"nc -ll -p {port} -e {prog} >/dev/null 2>&1 &", timeout=30).check()
    time.sleep(0.5)


def _rtts(sock: socket.socket, n: int) -> list[float]:
    sock.settimeout(30)
    out = []
    for _ in range(3):  # warm-up: first bytes cross freshly translated code under TCG
        sock.sendall(b"x")
        sock.recv(1)
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise RuntimeError("echo server answered something else")
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _push(sock: socket.socket, mib: int) -> float:
    sock.settimeout(120)
    blob = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    for _ in range(mib):
        sock.sendall(blob)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    return time.perf_counter() - t0


def _pull(sock: socket.socket, mib: int) -> float:
    sock.settimeout(120)
    got = 0
    t0 = time.perf_counter()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += len(data)
    if got != mib << 20:
        raise RuntimeError(f"received {got} bytes, expected {mib << 20}")
    return time.perf_counter() - t0


def _measure_paths(
    connect: dict[str, Any], rtts: int, mib: int, repeats: int, engine: str, where: str
) -> list[dict]:
    recs = []
    for path, opener in connect.items():
        with opener(ECHO) as s:
            samples = _rtts(s, rtts)
        recs.append(common.unchecked_record("net_rtt", engine, where, {"path": path}, samples))
        print(f"{engine}/{path}: rtt median {statistics.median(samples):.3f} ms", file=sys.stderr)
        for direction, port, fn in (("in", SINK, _push), ("out", SOURCE, _pull)):
            secs = []
            for _ in range(repeats):
                with opener(port) as s:
                    secs.append(fn(s, mib))
            med = statistics.median(secs)
            params = {"path": path, "direction": direction, "mib": mib}
            recs.append(
                common.unchecked_record(
                    "net_throughput",
                    engine,
                    where,
                    params,
                    [x * 1000 for x in secs],
                    mib_per_s=round(mib / med, 2),
                )
            )
            print(f"{engine}/{path}: {direction} {mib / med:.2f} MiB/s", file=sys.stderr)
    return recs


def _snapshot(engine: Any, cfg: Any, tmp: Path, name: str) -> Path:
    m = engine.boot(cfg, tmp / f"boot-{name}")
    try:
        engine.snapshot(m, tmp / f"snap-{name}")
    finally:
        m.close()
    return tmp / f"snap-{name}"


def _slirp_engine(base_cls: type, hostfwd: str, accelerator: str) -> Any:
    """A QEMU engine whose network=user device is QEMU's own slirp with ``hostfwd`` (for
    comparison only: the product uses passt)."""

    class _NoPasst:
        socket = Path("/nonexistent")

        def close(self) -> None:
            pass

    class SlirpEngine(base_cls):  # type: ignore[misc, valid-type]
        def _launch(self, m: Any, config: Any, extra: list[str], pass_fds: tuple = ()) -> float:
            m.passt = _NoPasst()  # no passt; _instance_args then names a netdev we replace
            return super()._launch(m, config, extra, pass_fds)

        def _instance_args(self, m: Any, config: Any) -> list[str]:
            args = super()._instance_args(m, config)
            i = args.index("-netdev")
            args[i + 1] = f"user,id=net0,restrict=on,net=10.0.2.0/24,hostfwd={hostfwd}"
            return args

    return SlirpEngine(accelerator=accelerator)


def _engines(which: str) -> list[tuple[str, Any, str]]:
    """(name, engine, where) for ``--engine``: inside the nested harness every record's
    ``where`` is ``nested`` and QEMU runs on the harness host's KVM, as the product picks it."""
    from pytest_ignition.engines.select import decide, probe_host
    from pytest_ignition.nested import inside

    out: list[tuple[str, Any, str]] = []
    for name in ("ignition", "qemu") if which == "both" else (which,):
        if name == "qemu":
            from pytest_ignition.engines.qemu import QemuEngine

            accel = decide("qemu", probe_host()).accelerator
            engine: Any = QemuEngine(accelerator=accel)
            out.append((name, engine, "nested" if inside() else accel))
        else:
            from pytest_ignition.engines.ignition import IgnitionEngine

            out.append((name, IgnitionEngine(), "nested" if inside() else "kvm"))
    return out


def _save_logs(src: Path, label: str) -> Path | None:
    """Copy the console/VMM/passt logs under ``src`` (a failed part's VM dirs) to
    build/bench-logs/network-<label>/ before the temporary directory goes."""
    logs = sorted(src.rglob("*.log")) if src.exists() else []
    if not logs:
        return None
    dest = LOG_DIR / f"network-{label}"
    for f in logs:
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(f, target)
    return dest


def _keep_logs(vms: list[Any], label: str) -> None:
    """After a failure, copy the live VMs' logs (a machine's directory goes with its close)."""
    for i, v in enumerate(vms):
        with contextlib.suppress(Exception):
            dest = _save_logs(Path(v.machine.dir), f"{label}/vm{i}")
            print(f"{label}: vm{i} logs in {dest}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("qemu", "ignition", "both"), default="qemu")
    ap.add_argument("--rtts", type=int, default=200)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="tunnels,slirp,segment", help="which measurements")
    ap.add_argument("--note", default="", help="added to every record (e.g. the outer load)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.guest import find_guest

    g = find_guest()
    if g is None:
        print("guest not built: python -m pytest_ignition.guest build", file=sys.stderr)
        return 2
    engines = _engines(args.engine)
    base = VMConfig(kernel=g.kernel, initrd=g.initrd, memory_mib=512, boot_timeout=300)
    records: list[dict] = []
    parts = [p for p in ("tunnels", "slirp", "segment") if p in set(args.parts.split(","))]
    with tempfile.TemporaryDirectory(prefix="ign-netb-") as td:
        tmp = Path(td)
        for i, part in enumerate(parts):
            # Engines alternate going first, so that a drift in the shared machine hits both.
            for name, engine, where in engines[:: -1 if i % 2 else 1]:
                if part == "slirp" and name != "qemu":
                    continue
                work = tmp / f"{part}-{name}"
                shutil.rmtree(LOG_DIR / f"network-{part}-{name}", ignore_errors=True)
                t0 = time.monotonic()
                try:
                    records += PARTS[part](engine, name, base, work, args, where)
                except Exception as e:  # keep the other measurements; say why this one is absent
                    _save_logs(work, f"{part}-{name}")  # what is left: boot, snapshot
                    saved = LOG_DIR / f"network-{part}-{name}"
                    saved = saved if saved.exists() else None
                    print(
                        f"{name}/{part} failed after {time.monotonic() - t0:.0f} s: {e}\n"
                        f"(console/VMM logs: {saved})",
                        file=sys.stderr,
                    )
                    path = "qemu-slirp-hostfwd" if part == "slirp" else part
                    path = "agent-forward" if part == "tunnels" else path
                    reason = f"{type(e).__name__}: {str(e)[:300]} (logs: {saved})"
                    # The measured record's params, so that each replaces the other.
                    extra = {"method": SEGMENT_METHOD} if part == "segment" else {}
                    records.append(
                        common.absent_record("net_rtt", name, where, reason, path=path, **extra)
                    )
                print(f"{name}/{part}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
        for name, _engine, where in engines:
            records.append(
                common.absent_record(
                    "net_rtt",
                    name,
                    where,
                    "passt forwards host ports only when started with -t; the product reaches "
                    "guest services through the agent channel instead",
                    path="passt-forward",
                )
            )
    return _finish(records, args)


def _segment(
    engine: Any, name: str, base: Any, tmp: Path, args: argparse.Namespace, where: str
) -> list[dict]:
    from pytest_ignition.network import Network
    from pytest_ignition.vm import VM

    seg = replace(base, network="segment")
    ssnap = _snapshot(engine, seg, tmp, "segment")
    net = Network("bench")
    vms = []
    try:
        for h in ("a", "b"):
            v = VM(engine, engine.restore(seg, ssnap, tmp / h), seg, snapshot_dir=ssnap)
            vms.append(v)
            net.add(v, h)
        # The guests' clock is jiffies under TCG (4 ms steps), so the host times it: an
        # echo on b reached through a relay on a, minus a's own echo over the same tunnel.
        a, b = vms
        _setup_servers(a, 1)
        _setup_servers(b, 1)
        a.write_file("/tmp/relay.sh", "#!/bin/sh\nexec nc b 7000\n", mode=0o755)
        a.run("nc -ll -p 7100 -e /tmp/relay.sh >/dev/null 2>&1 &", timeout=30).check()
        time.sleep(0.5)
        with a.connect(ECHO, timeout=30) as s:
            local = _rtts(s, args.rtts)
        with a.connect(7100, timeout=30) as s:
            relayed = _rtts(s, args.rtts)
    except BaseException:
        _keep_logs(vms, f"segment-{name}")
        raise
    finally:
        for v in vms:
            v.close()
        net.close()
    extra = statistics.median(relayed) - statistics.median(local)
    params = {"path": "segment", "method": SEGMENT_METHOD}
    print(f"{name}/segment: a->b adds {extra:.3f} ms", file=sys.stderr)
    return [
        common.unchecked_record(
            "net_rtt",
            name,
            where,
            params,
            relayed,
            guest_to_guest_ms=round(extra, 3),
            local_echo_median_ms=round(statistics.median(local), 3),
        )
    ]


def _noted(rec: dict, args: argparse.Namespace) -> dict:
    """The record with the run's load: this host's load average (inside the harness: the
    harness host's) and ``--note`` (the caller's, e.g. the outer machine's ``uptime``)."""
    note = f"loadavg here {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    rec["note"] = f"{note}; {args.note}" if args.note else note
    return rec


def _finish(records: list[dict], args: argparse.Namespace) -> int:
    records = [r if "note" in r or common.is_absent(r) else _noted(r, args) for r in records]
    print(json.dumps(records, indent=2))
    if not args.no_write:
        common.replace_records(args.results, records)
    return 0


def _tunnels(
    engine: Any, name: str, base: Any, tmp: Path, args: argparse.Namespace, where: str
) -> list[dict]:
    from pytest_ignition.vm import VM

    snap = _snapshot(engine, base, tmp, "none")
    vm = VM(engine, engine.restore(base, snap, tmp / "w"), base, snapshot_dir=snap)
    try:
        _setup_servers(vm, args.mib)
        fwd: dict[int, int] = {}

        def via_forward(port: int) -> socket.socket:
            if port not in fwd:
                fwd[port] = vm.forward(port)
            return socket.create_connection(("127.0.0.1", fwd[port]), timeout=30)

        paths: dict[str, Any] = {
            "agent-forward": via_forward,
            "agent-connect": lambda port: vm.connect(port, timeout=30),
        }
        return _measure_paths(paths, args.rtts, args.mib, args.repeats, name, where)
    except BaseException:
        _keep_logs([vm], f"tunnels-{name}")
        raise
    finally:
        vm.close()


def _slirp(
    engine: Any, name: str, base: Any, tmp: Path, args: argparse.Namespace, where: str
) -> list[dict]:
    ports = {}
    for p in (ECHO, SINK, SOURCE):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports[p] = s.getsockname()[1]
        s.close()
    hostfwd = ",hostfwd=".join(f"tcp:127.0.0.1:{hp}-:{gp}" for gp, hp in ports.items())
    slirp = _slirp_engine(type(engine), hostfwd, engine.accelerator)
    cfg = replace(base, network="user")
    snap = _snapshot(slirp, cfg, tmp, "slirp")
    from pytest_ignition.vm import VM

    vm = VM(slirp, slirp.restore(cfg, snap, tmp / "ws"), cfg, snapshot_dir=snap)
    try:
        # hostfwd delivers to the guest's eth0 address, so the servers listen on all addresses
        _setup_servers(vm, args.mib)

        def via_slirp(port: int) -> socket.socket:
            return socket.create_connection(("127.0.0.1", ports[port]), timeout=30)

        return _measure_paths(
            {"qemu-slirp-hostfwd": via_slirp}, args.rtts, args.mib, args.repeats, "qemu", where
        )
    except BaseException:
        _keep_logs([vm], f"slirp-{name}")
        raise
    finally:
        vm.close()


PARTS = {"tunnels": _tunnels, "slirp": _slirp, "segment": _segment}

if __name__ == "__main__":
    sys.exit(main())
