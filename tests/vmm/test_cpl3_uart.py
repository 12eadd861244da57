"""The 8250 UART driven by CPL3 guests: output through THR, input through LSR/RBR fed from
the event loop (the interactive console path), and its IRQ reaching KVM's in-kernel PIC."""

from __future__ import annotations

import os
import struct
import threading

import cpl3
import pytest

from pytest_ignition.vmm.devices.legacy import COM1_IRQ, COM1_PORT, UART_PORT_LEN, Serial8250
from pytest_ignition.vmm.eventloop import EventLoop

pytestmark = pytest.mark.kvm


def imm64(v: int) -> bytes:
    return struct.pack("<Q", v)


def test_guest_writes_a_string_polling_thre(kvm_system):
    msg = b"Hello from CPL3\r\n"
    code = b"".join(
        [
            b"\x48\xbe" + imm64(cpl3.DATA_ADDR),  # mov rsi, DATA_ADDR
            b"\xb9" + struct.pack("<I", len(msg)),  # mov ecx, len(msg)
            # next:
            b"\x66\xba\xfd\x03",  # mov dx, 0x3fd (LSR)
            # wait:
            b"\xec",  # in al, dx
            b"\xa8\x20",  # test al, 0x20 (THRE)
            b"\x74\xfb",  # jz wait
            b"\x66\xba\xf8\x03",  # mov dx, 0x3f8 (THR)
            b"\xac",  # lodsb
            b"\xee",  # out dx, al
            b"\xe2\xef",  # loop next
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    g.mem.write(cpl3.DATA_ADDR, msg)
    out = bytearray()
    uart = Serial8250(output=out.extend)
    g.pio.insert(uart, COM1_PORT, UART_PORT_LEN)
    try:
        assert g.run().kind == "requested"
        assert bytes(out) == msg
    finally:
        g.close()


def test_rep_outsb_to_the_uart(kvm_system):
    msg = b"one exit, many bytes"
    code = b"".join(
        [
            b"\x48\xbe" + imm64(cpl3.DATA_ADDR),  # mov rsi, DATA_ADDR
            b"\xb9" + struct.pack("<I", len(msg)),  # mov ecx, len(msg)
            b"\x66\xba\xf8\x03",  # mov dx, 0x3f8
            b"\xf3\x6e",  # rep outsb
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    g.mem.write(cpl3.DATA_ADDR, msg)
    out = bytearray()
    g.pio.insert(Serial8250(output=out.extend), COM1_PORT, UART_PORT_LEN)
    try:
        assert g.run().kind == "requested"
        assert bytes(out) == msg
    finally:
        g.close()


def test_interactive_input_through_the_event_loop(kvm_system):
    """The guest polls LSR.DR, reads RBR into memory and echoes each byte, until '\\n'.
    Input arrives on a pipe watched by the event loop, after the guest has started."""
    code = b"".join(
        [
            b"\x48\xbf" + imm64(cpl3.DATA_ADDR + 0x200),  # mov rdi, DATA_ADDR + 0x200
            # poll:
            b"\x66\xba\xfd\x03",  # mov dx, 0x3fd (LSR)
            b"\xec",  # in al, dx
            b"\xa8\x01",  # test al, 1 (DR)
            b"\x74\xf7",  # jz poll
            b"\x66\xba\xf8\x03",  # mov dx, 0x3f8 (RBR)
            b"\xec",  # in al, dx
            b"\xaa",  # stosb
            b"\xee",  # out dx, al (echo)
            b"\x3c\x0a",  # cmp al, '\n'
            b"\x75\xec",  # jne poll
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code)
    out = bytearray()
    echoed = threading.Event()

    def output(b: bytes) -> None:
        out.extend(b)
        if b == b"\n":
            echoed.set()

    uart = Serial8250(output=output)
    g.pio.insert(uart, COM1_PORT, UART_PORT_LEN)
    r, w = os.pipe()
    loop = EventLoop()
    loop.start()

    def on_readable() -> None:
        uart.feed(os.read(r, 4096))

    loop.add_reader(r, on_readable)
    try:
        runner = g.start()
        assert not g.stopped.wait(0.05)  # polling an empty receiver
        os.write(w, b"ls -l\n")
        assert g.stopped.wait(10)
        assert runner.stop_reason is not None and runner.stop_reason.kind == "requested"
        assert g.mem.read(cpl3.DATA_ADDR + 0x200, 6) == b"ls -l\n"
        assert bytes(out) == b"ls -l\n" and echoed.is_set()
    finally:
        loop.remove_reader(r)
        loop.stop()
        os.close(r)
        os.close(w)
        g.close()


def test_uart_irq_reaches_the_in_kernel_pic(kvm_system):
    """The guest enables the RDA interrupt (IER=1); host input then raises IRQ 4, which
    KVM's PIC latches in its IRR."""
    code = b"".join(
        [
            b"\x66\xba\xf9\x03",  # mov dx, 0x3f9 (IER)
            b"\xb0\x01",  # mov al, 1 (RDA)
            b"\xee",  # out dx, al
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )
    g = cpl3.Cpl3Guest(kvm_system, code, irqchip=True)
    levels: list[int] = []

    def irq(level: int) -> None:
        levels.append(level)
        g.vm.irq_line(COM1_IRQ, level)

    uart = Serial8250(irq=irq)
    g.pio.insert(uart, COM1_PORT, UART_PORT_LEN)
    try:
        assert g.run().kind == "requested"
        assert uart.ier == 1 and levels == []

        def pic_irr() -> int:
            return g.vm.get_irqchip(0)[9]  # struct kvm_pic_state.irr, after chip_id + pad

        assert not pic_irr() & (1 << COM1_IRQ)
        uart.feed(b"x")
        assert levels == [1]
        assert pic_irr() & (1 << COM1_IRQ)
        data = bytearray(1)
        uart.read(0, data)  # the guest would read RBR in its handler: the line drops
        assert data == b"x" and levels == [1, 0]
    finally:
        g.close()
