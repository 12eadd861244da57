"""End-to-end tests of the plugin: the prepare hook every e2e test relies on."""

from __future__ import annotations

PREPARED_PATH = "/etc/ignition-e2e-prepared"
PREPARED_TEXT = "prepared by tests/e2e/conftest.py\n"


def pytest_ignition_prepare(vm):
    # Runs once per guest configuration, before the snapshot: every test sees this file.
    vm.write_file(PREPARED_PATH, PREPARED_TEXT, mode=0o640)
    vm.run("echo 1 > /tmp/prepare-ran").check()
