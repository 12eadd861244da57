"""The `auto` engine's fallback rule (engines/select.vmm_fault) and the session's switch to QEMU."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_ignition.engines import select
from pytest_ignition.fixtures import FALLBACK_MARKER, IgnitionSession

PANIC = "[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n"


@pytest.mark.parametrize(
    "exit_code,tail,message,expected",
    [
        # the VMM's own failures: fall back
        (
            1,
            "",
            "the VMM exited before the guest booted (the VMM exited with 1)\nthe VMM said: "
            "python -m pytest_ignition.vmm: KVM_RUN: internal error",
            "exited with 1 (the VM broke): python -m pytest_ignition.vmm: KVM_RUN: internal error",
        ),
        (
            2,
            "",
            "x\nthe VMM said: cannot create the VM: KVM_CREATE_VM: EBUSY",
            "exited with 2 (it could not set the VM up): cannot create the VM",
        ),
        (-11, "early console text\n", "", "crashed (SIGSEGV)"),
        (None, "Linux version 6.1\n", "did not answer", "never answered"),
        # the guest's own failures (QEMU would hit them too): no fallback
        (0, PANIC, "", None),
        (1, PANIC, "", None),  # a panicking guest is the guest's fault whatever the VMM did
        (None, PANIC, "", None),
        (0, "reboot: Power down\n", "", None),
    ],
)
def test_vmm_fault(exit_code: int | None, tail: str, message: str, expected: str | None) -> None:
    reason = select.vmm_fault(exit_code, tail, message)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


def test_assume_native_kvm_hook_makes_auto_pick_the_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = select.probe_host()
    monkeypatch.setenv("IGNITION_ASSUME_NATIVE_KVM", "1")
    hooked = select.probe_host()
    assert hooked.assume_native and hooked.kvm_pvm == real.kvm_pvm
    if real.kvm_usable and real.ignition_available and real.system == "Linux":
        d = select.decide("auto", hooked)
        assert d.engine == "ignition"
        if real.kvm_pvm:
            assert "IGNITION_ASSUME_NATIVE_KVM=1" in d.reason
    if real.qemu_path:  # QEMU's accelerator still follows the real KVM (TCG on PVM)
        assert select.decide("qemu", hooked).accelerator == select.decide("qemu", real).accelerator
    monkeypatch.setenv("IGNITION_ASSUME_NATIVE_KVM", "0")
    assert not select.probe_host().assume_native


class _Session:
    fall_back = IgnitionSession.fall_back

    def __init__(self, setting: str, engine: Any, root: Path | None) -> None:
        self._settings = SimpleNamespace(engine=setting, arch="x86_64")
        self.settings = self._settings
        self.lock = threading.RLock()
        self._engine = engine
        self._engine_reason = "auto: native KVM"
        self.fallback: str | None = None
        self.root = root
        self.progress: list[str] = []

    def _progress(self, message: str) -> None:
        self.progress.append(message)


def _fake_select(monkeypatch: pytest.MonkeyPatch, ok: bool = True) -> SimpleNamespace:
    qemu = SimpleNamespace(name="qemu")

    def fake(name: str, probe: Any = None, arch: str | None = None) -> tuple[Any, str]:
        assert name == "qemu"
        if not ok:
            raise select.EngineUnavailable("qemu-system-x86_64 was not found on PATH")
        return qemu, "requested"

    monkeypatch.setattr(select, "select_engine", fake)
    return qemu


def test_auto_falls_back_and_leaves_a_marker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    qemu = _fake_select(monkeypatch)
    vmm = SimpleNamespace(name="ignition")
    s = _Session("auto", vmm, tmp_path)
    assert s.fall_back(vmm, "the bundled VMM exited with 1") is True
    assert s._engine is qemu and s.fallback == "the bundled VMM exited with 1"
    assert "fell back" in s._engine_reason
    assert (tmp_path / FALLBACK_MARKER).read_text() == "the bundled VMM exited with 1"
    assert "falling back to QEMU" in s.progress[-1]


@pytest.mark.parametrize(
    "setting,engine,reason",
    [
        ("ignition", "ignition", "the bundled VMM exited with 1"),  # explicit: never falls back
        ("auto", "ignition", None),  # the guest's fault
        ("auto", "qemu", "whatever"),  # already QEMU
    ],
)
def test_no_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str, engine: str, reason: str | None
) -> None:
    _fake_select(monkeypatch)
    current = SimpleNamespace(name=engine)
    s = _Session(setting, current, tmp_path)
    assert s.fall_back(current, reason) is False
    assert s._engine is current and s.fallback is None
    assert not (tmp_path / FALLBACK_MARKER).exists()


def test_no_qemu_to_fall_back_to(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_select(monkeypatch, ok=False)
    vmm = SimpleNamespace(name="ignition")
    s = _Session("auto", vmm, tmp_path)
    assert s.fall_back(vmm, "the bundled VMM exited with 1") is False
    assert s._engine is vmm and "no QEMU to fall back to" in s.progress[-1]
