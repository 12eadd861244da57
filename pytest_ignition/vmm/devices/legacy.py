"""Legacy devices: the 8250/16550A UART (COM1), the i8042 (reset only) and the boot timer.

All three follow the bus contract (``read(offset, data: bytearray)`` fills ``data``;
``write(offset, data: bytes)``), are driven from vCPU threads, and treat every guest access
as hostile: odd sizes and offsets are ignored or answered with all-ones, never raised.

Interrupts: the UART takes ``irq: Callable[[int], None]``, a *level* callback called with 1
when an interrupt condition becomes pending and 0 when none is, and only on a change. The
machine wires it to ``Vm.irq_line(4, level)``; with KVM's in-kernel PIC/IOAPIC (ISA pins are
edge-triggered) each 0→1 transition is one interrupt, which is what Linux's 8250 driver
expects: its handler loops on IIR until nothing is pending, which drops the line.

Each device has ``state() -> dict`` / ``set_state(dict)`` with plain JSON-able data, for
snapshots.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# -- 8250 / 16550A UART ------------------------------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
UART_PORT_LEN = 8

# register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IER_RLS = 0x04  # receiver line status
IER_MS = 0x08  # modem status
IER_MASK = 0x0F

IIR_NONE = 0x01
IIR_MS = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DEFAULT = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal is attached and ready

RX_LIMIT = 64 * 1024

Output = Callable[[bytes], object]


def _as_output(out: Output | BinaryIO | None) -> Output | None:
    if out is None or callable(out):
        return out  # type: ignore[return-value]
    f = out

    def write(b: bytes) -> None:
        f.write(b)
        f.flush()

    return write


class Serial8250:
    """A 16550A-compatible UART: THR/RBR, IER, IIR/FCR, LCR (DLAB), MCR (loopback), LSR,
    MSR, SCR; transmit is instantaneous (THR is always empty again right after a write).

    ``output`` receives every transmitted byte (a callable, or a binary file, flushed).
    :meth:`feed` queues input (from the event loop's console reader) and raises the
    received-data interrupt when IER allows it.
    """

    def __init__(
        self,
        output: Output | BinaryIO | None = None,
        irq: Callable[[int], object] | None = None,
        *,
        rx_limit: int = RX_LIMIT,
    ):
        self._output = _as_output(output)
        self._irq = irq
        self._lock = threading.RLock()
        self._out_lock = threading.Lock()
        self.rx_limit = rx_limit
        self.rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DEFAULT
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fcr = 0
        self.thre_pending = False  # THRE interrupt raised and not yet acknowledged
        self._level = 0
        self.dropped_input = 0

    # -- input from the host --------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many were accepted (bounded)."""
        with self._lock:
            room = self.rx_limit - len(self.rx)
            accepted = data[: max(room, 0)]
            self.rx.extend(accepted)
            if len(accepted) < len(data):
                self.dropped_input += len(data) - len(accepted)
                self.lsr |= LSR_OE
            self._update_irq()
            return len(accepted)

    def set_output(self, output: Output | BinaryIO | None) -> None:
        self._output = _as_output(output)

    # -- bus interface ----------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        if len(data) != 1 or not 0 <= offset < UART_PORT_LEN:
            data[:] = b"\xff" * len(data)
            return
        with self._lock:
            data[0] = self._read_reg(offset)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1 or not 0 <= offset < UART_PORT_LEN:
            return  # the 8250 is a byte-wide device; wider accesses are guest bugs
        # Emit outside the state lock, so a slow console consumer never blocks feed() from
        # the event loop; the output lock keeps bytes in order across vCPUs.
        with self._out_lock:
            with self._lock:
                out = self._write_reg(offset, data[0])
            if out is not None and self._output is not None:
                try:
                    self._output(out)
                except Exception:
                    log.exception("serial output callback failed; byte dropped")

    # -- registers --------------------------------------------------------------------------
    def _dlab(self) -> bool:
        return bool(self.lcr & LCR_DLAB)

    def _read_reg(self, offset: int) -> int:
        if offset == RBR_THR_DLL:
            if self._dlab():
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._update_irq()
            return value
        if offset == IER_DLM:
            return self.dlm if self._dlab() else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges a THRE interrupt
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_OE  # overrun is cleared by reading LSR
            return lsr
        if offset == MSR:
            return self._msr()
        return self.scr

    def _write_reg(self, offset: int, value: int) -> bytes | None:
        """Apply a register write; returns the byte to transmit, if any."""
        if offset == RBR_THR_DLL:
            if self._dlab():
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < self.rx_limit:
                    self.rx.append(value)
                else:
                    self.lsr |= LSR_OE
                out = None
            else:
                out = bytes((value,))
            # the byte is gone at once: THR is empty again and, if enabled, says so
            self.thre_pending = bool(self.ier & IER_THRE)
            self._update_irq()
            return out
        elif offset == IER_DLM:
            if self._dlab():
                self.dlm = value
                return
            old = self.ier
            self.ier = value & IER_MASK
            if self.ier & IER_THRE and not old & IER_THRE:
                # enabling THRE with an empty THR raises it at once (Linux's driver checks this)
                self.thre_pending = True
            elif not self.ier & IER_THRE:
                self.thre_pending = False
            self._update_irq()
        elif offset == IIR_FCR:
            self.fcr = value & (FCR_ENABLE | 0xC0)
            if value & FCR_CLEAR_RX:
                self.rx.clear()
                self._update_irq()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif offset == LSR:
            pass  # LSR is read-only; writes are ignored (as on real parts, "factory test")
        elif offset == MSR:
            pass
        else:
            self.scr = value

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            # loopback: the modem outputs drive the modem inputs
            m = 0
            if self.mcr & MCR_RTS:
                m |= MSR_CTS
            if self.mcr & MCR_DTR:
                m |= MSR_DSR
            if self.mcr & MCR_OUT1:
                m |= MSR_RI
            if self.mcr & MCR_OUT2:
                m |= MSR_DCD
            return m
        return self.msr

    def _iir(self) -> int:
        if self.ier & IER_RLS and self.lsr & LSR_OE:
            return IIR_RLS
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        return IIR_NONE

    def interrupt_pending(self) -> bool:
        with self._lock:
            return self._iir() != IIR_NONE

    def _update_irq(self) -> None:
        level = 0 if self._iir() == IIR_NONE else 1
        if level != self._level:
            self._level = level
            if self._irq is not None:
                try:
                    self._irq(level)
                except Exception:
                    log.exception("serial: raising IRQ failed")

    # -- snapshot ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "lsr": self.lsr,
                "msr": self.msr,
                "scr": self.scr,
                "dll": self.dll,
                "dlm": self.dlm,
                "fcr": self.fcr,
                "thre_pending": self.thre_pending,
                "rx": bytes(self.rx).hex(),
            }

    def set_state(self, st: dict[str, Any]) -> None:
        with self._lock:
            for k in ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr"):
                setattr(self, k, int(st[k]) & 0xFF)
            self.ier &= IER_MASK
            self.mcr &= MCR_MASK
            self.thre_pending = bool(st["thre_pending"])
            self.rx = collections.deque(bytes.fromhex(st["rx"])[: self.rx_limit])
            self._level = 0
            self._update_irq()


# -- i8042 ----------------------------------------------------------------------------------
I8042_PORT = 0x60
I8042_PORT_LEN = 5  # 0x60 data .. 0x64 status/command (0x61 is the in-kernel PIT's speaker)
I8042_DATA = 0
I8042_CMD = 4

I8042_CMD_READ_CTR = 0x20
I8042_CMD_WRITE_CTR = 0x60
I8042_CMD_SELF_TEST = 0xAA
I8042_CMD_KBD_TEST = 0xAB
I8042_CMD_KBD_DISABLE = 0xAD
I8042_CMD_KBD_ENABLE = 0xAE
I8042_CMD_READ_OUTP = 0xD0
I8042_CMD_RESET_CPU = 0xFE

I8042_STATUS_OBF = 0x01  # output buffer full: data for the guest at 0x60
I8042_STATUS_SYS = 0x04  # system flag (POST done)
I8042_STATUS_CMD = 0x08  # last write was a command


class I8042:
    """Just enough of the PS/2 controller for ``reboot=k``: the pulse-reset command (0xFE
    written to port 0x64) calls ``reset()``. Status reads say the input buffer is empty,
    so Linux's wait-for-ready loop passes; a few probe commands get sane answers.

    ``reset`` runs on the vCPU thread that did the write: it must not block on that vCPU
    (use ``VcpuRunner.request_stop``).
    """

    def __init__(self, reset: Callable[[], object] | None = None):
        self._reset = reset
        self._lock = threading.Lock()
        self.status = I8042_STATUS_SYS
        self.ctr = 0x00
        self.outbuf: collections.deque[int] = collections.deque(maxlen=16)
        self.expect_ctr = False
        self.reset_requests = 0

    def read(self, offset: int, data: bytearray) -> None:
        with self._lock:
            if len(data) != 1:
                data[:] = b"\xff" * len(data)
            elif offset == I8042_CMD:
                data[0] = self.status | (I8042_STATUS_OBF if self.outbuf else 0)
            elif offset == I8042_DATA:
                data[0] = self.outbuf.popleft() if self.outbuf else 0
            else:
                data[0] = 0

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        value = data[0]
        fire = False
        with self._lock:
            if offset == I8042_CMD:
                self.status |= I8042_STATUS_CMD
                self.expect_ctr = False
                if value == I8042_CMD_RESET_CPU:
                    self.reset_requests += 1
                    fire = True
                elif value == I8042_CMD_READ_CTR:
                    self.outbuf.append(self.ctr)
                elif value == I8042_CMD_WRITE_CTR:
                    self.expect_ctr = True
                elif value == I8042_CMD_SELF_TEST:
                    self.outbuf.append(0x55)
                elif value == I8042_CMD_KBD_TEST:
                    self.outbuf.append(0x00)
                elif value == I8042_CMD_READ_OUTP:
                    self.outbuf.append(0x01)  # A20 on, not in reset
                # anything else (enable/disable ports, ...) is accepted and ignored
            elif offset == I8042_DATA:
                self.status &= ~I8042_STATUS_CMD
                if self.expect_ctr:
                    self.ctr = value
                    self.expect_ctr = False
        if fire:
            log.info("i8042: guest requested a CPU reset (0xFE)")
            if self._reset is not None:
                try:
                    self._reset()
                except Exception:
                    log.exception("i8042: reset callback failed")

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": self.status,
                "ctr": self.ctr,
                "outbuf": list(self.outbuf),
                "expect_ctr": self.expect_ctr,
            }

    def set_state(self, st: dict[str, Any]) -> None:
        with self._lock:
            self.status = int(st["status"]) & 0xFF
            self.ctr = int(st["ctr"]) & 0xFF
            self.outbuf = collections.deque((int(b) & 0xFF for b in st["outbuf"]), maxlen=16)
            self.expect_ctr = bool(st["expect_ctr"])


# -- boot timer -----------------------------------------------------------------------------
BOOT_TIMER_ADDR = 0xD000_0000
BOOT_TIMER_LEN = 0x1000
BOOT_TIMER_MAGIC = 123


class BootTimer:
    """Firecracker-compatible boot timer: a one-byte write of 123 at offset 0 logs
    ``Guest-boot-time = <us> us <ms> ms``, measured from ``start_ns`` (a
    ``time.monotonic_ns()`` reading taken when the VM was launched; default: construction).

    ``boot_time_us`` keeps the first measurement, ``boot_times_us`` the first
    ``MAX_KEPT`` of them, ``booted`` is set on the first one, and ``on_boot(us)`` (if given)
    is called each time. A guest writing the magic in a loop must not grow host memory or the
    VMM's log: the list is capped and the log line rate-limited (``count`` counts them all).
    """

    MAX_KEPT = 64

    def __init__(
        self,
        start_ns: int | None = None,
        on_boot: Callable[[int], object] | None = None,
        logger: logging.Logger | None = None,
    ):
        self.start_ns = time.monotonic_ns() if start_ns is None else start_ns
        self.on_boot = on_boot
        self.log = logger or log
        self.boot_time_us: int | None = None
        self.boot_times_us: list[int] = []
        self.count = 0
        self.booted = threading.Event()

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = b"\0" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 1 or data[0] != BOOT_TIMER_MAGIC:
            return
        us = (time.monotonic_ns() - self.start_ns) // 1000
        self.count += 1
        if len(self.boot_times_us) < self.MAX_KEPT:
            self.boot_times_us.append(us)
        if self.boot_time_us is None:
            self.boot_time_us = us
            self.booted.set()
        n = self.count
        if n <= 16 or n & (n - 1) == 0:  # the first 16, then the 32nd, 64th, ...
            more = f" (boot-timer write #{n})" if n > 1 else ""
            self.log.info("Guest-boot-time = %d us %d ms%s", us, us // 1000, more)
        if self.on_boot is not None:
            try:
                self.on_boot(us)
            except Exception:
                log.exception("boot timer: on_boot callback failed")

    def state(self) -> dict[str, Any]:
        return {"boot_time_us": self.boot_time_us}

    def set_state(self, st: dict[str, Any]) -> None:
        # a restored guest has booted already; keep what it measured, do not re-arm
        self.boot_time_us = st.get("boot_time_us")
        if self.boot_time_us is not None:
            self.booted.set()
