"""Inside the arm64 nested harness: the plugin's e2e suite on the bundled VMM's aarch64 machine.

One child pytest of ``tests/e2e/test_plugin_vm.py`` (isolation, exit codes and streams, the
command timeout, files both ways, the console shell, the prepare hook, marker and factory
configurations, reset, a rootfs disk) with ``--ignition-engine=ignition`` on real arm64 KVM,
restore mode. The built arm64 guest is passed by path (its cache key hashes the cross tool
chain, which the harness root lacks). A pass needs the child to exit 0 with every test passed,
none skipped, and its report to name the bundled VMM, so that a child that fell back to QEMU
or skipped its VM tests fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from test_vmm_arm64 import _guest

from pytest_ignition._testing import run_child_pytest

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT = 1500.0  # ~20 tests, each a restore, under KVM under TCG on 2 shared cores


def test_plugin_e2e_suite_on_the_bundled_vmm() -> None:
    kernel, initrd = _guest()
    argv = [sys.executable, "-m", "pytest", "tests/e2e/test_plugin_vm.py"]
    argv += ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--color=no", "-rfEs"]
    argv += ["--ignition-engine=ignition", "--ignition-arch=aarch64"]
    argv += [f"--ignition-kernel={kernel}", f"--ignition-initrd={initrd}"]
    env = dict(os.environ, IGNITION_REQUIRE="1")
    run_child_pytest(argv, CHILD_TIMEOUT, cwd=ROOT, env=env, min_passed=15)
