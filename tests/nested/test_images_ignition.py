"""Inside the nested harness: Debian images (init=agent and init=systemd) on the bundled VMM.

Runs the image tests of ``tests/e2e/test_images.py`` that boot guests in a child pytest with
``--ignition-engine=ignition``, in restore mode, and the /etc isolation tests in rollback mode
(the overlay's upper layer lives in guest RAM, so an in-place rollback must revert it). The
images come from the cache (built outside by the e2e tier); a pass needs the child to exit 0
with tests passed and none skipped, on the bundled VMM.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_ignition._testing import require

ROOT = Path(__file__).resolve().parents[2]
TESTS = "tests/e2e/test_images.py"
SELECT = {
    "restore": "python or tcp or etc_write or never_written or systemd",
    "rollback": "etc_write or python",
}
CHILD_TIMEOUT = 1500


@pytest.mark.parametrize("reset", ["restore", "rollback"])
def test_images_on_the_bundled_vmm(reset: str) -> None:
    from pytest_ignition.engines.ignition import available
    from pytest_ignition.guest import find_guest

    ok, why = available()
    require(ok, why)
    require(find_guest() is not None, "guest not built (python -m pytest_ignition.guest build)")
    argv = [sys.executable, "-m", "pytest", TESTS, "-k", SELECT[reset], "-p", "no:cacheprovider"]
    argv += ["--color=no", "-rfEs", "--ignition-engine=ignition", f"--ignition-reset={reset}"]
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    out = proc.stdout.decode(errors="replace")
    print(out[-6000:])
    assert proc.returncode == 0, f"child pytest exited {proc.returncode}"
    assert re.search(r"^ignition: engine ignition \(bundled VMM", out, re.M), "engine not used"
    summary = out.strip().splitlines()[-1]
    m = re.search(r"(\d+) passed", summary)
    assert m is not None and int(m.group(1)) > 0, summary
    for bad in ("skipped", "failed", "error", "xfailed", "xpassed"):
        assert bad not in summary, summary
