"""The cap on guest-fed logs (console.log, qemu.log/vmm.log): rotation under an appending writer,
and tails that read across the rotated file; the boot timer's bounded bookkeeping."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from pathlib import Path

from pytest_ignition.console import LogGuard, read_tail, rotate
from pytest_ignition.vmm.devices.legacy import BOOT_TIMER_MAGIC, BootTimer


def test_rotate_keeps_the_last_cap_bytes_and_tail_spans_both(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old line\n" * 1000 + b"LAST-OF-OLD\n")
    assert not rotate(log, cap=1 << 20)  # under the cap: untouched
    assert rotate(log, cap=4096)
    assert log.stat().st_size == 0
    rotated = tmp_path / "console.log.1"
    assert rotated.stat().st_size == 4096 and rotated.read_bytes().endswith(b"LAST-OF-OLD\n")
    with open(log, "ab") as f:
        f.write(b"new\n")
    tail = read_tail(log, 30)
    assert tail.endswith("LAST-OF-OLD\nnew\n")
    assert read_tail(log, 4) == "new\n"


def _console_bytes(d: Path) -> int:
    """Bytes in the console log and its rotations; a file the guard renames between the
    listing and its stat (``console.log.1.tmp`` -> ``console.log.1``) is counted next time."""
    total = 0
    for p in d.iterdir():
        if p.name.startswith("console"):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
    return total


def test_guard_bounds_a_flooding_appender(tmp_path: Path) -> None:
    """A writer appends 64 MiB as fast as it can (as QEMU does with logappend=on); with a 1 MiB
    cap the two files never hold more than the cap plus what one poll interval lets through."""
    log = tmp_path / "console.log"
    cap = 1 << 20
    guard = LogGuard(interval=0.02)
    guard.watch(log, cap)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)\n"
            "line = b'x' * 1023 + b'\\n'\n"
            "for i in range(64 * 1024):\n"
            "    os.write(fd, line)\n"
            "    if i % 1024 == 0: time.sleep(0.002)\n"
            "os.write(fd, b'THE END\\n')\n",
            str(log),
        ]
    )
    peak = 0
    while writer.poll() is None:
        total = _console_bytes(tmp_path)
        peak = max(peak, total)
        time.sleep(0.005)
    assert writer.returncode == 0
    time.sleep(0.1)
    guard.unwatch(log)
    assert guard.rotations >= 2  # how many depends on scheduling; the peak bound is the point
    # 64 MiB written; on disk the cap twice plus what the writer adds between two of the guard's
    # checks (more on a loaded machine): bounded far below what was written
    assert peak < 16 * cap, peak
    assert read_tail(log, 20).endswith("THE END\n")
    assert not (tmp_path / "console.log.1.tmp").exists()


def test_boot_timer_in_a_loop_stays_bounded(caplog) -> None:
    t = BootTimer(logger=logging.getLogger("test.boot_timer"))
    with caplog.at_level(logging.INFO, logger="test.boot_timer"):
        for _ in range(100_000):
            t.write(0, bytes([BOOT_TIMER_MAGIC]))
    assert t.count == 100_000
    assert len(t.boot_times_us) == BootTimer.MAX_KEPT
    assert t.boot_time_us == t.boot_times_us[0]
    lines = [r for r in caplog.records if "Guest-boot-time" in r.getMessage()]
    assert 16 < len(lines) < 40, len(lines)  # the first 16, then powers of two
