"""The guest's LAPIC timer across snapshot/restore, on this machine's KVM with a CPL3 guest.

The guest spins with interrupts off (IF=0), so a timer interrupt that fires stays pending in
the LAPIC's IRR, where :mod:`pytest_ignition.vmm.probe` reads it: the test sees whether and
when the restored timer fired without any guest interrupt handler.
"""

from __future__ import annotations

import struct
import time

import pytest
from test_snapshot import cpl3_machine

from pytest_ignition.vmm import kvm, probe

VECTOR = 0xEC
TSC_DEADLINE_MODE = 2 << 17
APIC_SVR = 0xF0


def test_timer_msrs_order_and_zero_deadline():
    lapic = bytearray(1024)
    struct.pack_into("<I", lapic, 0x320, TSC_DEADLINE_MODE | VECTOR)
    msrs = {kvm.MSR_IA32_TSC_DEADLINE: 0, kvm.MSR_IA32_TSC: 12345, 0x174: 0}
    rest, deadline = kvm.timer_msrs(msrs, bytes(lapic))
    assert kvm.MSR_IA32_TSC_DEADLINE not in rest and rest[kvm.MSR_IA32_TSC] == 12345
    assert deadline == {kvm.MSR_IA32_TSC_DEADLINE: 12345}  # fires at once after the restore
    struct.pack_into("<I", lapic, 0x320, VECTOR)  # one-shot mode: 0 stays 0 (KVM ignores it)
    assert kvm.timer_msrs(msrs, bytes(lapic))[1] == {kvm.MSR_IA32_TSC_DEADLINE: 0}
    assert kvm.timer_msrs({kvm.MSR_IA32_TSC: 1}, None) == ({kvm.MSR_IA32_TSC: 1}, {})


def _arm(m, *, tsc: int | None, deadline_ms: float | None) -> None:
    """Put vCPU 0's LAPIC timer in TSC-deadline mode (software-enabled LAPIC), the TSC at
    ``tsc`` and the deadline ``deadline_ms`` after it (None: disarmed, the MSR reads 0)."""
    vcpu = m.runners[0].vcpu
    page = bytearray(vcpu.get_lapic())
    struct.pack_into("<I", page, APIC_SVR, struct.unpack_from("<I", page, APIC_SVR)[0] | 0x1FF)
    struct.pack_into("<I", page, 0x320, TSC_DEADLINE_MODE | VECTOR)
    vcpu.set_lapic(bytes(page))
    if tsc is not None:
        vcpu.set_msrs({kvm.MSR_IA32_TSC: tsc})
    now = vcpu.get_msrs([kvm.MSR_IA32_TSC])[kvm.MSR_IA32_TSC]
    khz = vcpu.get_tsc_khz()
    d = 0 if deadline_ms is None else now + int(deadline_ms * khz)
    vcpu.set_msrs({kvm.MSR_IA32_TSC_DEADLINE: d})


def _fired_within(r, seconds: float) -> dict:
    """Run the restored VM for up to ``seconds``; the vCPU's timer state once the vector is
    pending (or at the end)."""
    r.start()
    end = time.monotonic() + seconds
    while True:
        time.sleep(0.02)
        r.pause()
        t = probe.vcpu_timers(r.runners[0].vcpu)
        if VECTOR in t["irr"] or time.monotonic() > end:
            return t
        r.resume()


@pytest.mark.kvm
@pytest.mark.parametrize("deadline_ms", [None, 200.0], ids=["disarmed-zero", "armed-200ms"])
def test_restored_tsc_deadline_timer_fires(tmp_path, kvm_system, deadline_ms):
    """A timer armed 200 ms ahead fires when what was left of it has passed, not after the
    guest's TSC uptime (100 s here: what a deadline written before the TSC would wait for on
    real KVM), and one whose deadline was saved as 0 fires at once (the guest then reprograms
    its next tick; before, it waited for a tick that never came)."""
    from pytest_ignition.vmm import snapshot as snap
    from pytest_ignition.vmm.machine import Machine

    m = cpl3_machine(tmp_path, [b"\xeb\xfe"])  # jmp $ at CPL3, IF=0
    try:
        khz = m.runners[0].vcpu.get_tsc_khz()
        _arm(m, tsc=100_000 * khz, deadline_ms=deadline_ms)  # 100 s of guest TSC uptime
        path = m.snapshot(tmp_path / "store", "base")
    finally:
        m.close()
    saved = {int(k): v for k, v in snap.Snapshot.load(path).state["vcpus"][0]["msrs"].items()}
    r = Machine.restore(path, start=False, system=kvm_system)
    try:
        vcpu = r.runners[0].vcpu
        got = vcpu.get_msrs([kvm.MSR_IA32_TSC, kvm.MSR_IA32_TSC_DEADLINE])
        # Real KVM puts the saved TSC back; PVM (this machine) keeps the guest TSC equal to the
        # host's and ignores the write. Either way the deadline is what was saved (or the
        # TSC for a zero one) and what is left of it is measured from the TSC now.
        want = saved[kvm.MSR_IA32_TSC_DEADLINE] or saved[kvm.MSR_IA32_TSC]
        assert got[kvm.MSR_IA32_TSC_DEADLINE] == want
        left_s = max(0.0, (want - got[kvm.MSR_IA32_TSC]) / khz / 1000)
        t0 = time.monotonic()
        t = _fired_within(r, 10.0)
        took = time.monotonic() - t0
        assert VECTOR in t["irr"], f"the restored timer never fired: {t}"
        # a deadline written before the TSC would fire only after ~100 s of TSC uptime
        assert took < left_s + 5.0
        assert took >= left_s - 0.03  # not early either: the deadline kept its distance
    finally:
        r.close()


@pytest.mark.kvm
def test_probe_of_a_running_vm(tmp_path, kvm_system):
    """The diagnostic probe pauses a running VM, reads its timer state, and lets it run on."""
    m = cpl3_machine(tmp_path, [b"\xeb\xfe"])
    try:
        _arm(m, tsc=None, deadline_ms=60_000.0)
        m.start()
        p = probe.probe(m)
        assert m.state == "running"
        (v,) = p["vcpus"]
        assert v["mp_state"] == "runnable" and v["if"] is False
        assert v["timer"]["mode"] == "tsc-deadline" and v["timer"]["vector"] == VECTOR
        assert v["armed"] and 0 < v["deadline_in_ms"] <= 60_000
        assert p["kvmclock"]["clock_ns"] > 0 and p["virtio"] == []
    finally:
        m.close()
    text = probe.describe(p)
    assert text.startswith("vcpu0 runnable IF=0 ")
    assert "timer tsc-deadline in " in text and "event-loop wakeups" in text


def test_describe_names_what_is_odd() -> None:
    """The one-paragraph form of a probe (for errors about a silent guest) says what a halted
    vCPU waits for and which queue's guest and device cursors disagree."""
    p = {
        "vcpus": [
            {
                "mp_state": "halted",
                "if": True,
                "rip": "0xffffffff81000000",
                "timer": {"mode": "tsc-deadline", "masked": False},
                "armed": False,
                "irr": [],
                "isr": [],
            }
        ],
        "virtio": [
            {
                "type": "VirtioVsock",
                "addr": "0xd0000000",
                "interrupt_status": 1,
                "queues": [
                    {"ready": True, "avail_idx": 9, "next_avail": 7, "used_idx": 7, "next_used": 7},
                    {"ready": True, "avail_idx": 3, "next_avail": 3, "used_idx": 3, "next_used": 3},
                ],
            },
            {"type": "VirtioRng", "addr": "0xd0001000", "interrupt_status": 0, "queues": []},
        ],
        "loop_wakeups": 12,
    }
    text = probe.describe(p)
    assert "vcpu0 halted IF=1" in text and "timer tsc-deadline not armed" in text
    assert "VirtioVsock@0xd0000000 interrupt_status=1 q0 avail 9/7 used 7/7" in text
    assert "q1" not in text and "VirtioRng" not in text
    assert text.endswith("event-loop wakeups 12")


def test_describe_shows_a_vsock_devices_host_side_and_posted_buffers() -> None:
    """A device that reports its host side (vsock's ``debug_state``) gets it in the paragraph,
    with how many buffers the guest has posted per queue: an RX queue with none posted and
    bytes queued for the guest is a guest that stopped refilling, not a lost interrupt."""
    host = {"conns": 1, "pending_ctrl": 0, "rx_ready": 1, "to_guest": 22, "to_host": 0}
    p = {
        "vcpus": [],
        "virtio": [
            {
                "type": "VirtioVsock",
                "addr": "0xd0000000",
                "interrupt_status": 0,
                "host": host,
                "queues": [
                    {"ready": True, "avail_idx": 70, "next_avail": 70, "used_idx": 70,
                     "next_used": 70},
                    {"ready": True, "avail_idx": 5, "next_avail": 3, "used_idx": 3,
                     "next_used": 3},
                    {"ready": False},
                ],
            }
        ],
        "loop_wakeups": 3,
    }  # fmt: skip
    text = probe.describe(p)
    assert (
        "VirtioVsock@0xd0000000 interrupt_status=0 q1 avail 5/3 used 3/3 "
        "conns=1 pending_ctrl=0 rx_ready=1 to_guest=22 to_host=0 "
        "q0 buffers posted 0 q1 buffers posted 2"
    ) in text
