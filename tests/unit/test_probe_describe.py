"""The one-paragraph VM state of a guest that does not answer (``vmm.probe.describe``): from a
probe reply as the VMM sends it, without a VM."""

from __future__ import annotations

from pytest_ignition.vmm.probe import describe


def _reply(**vcpu: object) -> dict:
    v = {
        "mp_state": "runnable",
        "rip": "0xffffffff81000000",
        "if": True,
        "timer": {"mode": "tsc-deadline", "masked": False},
        "tpr": 0,
        "ppr": 0,
        "apic_sw_enabled": True,
        "irr": [34, 236],
        "isr": [],
        **vcpu,
    }
    return {
        "vcpus": [v],
        "virtio": [],
        "exits": {"vcpu0": {"IO": 120, "MMIO": 7, "HLT": 3, "SHUTDOWN": 0}},
        "loop_wakeups": 9,
    }


def test_a_vcpu_shows_its_exits_and_pending_vectors() -> None:
    text = describe(_reply())
    assert "vcpu0 runnable IF=1 rip=0xffffffff81000000" in text
    assert "timer tsc-deadline not armed irr=[34, 236] isr=[]" in text
    assert "exits 130 (IO 120, MMIO 7, HLT 3)" in text  # the three most frequent
    assert "tpr=" not in text and "ppr=" not in text and "apic-sw-disabled" not in text
    assert text.endswith("event-loop wakeups 9")


def test_what_blocks_delivery_is_named() -> None:
    """A raised TPR/PPR or a software-disabled LAPIC explains vectors left in the IRR."""
    text = describe(_reply(tpr=0xF0, ppr=0xF0, apic_sw_enabled=False))
    assert "tpr=0xf0 ppr=0xf0 apic-sw-disabled" in text


def test_a_vcpu_without_exits_says_so() -> None:
    reply = _reply()
    reply["exits"] = {}
    assert "exits 0" in describe(reply) and "exits 0 (" not in describe(reply)
