"""The bundled-VMM engine boots once more after an early triple fault, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ignition.engines.base import BootError, VMConfig
from pytest_ignition.engines.ignition import IgnitionEngine

FAULT = "the guest stopped before it booted (the VMM exited with 0)\nthe VMM said: triple_fault"


def _engine(monkeypatch: pytest.MonkeyPatch, outcomes: list[object]) -> IgnitionEngine:
    engine = IgnitionEngine(python="python3")
    calls: list[object] = []

    def fake_boot_once(config: VMConfig, workdir: Path) -> object:
        outcome = outcomes[len(calls)]
        calls.append(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(engine, "_boot_once", fake_boot_once)
    engine.calls = calls  # type: ignore[attr-defined]
    return engine


def test_an_early_triple_fault_boots_once_more(monkeypatch, tmp_path) -> None:
    engine = _engine(monkeypatch, [BootError(FAULT, "early console"), "machine"])
    with pytest.warns(RuntimeWarning, match="triple-faulted before its init ran"):
        assert engine.boot(VMConfig(kernel=tmp_path / "k", initrd=None), tmp_path) == "machine"
    assert engine.boot_retries == 1 and len(engine.calls) == 2  # type: ignore[attr-defined]


def test_a_second_fault_is_the_boot_error(monkeypatch, tmp_path) -> None:
    engine = _engine(monkeypatch, [BootError(FAULT, ""), BootError(FAULT + " again", "")])
    with pytest.warns(RuntimeWarning), pytest.raises(BootError, match="again"):
        engine.boot(VMConfig(kernel=tmp_path / "k", initrd=None), tmp_path)


@pytest.mark.parametrize(
    "error",
    [
        BootError("agent did not answer within 120 s", ""),  # not a fault: no retry
        BootError(FAULT, "...\nignition: init done\n"),  # faulted after init: a real crash
    ],
)
def test_other_boot_errors_are_not_retried(monkeypatch, tmp_path, error) -> None:
    engine = _engine(monkeypatch, [error, "machine"])
    with pytest.raises(BootError):
        engine.boot(VMConfig(kernel=tmp_path / "k", initrd=None), tmp_path)
    assert engine.boot_retries == 0
