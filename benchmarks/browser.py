"""Benchmark: the disposable browser (the seed's second table), QEMU engine on this machine.

Metrics (records in ``benchmarks/results/browser.json``, engine ``qemu``, where = accelerator):

* ``browser_cold_to_cdp``: VM launch (cold boot of the browser guest) → Chromium started →
  its DevTools endpoint answers on the forwarded host port. ``browser_boot_to_ready`` is the
  guest-boot part of it (launch → agent ready).
* ``browser_restore_to_cdp``: restore launched → agent ready → DevTools answers (the warm
  browser from the snapshot).
* ``browser_restore_to_paint``: restore launched → Playwright connected over CDP → a page
  served from the host loaded and painted (two animation frames after ``load``).
* ``host_chromium_cold_to_cdp`` / ``host_chromium_cold_to_paint`` (engine ``host``): the same
  Chromium started cold on this host with the same flags, what users would do instead.

Ratios (cold ÷ restore, host ÷ restore) are computed by the report from the medians of this
run. Usage: ``python -m benchmarks.browser [--restores 10] [--host-starts 5] [--memory 2048]``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

RESULTS = common.RESULTS_DIR / "browser.json"
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
        with tempfile.TemporaryDirectory(prefix="ign-bench-chromium-") as profile:
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
            )
            try:
                br.wait_devtools(port, 120, "host chromium")
                to_cdp.append(time.monotonic() - t0)
                _paint(pw, f"http://127.0.0.1:{port}", url)
                to_paint.append(time.monotonic() - t0)
            finally:
                proc.kill()
                proc.wait(30)
    return to_cdp, to_paint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=1, help="cold boots to CDP-ready")
    ap.add_argument("--restores", type=int, default=10)
    ap.add_argument("--host-starts", type=int, default=5)
    ap.add_argument("--memory", type=int, default=2048, help="guest memory, MiB")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from pytest_ignition import browser as br
    from pytest_ignition.engines.base import VMConfig
    from pytest_ignition.engines.qemu import QemuEngine
    from pytest_ignition.engines.select import decide, probe_host
    from pytest_ignition.guest import build_guest, find_guest
    from pytest_ignition.guest.image import ensure_image
    from pytest_ignition.vm import VM

    guest = find_guest() or build_guest(progress=lambda m: print(m, file=sys.stderr))
    image = ensure_image("debian:bookworm", packages=br.BROWSER_PACKAGES)
    accel = decide("qemu", probe_host()).accelerator
    engine = QemuEngine(accelerator=accel)
    config = VMConfig(
        kernel=guest.kernel,
        initrd=guest.initrd,
        memory_mib=args.memory,
        image=image.path,
        kernel_args=br.ROLE_ARG,
        boot_timeout=600,
    )
    params = {
        "memory_mib": args.memory,
        "cpus": 1,
        "qemu": engine.version,
        "image": "debian:bookworm+chromium",
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = server.server_address[1]
    cold: list[float] = []
    boot: list[float] = []
    restore_cdp: list[float] = []
    restore_paint: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ign-bench-browser-") as d, sync_playwright() as pw:
        root = Path(d)
        for i in range(args.boots):
            t0 = time.monotonic()
            m = engine.boot(config, root / f"boot{i}")
            vm = VM(engine, m, config, command_timeout=600)
            try:
                boot.append(m.ready_seconds)
                br.prepare_browser(vm, timeout=600)
                cold.append(time.monotonic() - t0)
                print(f"cold boot to CDP-ready: {cold[-1]:.2f} s", file=sys.stderr)
                if i == 0:
                    engine.snapshot(m, root / "snap")
            finally:
                vm.close()
        for i in range(args.restores):
            t0 = time.monotonic()
            m = engine.restore(config, root / "snap", root / f"r{i}")
            vm = VM(engine, m, config, command_timeout=600)
            try:
                b = br.open_browser(vm, timeout=120)
                restore_cdp.append(time.monotonic() - t0)
                url = b.page_url(site, "/")
                _paint(pw, b.cdp_url, url)
                restore_paint.append(time.monotonic() - t0)
            finally:
                vm.close()
            print(
                f"restore {i}: CDP {restore_cdp[-1] * 1000:.0f} ms, "
                f"painted {restore_paint[-1] * 1000:.0f} ms",
                file=sys.stderr,
            )
        host_cdp, host_paint = host_chromium(pw, args.host_starts, f"http://127.0.0.1:{site}/")
    server.shutdown()

    def rec(metric: str, eng: str, where: str, seconds: list[float], extra: dict | None = None):
        return common.unchecked_record(
            metric, eng, where, {**params, **(extra or {})}, [s * 1000 for s in seconds]
        )

    records = [
        rec("browser_cold_to_cdp", "qemu", accel, cold),
        rec("browser_boot_to_ready", "qemu", accel, boot),
        rec("browser_restore_to_cdp", "qemu", accel, restore_cdp),
        rec("browser_restore_to_paint", "qemu", accel, restore_paint),
    ]
    if host_cdp:
        host = {"chromium": "host"}
        records += [
            rec("host_chromium_cold_to_cdp", "host", "host", host_cdp, host),
            rec("host_chromium_cold_to_paint", "host", "host", host_paint, host),
        ]
    print(json.dumps(records, indent=2))
    if cold and restore_cdp:
        med = sorted(restore_cdp)[len(restore_cdp) // 2]
        print(f"cold/restore to CDP-ready: {cold[0] / med:.1f}x", file=sys.stderr)
    if not args.no_write:
        common.write_records(RESULTS, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
