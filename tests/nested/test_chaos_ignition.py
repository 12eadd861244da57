"""Inside the nested harness: the chaos scenarios (tests/chaos) on the bundled VMM (issue 16).

Runs ``tests/chaos/test_chaos.py`` in a child pytest with ``IGNITION_CHAOS_ENGINE=ignition``: in
the middle of a test the guest panics, powers off, loses its agent (killed, OOM-killed), runs a
fork bomb, fills its disk and tmpfs, floods its console, offers a file over the transfer cap and
sets traps for ``copy_from``; each gives a clear error or a safe result within its timeout, the
next test passes, and the pytest process's RSS and the VM work dirs' bytes stay bounded (asserted
there). Restore mode runs the whole module (with the prepare-hook timeout under ``-n 2``);
rollback mode the chaos session (a broken VM must come back as a fresh restore, never a rollback
in place). The inner sessions' headers (shown with ``-s``) must name the bundled VMM and the mode.

Part of ``make test-nested`` (both modes: 242 s on a quiet machine, 2026-12-02 06:10Z; about
6 min beside two other harness hosts, 2026-12-02 13:33Z). Before the TSC-rate fix the chaos
session alone took 21 min there. ``poweroff -f`` is a halt in the default guest (no ACPI); the
bundled VMM's halt watch ends that VM with exit status 3 (``vmm/halt.py``), so the command
fails at once with "the guest powered off or halted". Alone::

    python -m pytest_ignition.nested run -- .venv/bin/python -m pytest \\
        tests/nested/test_chaos_ignition.py -v
"""

from __future__ import annotations

import re

import pytest
from nested_child import run_on_bundled_vmm

CHILD_TIMEOUT = 3000
# Boot/restore deadline of the inner sessions: restores in the harness took 4-9 s quiet and up
# to 53 s with four other harnesses running (load 15 on 2 cores); only a failure waits for it.
INNER_BOOT_TIMEOUT = "600"


@pytest.mark.parametrize("reset", ["restore", "rollback"])
def test_chaos_on_the_bundled_vmm(reset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_CHAOS_ENGINE", "ignition")
    monkeypatch.setenv("IGNITION_RESET", reset)
    monkeypatch.setenv("IGNITION_TIMEOUT", INNER_BOOT_TIMEOUT)
    args = ["tests/chaos/test_chaos.py", "-s"]
    if reset == "rollback":
        args += ["-k", "chaos_session"]
    out = run_on_bundled_vmm(args, CHILD_TIMEOUT, deselect_ok=reset == "rollback")
    assert re.search(rf"^ignition: .*, reset {reset},", out, re.M), f"reset mode {reset} not used"
    assert "chaos session:" in out
    for line in out.splitlines():  # the inner session's RSS and disk figures (shown with -s)
        if "chaos session:" in line:
            print(f"[{reset}] {line.strip()}")
