"""Engine selection decisions, from injected host probes (no VM is started)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pytest_ignition.engines.base import EngineUnavailable, VMConfig
from pytest_ignition.engines.select import HostProbe, decide, probe_host

LINUX = HostProbe(
    system="Linux",
    machine="x86_64",
    kvm_usable=False,
    kvm_pvm=False,
    qemu_path="/usr/bin/qemu-system-x86_64",
    ignition_available=True,
)
NATIVE_KVM = replace(LINUX, kvm_usable=True)
PVM = replace(LINUX, kvm_usable=True, kvm_pvm=True)
MAC = replace(LINUX, system="Darwin")


def test_auto_picks_bundled_vmm_on_native_kvm() -> None:
    d = decide("auto", NATIVE_KVM)
    assert (d.engine, d.accelerator) == ("ignition", "kvm")
    assert "natively" in d.reason


def test_auto_on_pvm_picks_qemu_tcg_and_says_why() -> None:
    d = decide("auto", PVM)
    assert (d.engine, d.accelerator) == ("qemu", "tcg")
    assert "PVM" in d.reason


def test_auto_without_kvm_picks_qemu_tcg() -> None:
    d = decide("auto", LINUX)
    assert (d.engine, d.accelerator) == ("qemu", "tcg")
    assert "/dev/kvm" in d.reason


def test_auto_on_native_kvm_without_bundled_vmm_uses_qemu_kvm() -> None:
    d = decide("auto", replace(NATIVE_KVM, ignition_available=False))
    assert (d.engine, d.accelerator) == ("qemu", "kvm")
    assert "not available" in d.reason


def test_qemu_accelerator_kvm_only_when_not_pvm() -> None:
    assert decide("qemu", NATIVE_KVM).accelerator == "kvm"
    assert decide("qemu", PVM).accelerator == "tcg"
    assert decide("qemu", LINUX).accelerator == "tcg"


def test_qemu_on_macos_uses_hvf_for_the_hosts_own_architecture() -> None:
    assert decide("qemu", MAC).accelerator == "hvf"
    assert decide("auto", MAC).engine == "qemu"
    arm_mac = replace(
        MAC, machine="arm64", qemu_aarch64_path="/opt/homebrew/bin/qemu-system-aarch64"
    )
    # the default guest is the host's (aarch64): HVF; an x86_64 guest there needs TCG
    assert decide("qemu", arm_mac).accelerator == "hvf"
    assert decide("qemu", arm_mac, "x86_64").accelerator == "tcg"
    assert decide("qemu", replace(MAC, qemu_aarch64_path="/q"), "aarch64").accelerator == "tcg"


def test_aarch64_guests() -> None:
    arm_linux = replace(
        NATIVE_KVM, machine="aarch64", qemu_aarch64_path="/usr/bin/qemu-system-aarch64"
    )
    assert (decide("qemu", arm_linux).accelerator, decide("auto", arm_linux).engine) == (
        "kvm",
        "ignition",
    )
    # On an x86_64 host: QEMU TCG, whatever the KVM, and the reason says why.
    for host in (LINUX, NATIVE_KVM, PVM):
        d = decide(
            "auto", replace(host, qemu_aarch64_path="/usr/bin/qemu-system-aarch64"), "aarch64"
        )
        assert (d.engine, d.accelerator) == ("qemu", "tcg") and "aarch64 guest" in d.reason
    with pytest.raises(EngineUnavailable) as ei:
        decide("ignition", replace(NATIVE_KVM, qemu_aarch64_path="/x"), "aarch64")
    assert "host's architecture" in ei.value.reason and "qemu" in ei.value.hint
    with pytest.raises(EngineUnavailable) as ei:
        decide("auto", PVM, "aarch64")
    assert "qemu-system-aarch64" in ei.value.reason and "qemu-system-arm" in ei.value.hint


def test_no_qemu_binary_is_unavailable_with_install_hint() -> None:
    with pytest.raises(EngineUnavailable) as ei:
        decide("auto", replace(LINUX, qemu_path=None))
    assert "qemu-system-x86_64" in ei.value.reason
    assert "apt-get install qemu-system-x86" in ei.value.hint


def test_no_qemu_is_fine_when_the_bundled_vmm_is_picked() -> None:
    assert decide("auto", replace(NATIVE_KVM, qemu_path=None)).engine == "ignition"


def test_ignition_requested_needs_kvm() -> None:
    with pytest.raises(EngineUnavailable) as ei:
        decide("ignition", LINUX)
    assert "/dev/kvm" in ei.value.reason
    d = decide("ignition", PVM)  # allowed, but the reason warns
    assert d.engine == "ignition" and "PVM" in d.reason


def test_ignition_requested_but_not_installed() -> None:
    with pytest.raises(EngineUnavailable):
        decide("ignition", replace(NATIVE_KVM, ignition_available=False))


def test_unknown_engine_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        decide("firecracker", LINUX)


def test_probe_of_this_host_is_consistent() -> None:
    p = probe_host()
    assert p.system
    # PVM is a KVM flavour: it can only be reported alongside a /dev/kvm.
    if p.kvm_pvm and p.kvm_usable:
        assert decide("auto", p).engine == "qemu" or p.qemu_path is None


def test_config_key_tracks_fields_and_files(tmp_path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k" * 10)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i")
    a = VMConfig(kernel=kernel, initrd=initrd)
    assert a.key() == VMConfig(kernel=str(kernel), initrd=initrd).key()
    assert a.key() == replace(a, boot_timeout=5).key()  # timeout does not change the guest
    assert a.key() != replace(a, memory_mib=256).key()
    assert a.key() != replace(a, kernel_args="foo=1").key()
    assert a.key() != replace(a, cpus=2).key()
    before = a.key()
    kernel.write_bytes(b"k" * 11)  # another kernel at the same path
    assert a.key() != before


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        VMConfig(kernel="k", initrd=None, memory_mib=0)
    with pytest.raises(ValueError):
        VMConfig(kernel="k", initrd=None, cpus=0)
