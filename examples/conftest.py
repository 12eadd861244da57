"""Example conftest: prepare the guest once, before the session snapshot.

Everything this hook does is in the snapshot, so every test starts with it, and no test pays
for it again.
"""

GREET = """#!/bin/sh
# installed by examples/conftest.py before the snapshot
echo "hello, ${1:-world}, from $(hostname)"
"""


def pytest_ignition_prepare(vm):
    vm.run("mkdir -p /srv/app").check()
    vm.write_file("/usr/bin/greet", GREET, mode=0o755)
    vm.write_file("/srv/app/config.ini", "[app]\nmode = demo\n")
