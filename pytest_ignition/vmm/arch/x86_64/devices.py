"""The x86_64 machine's legacy devices: built, put on the machine's buses, and returned.

- PIO: the 8250 UART (COM1, ``0x3f8``, IRQ 4 through ``KVM_IRQ_LINE`` on the in-kernel
  PIC/IOAPIC) with the serial console (output to a file or callable, input from an fd on the
  event loop), and the i8042 at ``0x60..0x64`` (reset only: its pulse calls ``on_reset``);
- MMIO: the boot timer at :data:`.layout.BOOT_TIMER_ADDR` when asked.

Nothing here makes an ioctl: the UART raises its line only once the guest runs, through the
irqchip :mod:`.vm` created before. The machine adds these before its virtio devices, whose
MMIO slots start at the page above the boot timer's. The devices themselves are
:mod:`...devices.legacy`'s; the machine saves and loads their state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ... import console
from ...devices import legacy
from ...devices.bus import Bus
from ...hypervisor import kvm
from . import layout

log = logging.getLogger(__name__)

# devices/legacy.py's numbers, under the names vmm/machine.py exported them by
UART_PORT = legacy.COM1_PORT
UART_IRQ = legacy.COM1_IRQ
I8042_PORT = legacy.I8042_PORT
I8042_LEN = legacy.I8042_PORT_LEN


@dataclass
class LegacyDevices:
    uart: legacy.Serial8250
    i8042: legacy.I8042
    boot_timer: legacy.BootTimer | None


def add_legacy_devices(
    vm: kvm.Vm,
    pio: Bus,
    mmio: Bus,
    loop: Any,
    *,
    console_out: BinaryIO | Callable[[bytes], object] | None,
    console_in: int | None,
    on_reset: Callable[[], None],
    boot_timer_start_ns: int | None,
) -> LegacyDevices:
    """Build the UART (console on ``console_out``/``console_in``), the i8042 and, when
    ``boot_timer_start_ns`` is given (what the timer measures from), the boot timer; insert
    them on ``pio``/``mmio`` and return them."""
    uart = legacy.Serial8250(
        console.writer(console_out), irq=lambda level: vm.irq_line(UART_IRQ, level)
    )
    pio.insert(uart, UART_PORT, legacy.UART_PORT_LEN)
    if console_in is not None:
        fd = console_in
        try:
            loop.add_reader(fd, console.reader(loop, fd, uart.feed))
        except PermissionError:
            # epoll refuses regular files and /dev/null: there is no interactive input.
            log.debug("console input fd %d cannot be polled; the console is output-only", fd)
    i8042 = legacy.I8042(on_reset)
    pio.insert(i8042, I8042_PORT, I8042_LEN)
    boot_timer = None
    if boot_timer_start_ns is not None:
        boot_timer = legacy.BootTimer(boot_timer_start_ns)
        mmio.insert(boot_timer, layout.BOOT_TIMER_ADDR, legacy.BOOT_TIMER_LEN)
    return LegacyDevices(uart, i8042, boot_timer)
