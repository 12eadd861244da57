"""VmmThread: started without waiting, alive from start() until its target returns."""

from __future__ import annotations

import logging
import threading

import pytest

from pytest_ignition.vmm.threads import VmmThread


def test_alive_from_start_until_the_target_returns_and_named_inside() -> None:
    release = threading.Event()
    seen: dict[str, object] = {}
    t: VmmThread

    def target() -> None:
        seen["name"] = threading.current_thread().name
        seen["current"] = t.is_current()
        release.wait(10)

    t = VmmThread(target, "vcpu7")
    assert not t.is_alive() and t.ident is None
    with pytest.raises(RuntimeError, match="never started"):
        t.join(0)
    t.start()
    assert t.is_alive()  # at once, whether or not it has run yet
    assert not t.is_current()
    with pytest.raises(RuntimeError, match="already started"):
        t.start()
    t.join(0.05)
    assert t.is_alive()
    release.set()
    t.join(10)
    assert not t.is_alive()
    assert seen == {"name": "vcpu7", "current": True}
    assert t.ident is not None and t.ident != threading.get_ident()


def test_a_crashing_target_is_logged_and_ends_the_thread(caplog) -> None:
    def boom() -> None:
        raise ValueError("bad exit")

    t = VmmThread(boom, "vmm-control")
    with caplog.at_level(logging.ERROR, logger="pytest_ignition.vmm.threads"):
        t.start()
        t.join(10)
    assert not t.is_alive()
    assert "thread vmm-control crashed" in caplog.text and "ValueError: bad exit" in caplog.text
