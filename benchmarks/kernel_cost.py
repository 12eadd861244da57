"""Benchmark: what the guest-kernel additions of issue 10 cost at boot (QEMU, same run).

The guest kernel fragment (``guest/kernel/x86_64.config``) grew TCP/IP, IPv6, netfilter and
nftables, virtio-net, namespaces, cgroups, seccomp, BPF, FUSE, squashfs, ... in commit 85131d7
(and MISC_FILESYSTEMS in 3200732). This script builds the kernel of the fragment as it was just
before (``BEFORE_COMMIT``), apart from the pipeline's cache, and boots both kernels, interleaved
(the one that goes first alternates), with the same initramfs-only guest on the QEMU engine
(TCG here). Records (``benchmarks/results/images.json``, part ``kernel-cost``; the file's other
parts stay), engine ``qemu``, ``where`` the accelerator, params ``kernel_fragment`` ``before``
or ``after`` (plus ``fragment_commit`` and ``bzimage_kib``):

* ``guest_boot_time``: QEMU launched → the init's ``ignition: init done`` on the console
  (``method = "console-marker"``, the default command line with ``quiet``), ``--boots`` each.
* ``launch_to_ready``: QEMU launched → the agent answered (the engine's ``ready_seconds``).
* with ``initcall_debug printk.time=1 ignore_loglevel earlycon`` (and the host's TSC rate,
  ``tsc_early_khz``, so that the guest's clock is not jiffies), ``--debug-boots`` each:
  ``initcall_time``: the kernel's own ``initcall ... returned ... after N usecs`` lines summed
  per group of source directories (the initcall's symbol from ``System.map``, its object file
  from ``nm`` of the build tree), one record per group and kernel (``group=total``: all of them);
  ``launch_to_kernel_log``: QEMU launched → the kernel's first console line (earlycon):
  QEMU start-up, bzImage load and decompression, early setup; ``kernel_to_init``: the printk
  timestamp of ``Run /init`` (the kernel's own boot, guest clock). The debug boots print ~1000
  lines to the serial port, which slows them: compare their numbers with each other only.

The "before" kernel takes one build (~7-10 min on 2 cores; ``--build`` or ``build``), into
``~/.cache/pytest-ignition/bench/kernel-cost/`` from a copy of the pipeline's build directory;
the pipeline's build directory and its ``guest/<key>`` entries are not touched. Without it this
script says how to build it and exits 3 (``python -m benchmarks`` then marks its metrics absent).

Usage: ``python -m benchmarks.kernel_cost [--build] [--boots 10] [--debug-boots 5]``;
``python -m benchmarks.kernel_cost build`` only builds.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = common.RESULTS_DIR / "images.json"
PART = "kernel-cost"
FRAGMENT = "guest/kernel/x86_64.config"
# The last commit whose guest fragment has no TCP/IP: 85131d7 added TCP/IP, netfilter,
# namespaces, cgroups, seccomp, FUSE, ...; 3200732 added MISC_FILESYSTEMS (for squashfs).
BEFORE_COMMIT = "274900e"
DEBUG_ARGS = "initcall_debug printk.time=1 ignore_loglevel earlycon=uart8250,io,0x3f8,115200"
# Under TCG the guest cannot calibrate its TSC (no PIT reference on microvm), marks it unstable
# and times initcalls with jiffies (4 ms steps). TCG's guest TSC is the host's, so giving the
# host's rate (tsc_early_khz, tsc=reliable) in the debug boots makes those clocks ns-grained.
TSC_ARGS = "tsc_early_khz={khz} tsc=reliable"
BOOT_TIMEOUT = 180.0

# Object-path prefixes -> the group an initcall is counted in (first match wins); anything else
# is grouped by its first two path components.
GROUPS: tuple[tuple[str, str], ...] = (
    ("net/netfilter/", "netfilter/nftables"),
    ("net/ipv4/netfilter/", "netfilter/nftables"),
    ("net/ipv6/netfilter/", "netfilter/nftables"),
    ("net/ipv4/", "net/ipv4 (TCP/UDP/IPv4)"),
    ("net/ipv6/", "net/ipv6"),
    ("net/packet/", "net/packet (AF_PACKET)"),
    ("net/unix/", "net/unix (AF_UNIX)"),
    ("net/vmw_vsock/", "net/vsock"),
    ("net/core/net_namespace", "namespaces"),
    ("net/", "net core"),
    ("drivers/net/", "drivers/net (virtio-net, veth, tun)"),
    ("kernel/cgroup/", "cgroups"),
    ("mm/memcontrol", "cgroups"),
    ("kernel/nsproxy", "namespaces"),
    ("kernel/user_namespace", "namespaces"),
    ("kernel/pid_namespace", "namespaces"),
    ("kernel/utsname", "namespaces"),
    ("ipc/namespace", "namespaces"),
    ("ipc/", "ipc (SysV/POSIX)"),
    ("kernel/bpf/", "bpf"),
    ("kernel/seccomp", "seccomp"),
    ("fs/fuse/", "fuse"),
    ("fs/squashfs/", "squashfs"),
    ("fs/notify/", "inotify/fanotify"),
    ("fs/autofs/", "autofs"),
    ("fs/aio", "aio"),
    ("io_uring/", "io_uring"),
    ("drivers/block/", "drivers/block (virtio-blk, loop)"),
)

Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the two kernels


def bench_dir() -> Path:
    """This benchmark's own space, beside (not inside) the pipeline's guest/<key> entries."""
    from pytest_ignition.guest import build as gbuild

    return gbuild.cache_dir() / "bench" / "kernel-cost"


def before_fragment() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:{FRAGMENT}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _before_paths() -> tuple[Path, Path, str, Path | None]:
    """(output dir, scratch build dir, source identity, source tree or None)."""
    from pytest_ignition.guest import build as gbuild

    ident, tree = gbuild._source_identity(None)
    key = hashlib.sha256(f"{before_fragment()}\0{ident}".encode()).hexdigest()[:20]
    return (
        bench_dir() / f"before-{key}",
        bench_dir() / f"build-before-{gbuild._srckey(ident)}",
        ident,
        tree,
    )


def find_before() -> Path | None:
    out = _before_paths()[0]
    return out if (out / "bzImage").is_file() else None


def build_before(progress: Progress = _say) -> Path:
    """Build (or find) the guest kernel of the fragment before the additions; returns its dir
    (``bzImage``, ``config``, ``System.map``).

    The same steps as ``pytest_ignition.guest.build.build_kernel`` (tinyconfig, merge the
    fragment, olddefconfig, check every option survived, ``make -jN bzImage``), in a copy
    (``cp -a``) of the pipeline's build directory so that objects whose options did not change
    are reused.
    """
    from pytest_ignition.guest import build as gbuild
    from pytest_ignition.guest import kconfig

    out, scratch, ident, tree = _before_paths()
    if (out / "bzImage").is_file():
        return out
    fragment = before_fragment()
    if tree is None:
        tree = gbuild._extracted_tree(None, ident, progress)
    if not scratch.is_dir():
        src = gbuild.cache_dir() / "build" / f"guest-{gbuild._srckey(ident)}"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            progress(f"copying {src} -> {scratch}")
            subprocess.run(["cp", "-a", str(src), str(scratch)], check=True)
        else:
            scratch.mkdir()
    log = scratch / "build.log"
    log.write_text(f"# kernel_cost 'before' kernel ({BEFORE_COMMIT}), source {ident}\n")
    make = ["make", "-C", str(tree), f"O={scratch}", "ARCH=x86_64"]
    t0 = time.monotonic()

    def run(*args: str) -> None:
        with open(log, "ab") as fh:
            fh.write(f"\n$ {' '.join([*make, *args])}\n".encode())
            fh.flush()
            rc = subprocess.run([*make, *args], stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"make {' '.join(args)} failed (exit {rc}); log: {log}")

    progress(f"building the 'before' kernel ({BEFORE_COMMIT}) in {scratch} (log {log})")
    run("tinyconfig")
    cfg = scratch / ".config"
    cfg.write_text(kconfig.merge(cfg.read_text(), fragment))
    run("olddefconfig")
    bad = kconfig.verify(fragment, cfg.read_text())
    if bad:
        raise SystemExit(f"the 'before' fragment did not survive olddefconfig: {bad}")
    run(f"-j{os.cpu_count() or 1}", "bzImage")
    tmp = Path(tempfile.mkdtemp(prefix=".before-", dir=out.parent))
    try:
        shutil.copy2(scratch / "arch/x86/boot/bzImage", tmp / "bzImage")
        shutil.copy2(scratch / "System.map", tmp / "System.map")
        shutil.copy2(cfg, tmp / "config")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"'before' kernel built in {time.monotonic() - t0:.0f} s: {out}")
    return out


# --------------------------------------------------------------------------- initcalls


_INITCALL = re.compile(
    rb"initcall (?:0x)?([0-9a-fA-F]+|[A-Za-z_][\w.]*)(?:\+0x[0-9a-f]+/0x[0-9a-f]+)?"
    rb"(?: \[\w+\])? returned -?\d+ after (\d+) usecs"
)
_PRINTK_T = re.compile(rb"^\[\s*(\d+\.\d+)\] Run /init as init process", re.M)


def parse_initcalls(console: bytes) -> list[tuple[str, int]]:
    """``(symbol or hex address, usecs)`` of every ``initcall ... returned ... after N usecs``
    line (``%pS`` is a bare address in a kernel without KALLSYMS, as the guest's is)."""
    return [(m.group(1).decode(), int(m.group(2))) for m in _INITCALL.finditer(console)]


def parse_kernel_to_init(console: bytes) -> float | None:
    """The printk timestamp (seconds) of the kernel's ``Run /init as init process``."""
    m = _PRINTK_T.search(console)
    return float(m.group(1)) if m else None


class SymbolMap:
    """Address or name of an initcall -> its object file in the build tree -> a group."""

    def __init__(self, system_map: Path | None, build_dir: Path | None) -> None:
        addrs: list[tuple[int, str]] = []
        text = system_map.read_text() if system_map is not None and system_map.is_file() else ""
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                addrs.append((int(parts[0], 16), parts[2]))
        addrs.sort()
        self._addrs = [a for a, _ in addrs]
        self._names = [n for _, n in addrs]
        self._objects = _objects_by_symbol(build_dir) if build_dir is not None else {}

    def name(self, sym: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{8,16}", sym):
            return sym
        i = bisect.bisect_right(self._addrs, int(sym, 16)) - 1
        return self._names[i] if i >= 0 else sym

    def group(self, sym: str) -> str:
        objs = self._objects.get(self.name(sym), [])
        groups = {group_of(o) for o in objs}
        if len(groups) == 1:
            return groups.pop()
        return "unmapped" if not groups else "ambiguous"


def group_of(obj: str) -> str:
    for prefix, label in GROUPS:
        if obj.startswith(prefix):
            return label
    parts = obj.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0].removesuffix(".o")


def _objects_by_symbol(build_dir: Path) -> dict[str, list[str]]:
    """Defined text symbols of every object of vmlinux in ``build_dir`` -> their objects."""
    objs = [
        str(p.relative_to(build_dir))
        for p in build_dir.rglob("*.o")
        if p.name != "vmlinux.o"
        and not p.name.startswith(".tmp")
        and "arch/x86/boot" not in str(p.relative_to(build_dir))
        and "scripts/" not in str(p.relative_to(build_dir))[:8]
        and "tools/" not in str(p.relative_to(build_dir))[:6]
    ]
    out: dict[str, list[str]] = {}
    for i in range(0, len(objs), 500):
        res = subprocess.run(
            ["nm", "-A", "--defined-only", *objs[i : i + 500]],
            cwd=build_dir,
            capture_output=True,
            text=True,
        )
        for line in res.stdout.splitlines():  # "path/x.o:0000000000000000 t name"
            head, _, rest = line.partition(":")
            bits = rest.split()
            if len(bits) == 3 and bits[1] in "tT":
                out.setdefault(bits[2], []).append(head)
    return out


def group_usecs(calls: list[tuple[str, int]], symbols: SymbolMap) -> dict[str, int]:
    """Summed usecs per group for one boot, plus ``total``."""
    sums: dict[str, int] = {"total": 0}
    for sym, us in calls:
        g = symbols.group(sym)
        sums[g] = sums.get(g, 0) + us
        sums["total"] += us
    return sums


# --------------------------------------------------------------------------- boots


def _boot(engine, config, workdir: Path, markers: dict[str, bytes]) -> tuple[dict, bytes]:
    """One cold boot: ``ready`` and, per marker, launch -> it on the console (seconds)."""
    t0 = time.monotonic()
    watches = {
        k: common.ConsoleMarkerWatch(workdir / "qemu-*" / "console.log", t0, marker=v)
        for k, v in markers.items()
    }
    for w in watches.values():
        w.start()
    try:
        m = engine.boot(config, workdir)
    finally:
        for w in watches.values():
            w.join(10)
            w.stop.set()
    try:
        if m.agent.exec(["true"], timeout=60).exit_code != 0:
            raise SystemExit("the guest cannot run `true`")
        console = Path(m.console_log).read_bytes()
    finally:
        m.close()
    out = {"ready": m.ready_seconds}
    for k, w in watches.items():
        if w.seen is None:
            raise SystemExit(f"{workdir}: the console never showed {markers[k]!r}")
        out[k] = w.seen
    return out, console


def host_tsc_khz() -> int:
    """This host's CPU clock in kHz from /proc/cpuinfo (0 when unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 0
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    return round(float(m.group(1)) * 1000) if m else 0


def measure(
    boots: int, debug_boots: int, memory: int, before_dir: Path, tsc_khz: int
) -> list[dict]:
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.qemu import QemuEngine
    from pytest_ignition.engines.select import decide, probe_host
    from pytest_ignition.guest import build as gbuild
    from pytest_ignition.guest import find_guest

    guest = find_guest()
    if guest is None:
        raise SystemExit("guest not built: python -m pytest_ignition.guest build")
    kernels = {"before": before_dir / "bzImage", "after": Path(guest.kernel)}
    after_build = gbuild.cache_dir() / "build" / f"guest-{gbuild.current_source_key()}"
    build_dirs: dict[str, Path | None] = {
        "before": _before_paths()[1],
        "after": after_build,
    }
    # The symbols and objects must be those of the kernel measured (a build dir holds the
    # last build made in it); the "before" output keeps its own System.map.
    cfgs = {"before": before_dir / "config", "after": Path(guest.config)}
    maps: dict[str, Path | None] = {"before": before_dir / "System.map", "after": None}
    for k, d in build_dirs.items():
        if (
            d is None
            or not (d / ".config").is_file()
            or ((d / ".config").read_bytes() != cfgs[k].read_bytes())
        ):
            _say(f"{k}: {d} does not hold this kernel's objects; initcalls left unmapped")
            build_dirs[k] = None
        elif maps[k] is None or not maps[k].is_file():
            maps[k] = d / "System.map"
    accel = decide("qemu", probe_host()).accelerator
    engine = QemuEngine(accelerator=accel)
    sizes = {k: kernels[k].stat().st_size for k in kernels}
    base = {
        "memory_mib": memory,
        "cpus": 1,
        "qemu": engine.version_of("x86_64"),
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }

    def kparams(k: str) -> dict:
        commit = BEFORE_COMMIT if k == "before" else _head()
        return {
            "kernel_fragment": k,
            "fragment_commit": commit,
            "bzimage_kib": round(sizes[k] / 1024),
        }

    def config(k: str, args: str = "") -> VMConfig:
        return VMConfig(
            kernel=kernels[k],
            initrd=guest.initrd,
            memory_mib=memory,
            kernel_args=args,
            boot_timeout=BOOT_TIMEOUT,
        )

    debug_args = DEBUG_ARGS + (" " + TSC_ARGS.format(khz=tsc_khz) if tsc_khz else "")
    plain: dict[str, list[dict]] = {"before": [], "after": []}
    debug: dict[str, list[dict]] = {"before": [], "after": []}
    calls: dict[str, list[list[tuple[str, int]]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="ign-kcost-") as d:
        root = Path(d)
        for i in range(boots):
            for k in ("before", "after") if i % 2 == 0 else ("after", "before"):
                r, _ = _boot(engine, config(k), root / f"{k}-{i}", {"marker": common.BOOT_MARKER})
                plain[k].append(r)
                _say(f"boot {i} {k}: marker {r['marker']:.3f}s ready {r['ready']:.3f}s")
        for i in range(debug_boots):
            for k in ("before", "after") if i % 2 == 0 else ("after", "before"):
                r, console = _boot(
                    engine,
                    config(k, debug_args),
                    root / f"dbg-{k}-{i}",
                    {"marker": common.BOOT_MARKER, "first": b"Linux version"},
                )
                r["kernel_to_init"] = parse_kernel_to_init(console)
                c = parse_initcalls(console)
                if not c:
                    raise SystemExit(f"debug boot {i} {k}: no initcall lines on the console")
                calls[k].append(c)
                debug[k].append(r)
                _say(
                    f"debug boot {i} {k}: {len(c)} initcalls, {sum(u for _, u in c)} us, "
                    f"first line {r['first']:.3f}s, Run /init at {r['kernel_to_init']}s"
                )
    where = engine.accelerator_for("x86_64")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_after = round(os.getloadavg()[0], 2)

    def rec(metric: str, params: dict, seconds: list[float], **extra) -> dict:
        return common.unchecked_record(
            metric,
            "qemu",
            where,
            {**base, **params},
            [s * 1000 for s in seconds],
            digits=3,
            part=PART,
            when=when,
            loadavg_1m_after=load_after,
            note=f"1-min load average {base['loadavg_1m_before']} at the start, {load_after} at "
            "the end (2 shared cores)",
            **extra,
        )

    records: list[dict] = []
    for k in ("before", "after"):
        if plain[k]:
            p = {**kparams(k), "method": "console-marker"}
            records.append(rec("guest_boot_time", p, [r["marker"] for r in plain[k]]))
            records.append(rec("launch_to_ready", kparams(k), [r["ready"] for r in plain[k]]))
    group_meds: dict[str, dict[str, float]] = {}
    for k in ("before", "after"):
        if not debug[k]:
            continue
        dp = {**kparams(k), "kernel_args": "initcall_debug", "tsc_khz": tsc_khz}
        records.append(rec("launch_to_kernel_log", dp, [r["first"] for r in debug[k]]))
        kti = [r["kernel_to_init"] for r in debug[k] if r["kernel_to_init"] is not None]
        if kti:
            records.append(rec("kernel_to_init", dp, kti))
        symbols = SymbolMap(maps[k], build_dirs[k])
        per_boot = [group_usecs(c, symbols) for c in calls[k]]
        groups = sorted({g for b in per_boot for g in b})
        group_meds[k] = {}
        for g in groups:
            samples = [b.get(g, 0) / 1e6 for b in per_boot]
            group_meds[k][g] = statistics.median(samples) * 1000
            extra = {"mean_ms": round(statistics.mean(samples) * 1000, 3)}
            if g == "total":
                extra["initcalls"] = round(statistics.median(len(c) for c in calls[k]))
            records.append(rec("initcall_time", {**dp, "group": g}, samples, **extra))
    if "before" in group_meds and "after" in group_meds:
        delta = {
            g: round(group_meds["after"].get(g, 0) - group_meds["before"].get(g, 0), 3)
            for g in sorted(set(group_meds["after"]) | set(group_meds["before"]))
        }
        for r in records:
            if r["metric"] == "initcall_time" and r["params"]["kernel_fragment"] == "after":
                r["after_minus_before_ms"] = delta.get(r["params"]["group"])
    return records


def _head() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", FRAGMENT],
        capture_output=True,
        text=True,
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        print(build_before())
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_cost", description=__doc__)
    ap.add_argument("--build", action="store_true", help="build the 'before' kernel if missing")
    ap.add_argument("--boots", type=int, default=10, help="quiet boots per kernel")
    ap.add_argument("--debug-boots", type=int, default=5, help="initcall_debug boots per kernel")
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument(
        "--tsc-khz",
        type=int,
        default=None,
        help="guest TSC rate for the debug boots (default: this host's, /proc/cpuinfo; "
        "0: leave the guest on jiffies, 4 ms steps)",
    )
    ap.add_argument("--quick", action="store_true", help="2 boots and 1 debug boot each")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.boots, args.debug_boots = 2, 1
    before = find_before()
    if before is None:
        if not args.build:
            print(
                "the 'before' kernel is not built: python -m benchmarks.kernel_cost build "
                "(one kernel build, ~7-10 min on 2 cores)",
                file=sys.stderr,
            )
            return 3
        before = build_before()
    tsc_khz = host_tsc_khz() if args.tsc_khz is None else args.tsc_khz
    records = measure(args.boots, args.debug_boots, args.memory, before, tsc_khz)
    for r in records:
        print(json.dumps(r))
    if not args.no_write:
        common.replace_part(args.results, PART, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
