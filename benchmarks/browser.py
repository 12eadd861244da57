"""Benchmark: the disposable browser (the seed's second table), QEMU and the bundled VMM.

Metrics (records in ``benchmarks/results/browser.json``; ``where`` is ``nested`` inside the
nested harness, else QEMU's accelerator, or ``direct`` for the bundled VMM on this host's KVM):

* ``browser_cold_to_cdp``: VM launch (cold boot of the browser guest) → Chromium started →
  its DevTools endpoint answers on the forwarded host port. ``browser_boot_to_ready`` is the
  guest-boot part of it (launch → agent ready); the bundled VMM also reports its boot timer
  (``browser_guest_boot_time``, launch → the guest's init wrote the boot marker).
* ``browser_restore_to_cdp``: restore launched → agent ready → DevTools answers (the warm
  browser from the snapshot); ``cold_over_restore`` on it is cold ÷ restore of this run;
  ``agent_ready_median_ms`` is its launch → agent-ready part. Its samples are restore mode's
  (``dirty_log: off``: the bundled VMM keeps no dirty-page log, as the plugin's restore mode);
  the restores that are rolled back afterwards had the log on and are summarized in its
  ``with_dirty_log`` (they make the column, ``dirty_log: on``, only when there are no others).
* ``browser_restore_to_paint``: restore launched → Playwright connected over CDP → a page
  served from the host loaded and painted (two animation frames after ``load``).
* ``browser_rollback_to_cdp`` (engines that roll back in place: the bundled VMM): after that
  page was painted, ``vm.reset()`` in rollback mode → DevTools answers again; the painted page
  must be gone (checked: a page that survives the rollback fails the run).
* ``host_chromium_cold_to_cdp`` / ``host_chromium_cold_to_paint`` (engine ``host``): the same
  Chromium started cold with the same flags where this script runs (this host, or inside the
  nested host when run there: ``where`` says which), what users would do instead.

With ``--engine qemu,ignition`` both engines are measured in the same run, interleaved (the
engine that goes first alternates); host Chromium goes first (a failure there shows in
minutes). A boot or restore that fails costs only its sample: it is named in the records'
``failures``, its console and VMM logs are copied under ``--logs`` (default
``build/bench-logs/``), and a column left with no sample is written as an absent record
saying why (a cold boot that failed leaves that engine's restores unmeasured). Usage::

    python -m benchmarks.browser [--engine qemu] [--restores 10] [--host-starts 5] [--memory 2048]
    python -m pytest_ignition.nested run --mem 10240 -- .venv/bin/python -m benchmarks.browser \
        --engine qemu,ignition --boots 1 --restores 6 --rollbacks 3 --host-starts 3

Records of the same metric, engine and where are replaced; the others stay.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "browser.json"
LOG_DIR = Path(__file__).resolve().parent.parent / "build" / "bench-logs"
PAGE = b"<!doctype html><title>bench</title><body style='background:#0a0'><h1>painted</h1>"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a browser that resets its connection (it does when it goes) is not news


def _paint(pw, cdp_url: str, url: str) -> None:
    b = pw.chromium.connect_over_cdp(cdp_url, timeout=300_000)
    try:
        ctx = b.contexts[0] if b.contexts else b.new_context()
        page = ctx.new_page()
        page.goto(url, timeout=300_000)
        page.evaluate(
            "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        )
    finally:
        b.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_chromium(pw, runs: int, url: str) -> tuple[list[float], list[float]]:
    from pytest_ignition import browser as br

    exe = shutil.which("chromium")
    if exe is None:
        return [], []
    to_cdp: list[float] = []
    to_paint: list[float] = []
    for _ in range(runs):
        port = _free_port()
        # Chromium's helper processes may still write the profile while it goes: never let
        # the cleanup cost the run its records.
        with tempfile.TemporaryDirectory(
            prefix="ign-bench-chromium-", ignore_cleanup_errors=True
        ) as profile:
            flags = [
                f
                if not f.startswith("--remote-debugging-port")
                else f"--remote-debugging-port={port}"
                for f in br.CHROMIUM_FLAGS
                if not f.startswith("--user-data-dir")
            ]
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [exe, *flags, f"--user-data-dir={profile}", "about:blank"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its helpers too are killed below (the group)
            )
            try:
                br.wait_devtools(port, 120, "host chromium")
                to_cdp.append(time.monotonic() - t0)
                _paint(pw, f"http://127.0.0.1:{port}", url)
                to_paint.append(time.monotonic() - t0)
            except Exception as e:  # the starts before and after still count
                print(f"host Chromium start: {e!r}", file=sys.stderr)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    return to_cdp, to_paint


_RESTORE_LISTS = ("ready", "cdp", "paint", "ready_dl", "cdp_dl", "paint_dl")


def _rolls_back(i: int, iterations: int, rollbacks: int) -> bool:
    """Whether restore ``i`` of ``iterations`` is one of the ``rollbacks`` rolled back after
    its paint, spread evenly among them (the others are restore mode's: no dirty-page log)."""
    return (i + 1) * rollbacks // iterations > i * rollbacks // iterations


def _failed(
    failures: dict[str, list[str]], name: str, what: str, exc: Exception, work: Path, logs: Path
) -> None:
    """Note a failed sample and keep the logs under its work dir (console, VMM: a machine's
    directory goes with its close)."""
    why = f"{what}: {type(exc).__name__}: {str(exc)[:500]}"
    found = sorted(work.rglob("*.log*")) if work.exists() else []
    if found:
        dest = logs / f"browser-{name}-{work.name}-{int(time.time())}"
        for f in found:
            target = dest / f.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(f, target)
        why += f" (logs: {dest})"
    failures[name].append(why)
    print(f"{name} {why}", file=sys.stderr)


def _engine(name: str):
    if name == "ignition":
        from pytest_ignition.engines.ignition import IgnitionEngine

        return IgnitionEngine(check=True)
    from pytest_ignition.engines.qemu import QemuEngine
    from pytest_ignition.engines.select import decide, probe_host

    return QemuEngine(accelerator=decide("qemu", probe_host()).accelerator)


def _where(name: str, engine) -> str:
    from pytest_ignition.nested import inside

    if inside():
        return "nested"
    return engine.accelerator if name == "qemu" else "direct"


def _nested_host() -> str:
    import platform

    return (
        f"nested host (QEMU TCG, emulated AMD SVM) {platform.machine()} {os.cpu_count()}cpu "
        f"{platform.release()} [{common.cpu_model()}]"
    )


def _replace(path: Path, records: list[dict]) -> None:
    """Write ``records`` in place of earlier ones of the same metric, engine and where (their
    params may differ: an older run's), keeping the others."""
    new = {(r["metric"], r["engine"], r["where"]) for r in records}
    kept = [
        r
        for r in common.load_records(path)
        if (r.get("metric"), r.get("engine"), r.get("where")) not in new
    ]
    common.write_records(path, kept + records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--engine",
        default="qemu",
        help="qemu, ignition, or qemu,ignition (interleaved, the first alternating)",
    )
    ap.add_argument("--boots", type=int, default=1, help="cold boots to CDP-ready, per engine")
    ap.add_argument("--restores", type=int, default=10, help="per engine")
    ap.add_argument(
        "--rollbacks",
        type=int,
        default=None,
        help="in-place rollbacks to CDP-ready, among the restores (engines that roll back; "
        "default: half of --restores)",
    )
    ap.add_argument("--host-starts", type=int, default=5)
    ap.add_argument("--memory", type=int, default=2048, help="guest memory, MiB")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--note", help="a note every record carries (the run's date, outer load...)")
    ap.add_argument(
        "--logs",
        type=Path,
        default=LOG_DIR,
        help="where a failed boot's or restore's console and VMM logs are copied",
    )
    args = ap.parse_args(argv)
    names = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not names or any(n not in ("qemu", "ignition") for n in names):
        ap.error(f"--engine: qemu, ignition or qemu,ignition (not {args.engine!r})")
    rollbacks = args.restores // 2 if args.rollbacks is None else args.rollbacks

    from playwright.sync_api import sync_playwright

    from pytest_ignition import browser as br
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.guest import build_guest, find_guest
    from pytest_ignition.guest.image import ensure_image
    from pytest_ignition.vm import VM

    guest = find_guest() or build_guest(progress=lambda m: print(m, file=sys.stderr))
    image = ensure_image("debian:bookworm", packages=br.BROWSER_PACKAGES)
    engines = {n: _engine(n) for n in names}
    config = VMConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        memory_mib=args.memory,
        image=image.path,
        kernel_args=br.ROLE_ARG,
        boot_timeout=900,
    )
    params = {"memory_mib": args.memory, "cpus": 1, "image": "debian:bookworm+chromium"}
    notes: dict[str, object] = {"loadavg_1m_before": round(os.getloadavg()[0], 2)}
    if args.note:
        notes["note"] = args.note
    server = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = server.server_address[1]
    t: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in ("cold", "boot", "guest_boot", "rollback", *_RESTORE_LISTS)}
        for n in names
    }
    snapped = dict.fromkeys(names, False)
    failures: dict[str, list[str]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="ign-bench-browser-") as d, sync_playwright() as pw:
        root = Path(d)
        # First: a failure here shows in minutes, not after the engines' long part.
        try:
            host_cdp, host_paint = host_chromium(pw, args.host_starts, f"http://127.0.0.1:{site}/")
        except Exception as e:  # the engines' records are written all the same
            print(f"host Chromium: {e!r}; not measured", file=sys.stderr)
            host_cdp, host_paint = [], []
        print(f"host Chromium: to CDP {host_cdp}, to paint {host_paint}", file=sys.stderr)
        for i in range(args.boots):
            for n in names if i % 2 == 0 else names[::-1]:
                engine = engines[n]
                t0 = time.monotonic()
                vm = None
                try:
                    m = engine.boot(config, root / f"{n}-boot{i}")
                    vm = VM(engine, m, config, command_timeout=900)
                    t[n]["boot"].append(m.ready_seconds)
                    boot_us = getattr(m, "boot_time_us", lambda: None)()
                    if boot_us:
                        t[n]["guest_boot"].append(boot_us / 1e6)
                    br.prepare_browser(vm, timeout=1800)
                    t[n]["cold"].append(time.monotonic() - t0)
                    print(f"{n}: cold boot to CDP-ready: {t[n]['cold'][-1]:.2f} s", file=sys.stderr)
                    if not snapped[n]:
                        engine.snapshot(m, root / f"{n}-snap")
                        snapped[n] = True
                except Exception as e:  # the other samples and engines are measured all the same
                    _failed(failures, n, f"boot {i}", e, root / f"{n}-boot{i}", args.logs)
                finally:
                    if vm is not None:
                        vm.close()
        url_path = "/"
        iterations = max(args.restores, rollbacks)
        for i in range(iterations):
            for n in names if i % 2 == 0 else names[::-1]:
                engine = engines[n]
                roll = engine.supports_rollback and _rolls_back(i, iterations, rollbacks)
                if (i >= args.restores and not roll) or not snapped[n]:
                    continue
                snap = root / f"{n}-snap"
                t0 = time.monotonic()
                mode = "rollback" if roll else "restore"
                vm = None
                line = f"{n} restore {i}: failed"
                try:
                    # The dirty-page log only where a rollback follows (restore mode has none)
                    m = engine.restore(config, snap, root / f"{n}-r{i}", rollback=roll)
                    vm = VM(engine, m, config, snap, mode, command_timeout=900)
                    b = br.open_browser(vm, timeout=300)
                    cdp = time.monotonic() - t0
                    _paint(pw, b.cdp_url, b.page_url(site, url_path))
                    paint = time.monotonic() - t0
                    if i < args.restores:
                        suffix = "_dl" if roll else ""
                        t[n]["ready" + suffix].append(m.ready_seconds)
                        t[n]["cdp" + suffix].append(cdp)
                        t[n]["paint" + suffix].append(paint)
                    line = (
                        f"{n} restore {i}: CDP {cdp * 1000:.0f} ms, painted {paint * 1000:.0f} ms"
                    )
                    if roll:
                        # Back to the warm snapshot in place (the page just painted must be gone).
                        t1 = time.monotonic()
                        vm.reset()
                        b = br.open_browser(vm, timeout=300)
                        t[n]["rollback"].append(time.monotonic() - t1)
                        pages = br._http_json(b.port, "/json/list", timeout=60)
                        if any(str(site) in str(p.get("url", "")) for p in pages):
                            raise RuntimeError(f"{n}: the page survived the rollback: {pages}")
                        line += f", rollback to CDP {t[n]['rollback'][-1] * 1000:.0f} ms"
                except Exception as e:
                    _failed(failures, n, f"restore {i} ({mode})", e, root / f"{n}-r{i}", args.logs)
                finally:
                    if vm is not None:
                        vm.close()
                print(line, file=sys.stderr)
    server.shutdown()
    notes["loadavg_1m_after"] = round(os.getloadavg()[0], 2)

    def med(xs: list[float]) -> float | None:
        return common.summarize_ms([x * 1000 for x in xs])["median_ms"] if xs else None

    from pytest_ignition.nested import inside

    host_where = "nested" if inside() else "host"
    host_cdp_med = med(host_cdp)
    records = []
    for n in names:
        engine = engines[n]
        where = _where(n, engine)
        extra = {**notes, "engine_version": getattr(engine, "version", None) or engine.describe()}
        if len(names) > 1:
            extra["same_run_as"] = [x for x in names if x != n]
        # restore mode's restores (no dirty-page log) make the column; those with the log
        # (followed by a rollback) are a field beside it, or the column when there are no others
        dl = "" if t[n]["cdp"] else "_dl"
        cold, cdp = med(t[n]["cold"]), med(t[n]["cdp" + dl])
        part = {"dirty_log": "on" if dl else "off"}
        if t[n]["ready" + dl]:
            part["agent_ready_median_ms"] = med(t[n]["ready" + dl])

        if failures[n]:
            extra["failures"] = failures[n]

        def rec(metric: str, xs: list[float], n=n, where=where, extra=extra, **kw) -> dict:
            if not xs:  # a column that could not be measured says why instead of vanishing
                why = "; ".join(failures[n]) or "not measured"
                return common.absent_record(metric, n, where, why, **params)
            return common.unchecked_record(
                metric, n, where, params, [x * 1000 for x in xs], **extra, **kw
            )

        records += [
            rec("browser_cold_to_cdp", t[n]["cold"]),
            rec("browser_boot_to_ready", t[n]["boot"]),
        ]
        if t[n]["guest_boot"] or getattr(engine, "supports_rollback", False):
            # the bundled VMM's boot timer (QEMU's engine has none)
            records.append(rec("browser_guest_boot_time", t[n]["guest_boot"], method="boot-timer"))
        ratios = {}
        if cold and cdp:
            ratios["cold_over_restore"] = round(cold / cdp, 1)
        if host_cdp_med and cdp:
            ratios["host_chromium_over_restore"] = round(host_cdp_med / cdp, 3)
        for metric, key in (
            ("browser_restore_to_cdp", "cdp"),
            ("browser_restore_to_paint", "paint"),
        ):
            more = dict(part) if metric.endswith("cdp") else {"dirty_log": part["dirty_log"]}
            if not dl and t[n][key + "_dl"]:
                more["with_dirty_log"] = common.summarize_ms([x * 1000 for x in t[n][key + "_dl"]])
            records.append(rec(metric, t[n][key + dl], **more, **(ratios if key == "cdp" else {})))
        if t[n]["rollback"] or (engine.supports_rollback and rollbacks):
            rb = med(t[n]["rollback"])
            records.append(
                rec(
                    "browser_rollback_to_cdp",
                    t[n]["rollback"],
                    **({"cold_over_rollback": round(cold / rb, 1)} if cold and rb else {}),
                )
            )
    if host_cdp:
        host = {**params, "chromium": "host" if host_where == "host" else "inside the nested host"}
        for metric, xs in (
            ("host_chromium_cold_to_cdp", host_cdp),
            ("host_chromium_cold_to_paint", host_paint),
        ):
            records.append(
                common.unchecked_record(
                    metric, "host", host_where, host, [x * 1000 for x in xs], **notes
                )
            )
    print(json.dumps(records, indent=2))
    for r in records:
        ratio = {k: v for k, v in r.items() if "_over_" in k}
        median = "absent" if r["median_ms"] is None else f"median {r['median_ms']:.0f} ms"
        print(
            f"{r['metric']} {r['engine']}/{r['where']}: {median} (n={r['n']}) {ratio or ''}",
            file=sys.stderr,
        )
    if inside():  # "(none) ... kvm" would say nothing of where this ran
        for r in records:
            r["host"] = _nested_host()
    if not args.no_write:
        _replace(args.results, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
