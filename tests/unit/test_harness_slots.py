"""At most IGNITION_NESTED_SLOTS nested harness hosts at once; a run waits, then says why."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pytest_ignition import _harness_slots as hs


def _holder(lock_dir, index: int) -> subprocess.Popen:
    """Another process holding slot ``index`` until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({str(lock_dir / f"nested-slot-{index}.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_takes_a_free_slot_and_gives_it_back(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(hs.SLOTS_ENV, "2")
    holder = _holder(tmp_path, 0)
    try:
        with hs.slot(tmp_path) as i:
            assert i == 1
        with hs.slot(tmp_path) as i:  # released: the same one again
            assert i == 1
    finally:
        holder.communicate("")


def test_waits_then_fails_naming_the_settings(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(hs.SLOTS_ENV, "1")
    monkeypatch.setenv(hs.WAIT_ENV, "30")
    now = [0.0]
    said: list[str] = []
    holder = _holder(tmp_path, 0)
    try:

        def sleep(s: float) -> None:
            now[0] += s

        with pytest.raises(
            hs.SlotTimeout, match="IGNITION_NESTED_SLOTS.*IGNITION_NESTED_SLOT_WAIT"
        ):
            with hs.slot(tmp_path, say=said.append, clock=lambda: now[0], sleep=sleep):
                pass
    finally:
        holder.communicate("")
    assert said and "waiting for a nested harness slot: all 1 busy" in said[0]
    assert now[0] >= 30


def test_a_dead_holder_frees_its_slot(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(hs.SLOTS_ENV, "1")
    holder = _holder(tmp_path, 0)
    holder.kill()
    holder.wait()
    with hs.slot(tmp_path) as i:
        assert i == 0


def test_zero_means_no_limit_and_bad_values_are_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(hs.SLOTS_ENV, "0")
    with hs.slot(tmp_path) as i:
        assert i is None
    monkeypatch.setenv(hs.SLOTS_ENV, "two")
    with pytest.raises(ValueError, match="IGNITION_NESTED_SLOTS='two'"):
        hs.slot_count()
    monkeypatch.delenv(hs.SLOTS_ENV)
    assert hs.slot_count() >= 1
