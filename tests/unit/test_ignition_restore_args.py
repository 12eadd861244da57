"""The bundled-VMM engine restores without a dirty-page log when rollback will not be asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_ignition.engines.base import EngineError, VMConfig
from pytest_ignition.engines.ignition import IgnitionEngine


class _Launched(Exception):
    pass


def _restore_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **kw: object) -> list[str]:
    engine = IgnitionEngine(python="python3")
    seen: list[list[str]] = []

    def launch(m: object, argv: list[str]) -> float:
        seen.append(argv)
        raise _Launched

    monkeypatch.setattr(engine, "read_meta", lambda config, directory: {})
    monkeypatch.setattr(engine, "_check_files", lambda config: None)
    monkeypatch.setattr(engine, "_launch", launch)
    (tmp_path / "w").mkdir(exist_ok=True)
    config = VMConfig(kernel=tmp_path / "k", initrd=None)
    with pytest.raises(_Launched):
        engine.restore(config, tmp_path / "snap", tmp_path / "w", **kw)  # type: ignore[arg-type]
    return seen[0]


def test_restore_mode_turns_the_dirty_log_off(monkeypatch, tmp_path) -> None:
    argv = _restore_argv(monkeypatch, tmp_path, rollback=False)
    assert argv[3] == "restore" and "--no-rollback" in argv


def test_rollback_mode_keeps_it(monkeypatch, tmp_path) -> None:
    assert "--no-rollback" not in _restore_argv(monkeypatch, tmp_path)
    assert "--no-rollback" not in _restore_argv(monkeypatch, tmp_path, rollback=True)


def test_rollback_of_a_machine_restored_without_the_log_is_refused(tmp_path) -> None:
    from pytest_ignition.engines.ignition import IgnitionMachine

    engine = IgnitionEngine(python="python3")
    (tmp_path / "w").mkdir()
    m = IgnitionMachine(engine, VMConfig(kernel=tmp_path / "k", initrd=None), tmp_path / "w")
    try:
        m.rollback_ok = False
        with pytest.raises(EngineError, match="rollback=False"):
            engine.rollback(m)
    finally:
        m.close()
