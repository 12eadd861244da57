"""PIO exits from a CPL3 guest: out/in of each width, string I/O, the exit port."""

from __future__ import annotations

import struct
import threading

import cpl3
import pytest

pytestmark = pytest.mark.kvm


class Recorder:
    """A PIO device that records writes and answers reads with ``value``."""

    def __init__(self, value: int = 0):
        self.value = value
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, data: bytearray) -> None:
        self.reads.append((offset, len(data)))
        data[:] = self.value.to_bytes(8, "little")[: len(data)]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def imm64(v: int) -> bytes:
    return struct.pack("<Q", v)


def test_out_of_each_width(kvm_system):
    code = b"".join(
        [
            b"\x66\xba\x34\x12",  # mov dx, 0x1234
            b"\xb0\xab",  # mov al, 0xab
            b"\xee",  # out dx, al
            b"\x66\xb8\xcd\xab",  # mov ax, 0xabcd
            b"\x66\xef",  # out dx, ax
            b"\xb8\xef\xbe\xad\xde",  # mov eax, 0xdeadbeef
            b"\xef",  # out dx, eax
            b"\xb0\x07",  # mov al, 7
            b"\xe6\xf4",  # out 0xf4, al   (exit port: stop)
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    dev = Recorder()
    g.pio.insert(dev, 0x1234, 4)
    try:
        reason = g.run()
        assert reason.kind == "requested", reason
        assert dev.writes == [(0, b"\xab"), (0, b"\xcd\xab"), (0, b"\xef\xbe\xad\xde")]
        assert g.exit_port.values == [7]
        regs = g.vcpu.get_regs()
        assert regs.rip == cpl3.CODE_ADDR + len(code)  # out completed, nothing re-executed
    finally:
        g.close()


def test_in_value_is_seen_by_the_next_instruction(kvm_system):
    code = b"".join(
        [
            b"\x66\xba\x34\x12",  # mov dx, 0x1234
            b"\xed",  # in eax, dx             <- the device supplies 0xcafebabe
            b"\x83\xc0\x01",  # add eax, 1
            b"\x66\xba\x38\x12",  # mov dx, 0x1238
            b"\xef",  # out dx, eax            -> 0xcafebabf
            b"\x66\xba\x34\x12",  # mov dx, 0x1234
            b"\xec",  # in al, dx              <- 0xbe (low byte)
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    src, sink = Recorder(0xCAFEBABE), Recorder()
    g.pio.insert(src, 0x1234, 4)
    g.pio.insert(sink, 0x1238, 4)
    try:
        assert g.run().kind == "requested"
        assert src.reads == [(0, 4), (0, 1)]
        assert sink.writes == [(0, struct.pack("<I", 0xCAFEBABF))]
        assert g.exit_port.values == [0xBE]
        assert g.vcpu.get_regs().rax & 0xFFFF_FFFF == 0xCAFE_BABE
    finally:
        g.close()


def test_in_from_an_unhandled_port_reads_all_ones(kvm_system):
    code = b"".join(
        [
            b"\x66\xba\x00\x70",  # mov dx, 0x7000 (no device)
            b"\xed",  # in eax, dx
            b"\x66\xba\x38\x12",  # mov dx, 0x1238
            b"\xef",  # out dx, eax
            b"\x66\xba\x01\x70",  # mov dx, 0x7001
            b"\xef",  # out dx, eax  (to nowhere: ignored)
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    sink = Recorder()
    g.pio.insert(sink, 0x1238, 4)
    try:
        assert g.run().kind == "requested"
        assert sink.writes == [(0, b"\xff\xff\xff\xff")]
        assert g.pio.unhandled == 2
    finally:
        g.close()


def test_string_io_honours_count(kvm_system):
    msg = b"string I/O through one exit"
    code = b"".join(
        [
            b"\x48\xbe" + imm64(cpl3.DATA_ADDR),  # mov rsi, DATA_ADDR
            b"\xb9" + struct.pack("<I", len(msg)),  # mov ecx, len(msg)
            b"\x66\xba\x34\x12",  # mov dx, 0x1234
            b"\xf3\x6e",  # rep outsb
            b"\x48\xbf" + imm64(cpl3.DATA_ADDR + 0x100),  # mov rdi, DATA_ADDR + 0x100
            b"\xb9\x06\x00\x00\x00",  # mov ecx, 6
            b"\xf3\x66\x6d",  # rep insw (6 words from the device)
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    g.mem.write(cpl3.DATA_ADDR, msg)
    dev = Recorder(0x4241)  # "AB"
    g.pio.insert(dev, 0x1234, 2)
    try:
        assert g.run().kind == "requested"
        assert b"".join(d for _, d in dev.writes) == msg
        assert all(len(d) == 1 for _, d in dev.writes)
        assert dev.reads == [(0, 2)] * 6
        assert g.mem.read(cpl3.DATA_ADDR + 0x100, 12) == b"AB" * 6
        assert g.runner is not None and g.runner.exits[2] < len(msg) + 6  # batched by count
    finally:
        g.close()


def test_device_exception_does_not_kill_the_vcpu(kvm_system, caplog):
    class Broken:
        def read(self, offset, data):
            raise RuntimeError("device bug on read")

        def write(self, offset, data):
            raise RuntimeError("device bug on write")

    code = b"".join(
        [
            b"\x66\xba\x34\x12",  # mov dx, 0x1234
            b"\xee",  # out dx, al     (device raises)
            b"\xec",  # in al, dx      (device raises: all-ones)
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    g.pio.insert(Broken(), 0x1234, 1)
    try:
        assert g.run().kind == "requested"
        assert g.exit_port.values == [0xFF]
        assert g.pio.device_errors == 2
        assert "device bug on write" in caplog.text
    finally:
        g.close()


def test_pause_during_an_in_exit_completes_the_instruction(kvm_system):
    """A pause requested while an ``in`` is being served parks the vCPU only after KVM has
    completed the instruction (immediate_exit), so saved state never has a half-done in."""
    code = b"".join(
        [
            b"\x66\xba\x34\x12",  # mov dx, 0x1234
            b"\xed",  # in eax, dx        <- the device pauses the vCPU while serving it
            b"\xeb\xfe",  # jmp $       (spin; never reached before the pause)
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    served = threading.Event()

    class PausingSource:
        def read(self, offset: int, data: bytearray) -> None:
            assert g.runner is not None
            g.runner.pause()  # from the vCPU thread itself: only flags it
            data[:] = (0x600DF00D).to_bytes(4, "little")
            served.set()

        def write(self, offset: int, data: bytes) -> None:
            pass

    g.pio.insert(PausingSource(), 0x1234, 4)
    try:
        runner = g.start()
        assert served.wait(5)
        assert runner.pause(timeout=5) and runner.paused  # already requested: just waits
        regs = g.vcpu.get_regs()
        assert regs.rax & 0xFFFF_FFFF == 0x600DF00D
        assert regs.rip == cpl3.CODE_ADDR + 5  # past the in, at the jmp
        reason = runner.stop(timeout=5)
        assert reason is not None and reason.kind == "requested"
    finally:
        g.close()


def test_i8042_reset_from_the_guest_stops_the_vcpu(kvm_system):
    from pytest_ignition.vmm.devices.legacy import I8042, I8042_PORT, I8042_PORT_LEN
    from pytest_ignition.vmm.vcpu import StopReason

    code = b"".join(
        [
            b"\xe4\x64",  # in al, 0x64      (status: input buffer empty)
            b"\xb0\xfe",  # mov al, 0xfe
            b"\xe6\x64",  # out 0x64, al     (pulse reset)
            b"\xeb\xfe",  # jmp $
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)

    def reset() -> None:
        assert g.runner is not None
        g.runner.request_stop(StopReason("reset", "i8042"))

    kbd = I8042(reset)
    g.pio.insert(kbd, I8042_PORT, I8042_PORT_LEN)
    try:
        reason = g.run()
        assert reason.kind == "reset" and reason.vcpu == 0
        assert kbd.reset_requests == 1
        assert not reason.is_error
    finally:
        g.close()


def test_pio_round_trip_probe_counts_every_exit(kvm_system):
    # the probe benchmarks use; here only its bookkeeping is checked, never its speed
    samples = cpl3.measure_pio_exits(kvm_system, 500)
    assert len(samples) == 499 and all(s > 0 for s in samples)
