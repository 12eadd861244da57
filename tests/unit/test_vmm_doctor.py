"""doctor's decisions and the macOS engine choice, from injected host facts (no Mac here)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pytest_ignition.engines.base import EngineUnavailable
from pytest_ignition.engines.select import HostProbe, decide
from pytest_ignition.vmm import doctor

MAC = doctor.Facts(
    system="Darwin",
    machine="arm64",
    macos_version=(15, 1),
    framework_present=True,
    codesign_present=True,
    interpreter="/opt/homebrew/bin/python3",
    interpreter_entitled=False,
    signed_copy="/Users/u/.cache/pytest-ignition/hvf/python3-hvf",
    signed_copy_entitled=True,
    c_compiler="xcrun clang",
    qemu_aarch64="/opt/homebrew/bin/qemu-system-aarch64",
)
LINUX = doctor.Facts(
    system="Linux", machine="x86_64", kvm_present=True, kvm_usable=True, kvm_pvm=True,
    qemu_x86_64="/usr/bin/qemu-system-x86_64",
)  # fmt: skip


def test_mac_with_everything_uses_the_signed_copy() -> None:
    r = doctor.diagnose(MAC)
    assert r.hvf_problem is None and r.interpreter == MAC.signed_copy
    text = "\n".join(r.lines)
    assert "EXPERIMENTAL" in text and "auto: QEMU with -accel hvf" in text


@pytest.mark.parametrize(
    "change,problem",
    [
        (dict(macos_version=(14, 6)), "needs macOS 15"),
        (dict(macos_version=None), "needs macOS 15"),
        (dict(framework_present=False), "is missing"),
        (dict(signed_copy=None, signed_copy_entitled=False), "--sign"),
        (dict(machine="x86_64"), "Apple silicon"),
        (dict(c_compiler=None), "xcode-select --install"),
        (dict(vmm_import_error="ModuleNotFoundError: No module named 'cffi'"), "'cffi'"),
    ],
)
def test_mac_checks(change: dict, problem: str) -> None:
    r = doctor.diagnose(replace(MAC, **change))
    assert r.hvf_problem is not None and problem in r.hvf_problem
    assert r.interpreter is None
    assert any("not available" in line for line in r.lines)


def test_mac_without_copy_or_codesign_says_how_to_get_them() -> None:
    r = doctor.diagnose(
        replace(MAC, signed_copy=None, signed_copy_entitled=False, codesign_present=False)
    )
    assert any("--sign makes one" in line and "xcode-select" in line for line in r.lines)


def test_entitled_interpreter_needs_no_copy() -> None:
    r = doctor.diagnose(
        replace(MAC, interpreter_entitled=True, signed_copy=None, signed_copy_entitled=False)
    )
    assert r.hvf_problem is None and r.interpreter == MAC.interpreter


def test_linux_reports_kvm_pvm_and_autos_pick() -> None:
    text = "\n".join(doctor.diagnose(LINUX).lines)
    assert "PVM" in text and "does not apply" in text and "auto: qemu (tcg)" in text
    native = "\n".join(doctor.diagnose(replace(LINUX, kvm_pvm=False)).lines)
    assert "auto: ignition (kvm)" in native
    none = "\n".join(doctor.diagnose(replace(LINUX, kvm_present=False, kvm_usable=False)).lines)
    assert "/dev/kvm: absent" in none and "auto: qemu (tcg)" in none


def test_doctor_runs_on_this_host(capsys) -> None:
    assert doctor.main([]) == 0  # not macOS here: informational, exit 0
    assert "host: " in capsys.readouterr().out


def probe_mac(**kw) -> HostProbe:
    base = dict(
        system="Darwin", machine="arm64", kvm_usable=False, kvm_pvm=False, qemu_path=None,
        ignition_available=True, qemu_aarch64_path="/opt/homebrew/bin/qemu-system-aarch64",
        hvf_problem=None,
    )  # fmt: skip
    base.update(kw)
    return HostProbe(**base)


def test_auto_on_macos_keeps_qemu_hvf_even_when_doctor_passes() -> None:
    d = decide("auto", probe_mac())
    assert (d.engine, d.accelerator) == ("qemu", "hvf")


def test_ignition_on_macos_after_doctor_is_experimental_hvf() -> None:
    d = decide("ignition", probe_mac())
    assert (d.engine, d.accelerator) == ("ignition", "hvf") and "EXPERIMENTAL" in d.reason


def test_ignition_on_macos_refused_until_doctor_passes() -> None:
    with pytest.raises(EngineUnavailable, match="needs macOS 15"):
        decide(
            "ignition",
            probe_mac(hvf_problem=doctor.hvf_problem(replace(MAC, macos_version=(14, 0)))),
        )
    # a probe that never ran the checks (the default) is refused too
    p = HostProbe("Darwin", "arm64", False, False, None, True, "/q")
    with pytest.raises(EngineUnavailable, match="were not run"):
        decide("ignition", p)


def test_import_check_runs_the_interpreter_as_the_engine_does(tmp_path) -> None:
    """doctor's import check, executed here with this interpreter: the VMM's imports work with
    hvf_sign.vmm_env's PYTHONPATH; a python that cannot import them reports the error's line."""
    import sys

    assert doctor._import_error(sys.executable) == ""
    fake = tmp_path / "python3-hvf"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'cffi'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    assert doctor._import_error(str(fake)) == "ModuleNotFoundError: No module named 'cffi'"
    assert doctor._import_error(None) is None
