"""Inside the nested harness: ``--ignition-keep-failed`` on the bundled VMM.

Runs ``tests/e2e/test_keep_failed.py`` in a child pytest with ``IGNITION_KEEP_TEST_ENGINE=ignition``:
its inner runs use ``IGNITION_ENGINE=ignition`` and check that their header names the bundled VMM,
that exactly the failed test's VMM process outlives pytest (under its keeper), that ``attach``
(pexpect) reaches the agent over vsock and sees the failed test's files, that ``kill`` and
``--ignition-keep-failed-for`` end it with nothing left over. A pass needs all three tests passed
and none skipped (a missing engine or guest fails under IGNITION_REQUIRE=1 and skips otherwise).

Not part of ``make test-nested``: three inner pytest sessions, each booting and snapshotting the
guest, plus a Python start under TCG for every CLI call. Measured in the harness on the 2-core
machine (2026-12-02): passed in 4.7 min at outer load ~4; two runs at load ~15 failed on its
deadlines then (a 60 s CLI call, a 4 s keep time that expired before the inner pytest ended; both
are stretched inside the harness now), so it is not known to be reliable under a loaded CI. Run it
with ``IGNITION_NESTED_LONG=1``::

    python -m pytest_ignition.nested run -- env IGNITION_NESTED_LONG=1 \
        .venv/bin/python -m pytest tests/nested/test_keep_failed_ignition.py -v -s
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest
from nested_child import ROOT

from pytest_ignition._testing import BAD_OUTCOMES, require

# Measured inside the harness on the 2-core machine; the ceiling only keeps a hung child from
# holding the harness until the harness's own timeout.
CHILD_TIMEOUT = 2700


@pytest.mark.skipif(
    os.environ.get("IGNITION_NESTED_LONG") != "1",
    reason="long (~5 min in the harness, more under load): IGNITION_NESTED_LONG=1 runs it",
)
def test_keep_failed_attach_kill_on_the_bundled_vmm() -> None:
    from pytest_ignition.engines.ignition import available
    from pytest_ignition.guest import find_guest

    ok, why = available()
    require(ok, why)
    require(find_guest() is not None, "guest not built (python -m pytest_ignition.guest build)")
    argv = [sys.executable, "-m", "pytest", "tests/e2e/test_keep_failed.py", "-v"]
    argv += ["-p", "no:cacheprovider", "-p", "no:xdist", "--color=no", "-rfEs", "--durations=0"]
    with tempfile.TemporaryFile() as log:  # read back also when the child times out
        try:
            proc = subprocess.run(
                argv,
                cwd=ROOT,
                env={**os.environ, "IGNITION_KEEP_TEST_ENGINE": "ignition"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=CHILD_TIMEOUT,
                check=False,
            )
        finally:
            log.seek(0)
            out = log.read().decode(errors="replace")
            print(out[-12000:])  # shown by pytest when this test fails
    assert proc.returncode == 0, f"child pytest exited {proc.returncode}"
    summary = out.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", summary)
    assert m is not None and int(m.group(1)) == 3, summary
    for bad in BAD_OUTCOMES:
        assert bad not in summary, summary
