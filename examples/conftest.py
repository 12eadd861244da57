"""Example conftest: prepare the guest once, before the session snapshot.

Everything this hook does is in the snapshot, so every test starts with it, and no test pays
for it again. Commands run with /usr/local/sbin and /usr/local/bin on PATH, so a tool
installed there is found by name, as on any Linux machine.
"""

GREET = """#!/bin/sh
# installed by examples/conftest.py before the snapshot
echo "hello, ${1:-world}, from $(hostname)"
"""


def pytest_ignition_prepare(vm):
    vm.run("mkdir -p /srv/app").check()
    vm.write_file("/usr/local/bin/greet", GREET, mode=0o755)  # parents are created
    vm.write_file("/srv/app/config.ini", "[app]\nmode = demo\n")
