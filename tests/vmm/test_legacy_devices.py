"""Device models with no vCPU: the bus, the 8250 UART, the i8042, the boot timer, and the
event loop that feeds console input."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ignition.vmm.devices import legacy as L
from pytest_ignition.vmm.devices.bus import Bus, BusError
from pytest_ignition.vmm.eventloop import EventLoop


# -- bus ----------------------------------------------------------------------------------
class Dev:
    def __init__(self, tag: int = 0):
        self.tag = tag
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes([self.tag + offset]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_bus_dispatches_by_offset():
    bus = Bus("pio", 0x10000)
    a, b = Dev(0x10), Dev(0x20)
    bus.insert(a, 0x3F8, 8)
    bus.insert(b, 0x60, 5)
    d = bytearray(1)
    assert bus.read(0x3FA, d) and d == b"\x12"
    assert bus.read(0x64, d) and d == b"\x24"
    assert bus.write(0x3FF, b"z") and a.writes == [(7, b"z")]
    assert not bus.read(0x400, d) and d == b"\x24"  # untouched on a miss
    assert not bus.write(0x5F, b"q")
    assert bus.unhandled == 2


@pytest.mark.parametrize(
    "base,length", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 8), (0x3F0, 0x20), (0x3FC, 2)]
)
def test_bus_rejects_overlaps(base, length):
    bus = Bus("pio", 0x10000)
    bus.insert(Dev(), 0x3F8, 8)
    with pytest.raises(BusError, match="overlaps"):
        bus.insert(Dev(), base, length)


def test_bus_accepts_adjacent_ranges_and_checks_bounds():
    bus = Bus("pio", 0x10000)
    bus.insert(Dev(1), 0x3F8, 8)
    bus.insert(Dev(2), 0x3F0, 8)
    bus.insert(Dev(3), 0x400, 8)
    assert [r.base for r in bus.devices()] == [0x3F0, 0x3F8, 0x400]
    for base, length in [(0xFFFF, 2), (-1, 1), (0x500, 0)]:
        with pytest.raises(BusError):
            bus.insert(Dev(), base, length)
    assert bus.remove(0x3F8).tag == 1
    bus.insert(Dev(4), 0x3F8, 8)
    with pytest.raises(BusError):
        bus.remove(0x1234)


def test_bus_access_straddling_a_device_end_is_unhandled():
    bus = Bus("mmio")
    dev = Dev()
    bus.insert(dev, 0xD000_0000, 0x1000)
    d = bytearray(4)
    assert not bus.read(0xD000_0FFE, d)
    assert not bus.write(0xD000_0FFE, b"abcd")
    assert bus.write(0xD000_0FFC, b"abcd") and dev.writes == [(0xFFC, b"abcd")]


def test_bus_swallows_device_exceptions(caplog):
    class Broken:
        def read(self, offset, data):
            raise ZeroDivisionError

        def write(self, offset, data):
            raise KeyError("boom")

    bus = Bus("mmio")
    bus.insert(Broken(), 0x1000, 0x100)
    d = bytearray(b"\0\0")
    with caplog.at_level(logging.ERROR):
        assert bus.read(0x1010, d)
        assert bus.write(0x1010, b"x")
    assert d == b"\xff\xff"
    assert bus.device_errors == 2
    assert "raised on write" in caplog.text


def test_bus_error_log_is_rate_limited(caplog):
    class Broken:
        def read(self, offset, data):
            raise RuntimeError("again")

        def write(self, offset, data):
            raise RuntimeError("again")

    bus = Bus("mmio")
    bus.insert(Broken(), 0, 16)
    with caplog.at_level(logging.ERROR):
        for _ in range(1000):
            bus.write(0, b"x")
    assert bus.device_errors == 1000
    assert len([r for r in caplog.records if "raised on write" in r.getMessage()]) <= 20


# -- UART ---------------------------------------------------------------------------------
class UartHarness:
    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[int] = []
        self.uart = L.Serial8250(output=self.out.extend, irq=self.levels.append)

    def rd(self, reg: int) -> int:
        d = bytearray(1)
        self.uart.read(reg, d)
        return d[0]

    def wr(self, reg: int, value: int) -> None:
        self.uart.write(reg, bytes([value]))


def test_uart_transmit_and_line_status():
    h = UartHarness()
    for c in b"ok\n":
        assert h.rd(L.LSR) & (L.LSR_THRE | L.LSR_TEMT) == L.LSR_THRE | L.LSR_TEMT
        h.wr(L.RBR_THR_DLL, c)
    assert bytes(h.out) == b"ok\n"
    assert h.levels == []  # no interrupts enabled


def test_uart_receive_and_rda_interrupt():
    h = UartHarness()
    assert h.rd(L.LSR) & L.LSR_DR == 0
    assert h.rd(L.RBR_THR_DLL) == 0  # empty receiver reads 0
    h.uart.feed(b"ab")
    assert h.levels == []  # IER off: no IRQ
    h.wr(L.IER_DLM, L.IER_RDA)
    assert h.levels == [1]
    assert h.rd(L.IIR_FCR) == L.IIR_RDA
    assert h.rd(L.LSR) & L.LSR_DR
    assert h.rd(L.RBR_THR_DLL) == ord("a")
    assert h.levels == [1]  # still data pending
    assert h.rd(L.RBR_THR_DLL) == ord("b")
    assert h.levels == [1, 0]
    assert h.rd(L.IIR_FCR) == L.IIR_NONE
    assert h.rd(L.LSR) & L.LSR_DR == 0


def test_uart_thre_interrupt_semantics():
    h = UartHarness()
    h.wr(L.IER_DLM, L.IER_THRE)  # enabling THRE with an empty THR raises it at once
    assert h.levels == [1]
    assert h.rd(L.IIR_FCR) == L.IIR_THRE  # reading IIR acknowledges it
    assert h.levels == [1, 0]
    assert h.rd(L.IIR_FCR) == L.IIR_NONE
    h.wr(L.RBR_THR_DLL, ord("x"))  # the byte leaves at once: THRE again
    assert h.levels == [1, 0, 1]
    h.wr(L.IER_DLM, 0)
    assert h.levels == [1, 0, 1, 0]
    assert bytes(h.out) == b"x"


def test_uart_rda_has_priority_over_thre():
    h = UartHarness()
    h.wr(L.IER_DLM, L.IER_THRE | L.IER_RDA)
    h.uart.feed(b"q")
    assert h.rd(L.IIR_FCR) == L.IIR_RDA
    assert h.rd(L.RBR_THR_DLL) == ord("q")
    assert h.rd(L.IIR_FCR) == L.IIR_THRE


def test_uart_dlab_divisor_latch():
    h = UartHarness()
    h.wr(L.LCR, 0x83)
    h.wr(L.RBR_THR_DLL, 0x01)
    h.wr(L.IER_DLM, 0x00)
    assert h.rd(L.RBR_THR_DLL) == 0x01 and h.rd(L.IER_DLM) == 0
    assert h.out == b""  # DLL writes are not output
    h.wr(L.LCR, 0x03)
    assert h.rd(L.IER_DLM) == 0 and h.rd(L.LCR) == 0x03
    h.wr(L.RBR_THR_DLL, ord("k"))
    assert h.out == b"k"


def test_uart_loopback_as_linux_probes_it():
    h = UartHarness()
    h.wr(L.MCR, L.MCR_LOOP | 0x0A)  # loopback, RTS, OUT2: Linux's autoconfig check
    assert h.rd(L.MSR) & 0xF0 == 0x90
    h.wr(L.RBR_THR_DLL, 0x55)
    assert h.out == b""  # looped back, not transmitted
    assert h.rd(L.LSR) & L.LSR_DR
    assert h.rd(L.RBR_THR_DLL) == 0x55
    h.wr(L.MCR, L.MCR_OUT2)
    assert h.rd(L.MSR) == L.MSR_DEFAULT


def test_uart_fifo_bits_scratch_and_clear():
    h = UartHarness()
    h.wr(L.IIR_FCR, L.FCR_ENABLE)
    assert h.rd(L.IIR_FCR) & 0xC0 == 0xC0  # reports a 16550A FIFO
    h.wr(L.SCR, 0xA5)
    assert h.rd(L.SCR) == 0xA5
    h.uart.feed(b"junk")
    h.wr(L.IIR_FCR, L.FCR_ENABLE | L.FCR_CLEAR_RX)
    assert h.rd(L.LSR) & L.LSR_DR == 0


def test_uart_input_is_bounded():
    out = bytearray()
    u = L.Serial8250(output=out.extend, rx_limit=8)
    assert u.feed(b"0123456789") == 8
    assert u.dropped_input == 2
    d = bytearray(1)
    u.read(L.LSR, d)
    assert d[0] & L.LSR_OE and d[0] & L.LSR_DR
    u.read(L.LSR, d)
    assert not d[0] & L.LSR_OE  # cleared by the read


def test_uart_hostile_accesses_are_ignored():
    h = UartHarness()
    d = bytearray(4)
    h.uart.read(0, d)
    assert d == b"\xff" * 4
    h.uart.write(0, b"abcd")  # 4-byte write to THR: ignored
    h.uart.write(9, b"a")
    h.uart.read(200, bytearray(1))
    assert h.out == b""


def test_uart_output_to_a_file(tmp_path):
    p = tmp_path / "console.log"
    with open(p, "wb") as f:
        u = L.Serial8250(output=f)
        for c in b"to file":
            u.write(0, bytes([c]))
        assert p.read_bytes() == b"to file"  # flushed per byte


def test_uart_slow_console_does_not_block_input_or_registers():
    gate, entered = threading.Event(), threading.Event()

    def slow_output(b: bytes) -> None:
        entered.set()
        gate.wait(10)

    u = L.Serial8250(output=slow_output)
    writer = threading.Thread(target=lambda: u.write(L.RBR_THR_DLL, b"x"))
    writer.start()
    try:
        assert entered.wait(5)  # the "vCPU" is stuck in the console consumer
        assert u.feed(b"abc") == 3  # the event loop is not
        d = bytearray(1)
        u.read(L.LSR, d)  # nor is another vCPU reading registers
        assert d[0] & L.LSR_DR
    finally:
        gate.set()
        writer.join(5)
    assert not writer.is_alive()


def test_uart_state_round_trip():
    h = UartHarness()
    h.wr(L.IER_DLM, L.IER_RDA)
    h.wr(L.SCR, 7)
    h.uart.feed(b"pending")
    st = h.uart.state()
    levels: list[int] = []
    u2 = L.Serial8250(irq=levels.append)
    u2.set_state(st)
    assert u2.state() == st
    assert levels == [1]  # the restored device re-asserts its pending interrupt
    d = bytearray(1)
    u2.read(0, d)
    assert d == b"p"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(min_value=-4, max_value=12),
            st.binary(min_size=0, max_size=9),
        ),
        max_size=60,
    ),
    st.binary(max_size=40),
)
def test_uart_never_raises_on_guest_input(ops, feed):
    u = L.Serial8250(output=lambda b: None, irq=lambda level: None)
    u.feed(feed)
    for is_write, offset, data in ops:
        if is_write:
            u.write(offset, data)
        else:
            buf = bytearray(data)
            u.read(offset, buf)
            assert len(buf) == len(data)
    assert 0 <= u.ier <= 0x0F
    assert L.Serial8250().set_state(u.state()) is None


# -- i8042 --------------------------------------------------------------------------------
def test_i8042_reset_command_requests_reset():
    resets: list[int] = []
    k = L.I8042(reset=lambda: resets.append(1))
    d = bytearray(1)
    k.read(L.I8042_CMD, d)
    assert d[0] & 0x02 == 0  # input buffer empty: Linux's wait loop passes
    k.write(L.I8042_CMD, b"\xfe")
    assert resets == [1] and k.reset_requests == 1


def test_i8042_probe_commands():
    k = L.I8042()
    d = bytearray(1)
    k.write(L.I8042_CMD, bytes([L.I8042_CMD_SELF_TEST]))
    k.read(L.I8042_CMD, d)
    assert d[0] & L.I8042_STATUS_OBF
    k.read(L.I8042_DATA, d)
    assert d[0] == 0x55
    k.write(L.I8042_CMD, bytes([L.I8042_CMD_WRITE_CTR]))
    k.write(L.I8042_DATA, b"\x47")
    k.write(L.I8042_CMD, bytes([L.I8042_CMD_READ_CTR]))
    k.read(L.I8042_DATA, d)
    assert d[0] == 0x47
    k.read(L.I8042_CMD, d)
    assert not d[0] & L.I8042_STATUS_OBF
    st = k.state()
    k2 = L.I8042()
    k2.set_state(st)
    assert k2.state() == st


def test_i8042_hostile_accesses():
    k = L.I8042(reset=lambda: 1 / 0)  # a failing callback is logged, not raised
    k.write(L.I8042_CMD, b"\xfe")
    k.write(L.I8042_CMD, b"\xfe\xfe")
    d = bytearray(3)
    k.read(L.I8042_CMD, d)
    assert d == b"\xff\xff\xff"
    for _ in range(100):
        k.write(L.I8042_CMD, bytes([L.I8042_CMD_SELF_TEST]))  # output queue stays bounded
    assert len(k.outbuf) <= 16


# -- boot timer ---------------------------------------------------------------------------
def test_boot_timer_measures_from_start(caplog):
    start = time.monotonic_ns() - 5_000_000  # "launched" 5 ms ago
    t = L.BootTimer(start)
    with caplog.at_level(logging.INFO):
        t.write(0, b"\x7b")
    assert t.boot_time_us is not None and t.boot_time_us >= 5000
    assert t.booted.is_set()
    assert f"Guest-boot-time = {t.boot_time_us} us {t.boot_time_us // 1000} ms" in caplog.text


def test_boot_timer_ignores_other_writes():
    t = L.BootTimer()
    for off, data in [(0, b"\x7a"), (1, b"\x7b"), (0, b"\x7b\x00"), (0, b"")]:
        t.write(off, data)
    assert t.boot_time_us is None and not t.booted.is_set()
    d = bytearray(b"\xaa" * 4)
    t.read(0, d)
    assert d == bytes(4)


# -- event loop ---------------------------------------------------------------------------
def test_event_loop_feeds_the_uart_and_survives_callback_errors(caplog):
    out = bytearray()
    uart = L.Serial8250(output=out.extend)
    r, w = os.pipe()
    got = threading.Event()
    loop = EventLoop()
    loop.start()
    try:

        def on_input() -> None:
            uart.feed(os.read(r, 100))
            got.set()

        loop.add_reader(r, on_input)

        def bad() -> None:
            raise RuntimeError("callback bug")

        with caplog.at_level(logging.ERROR):
            loop.call_soon_threadsafe(bad)
            os.write(w, b"hi")
            assert got.wait(5)
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)
        assert done.wait(5)
        assert "callback bug" in caplog.text
        assert loop.running
        d = bytearray(1)
        uart.read(0, d)
        assert d == b"h"
        # remove_reader from another thread: later input is not consumed
        loop.remove_reader(r)
        fence = threading.Event()
        loop.call_soon_threadsafe(fence.set)
        assert fence.wait(5)
        got.clear()
        os.write(w, b"more")
        assert not got.wait(0.1)
    finally:
        loop.stop()
        os.close(r)
        os.close(w)
    assert not loop.running


def test_event_loop_runs_callbacks_in_order_on_its_thread():
    seen: list[tuple[int, str]] = []
    done = threading.Event()
    with EventLoop(name="order") as loop:
        for i in range(50):
            loop.call_soon_threadsafe(lambda i=i: seen.append((i, threading.current_thread().name)))
        loop.call_soon_threadsafe(done.set)
        assert done.wait(5)
    assert [i for i, _ in seen] == list(range(50))
    assert {n for _, n in seen} == {"order"}


def _fence(loop: EventLoop) -> None:
    done = threading.Event()
    loop.call_soon_threadsafe(done.set)
    assert done.wait(5)


def test_event_loop_survives_fd_number_reuse():
    """A backend closes a registered socket and the next one gets the same fd number: the
    new registration must work (epoll dropped the old file; the selector's map had not)."""
    import socket

    with EventLoop() as loop:
        a, b = socket.socketpair()
        loop.add_reader(a.fileno(), lambda: None)
        _fence(loop)
        old = a.fileno()
        a.close()  # closed without remove_reader, as a buggy backend might
        b.close()
        c, d = socket.socketpair()
        try:
            if c.fileno() != old:
                c, d = d, c
            assert c.fileno() == old  # the kernel hands out the lowest free number
            got = threading.Event()
            loop.add_reader(c.fileno(), lambda: (c.recv(10), got.set()))
            d.send(b"x")
            assert got.wait(5)
        finally:
            loop.remove_reader(c.fileno())
            _fence(loop)
            c.close()
            d.close()


def test_event_loop_writer_callbacks():
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    backlog = [b"x" * 65536] * 64  # more than the socket buffer holds
    drained = threading.Event()
    with EventLoop() as loop:

        def on_writable() -> None:
            while backlog:
                try:
                    n = a.send(backlog[0])
                except BlockingIOError:
                    return
                backlog[0] = backlog[0][n:]
                if not backlog[0]:
                    backlog.pop(0)
            loop.remove_writer(a.fileno())
            drained.set()

        loop.add_writer(a.fileno(), on_writable)
        total = 0
        while not drained.is_set() or total < 64 * 65536:
            chunk = b.recv(1 << 20)
            total += len(chunk)
            if total >= 64 * 65536:
                break
        assert drained.wait(5)
        assert total == 64 * 65536
        _fence(loop)
    a.close()
    b.close()
