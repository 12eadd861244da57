"""Inside the nested harness: signals to pytest on the bundled VMM leave nothing behind (issue 16).

Runs ``tests/e2e/test_signals.py`` in a child pytest with ``IGNITION_SIGNALS_ENGINE=ignition``:
SIGINT during a stuck background restore, SIGTERM, SIGKILL and SIGKILL of one xdist worker, each
followed by a run that must find zero VM processes (the fork server and the VMMs it forked
included), sockets, overlays and work dirs of the killed one. The chain's last inner run must
name the bundled VMM in its summary (checked there); a pass here needs the child to exit 0 with
the test passed and none skipped.

Part of ``make test-nested``: five inner pytest runs, each booting and snapshotting the guest
in the harness. Before the TSC-rate fix it passed 1 run in 3 there (the other two: a forked
guest's agent silent for 120-300 s, KVM's stale TSC rate); after it, it passed on
2026-12-02 13:40Z beside two other harness hosts. Alone::

    python -m pytest_ignition.nested run -- .venv/bin/python -m pytest \\
        tests/nested/test_signals_ignition.py -v
"""

from __future__ import annotations

import pytest
from nested_child import run_on_bundled_vmm

CHILD_TIMEOUT = 3000


def test_signals_on_the_bundled_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNITION_SIGNALS_ENGINE", "ignition")
    out = run_on_bundled_vmm(["tests/e2e/test_signals.py", "-s"], CHILD_TIMEOUT, header=False)
    assert "SIGINT during a background restore: pytest ended" in out, out[-2000:]
    for label in ("SIGINT", "SIGTERM", "SIGKILL", "xdist worker SIGKILL"):
        assert f"{label}: left behind {{'processes': 0, 'sockets': 0" in out, label
