"""Run inside a nested harness host whose KVM started with a stale TSC rate (see
test_tsc_rate.py): what a raw new vCPU and the VMM's vCPUs see, and whether guest timers work.
Prints one JSON object."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from pytest_ignition.engines.base import VMConfig
from pytest_ignition.engines.ignition import IgnitionEngine
from pytest_ignition.guest import find_guest
from pytest_ignition.vmm import kvm  # the shim: raw ioctls + the x86 state rules


def main() -> None:
    out: dict[str, object] = {}
    system = kvm.System()
    vm = system.create_vm()
    vcpu = vm.create_vcpu(0)
    out["raw_khz"] = vcpu.get_tsc_khz()
    out["raw_tsc"] = kvm.readable_msrs(vcpu, [kvm.MSR_IA32_TSC]).get(kvm.MSR_IA32_TSC)
    out["fixed_khz"] = kvm.use_host_tsc_rate(vcpu)
    t1 = kvm.readable_msrs(vcpu, [kvm.MSR_IA32_TSC])[kvm.MSR_IA32_TSC]
    time.sleep(0.2)
    t2 = kvm.readable_msrs(vcpu, [kvm.MSR_IA32_TSC])[kvm.MSR_IA32_TSC]
    out["fixed_tsc"] = [t1, t2]
    vm.close()
    system.close()

    guest = find_guest()
    assert guest is not None, "guest not built"
    config = VMConfig(kernel=guest.kernel, initrd=guest.initrd, memory_mib=256, boot_timeout=120)
    engine = IgnitionEngine()
    root = Path(tempfile.mkdtemp(prefix="tsc-"))
    m = engine.boot(config, root / "boot")
    try:
        t0 = time.monotonic()
        r = m.agent.exec(["sleep", "1"], timeout=30)
        out["boot_sleep"] = [r.exit_code, round(time.monotonic() - t0, 2)]
        engine.snapshot(m, root / "snaps" / "s")
    finally:
        m.close()
    m = engine.restore(config, root / "snaps" / "s", root / "restore")
    try:
        t0 = time.monotonic()
        r = m.agent.exec(["sleep", "1"], timeout=30)
        out["restore_sleep"] = [r.exit_code, round(time.monotonic() - t0, 2)]
    finally:
        m.close()
    print("TSC-CHILD " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
