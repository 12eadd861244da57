"""Inside the nested harness: Debian images (init=agent and init=systemd) on the bundled VMM.

Runs the image tests of ``tests/e2e/test_images.py`` that boot guests in a child pytest with
``--ignition-engine=ignition``, in restore mode, and the /etc isolation tests in rollback mode
(the overlay's upper layer lives in guest RAM, so an in-place rollback must revert it). The
images come from the cache (built outside by the e2e tier); a pass needs the child to exit 0
with tests passed and none skipped, on the bundled VMM.
"""

from __future__ import annotations

import pytest
from nested_child import run_on_bundled_vmm

TESTS = "tests/e2e/test_images.py"
SELECT = {
    "restore": "python or tcp or etc_write or never_written or systemd",
    "rollback": "etc_write or python",
}
CHILD_TIMEOUT = 1500


@pytest.mark.parametrize("reset", ["restore", "rollback"])
def test_images_on_the_bundled_vmm(reset: str) -> None:
    args = [TESTS, "-k", SELECT[reset], f"--ignition-reset={reset}"]
    run_on_bundled_vmm(args, CHILD_TIMEOUT, deselect_ok=True)
