"""What a VMM process loads before its guest runs: the start-up cost matters under TCG.

The nested harness runs the VMM's Python under TCG, where each module costs ~50x its native
import time; these tests keep the boot path free of the heavy modules it does not need.
"""

from __future__ import annotations

import json
import subprocess
import sys

from pytest_ignition.vmm import machine

# Modules the boot path must not load (each was measured at 0.2-3 s in the nested harness).
NOT_ON_BOOT_PATH = [
    "pycparser",  # cdef parsing: replaced by the pre-parsed _kvm_ffi module
    "cffi",  # the Python half of cffi is only needed to parse a cdef
    "pytest_ignition.guest",  # the guest build pipeline (filelock, hashlib, subprocess)
    "pytest_ignition.vmm.snapshot",  # loaded by restore/snapshot only
    "hashlib",
    "uuid",
    "tempfile",
    "shutil",
]

_PROBE = """
import json, sys
from pytest_ignition.vmm import __main__ as m
args = m.build_parser().parse_args(
    ["boot", "--kernel", "k", "--vsock", "v.sock", "--control", "c.sock", "--boot-timer"]
)
from pytest_ignition.vmm import control, kvm, machine, vcpu
from pytest_ignition.vmm.devices import legacy
from pytest_ignition.vmm.devices.virtio import mmio, rng, vsock
from pytest_ignition.vmm.arch.x86_64 import loader
assert machine.default_cmdline()
print(json.dumps(sorted(sys.modules)))
"""


def _modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return set(json.loads(out))


def test_boot_path_imports_stay_light():
    loaded = _modules(_PROBE)
    assert "pytest_ignition.vmm.machine" in loaded  # the probe did import the boot path
    heavy = sorted(m for m in NOT_ON_BOOT_PATH if m in loaded)
    assert heavy == [], f"the VMM boot path imports {heavy}"


def test_restore_path_still_has_what_it_needs():
    loaded = _modules(
        _PROBE.replace("import loader", "import loader\nimport pytest_ignition.vmm.snapshot")
    )
    assert {"pytest_ignition.vmm.snapshot", "hashlib", "json"} <= loaded


def test_vmm_default_cmdline_is_the_guest_pipelines():
    from pytest_ignition.guest import DEFAULT_CMDLINE

    assert machine.DEFAULT_CMDLINE == DEFAULT_CMDLINE
    assert machine.default_cmdline() == DEFAULT_CMDLINE
