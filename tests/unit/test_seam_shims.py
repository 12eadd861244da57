"""The old import paths of the x86 seam step still give the moved objects themselves:
``vmm.kvm`` (now ``vmm.hypervisor.kvm`` + ``vmm.arch.x86_64.state``), ``vmm.x86_64.*`` (now
``vmm.arch.x86_64.*``) and ``vmm.machine.MachineError`` (now ``vmm.errors``). No VM needed."""

from __future__ import annotations

import importlib

import pytest

from pytest_ignition.vmm import errors, kvm
from pytest_ignition.vmm.arch.x86_64 import state
from pytest_ignition.vmm.hypervisor import kvm as raw

STATE_NAMES = (
    "save_vcpu_state",
    "restore_vcpu_state",
    "restore_vcpu_registers",
    "VcpuRegisterLoad",
    "timer_msrs",
    "use_host_tsc_rate",
    "within_tsc_tolerance",
    "readable_msrs",
    "set_msrs_each",
    "save_vm_state",
    "restore_vm_state",
    "MSR_IA32_TSC",
    "MSR_IA32_TSC_DEADLINE",
)
RAW_NAMES = ("System", "Vm", "Vcpu", "KvmError", "KvmUnavailable", "ffi", "_ioctl", "_libc")
RAW_NAMES += ("_ULONG_ZERO", "_load_ffi", "KVM_RUN", "EXIT_NAMES", "Regs", "Sregs")


@pytest.mark.parametrize("name", STATE_NAMES)
def test_kvm_shim_re_exports_the_x86_state_bundles(name: str) -> None:
    assert getattr(kvm, name) is getattr(state, name)
    assert not hasattr(raw, name)  # moved, not copied


@pytest.mark.parametrize("name", RAW_NAMES)
def test_kvm_shim_re_exports_the_raw_layer(name: str) -> None:
    assert getattr(kvm, name) is getattr(raw, name)


@pytest.mark.parametrize(
    "name", ["boot", "bootparams", "cpuid", "gdt", "layout", "loader", "mptable", "msrs"]
)
def test_old_x86_64_module_paths_are_the_new_modules(name: str) -> None:
    old = importlib.import_module(f"pytest_ignition.vmm.x86_64.{name}")
    assert old is importlib.import_module(f"pytest_ignition.vmm.arch.x86_64.{name}")


def test_one_machine_error_for_both_machines() -> None:
    from pytest_ignition.vmm import machine

    assert machine.MachineError is errors.MachineError
