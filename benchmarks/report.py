"""Turn benchmark records into the report: ``latest.md``, ``latest.meta.json`` and PNG plots.

Owns the presentation: what each clock means, the markdown table grouped by metric, the
ignition/qemu ratios (same metric, same ``where``, matching params, same run), the paragraph on
what is comparable, the README's ``## Benchmarks`` section, and two plots (restore time against
guest memory size; rollback time against dirty pages). Missing data never fails a plot: the
figure says what is missing.

Usage: ``python -m benchmarks.report [--results benchmarks/results/latest.json] [--readme README.md]``
regenerates the report from a results file (and its ``.meta.json`` beside it, if any).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import common

Record = dict[str, Any]

# metric -> (heading, what the clock measures)
CLOCKS: dict[str, tuple[str, str]] = {
    "guest_boot_time": (
        "Guest-boot-time",
        "boot-timer device: the guest's init writes a magic byte to a fixed MMIO page; the VMM "
        "stamps it relative to VM start. Kernel + early init, in the guest's time domain; "
        "excludes host process spawn. QEMU's microvm has no boot-timer device, so both engines "
        "are also timed from launch to the same init's console marker (`method` in params).",
    ),
    "launch_to_ready": (
        "launch→ready",
        "host wall clock from exec of the VMM until the guest agent answers a ping (cold boot).",
    ),
    "snapshot_time": (
        "snapshot-time",
        "host wall clock to pause the running guest, write its memory and device state, and "
        "resume it.",
    ),
    "restore_time_host": (
        "restore-time (host side)",
        "host-side clock from the restore entry (state file read, guest memory mapped) until "
        "the vCPU is handed to the run loop; the guest has not run yet. The seed's Restore-time.",
    ),
    "process_restore": (
        "restore request → vCPU running (new VMM process)",
        "host wall clock from asking for a restore until the new VMM process's control socket "
        "exists (its vCPU runs): `via` fork (the fork server) or spawn (a fresh interpreter).",
    ),
    "restore_to_ready": (
        "restore→ready",
        "host wall clock from launching the restore until the restored guest's agent answers.",
    ),
    "rollback_time": (
        "rollback-time",
        "in-place reset of a running VM to its snapshot: revert the dirtied guest pages and "
        "the vCPU/device state; against the number of dirty pages.",
    ),
    "pytest_per_test": (
        "pytest per test",
        "pytest wall time per trivial test (setup + call + teardown of "
        '`ignition_vm.run("true")`), session setup excluded.',
    ),
    "hypothesis_rate": (
        "Hypothesis example",
        "one `@given` example on a pristine guest: `ignition_vm.reset()` (in-place rollback, or a "
        "fresh restore where the engine has none) + a marker check + a write; "
        "`examples_per_s` = 1000 / median.",
    ),
    "browser_cold_to_cdp": (
        "browser cold start",
        "host wall clock from launching a cold boot of the browser guest (Debian + chromium) "
        "until Chromium's DevTools answers on the forwarded host port (boot, Chromium start, "
        "warm-up page).",
    ),
    "browser_boot_to_ready": (
        "browser guest boot",
        "the guest-boot part of the browser cold start: launch → agent ready.",
    ),
    "browser_restore_to_cdp": (
        "browser restore",
        "host wall clock from launching a restore of the warm browser snapshot until DevTools "
        "answers on the forwarded host port (the seed's browser restore).",
    ),
    "browser_restore_to_paint": (
        "browser restore to paint",
        "restore launched → Playwright connected over CDP → a page served from the host "
        "loaded and painted (two animation frames after load).",
    ),
    "host_chromium_cold_to_cdp": (
        "host Chromium start",
        "the same Chromium, same flags, started cold on this host with a new profile, until "
        "DevTools answers (what users would do instead of a restore).",
    ),
    "host_chromium_cold_to_paint": (
        "host Chromium to paint",
        "host Chromium started cold until the same page is loaded and painted.",
    ),
    "session_setup": (
        "session setup",
        "host wall clock from pytest's session start to the first test's call with its "
        "`ignition_vm` in hand; `mode`: `off` (boot, prepare, snapshot, restore), `reuse_new` "
        "(`--ignition-reuse` with a new key: the same plus storing the snapshot), `reuse_hit` "
        "(the next run: restore only).",
    ),
    "image_build_time": (
        "image build",
        "host wall clock of `ensure_image` for a root image: `cache=cold` builds it into an "
        "empty cache (mmdebstrap + mke2fs for debian:, layers + mke2fs for an OCI archive), "
        "`cache=hit` finds it (key probes, image.json; an OCI hit hashes the archive).",
    ),
    "net_rtt": (
        "network round trip",
        "host wall clock of one byte to a guest echo server and back on an open connection; "
        "`path`: `agent-forward` (vm.forward), `agent-connect` (vm.connect), "
        "`qemu-slirp-hostfwd` (QEMU's own user networking, for comparison), `segment` (guest a "
        "to guest b on an ignition_network: `guest_to_guest_ms` beside the relayed total).",
    ),
    "net_throughput": (
        "network throughput",
        "host wall clock to move `mib` MiB into a guest (`direction=in`) or out of it (`out`) "
        "over one connection of `path`; `mib_per_s` in the record.",
    ),
    "initcall_time": (
        "initcall time",
        "the guest kernel's own `initcall ... returned ... after N usecs` lines "
        "(`initcall_debug`), summed per `group` of source directories, per boot; "
        "`kernel_fragment` `before`/`after` the issue-10 additions (TCP/IP, netfilter, "
        "namespaces, cgroups, ...), `group=total` all initcalls.",
    ),
    "launch_to_kernel_log": (
        "launch→kernel log",
        "host wall clock from launching QEMU until the kernel's first console line (earlycon): "
        "QEMU start-up, bzImage load and decompression, early setup.",
    ),
    "kernel_to_init": (
        "kernel→init",
        "the printk timestamp of the kernel's `Run /init as init process`: the kernel's own "
        "boot in the guest's clock (in the `initcall_debug` boots, which print to the serial "
        "port).",
    ),
}

WHERE_TEXT = {
    "direct": "this machine's KVM",
    "nested": "inside the nested harness (QEMU-TCG hypervisor host with emulated SVM)",
    "tcg": "QEMU TCG on this machine",
    "host": "on this machine, no VM (a local Chromium, an image build)",
}

# Params that describe an engine rather than the workload: never used to pair records.
ENGINE_PARAMS = {
    "qemu",
    "accel",
    "engine_description",
    "state_bytes",
    "pytest_args",
    "version",
    "vmm",
    "kernel",
    "initrd",
}
# Params too noisy for the table.
HIDDEN_PARAMS = {"engine_description", "pytest_args", "test"}

MEMORY_KEYS = ("memory_mib", "mem_mib", "memory_mb", "guest_memory_mib")
DIRTY_KEYS = ("dirty_pages", "dirty", "pages_dirty", "dirty_page_count")


# --------------------------------------------------------------------------- helpers


def memory_mib(params: dict[str, Any]) -> float | None:
    """Guest memory in MiB from whichever key a script used."""
    for k in MEMORY_KEYS:
        v = params.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    v = params.get("memory_bytes")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
        return v / (1 << 20)
    return None


def dirty_pages(params: dict[str, Any]) -> float | None:
    for k in DIRTY_KEYS:
        v = params.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
            return float(v)
    return None


def fmt_ms(v: float | None, unit: bool = False) -> str:
    """Milliseconds for a table cell (seconds marked ``s``); ``unit`` adds ``ms`` too."""
    if v is None:
        return "—"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    ms = " ms" if unit else ""
    if v >= 100:
        return f"{v:.0f}{ms}"
    if v >= 10:
        return f"{v:.1f}{ms}"
    return f"{v:.2f}{ms}"


def fmt_params(params: dict[str, Any]) -> str:
    parts = []
    for k in sorted(params):
        if k in HIDDEN_PARAMS or k.startswith("loadavg"):
            continue
        v = params[k]
        if isinstance(v, (dict, list)):
            continue
        text = f"{k}={v}"
        if len(text) > 40:
            continue
        parts.append(text)
    return ", ".join(parts) or "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def measured(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if not common.is_absent(r)]


def _context_key(k: str) -> bool:
    """Params that describe the engine or the moment (load), not the workload."""
    return k in ENGINE_PARAMS or k.startswith("loadavg")


# Workload params compared even where one record lacks them (absent = the default guest):
# an image-root record never pairs with an initramfs-only one.
ALWAYS_COMPARED = ("image", "kernel_fragment")


def _params_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    shared = {k for k in set(a) & set(b) if not _context_key(k)}
    if any(a.get(k) != b.get(k) for k in ALWAYS_COMPARED):
        return False
    return all(a[k] == b[k] for k in shared)


def ratios(records: Iterable[Record]) -> list[dict[str, Any]]:
    """ignition/qemu for every measured pair with the same metric, ``where`` and workload params.

    Records of one results file are one run (the runner writes only this run's records), so
    each pair was measured in the same run.
    """
    recs = measured(records)
    out = []
    for ig in recs:
        if ig["engine"] != "ignition":
            continue
        for qe in recs:
            if qe["engine"] != "qemu":
                continue
            if (ig["metric"], ig["where"]) != (qe["metric"], qe["where"]):
                continue
            if not _params_match(ig["params"], qe["params"]):
                continue
            q = qe["median_ms"]
            out.append(
                {
                    "metric": ig["metric"],
                    "where": ig["where"],
                    "params": {
                        k: v
                        for k, v in ig["params"].items()
                        if k in qe["params"] and not _context_key(k)
                    },
                    "ignition_ms": ig["median_ms"],
                    "qemu_ms": q,
                    "ratio": round(ig["median_ms"] / q, 3) if q else None,
                }
            )
    return out


# --------------------------------------------------------------------------- markdown


def machine_line(meta: dict[str, Any]) -> str:
    m = meta.get("machine") or {}
    if not m:
        return f"Host: {meta.get('host', 'unknown')}."
    kvm = m.get("kvm", "?")
    if m.get("kvm_is_pvm"):
        kvm_text = (
            "KVM is **PVM** (this machine is itself a guest: guest CPL0 code is emulated, "
            "~1 µs/instruction; CPL3 runs natively)"
        )
    elif kvm == "kvm":
        kvm_text = "KVM with hardware virtualization"
    else:
        kvm_text = "no KVM"
    load = m.get("loadavg")
    load_text = f"; load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}" if load else ""
    return (
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, {m.get('arch', '')} "
        f"{m.get('os', '')} {m.get('kernel', '?')}; {kvm_text}{load_text}."
    )


COMPARABLE = """\
**What is comparable.**
A ratio is printed only for the same metric, the same `where` and the same workload parameters,
measured in the same run. `nested` numbers come from inside the nested harness: the hypervisor
host is itself emulated by QEMU TCG, so the guest's own work (kernel boot, init, the agent) is
inflated many-fold (CPL0 code there runs ~15× slower than native) and absolute `nested` times
say little about real hardware; the ignition/qemu ratio within `nested` is the meaningful
number. Host-side VMM work measured `direct` (`restore_time_host`, `rollback_time`) runs on this
machine's CPU and is not inflated by TCG, but its clock stops when the vCPU is handed to the run
loop, before the guest runs. The `direct` records come from tiny CPL3 test guests (PVM cannot
run a Linux kernel in useful time), whose memory is mostly never touched: they measure the VMM's
own mechanics, not a booted Linux guest's snapshot or restore, so `snapshot_time` ignition/direct
and qemu/tcg are not a race either. `tcg` numbers are QEMU emulating the guest CPU in software: they
are not KVM numbers, and the bundled VMM has no TCG mode, so there is no ratio there.
`restore_time_host` (ignition, stops before the guest runs) and `restore_to_ready` (QEMU, stops
when the agent answers) are different clocks: the restore plot puts them on one axis for scale,
not as a race. Guest-boot-time and launch→ready are complementary, not subtractable (different
clock domains), as in the seed.
"""

NOISE = """\
**Noise.** The machine is shared with other jobs (builds, test suites) while these numbers are
taken; expect wide p10–p90 ranges and medians that move between runs by tens of percent.
"""


def _table(rows: list[Record]) -> list[str]:
    lines = [
        "| engine | where | params | median | p10 | p90 | n |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if common.is_absent(r):
            lines.append(
                f"| {r['engine']} | {r['where']} | {_cell(fmt_params(r['params']))} | "
                f"absent: {_cell(str(r.get('absent', '')))[:200]} | | | 0 |"
            )
            continue
        lines.append(
            f"| {r['engine']} | {r['where']} | {_cell(fmt_params(r['params']))} | "
            f"{fmt_ms(r['median_ms'])} | {fmt_ms(r['p10_ms'])} | {fmt_ms(r['p90_ms'])} | "
            f"{r['n']} |"
        )
    return lines


def _sort_key(r: Record) -> tuple:
    p = r.get("params") or {}
    return (
        r["engine"],
        r["where"],
        memory_mib(p) or 0,
        dirty_pages(p) or 0,
        json.dumps(p, sort_keys=True, default=str),
    )


def results_markdown(records: list[Record], heading: str = "###") -> list[str]:
    """Tables grouped by metric (in the record format's order), each with its ratios."""
    lines: list[str] = []
    all_ratios = ratios(records)
    metrics = [m for m in common.METRICS if any(r["metric"] == m for r in records)]
    metrics += sorted({r["metric"] for r in records} - set(metrics))
    for metric in metrics:
        title, meaning = CLOCKS.get(metric, (metric, ""))
        rows = sorted((r for r in records if r["metric"] == metric), key=_sort_key)
        lines += ["", f"{heading} `{metric}`: {title}", "", meaning, "", *_table(rows)]
        rs = [x for x in all_ratios if x["metric"] == metric]
        if rs:
            lines.append("")
            for x in rs:
                lines.append(
                    f"- ignition/qemu ({x['where']}, {fmt_params(x['params'])}): "
                    f"**{x['ratio']:.2f}×** (ignition {fmt_ms(x['ignition_ms'], unit=True)} vs "
                    f"qemu {fmt_ms(x['qemu_ms'], unit=True)})"
                )
    return lines


BOOT_METRICS = ("guest_boot_time", "launch_to_ready", "restore_to_ready")


def _without(params: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in keys and not _context_key(k)}


def image_markdown(records: list[Record]) -> list[str]:
    """Boot/restore with a root image beside the initramfs-only guest of the same script run
    (same metric, engine, ``where``, other workload params): image / initramfs."""
    recs = measured(records)
    lines: list[str] = []
    for img in recs:
        p = img.get("params") or {}
        if img["metric"] not in BOOT_METRICS or not p.get("image"):
            continue
        for base in recs:
            bp = base.get("params") or {}
            if (
                (base["metric"], base["engine"], base["where"])
                != (img["metric"], img["engine"], img["where"])
                or bp.get("image")
                or (base.get("unit"), base.get("part")) != (img.get("unit"), img.get("part"))
                or _without(bp, "packages") != _without(p, "image", "packages")
            ):
                continue
            ratio = img["median_ms"] / base["median_ms"] if base["median_ms"] else None
            lines.append(
                f"| `{img['metric']}` | {img['engine']} | {img['where']} | "
                f"{_cell(str(p['image']))} {_cell(str(p.get('packages') or ''))} | "
                f"{fmt_ms(base['median_ms'])} | {fmt_ms(img['median_ms'])} | "
                f"{'—' if ratio is None else f'{ratio:.2f}×'} | {base['n']}/{img['n']} |"
            )
    if not lines:
        return []
    return [
        "## Root image beside the initramfs-only guest",
        "",
        "Same script run, engine, `where` and memory; medians.",
        "",
        "| metric | engine | where | root image | initramfs | with image | image/initramfs | n |",
        "|---|---|---|---|---:|---:|---:|---:|",
        *lines,
        "",
    ]


def kernel_markdown(records: list[Record]) -> list[str]:
    """The guest kernel before and after the issue-10 additions (``kernel_fragment``)."""
    recs = [r for r in measured(records) if (r.get("params") or {}).get("kernel_fragment")]
    if not recs:
        return []

    def find(metric: str, k: str, group: str | None = None) -> Record | None:
        for r in recs:
            p = r["params"]
            if (r["metric"], p["kernel_fragment"], p.get("group")) == (metric, k, group):
                return r
        return None

    lines = [
        "## Guest kernel before and after the issue-10 additions",
        "",
        "Both kernels booted interleaved in one run, same initramfs-only guest and memory; "
        "`before` is the fragment of "
        + ", ".join(
            sorted(
                {
                    f"`{r['params'].get('fragment_commit')}`"
                    for r in recs
                    if r["params"]["kernel_fragment"] == "before"
                }
            )
        )
        + ". Medians (p10–p90).",
        "",
        "| clock | engine/where | before | after | after/before | n |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for metric in ("guest_boot_time", "launch_to_ready", "launch_to_kernel_log", "kernel_to_init"):
        b, a = find(metric, "before"), find(metric, "after")
        if b is None or a is None:
            continue
        ratio = f"{a['median_ms'] / b['median_ms']:.2f}×" if b["median_ms"] else "—"
        lines.append(
            f"| `{metric}` | {a['engine']}/{a['where']} | {fmt_ms(b['median_ms'])} "
            f"({fmt_ms(b['p10_ms'])}–{fmt_ms(b['p90_ms'])}) | {fmt_ms(a['median_ms'])} "
            f"({fmt_ms(a['p10_ms'])}–{fmt_ms(a['p90_ms'])}) | {ratio} | {b['n']}/{a['n']} |"
        )
    b, a = find("guest_boot_time", "before"), find("guest_boot_time", "after")
    if b is not None and a is not None:
        lines += [
            "",
            f"bzImage: before {b['params'].get('bzimage_kib')} KiB, "
            f"after {a['params'].get('bzimage_kib')} KiB.",
        ]
    groups = sorted(
        {r["params"]["group"] for r in recs if r["metric"] == "initcall_time"},
        key=lambda g: (g != "total", g),
    )
    if groups:
        rows = []
        for g in groups:
            b, a = find("initcall_time", "before", g), find("initcall_time", "after", g)
            bm = b["median_ms"] if b else 0.0
            am = a["median_ms"] if a else 0.0
            rows.append((g, bm, am, b, a))
        rows.sort(key=lambda x: (x[0] != "total", -(x[2] - x[1])))
        lines += [
            "",
            "Initcalls (`initcall_debug`), summed per group of source directories, median over "
            "the debug boots; `—`: no initcall of that group in that kernel.",
            "",
            "| group | before | after | after − before |",
            "|---|---:|---:|---:|",
        ]
        for g, bm, am, b, a in rows:
            lines.append(
                f"| {_cell(g)} | {fmt_ms(bm) if b else '—'} | {fmt_ms(am) if a else '—'} | "
                f"{am - bm:+.2f} |"
            )
    return [*lines, ""]


def not_applicable(meta: dict[str, Any]) -> list[str]:
    """Engine/metric pairs that no script measures, and why (markdown bullets)."""
    out = [
        "- `rollback_time` qemu: QEMU has no in-place dirty-page rollback; its reset is a "
        "restore (`restore_to_ready`).",
        "- `restore_time_host` qemu: QEMU exposes no clock from restore entry to vCPU handover; "
        "its restore is timed end to end (`restore_to_ready`).",
        "- `tcg` for ignition: the bundled VMM needs KVM; it has no software emulation.",
        "- `pytest_per_test` on this machine measures the engine that `--ignition-engine auto` "
        "picks (see its `engine` column); `nested` measures both engines in the harness, the "
        "bundled VMM in both reset modes (`reset` in params; QEMU has only `restore`).",
    ]
    if (meta.get("machine") or {}).get("kvm_is_pvm"):
        out.insert(
            0,
            "- `guest_boot_time`/`launch_to_ready`/`restore_to_ready` for ignition `direct`: this "
            "machine's KVM is PVM, which emulates guest kernel code (~1 µs/instruction), so a "
            "Linux guest does not boot on it in useful time; these are measured `nested` instead.",
        )
    return out


def markdown(records: list[Record], meta: dict[str, Any]) -> str:
    """The whole ``latest.md``."""
    date = meta.get("date", "unknown date")
    lines = [
        f"# Benchmarks, {date}",
        "",
        machine_line(meta),
        "",
        f"Command: `{meta.get('command', 'python -m benchmarks')}`"
        + (f" (took {meta['total_seconds']:.0f} s)." if "total_seconds" in meta else "."),
        "Times in ms unless marked s; median and p10/p90 over n repeats.",
        "`where`: " + "; ".join(f"`{k}` = {v}" for k, v in WHERE_TEXT.items()) + ".",
        "",
        NOISE,
        "## The seed's table, side by side",
        "",
        *seed_table(records),
        "",
        "## All results",
    ]
    lines += results_markdown(records)
    rs = ratios(records)
    lines += ["", "## Ratios (ignition / qemu, same run, same `where`)", ""]
    if rs:
        lines += [
            "| metric | where | params | ignition | qemu | ignition/qemu |",
            "|---|---|---|---:|---:|---:|",
        ]
        for x in rs:
            lines.append(
                f"| {x['metric']} | {x['where']} | {_cell(fmt_params(x['params']))} | "
                f"{fmt_ms(x['ignition_ms'])} | {fmt_ms(x['qemu_ms'])} | {x['ratio']:.2f}× |"
            )
    else:
        lines.append("No metric was measured for both engines in the same `where` in this run.")
    lines += ["", COMPARABLE]
    lines += image_markdown(records) + kernel_markdown(records)
    absent = [r for r in records if common.is_absent(r)]
    if absent:
        lines += ["## Not measured in this run", ""]
        for r in absent:
            lines.append(f"- `{r['metric']}` {r['engine']}/{r['where']}: {r.get('absent')}")
        lines.append("")
    lines += ["## Not applicable", "", *not_applicable(meta), ""]
    units = meta.get("units") or []
    if units:
        lines += [
            "## Scripts run",
            "",
            "| run | command | seconds | load (1 min) at start | outcome |",
            "|---|---|---:|---:|---|",
        ]
        for u in units:
            outcome = "ok" if u.get("ok") else f"failed: {u.get('reason', '')}"
            load = u.get("loadavg_1m")
            lines.append(
                f"| {u['unit']} | `{u.get('command', '')}` | {u.get('seconds', 0):.0f} | "
                f"{'' if load is None else load} | {_cell(outcome)[:300]} |"
            )
        lines.append("")
    lines += [
        "## Plots",
        "",
        "![restore time against guest memory](restore_vs_memory.png)",
        "",
        "![rollback time against dirty pages](rollback_vs_dirty.png)",
        "",
    ]
    return "\n".join(lines)


# The seed's own table (Apple Silicon, HVF, aarch64 Linux 6.1 guest, 512 MiB, mean of n = 6).
SEED_ROWS = (
    ("Fresh boot", "guest_boot_time", "Guest-boot-time", "204 ms"),
    ("Fresh boot", "launch_to_ready", "launch → ready (seed: → login:)", "1.24 s"),
    ("Restore", "restore_time_host", "Restore-time (host side)", "115 ms"),
    ("Restore", "restore_to_ready", "launch → restored and ready (seed: → prompt)", "0.53 s"),
    ("Snapshot", "snapshot_time", "snapshot-time", "—"),
    ("Reset", "rollback_time", "in-place rollback", "100–1220 ms (browser)"),
)
SEED_NOTE = (
    "The seed column is the seed's own measurement (Apple Silicon, HVF, aarch64 guest, 512 MiB, "
    "mean of 6), for orientation only: another machine, another architecture, another "
    "hypervisor. Each engine cell shows one record per `where` (512 MiB where several sizes "
    "were run; the boot-timer method where there are two); see the full table for the rest."
)


def _pick(rows: list[Record]) -> Record:
    """The record that stands for a metric/engine/where in the seed table."""

    def score(r: Record) -> tuple:
        p = r.get("params") or {}
        return (
            memory_mib(p) == 512,
            p.get("method") == "boot-timer",
            p.get("prefetch") is True,
            p.get("kind") != "first",
            r["n"],
        )

    return max(rows, key=score)


def _seed_cell(records: list[Record], metric: str, engine: str) -> str:
    rows = [r for r in measured(records) if r["metric"] == metric and r["engine"] == engine]
    if not rows:
        return "—"
    cells = []
    for where in common.WHERE:
        here = [r for r in rows if r["where"] == where]
        if not here:
            continue
        r = _pick(here)
        p = r.get("params") or {}
        detail = [where]
        if memory_mib(p):
            detail.append(f"{memory_mib(p):g} MiB")
        for key in ("method", "kind"):
            if p.get(key):
                detail.append(f"{key} {p[key]}" if key == "kind" else str(p[key]))
        if dirty_pages(p) is not None:
            others = sorted(
                dirty_pages(x["params"]) for x in here if dirty_pages(x["params"]) is not None
            )
            lo = min(here, key=lambda x: dirty_pages(x["params"]) or 0)
            hi = max(here, key=lambda x: dirty_pages(x["params"]) or 0)
            cells.append(
                f"{fmt_ms(lo['median_ms'], unit=True)}–{fmt_ms(hi['median_ms'], unit=True)} "
                f"({where}, {others[0]:g}–{others[-1]:g} dirty pages)"
            )
            continue
        cells.append(f"{fmt_ms(r['median_ms'], unit=True)} ({', '.join(detail)})")
    return "; ".join(cells)


def seed_table(records: list[Record]) -> list[str]:
    """The seed's table, with this run's numbers for both engines beside it."""
    lines = [
        "| phase | clock | seed (HVF) | ignition | qemu |",
        "|---|---|---|---|---|",
    ]
    for phase, metric, label, seed in SEED_ROWS:
        lines.append(
            f"| {phase} | {label} | {seed} | {_cell(_seed_cell(records, metric, 'ignition'))} | "
            f"{_cell(_seed_cell(records, metric, 'qemu'))} |"
        )
    return [*lines, "", SEED_NOTE]


def compact_markdown(records: list[Record]) -> list[str]:
    """One table for every metric (the README's), then the ratios."""
    lines = [
        "| metric | engine | where | params | median | p10–p90 | n |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(common.METRICS)}
    rows = sorted(records, key=lambda r: (order.get(r["metric"], 99), *_sort_key(r)))
    for r in rows:
        head = f"| `{r['metric']}` | {r['engine']} | {r['where']} | "
        if common.is_absent(r):
            reason = _cell(str(r.get("absent", "")))
            reason = reason if len(reason) <= 90 else reason[:87] + "..."
            lines.append(head + f"— | not measured: {reason} | | 0 |")
            continue
        lines.append(
            head + f"{_cell(fmt_params(r['params']))} | {fmt_ms(r['median_ms'])} | "
            f"{fmt_ms(r['p10_ms'])}–{fmt_ms(r['p90_ms'])} | {r['n']} |"
        )
    rs = ratios(records)
    lines.append("")
    if rs:
        for x in rs:
            lines.append(
                f"- ignition/qemu, `{x['metric']}` {x['where']} ({fmt_params(x['params'])}): "
                f"**{x['ratio']:.2f}×** (ignition {fmt_ms(x['ignition_ms'], unit=True)} vs "
                f"qemu {fmt_ms(x['qemu_ms'], unit=True)})"
            )
    else:
        lines.append("No metric was measured for both engines in the same `where` in this run.")
    return lines


def readme_section(records: list[Record], meta: dict[str, Any]) -> str:
    """The README's ``## Benchmarks`` section: how to run, the clocks, the latest table."""
    lines = [
        "## Benchmarks",
        "",
        "`make bench` (or `.venv/bin/python -m benchmarks`; `--quick` for a smoke run, "
        "`--only qemu_engine,...` for some) runs every script in `benchmarks/`, each as a "
        "subprocess writing `benchmarks/results/<name>.json`, and merges this run's records into "
        "`benchmarks/results/latest.json`, `latest.md` and two plots. A script that is missing "
        "or fails is reported and its metrics are marked absent with the reason."
        " Root images and the guest kernel share `benchmarks/results/images.json` (each script "
        "replaces only its own part): `images` (build time, cold and cache hit), `image_boot` "
        "(boot and restore to agent-ready with a `debian:bookworm` root beside the "
        "initramfs-only guest; run in the nested harness it measures the bundled VMM beside "
        "QEMU+KVM) and `kernel_cost` (the guest kernel before and after the TCP/IP, netfilter, "
        "namespaces, cgroups, ... additions, booted interleaved, with the `initcall_debug` time"
        ' of each group of additions; it needs the "before" kernel built once, outside the '
        "pipeline's cache: `python -m benchmarks.kernel_cost build`, ~10 min, else its metrics "
        "are marked absent).",
        "",
        "What each clock means:",
        "",
    ]
    for metric in common.METRICS:
        title, meaning = CLOCKS[metric]
        lines.append(f"- **{title}** (`{metric}`): {meaning}")
    lines += [
        "",
        f"Latest run: {meta.get('date', 'unknown date')}. {machine_line(meta)}",
        "",
        "Times in ms unless marked s (median, p10–p90 over n repeats). `where`: "
        + "; ".join(f"`{k}` = {v}" for k, v in WHERE_TEXT.items())
        + ".",
        "",
        NOISE,
        *seed_table(records),
        "",
        "All records of the run:",
        "",
        *compact_markdown(records),
        "",
        COMPARABLE,
    ]
    lines += [
        "![restore time against guest memory](benchmarks/results/restore_vs_memory.png)",
        "![rollback time against dirty pages](benchmarks/results/rollback_vs_dirty.png)",
        "",
        "Full report, with absent metrics and the scripts' commands: "
        "[`benchmarks/results/latest.md`](benchmarks/results/latest.md).",
        "",
    ]
    return "\n".join(lines)


def replace_section(text: str, section: str, heading: str = "## Benchmarks") -> str:
    """``text`` with its ``heading`` section (up to the next level-2 heading outside code
    fences, or the end) replaced by ``section``; appended when there is no such section."""
    lines = text.splitlines(keepends=True)
    start = None
    end = len(lines)
    fence = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        if start is None:
            if line.rstrip() == heading:
                start = i
        elif line.startswith("## ") or line.startswith("# "):
            end = i
            break
    body = section.rstrip("\n") + "\n"
    if start is None:
        sep = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + body
    if end < len(lines):
        body += "\n"
    return "".join(lines[:start]) + body + "".join(lines[end:])


def update_readme(path: Path, section: str) -> None:
    path = Path(path)
    path.write_text(replace_section(path.read_text(), section))


# --------------------------------------------------------------------------- plots


def _series(records: list[Record], metric: str, key) -> dict[tuple[str, str], list[Record]]:
    out: dict[tuple[str, str], list[Record]] = {}
    for r in measured(records):
        if r["metric"] != metric or key(r["params"]) is None:
            continue
        out.setdefault((r["engine"], r["where"]), []).append(r)
    return out


def _absent_notes(records: list[Record], metrics: set[str]) -> list[str]:
    return [
        f"{r['metric']} {r['engine']}/{r['where']}: not measured ({str(r.get('absent'))[:70]})"
        for r in records
        if common.is_absent(r) and r["metric"] in metrics
    ]


def _draw(ax, series, key, label_fmt) -> None:
    markers = "osD^v<>"
    for i, ((engine, where), rows) in enumerate(sorted(series.items())):
        # One point per x: where a run measured an x twice, the record with more repeats.
        best: dict[float, Record] = {}
        for r in rows:
            x = key(r["params"])
            if x not in best or r["n"] > best[x]["n"]:
                best[x] = r
        rows = [best[x] for x in sorted(best)]
        xs = [key(r["params"]) for r in rows]
        ys = [r["median_ms"] for r in rows]
        lo = [r["median_ms"] - r["p10_ms"] for r in rows]
        hi = [r["p90_ms"] - r["median_ms"] for r in rows]
        ax.errorbar(
            xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], capsize=3,
            label=label_fmt(engine, where, rows),
        )  # fmt: skip


def _finish(fig, ax, notes: list[str], empty: bool, path: Path) -> None:
    if empty:
        ax.text(
            0.5, 0.5, "no data measured in this run", ha="center", va="center",
            transform=ax.transAxes, fontsize=13, color="0.3",
        )  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.margins(y=0.12)  # keep the p90 caps off the frame
        ax.legend(fontsize=8, loc="best")
        ax.grid(True, which="both", alpha=0.3)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes[:6]), fontsize=7, color="0.35", va="bottom")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * min(len(notes), 6), 1, 1))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RESTORE_LABELS = {
    "restore_time_host": "restore-time, host side (to vCPU handover)",
    "restore_to_ready": "restore→ready (to agent answer)",
}


def plot_restore(records: list[Record], path: Path, title_suffix: str = "") -> Path:
    """Restore time against guest memory size, every engine and restore clock measured."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    any_data = False
    for metric, label in RESTORE_LABELS.items():
        series = _series(records, metric, lambda p: memory_mib(p))
        if series:
            any_data = True

            def fmt(engine, where, rows, label=label):
                return f"{engine} ({where}): {label}"

            _draw(ax, series, memory_mib, fmt)
    notes = _absent_notes(records, set(RESTORE_LABELS))
    if any_data:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest memory (MiB)")
        ax.set_ylabel("median ms (bars: p10–p90), log scale")
        sizes = sorted(
            {memory_mib(r["params"]) for r in measured(records) if r["metric"] in RESTORE_LABELS}
            - {None}
        )
        if sizes:
            ax.set_xticks(sizes)
            ax.set_xticklabels([f"{s:g}" for s in sizes])
    ax.set_title("Restore time against guest memory size" + title_suffix)
    _finish(fig, ax, notes, not any_data, path)
    plt.close(fig)
    return path


def plot_rollback(records: list[Record], path: Path, title_suffix: str = "") -> Path:
    """In-place rollback time against the number of dirty pages."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [
        r
        for r in measured(records)
        if r["metric"] == "rollback_time" and dirty_pages(r["params"]) is not None
    ]
    # Separate lines per engine/where/memory size.
    series: dict[tuple[str, str], list[Record]] = {}
    for r in rows:
        mem = memory_mib(r["params"])
        label_where = f"{r['where']}, {mem:g} MiB" if mem else r["where"]
        series.setdefault((r["engine"], label_where), []).append(r)
    if series:
        _draw(ax, series, dirty_pages, lambda e, w, rows: f"{e} ({w})")
        # The page-revert part alone, where the script reports it.
        for (engine, label_where), group in sorted(series.items()):
            part = sorted(
                (dirty_pages(r["params"]), r["memory_median_ms"])
                for r in group
                if isinstance(r.get("memory_median_ms"), (int, float))
            )
            if part:
                ax.plot(
                    [x for x, _ in part], [y for _, y in part], linestyle="--", marker=".",
                    color="0.5", label=f"{engine} ({label_where}): page revert only",
                )  # fmt: skip
        xs = [dirty_pages(r["params"]) for r in rows]
        ys = [r["median_ms"] for r in rows]
        if min(ys) > 0 and max(ys) / min(ys) >= 50:
            ax.set_yscale("log")
        if min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        elif max(xs) > 0 and max(xs) / max(min(xs), 1) >= 20:
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("dirty guest pages (4 KiB) reverted")
        ax.set_ylabel(
            "median ms (bars: p10–p90)" + (", log scale" if ax.get_yscale() == "log" else "")
        )
    notes = _absent_notes(records, {"rollback_time"})
    ax.set_title("In-place rollback time against dirty pages" + title_suffix)
    _finish(fig, ax, notes, not series, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry points


def generate(records: list[Record], meta: dict[str, Any], outdir: Path) -> list[Path]:
    """Write ``latest.md``, ``latest.meta.json`` and the plots into ``outdir``; their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "ratios": ratios(records)}
    md = outdir / "latest.md"
    md.write_text(markdown(records, meta))
    common.write_json(outdir / "latest.meta.json", meta)
    suffix = f" ({meta['date'][:10]})" if meta.get("date") else ""
    written = [md, outdir / "latest.meta.json"]
    for fn, name in (
        (plot_restore, "restore_vs_memory.png"),
        (plot_rollback, "rollback_vs_dirty.png"),
    ):
        try:
            written.append(fn(records, outdir / name, suffix))
        except Exception as e:  # noqa: BLE001 - a plot must not lose the rest of the report
            print(f"warning: plot {name} failed: {e!r}")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS_DIR / "latest.json")
    ap.add_argument("--readme", type=Path, help="also replace this README's ## Benchmarks section")
    args = ap.parse_args(argv)
    records = [r for r in common.load_records(args.results) if not common.validate(r)]
    meta_path = args.results.with_name(args.results.stem + ".meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {"host": common.host_description()}
    meta.pop("ratios", None)
    for p in generate(records, meta, args.results.parent):
        print(f"wrote {p}")
    if args.readme:
        update_readme(args.readme, readme_section(records, meta))
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
