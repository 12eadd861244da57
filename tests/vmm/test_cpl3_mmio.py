"""MMIO exits from a CPL3 guest: writes and reads of each width, unhandled addresses, the
boot timer, a triple fault, and pausing a vCPU that spins in guest code."""

from __future__ import annotations

import logging
import struct
import time

import cpl3
import pytest

from pytest_ignition.vmm.devices.legacy import BOOT_TIMER_ADDR, BOOT_TIMER_LEN, BootTimer

pytestmark = pytest.mark.kvm

DEV = 0xD000_1000


def imm64(v: int) -> bytes:
    return struct.pack("<Q", v)


class Regs:
    """An MMIO device of 8-byte registers that records accesses."""

    def __init__(self) -> None:
        self.mem = bytearray(0x1000)
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = self.mem[offset : offset + len(data)]
        self.log.append(("r", offset, bytes(data)))

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset : offset + len(data)] = data
        self.log.append(("w", offset, bytes(data)))


class Sink:
    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(int.from_bytes(data, "little"))


def test_mmio_write_and_read(kvm_system):
    code = b"".join(
        [
            b"\x48\xb8" + imm64(DEV),  # mov rax, DEV
            b"\xc6\x00\x5a",  # mov byte [rax], 0x5a
            b"\x66\xc7\x40\x02\x34\x12",  # mov word [rax+2], 0x1234
            b"\xc7\x40\x04\x78\x56\x34\x12",  # mov dword [rax+4], 0x12345678
            b"\x48\xbb" + imm64(0x1122334455667788),  # mov rbx, 0x1122334455667788
            b"\x48\x89\x58\x08",  # mov [rax+8], rbx
            b"\x48\x8b\x48\x10",  # mov rcx, [rax+0x10]  <- device value
            b"\x48\x89\xc8",  # mov rax, rcx
            b"\x66\xba\x00\x05",  # mov dx, 0x500
            b"\xef",  # out dx, eax   (low half)
            b"\x48\xc1\xe8\x20",  # shr rax, 32
            b"\xef",  # out dx, eax   (high half)
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    dev, sink = Regs(), Sink()
    dev.mem[0x10:0x18] = struct.pack("<Q", 0x0BADC0DE_FEEDFACE)
    g.mmio.insert(dev, DEV, 0x1000)
    g.pio.insert(sink, 0x500, 4)
    try:
        assert g.run().kind == "requested"
        assert dev.log == [
            ("w", 0, b"\x5a"),
            ("w", 2, b"\x34\x12"),
            ("w", 4, struct.pack("<I", 0x12345678)),
            ("w", 8, struct.pack("<Q", 0x1122334455667788)),
            ("r", 0x10, struct.pack("<Q", 0x0BADC0DE_FEEDFACE)),
        ]
        assert sink.values == [0xFEEDFACE, 0x0BADC0DE]
    finally:
        g.close()


def test_unhandled_mmio_does_not_kill_the_vmm(kvm_system, caplog):
    code = b"".join(
        [
            b"\x48\xb8" + imm64(0xD000_5000),  # mov rax, 0xd0005000 (nothing there)
            b"\xc7\x00\x01\x00\x00\x00",  # mov dword [rax], 1
            b"\x8b\x18",  # mov ebx, [rax]          <- all-ones
            b"\x89\xd8",  # mov eax, ebx
            b"\x66\xba\x00\x05",  # mov dx, 0x500
            b"\xef",  # out dx, eax
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    sink = Sink()
    g.pio.insert(sink, 0x500, 4)
    try:
        with caplog.at_level(logging.WARNING):
            reason = g.run()
        assert reason.kind == "requested", reason
        assert sink.values == [0xFFFF_FFFF]
        assert g.mmio.unhandled == 2
        assert "unhandled address 0xd0005000" in caplog.text
    finally:
        g.close()


def test_boot_timer(kvm_system, caplog):
    code = b"".join(
        [
            b"\x48\xb8" + imm64(BOOT_TIMER_ADDR),  # mov rax, 0xd0000000
            b"\xc6\x00\x7b",  # mov byte [rax], 123
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    start = time.monotonic_ns()
    seen: list[int] = []
    timer = BootTimer(start, on_boot=seen.append)
    g.mmio.insert(timer, BOOT_TIMER_ADDR, BOOT_TIMER_LEN)
    try:
        with caplog.at_level(logging.INFO):
            assert g.run().kind == "requested"
        assert timer.booted.is_set()
        assert timer.boot_time_us is not None and timer.boot_time_us >= 0
        assert seen == [timer.boot_time_us]
        assert f"Guest-boot-time = {timer.boot_time_us} us {timer.boot_time_us // 1000} ms" in (
            caplog.text
        )
    finally:
        g.close()


def test_triple_fault_stops_with_a_clear_reason(kvm_system):
    code = b"\x0f\x0b"  # ud2: #UD with no IDT -> #DF -> triple fault
    g = cpl3.Cpl3Guest(kvm_system, code)
    try:
        reason = g.run()
        assert reason.kind == "triple_fault"
        assert reason.is_error
        assert "rip=" in reason.detail and "KVM_EXIT_SHUTDOWN" in reason.detail
    finally:
        g.close()


def test_pause_resume_stop_a_spinning_guest(kvm_system):
    code = b"".join(
        [
            b"\x48\xff\xc0",  # loop: inc rax
            b"\xeb\xfb",  # jmp loop
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    try:
        runner = g.start()

        def rax_after_running_past(floor: int) -> int:
            # resume/pause until the guest has made progress (no timing assumptions)
            for _ in range(1000):
                assert runner.pause(timeout=5) and runner.paused
                value = g.vcpu.get_regs().rax
                if value > floor:
                    return value
                runner.resume()
                time.sleep(0.005)
            raise AssertionError("the guest made no progress")

        a = rax_after_running_past(0)
        time.sleep(0.02)
        assert g.vcpu.get_regs().rax == a  # really parked, not running
        runner.resume()
        b = rax_after_running_past(a)
        assert b > a
        runner.resume()
        reason = runner.stop(timeout=5)
        assert reason is not None and reason.kind == "requested"
        assert not runner.running
    finally:
        g.close()


def test_emulation_failure_stops_with_the_instruction_bytes(kvm_system):
    """An instruction KVM's emulator cannot do on MMIO (crc32 with a memory operand) is an
    INTERNAL_ERROR exit. At CPL3 KVM would inject #UD instead, so this one runs at CPL0,
    which PVM emulates slowly; it is two instructions."""
    code = b"".join(
        [
            b"\x48\xbb" + imm64(0xD000_3000),  # mov rbx, 0xd0003000
            b"\xf2\x0f\x38\xf1\x03",  # crc32 eax, dword [rbx]
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    s = g.vcpu.get_sregs()
    s.cs = cpl3.segment(cpl3.SEL_KCODE, code=True, dpl=0)
    s.ds = s.es = s.fs = s.gs = s.ss = cpl3.segment(cpl3.SEL_KDATA, code=False, dpl=0)
    g.vcpu.set_sregs(s)
    try:
        reason = g.run()
        assert reason.kind == "internal_error", reason
        assert "emulation failure" in reason.detail
        assert "f20f38f103" in reason.detail
        assert f"rip={cpl3.CODE_ADDR + 10:#x}" in reason.detail
    finally:
        g.close()


KICK_WITHOUT_HANDLER = r"""
import signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import cpl3
from pytest_ignition.vmm import kvm
from pytest_ignition.vmm.vcpu import KICK_SIGNAL

assert signal.getsignal(KICK_SIGNAL) == signal.SIG_DFL  # a kick delivered would kill us
result = {}

def worker():
    g = cpl3.Cpl3Guest(kvm.System(), b"\x48\xff\xc0\xeb\xfb")  # inc rax; jmp back
    runner = g.start()
    for _ in range(20):
        assert runner.pause(timeout=5) and runner.paused
        runner.resume()
    result["reason"] = runner.stop(timeout=5)
    g.close()

t = threading.Thread(target=worker)
t.start()
t.join(60)
assert signal.getsignal(KICK_SIGNAL) == signal.SIG_DFL
print("stopped:", result["reason"].kind)
"""


def test_kicks_need_no_signal_handler_and_no_main_thread(kvm_system):
    """Runners made on a non-main thread of a process with no handler for the kick signal
    pause and stop a spinning guest; the kick is consumed, never delivered."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", KICK_WITHOUT_HANDLER, here],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "stopped: requested" in out.stdout
