"""A diagnostic snapshot of a running VM's clocks, timers, interrupts and virtqueues.

:func:`probe` briefly pauses the VM (vCPU ioctls block while the vCPU is in ``KVM_RUN``, so
state can only be read from outside it), reads per vCPU the run state, the TSC and the
TSC-deadline MSR, the kvmclock MSR, the LAPIC timer registers (LVTT, TMICT, TMCCT, TDCR) and
the pending/in-service interrupt vectors (IRR/ISR), plus the VM's kvmclock, and per virtio
device the transport's interrupt status and each queue's indices (the guest's avail/used
``idx`` read from guest RAM next to the device's own cursors) and, for vsock, what the host
side holds (connections, bytes queued each way), then resumes. The control
socket's ``probe`` request returns it; ``benchmarks/nested_stall.py`` takes one whenever a
guest is late.

Reading the answer: a vCPU ``halted`` with ``timer.mode == "tsc-deadline"``, no pending
vector and ``deadline_in_ms`` far in the future (or ``armed: false``) is a guest whose next
timer tick is lost; ``avail_idx != next_avail`` on a queue means the guest posted buffers the
device has not taken; ``interrupt_status`` non-zero for long means an interrupt the driver
has not acknowledged.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

from .arch.x86_64 import state as x86_state
from .hypervisor import kvm

if TYPE_CHECKING:
    from .machine import Machine

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01

# LAPIC register offsets in struct kvm_lapic_state (the 1 KiB register page)
APIC_TPR = 0x80
APIC_PPR = 0xA0  # processor priority: max(TPR, the ISR's highest class)
APIC_SVR = 0xF0  # bit 8: the LAPIC is software-enabled (it accepts no interrupt otherwise)
APIC_ISR = 0x100
APIC_IRR = 0x200
APIC_LVTT = 0x320
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0

MP_STATES = {
    kvm.KVM_MP_STATE_RUNNABLE: "runnable",
    kvm.KVM_MP_STATE_UNINITIALIZED: "uninitialized",
    kvm.KVM_MP_STATE_INIT_RECEIVED: "init_received",
    kvm.KVM_MP_STATE_HALTED: "halted",
    kvm.KVM_MP_STATE_SIPI_RECEIVED: "sipi_received",
}
TIMER_MODES = {0: "oneshot", 1: "periodic", 2: "tsc-deadline", 3: "reserved"}


def _reg(page: bytes, off: int) -> int:
    return struct.unpack_from("<I", page, off)[0]


def vectors(page: bytes, base: int) -> list[int]:
    """The vectors set in a 256-bit LAPIC bitmap (IRR, ISR): eight 32-bit words 16 bytes apart."""
    out = []
    for word in range(8):
        bits = _reg(page, base + 16 * word)
        out += [word * 32 + b for b in range(32) if bits >> b & 1]
    return out


def lapic_timer(page: bytes) -> dict[str, Any]:
    """The LAPIC timer's registers, decoded."""
    lvtt = _reg(page, APIC_LVTT)
    return {
        "lvtt": lvtt,
        "vector": lvtt & 0xFF,
        "masked": bool(lvtt >> 16 & 1),
        "mode": TIMER_MODES[lvtt >> 17 & 3],
        "tmict": _reg(page, APIC_TMICT),
        "tmcct": _reg(page, APIC_TMCCT),
        "tdcr": _reg(page, APIC_TDCR),
    }


def vcpu_timers(vcpu: kvm.Vcpu) -> dict[str, Any]:
    """One (paused) vCPU's run state, TSC, timer and pending interrupts."""
    msrs = x86_state.readable_msrs(
        vcpu, [MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC_ADJUST, MSR_KVM_SYSTEM_TIME_NEW]
    )
    page = vcpu.get_lapic()
    regs = vcpu.get_regs()
    khz = vcpu.get_tsc_khz()
    tsc = msrs.get(MSR_IA32_TSC, 0)
    deadline = msrs.get(MSR_IA32_TSC_DEADLINE, 0)
    timer = lapic_timer(page)
    out: dict[str, Any] = {
        "mp_state": MP_STATES.get(vcpu.get_mp_state(), "?"),
        "rip": hex(regs.rip),
        "if": bool(regs.rflags & 0x200),
        "tsc": tsc,
        "tsc_khz": khz,
        "tsc_deadline": deadline,
        "tsc_adjust": msrs.get(MSR_IA32_TSC_ADJUST),
        "kvmclock_msr": hex(msrs.get(MSR_KVM_SYSTEM_TIME_NEW, 0)),
        "timer": timer,
        "tpr": _reg(page, APIC_TPR),
        "ppr": _reg(page, APIC_PPR),
        "apic_sw_enabled": bool(_reg(page, APIC_SVR) & 0x100),
        "irr": vectors(page, APIC_IRR),
        "isr": vectors(page, APIC_ISR),
    }
    if timer["mode"] == "tsc-deadline":
        out["armed"] = deadline != 0
        if deadline and khz:
            out["deadline_in_ms"] = round((deadline - tsc) / khz, 3)
    return out


def queue_indices(mem: Any, q: Any) -> dict[str, Any]:
    """A queue's device-side cursors and the guest-side ``idx`` of its avail and used rings."""
    s = q.state
    d: dict[str, Any] = {"ready": s.ready, "size": s.size}
    if s.ready and mem is not None:
        try:
            d["avail_idx"] = struct.unpack("<H", mem.read(s.avail_ring + 2, 2))[0]
            d["used_idx"] = struct.unpack("<H", mem.read(s.used_ring + 2, 2))[0]
        except Exception as e:  # a guest address outside RAM: report, never fail the probe
            d["error"] = str(e)
        d["next_avail"] = s.next_avail
        d["next_used"] = s.next_used
    return d


def probe(machine: Machine) -> dict[str, Any]:
    """Pause ``machine`` for a moment and return its timer, interrupt and queue state."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"host_monotonic_ns": time.monotonic_ns()}
    with machine._quiesced():
        out["vcpus"] = [vcpu_timers(r.vcpu) for r in machine.runners]
        c = machine.vm.get_clock()
        out["kvmclock"] = {"clock_ns": c.clock, "flags": c.flags}
        devs = []
        for addr, irq, t in machine.virtio_devices:
            dev = t.device
            with dev.lock:
                d = {
                    "addr": hex(addr),
                    "irq": irq,
                    "type": type(dev).__name__,
                    "status": t.status,
                    "interrupt_status": t.interrupt_status,
                    "queues": [queue_indices(machine.mem, q) for q in dev.queues],
                }
                debug_state = getattr(dev, "debug_state", None)
                if debug_state is not None:
                    d["host"] = debug_state()
                devs.append(d)
        out["virtio"] = devs
    out["exits"] = {
        r.name: {kvm.EXIT_NAMES.get(k, str(k)): v for k, v in r.exits.items()}
        for r in machine.runners
    }
    out["loop_wakeups"] = machine.loop.wakeups
    out["interrupts_reraised"] = machine.interrupts_reraised
    out["probe_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    return out


def describe(p: dict[str, Any]) -> str:
    """One paragraph of a :func:`probe` answer for an error message: per vCPU its run state,
    timer and pending vectors; per virtio device its unacknowledged interrupt and any queue
    whose guest and device cursors disagree; for a device that reports its host side (vsock)
    that state and how many buffers the guest has posted on each queue."""
    parts = []
    for i, v in enumerate(p.get("vcpus", [])):
        t = v.get("timer", {})
        timer = t.get("mode", "?")
        if t.get("masked"):
            timer += " masked"
        if timer.startswith("tsc-deadline"):
            timer += f" in {v['deadline_in_ms']:g} ms" if "deadline_in_ms" in v else " not armed"
        tpr = f" tpr={v['tpr']:#x}" if v.get("tpr") else ""  # nonzero: it masks vectors below
        if v.get("ppr"):
            tpr += f" ppr={v['ppr']:#x}"
        if v.get("apic_sw_enabled") is False:  # pending vectors are then never delivered
            tpr += " apic-sw-disabled"
        exits = p.get("exits", {}).get(f"vcpu{i}", {})
        top = sorted(exits.items(), key=lambda kv: -kv[1])[:3]
        parts.append(
            f"vcpu{i} {v.get('mp_state', '?')} IF={int(bool(v.get('if')))} rip={v.get('rip')} "
            f"timer {timer} irr={v.get('irr', [])} isr={v.get('isr', [])}{tpr} "
            f"exits {sum(exits.values())}"
            + (f" ({', '.join(f'{k} {n}' for k, n in top)})" if top else "")
        )
    for d in p.get("virtio", []):
        odd = []
        for qi, q in enumerate(d.get("queues", [])):
            if not q.get("ready"):
                continue
            if q.get("avail_idx") != q.get("next_avail") or q.get("used_idx") != q.get("next_used"):
                odd.append(
                    f"q{qi} avail {q.get('avail_idx')}/{q.get('next_avail')} "
                    f"used {q.get('used_idx')}/{q.get('next_used')}"
                )
        host = d.get("host")
        if host:  # the device's own queues and connections (vsock): always worth a look
            odd.append(" ".join(f"{k}={v}" for k, v in host.items()))
            for qi, q in enumerate(d.get("queues", [])):
                if q.get("ready") and "avail_idx" in q:
                    free = (q["avail_idx"] - q["next_avail"]) & 0xFFFF
                    odd.append(f"q{qi} buffers posted {free}")
        if d.get("interrupt_status") or odd:
            parts.append(
                f"{d.get('type')}@{d.get('addr')} interrupt_status={d.get('interrupt_status')} "
                + " ".join(odd)
            )
    parts.append(f"event-loop wakeups {p.get('loop_wakeups')}")
    return "; ".join(parts)
