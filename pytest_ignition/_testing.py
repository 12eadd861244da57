"""Helpers for this project's own tests: skipping, or failing under IGNITION_REQUIRE=1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest


def required() -> bool:
    """True when a missing engine/kernel/KVM must fail the run instead of skipping."""
    return os.environ.get("IGNITION_REQUIRE", "").strip().lower() in ("1", "true", "yes", "on")


def require(condition: object, reason: str) -> None:
    """Skip the calling test when ``condition`` is false; fail it under IGNITION_REQUIRE=1."""
    if condition:
        return
    if required():
        pytest.fail(f"IGNITION_REQUIRE=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: default disposition first.

    An ignored SIGINT stays ignored across exec, and Python then installs no KeyboardInterrupt
    handler; a suite started as a background job of a non-interactive shell (``make test &``)
    has it ignored, and its Ctrl-C tests would wait in vain."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (``R``, ``S``, ``Z``...), or None once it is gone.

    A process that exits while its ``stat`` is read gives ESRCH, not only ENOENT."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


BAD_OUTCOMES = ("skipped", "failed", "error", "xfailed", "xpassed")


def run_child_pytest(
    argv: list[str],
    timeout: float,
    *,
    cwd: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    deselect_ok: bool = False,
    engine_header: bool = True,
    min_passed: int = 1,
) -> str:
    """Run the command ``argv`` (a pytest) and check it like a tier's own run: exit 0, at
    least ``min_passed`` tests passed and none skipped, failed or (unless ``deselect_ok``) deselected, and, with
    ``engine_header``, the bundled VMM named in its report header (a child that fell back to
    QEMU or skipped its VM tests fails). Returns its output (the tail is printed, for the
    calling test's failure report)."""
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    print(out[-6000:])
    assert proc.returncode == 0, f"child pytest exited {proc.returncode}"
    if engine_header:
        assert re.search(r"^ignition: engine ignition \(bundled VMM", out, re.M), "engine not used"
    summary = out.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", summary)
    assert m is not None and int(m.group(1)) >= min_passed, summary
    for bad in BAD_OUTCOMES + (() if deselect_ok else ("deselected",)):
        assert bad not in summary, summary
    return out
