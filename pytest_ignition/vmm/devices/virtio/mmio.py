"""The virtio-mmio transport, version 2 (virtio 1.x section 4.2), and the device base class.

A :class:`MmioTransport` is what sits on the MMIO bus (``read(offset, data)`` /
``write(offset, data)`` relative to its 4 KiB slot). It owns the register file, the
status state machine and feature negotiation; a :class:`VirtioDevice` owns its queues'
processing and its config space. Every guest write is checked: out-of-range queue
selectors, bad sizes, rings outside RAM and writes in the wrong state are logged and
ignored, never raised. All register accesses and queue notifications run under the
device's lock, which device backends (e.g. vsock's event-loop callbacks) take too.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

from pytest_ignition.vmm.devices.virtio.queue import DescriptorChain, Queue
from pytest_ignition.vmm.devices.virtio.ratelimit import GuestLog
from pytest_ignition.vmm.memory import GuestMemory, GuestMemoryError

log = GuestLog(logging.getLogger(__name__))

MMIO_MAGIC = 0x7472_6976  # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0x4E47_4950  # arbitrary; Linux does not match on it

# Register offsets.
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_AVAIL_LOW = 0x090
QUEUE_AVAIL_HIGH = 0x094
QUEUE_USED_LOW = 0x0A0
QUEUE_USED_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits.
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# Interrupt status bits.
INT_VRING = 1
INT_CONFIG = 2

# Transport feature bits.
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

SLOT_SIZE = 0x1000


class VirtioDevice:
    """Base of the device models. Subclasses set ``device_type`` and ``queue_sizes``."""

    device_type: int = 0
    queue_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.avail_features = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC
        self.acked_features = 0
        self.queues = [Queue(n) for n in self.queue_sizes]
        self.mem: GuestMemory | None = None
        self.active = False
        self.lock = threading.RLock()
        self._signal: Callable[[int], None] = lambda bits: None

    # -- wiring (the transport calls these) ----------------------------------------------
    def attach(self, mem: GuestMemory, signal: Callable[[int], None]) -> None:
        self.mem = mem
        self._signal = signal

    def activate(self) -> bool:
        """DRIVER_OK was written; return False if the device cannot run (needs reset)."""
        indirect = bool(self.acked_features & VIRTIO_F_INDIRECT_DESC)
        for q in self.queues:
            q.indirect = indirect
        self.active = True
        return True

    def reset(self) -> None:
        """The driver wrote 0 to status: forget negotiated state and in-flight work."""
        self.active = False
        self.acked_features = 0
        for q in self.queues:
            q.reset()

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index`` (device is active)."""

    def config_space(self) -> bytes:
        return b""

    def read_config(self, offset: int, data: bytearray) -> None:
        cfg = self.config_space()
        chunk = cfg[offset : offset + len(data)]
        data[:] = chunk + bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:
        log.warning("%s: config write at %#x ignored", type(self).__name__, offset)

    # -- helpers for subclasses -----------------------------------------------------------
    def signal_used(self, index: int) -> None:
        """Raise the used-buffer interrupt for queue ``index`` unless the driver suppressed it."""
        q = self.queues[index]
        if self.mem is not None and q.needs_interrupt(self.mem):
            self._signal(INT_VRING)

    def process_queue(self, index: int, handle: Callable[[DescriptorChain], int]) -> int:
        """Pop every available chain of queue ``index`` into ``handle`` (which returns the used
        length); bad chains complete with length 0. Interrupts once at the end if anything was
        used. Returns the number of chains completed."""
        q = self.queues[index]
        mem = self.mem
        assert mem is not None
        done = 0
        while True:
            chain, bad = q.pop_valid(
                mem, log, f"{type(self).__name__}: queue {index}", publish=False
            )
            done += bad
            if chain is None:
                break
            try:
                length = handle(chain)
            except GuestMemoryError as e:
                log.warning("%s: queue %d: %s", type(self).__name__, index, e)
                length = 0
            q.add_used(mem, chain.head, length, publish=False)
            done += 1
        if done:
            q.publish_used(mem)  # one idx update per batch
            self.signal_used(index)
        return done

    def signal_config(self) -> None:
        self._signal(INT_CONFIG)

    # -- snapshots ------------------------------------------------------------------------
    def state(self) -> dict:
        """Plain data: negotiated features, queues and whatever the subclass adds."""
        return {
            "device_type": self.device_type,
            "acked_features": self.acked_features,
            "active": self.active,
            "queues": [q.to_dict() for q in self.queues],
        }

    def set_state(self, state: dict) -> None:
        """Rebuild from :meth:`state` output (after :meth:`attach`)."""
        if state.get("device_type") != self.device_type:
            raise ValueError(f"state is for device type {state.get('device_type')}")
        self.acked_features = int(state["acked_features"])
        self.queues = [Queue.from_dict(d) for d in state["queues"]]
        self.active = bool(state["active"])


class MmioTransport:
    """One virtio-mmio slot: registers and negotiation in front of a :class:`VirtioDevice`."""

    def __init__(
        self, device: VirtioDevice, mem: GuestMemory, interrupt: Callable[[], None]
    ) -> None:
        self.device = device
        self.mem = mem
        self.interrupt = interrupt
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self._acks = 0  # INTERRUPT_ACK writes so far, for recheck_interrupt
        self._watch: tuple[int, int] | None = None
        device.attach(mem, self._raise)

    # -- interrupts ---------------------------------------------------------------------
    def _raise(self, bits: int) -> None:
        with self.device.lock:
            self.interrupt_status |= bits
        self.interrupt()

    def recheck_interrupt(self) -> bool:
        """Raise the interrupt again if the driver has acknowledged nothing since the previous
        call while ``interrupt_status`` stayed set; True if it did.

        Called periodically (see ``Machine``): in a nested guest an edge on the irqfd has been
        seen to go missing, which leaves the driver waiting for an interrupt that never comes
        (vsock replies stall until the host sends something else). A second edge is harmless:
        the driver reads INTERRUPT_STATUS and finds either work or nothing."""
        with self.device.lock:
            seen = (self.interrupt_status, self._acks)
            stale = self.interrupt_status != 0 and self._watch == seen
            self._watch = seen if self.interrupt_status else None
        if stale:
            self.interrupt()
        return stale

    # -- bus interface ------------------------------------------------------------------
    def read(self, offset: int, data: bytearray) -> None:
        try:
            with self.device.lock:
                self._read(offset, data)
        except Exception:  # a device bug must not kill the vCPU thread
            log.exception("virtio-mmio: read at %#x failed", offset)
            data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        try:
            with self.device.lock:
                self._write(offset, bytes(data))
        except Exception:
            log.exception("virtio-mmio: write at %#x failed", offset)

    def _queue(self):
        if 0 <= self.queue_sel < len(self.device.queues):
            return self.device.queues[self.queue_sel]
        return None

    def _read(self, offset: int, data: bytearray) -> None:
        if offset >= CONFIG:
            if offset + len(data) > SLOT_SIZE:
                data[:] = bytes(len(data))
                return
            self.device.read_config(offset - CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            log.warning("virtio-mmio: %d-byte read at %#x ignored", len(data), offset)
            data[:] = bytes(len(data))
            return
        dev = self.device
        q = self._queue()
        if offset == MAGIC_VALUE:
            v = MMIO_MAGIC
        elif offset == VERSION:
            v = MMIO_VERSION
        elif offset == DEVICE_ID:
            v = dev.device_type
        elif offset == VENDOR:
            v = VENDOR_ID
        elif offset == DEVICE_FEATURES:
            v = (
                (dev.avail_features >> (32 * self.device_features_sel))
                if self.device_features_sel < 2
                else 0
            )
        elif offset == QUEUE_NUM_MAX:
            v = q.state.max_size if q else 0
        elif offset == QUEUE_READY:
            v = int(q.state.ready) if q else 0
        elif offset == INTERRUPT_STATUS:
            v = self.interrupt_status
        elif offset == STATUS:
            v = self.status
        elif offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            v = 0xFFFF_FFFF  # no shared memory regions
        elif offset == CONFIG_GENERATION:
            v = self.config_generation
        else:
            log.warning("virtio-mmio: read of unknown/write-only register %#x", offset)
            v = 0
        data[:] = struct.pack("<I", v & 0xFFFF_FFFF)

    def _write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG:
            if offset + len(data) > SLOT_SIZE or not self.status & DRIVER:
                log.warning("virtio-mmio: config write at %#x ignored", offset)
                return
            self.device.write_config(offset - CONFIG, data)
            return
        if len(data) != 4 or offset % 4:
            log.warning("virtio-mmio: %d-byte write at %#x ignored", len(data), offset)
            return
        (v,) = struct.unpack("<I", data)
        dev = self.device
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = v
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = v
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(v)
        elif offset == QUEUE_SEL:
            self.queue_sel = v
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~v
            self._acks += 1
        elif offset == STATUS:
            self._write_status(v)
        elif offset == QUEUE_NOTIFY:
            if not (self.status & DRIVER_OK and dev.active) or self.status & DEVICE_NEEDS_RESET:
                log.warning("virtio-mmio: notify before DRIVER_OK ignored")
            elif not 0 <= v < len(dev.queues) or not dev.queues[v].state.ready:
                log.warning("virtio-mmio: notify of bad/unready queue %d ignored", v)
            else:
                dev.queue_notify(v)
        elif offset in (
            QUEUE_NUM,
            QUEUE_READY,
            QUEUE_DESC_LOW,
            QUEUE_DESC_HIGH,
            QUEUE_AVAIL_LOW,
            QUEUE_AVAIL_HIGH,
            QUEUE_USED_LOW,
            QUEUE_USED_HIGH,
        ):
            self._write_queue(offset, v)
        elif offset == SHM_SEL:
            pass
        else:
            log.warning("virtio-mmio: write of unknown/read-only register %#x ignored", offset)

    def _write_driver_features(self, v: int) -> None:
        if self.status != ACKNOWLEDGE | DRIVER:
            log.warning("virtio-mmio: driver features written in status %#x; ignored", self.status)
            return
        if self.driver_features_sel > 1:
            log.warning("virtio-mmio: driver features page %d ignored", self.driver_features_sel)
            return
        shift = 32 * self.driver_features_sel
        offered = (self.device.avail_features >> shift) & 0xFFFF_FFFF
        if v & ~offered:
            log.warning(
                "virtio-mmio: driver acked unoffered features %#x (page %d)",
                v & ~offered,
                self.driver_features_sel,
            )
        acked = self.device.acked_features & ~(0xFFFF_FFFF << shift)
        self.device.acked_features = acked | ((v & offered) << shift)

    def _write_queue(self, offset: int, v: int) -> None:
        q = self._queue()
        if q is None:
            log.warning(
                "virtio-mmio: queue register %#x with bad queue %d ignored", offset, self.queue_sel
            )
            return
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK:
            log.warning(
                "virtio-mmio: queue register %#x written in status %#x; ignored",
                offset,
                self.status,
            )
            return
        s = q.state
        if offset == QUEUE_READY:
            if v == 0:
                s.ready = False
            elif v == 1:
                q.indirect = bool(self.device.acked_features & VIRTIO_F_INDIRECT_DESC)
                problem = q.validate(self.mem)
                if problem:
                    log.warning("virtio-mmio: queue %d not made ready: %s", self.queue_sel, problem)
                else:
                    s.ready = True
            return
        if s.ready:
            log.warning(
                "virtio-mmio: queue %d is ready; register %#x ignored", self.queue_sel, offset
            )
            return
        if offset == QUEUE_NUM:
            if v == 0 or v > s.max_size or v & (v - 1):
                log.warning(
                    "virtio-mmio: queue %d size %d invalid (max %d)", self.queue_sel, v, s.max_size
                )
            else:
                s.size = v
            return
        attr = {
            QUEUE_DESC_LOW: "desc_table",
            QUEUE_DESC_HIGH: "desc_table",
            QUEUE_AVAIL_LOW: "avail_ring",
            QUEUE_AVAIL_HIGH: "avail_ring",
            QUEUE_USED_LOW: "used_ring",
            QUEUE_USED_HIGH: "used_ring",
        }[offset]
        old = getattr(s, attr)
        if offset & 4:  # the HIGH half
            setattr(s, attr, (old & 0xFFFF_FFFF) | (v << 32))
        else:
            setattr(s, attr, (old & ~0xFFFF_FFFF) | v)

    def _write_status(self, v: int) -> None:
        cur = self.status
        if v == 0:
            self.reset()
            return
        if v & FAILED:
            self.status = cur | FAILED
            return
        if cur & (FAILED | DEVICE_NEEDS_RESET):
            log.warning("virtio-mmio: status %#x written while %#x; reset first", v, cur)
            return
        # Only one step forward at a time, keeping the bits already set (section 3.1.1).
        if cur == 0 and v == ACKNOWLEDGE:
            self.status = v
        elif cur == ACKNOWLEDGE and v == ACKNOWLEDGE | DRIVER:
            self.status = v
        elif cur == ACKNOWLEDGE | DRIVER and v == cur | FEATURES_OK:
            if self.device.acked_features & VIRTIO_F_VERSION_1:
                self.status = v
            else:
                log.warning("virtio-mmio: FEATURES_OK without VIRTIO_F_VERSION_1; refused")
        elif cur == ACKNOWLEDGE | DRIVER | FEATURES_OK and v == cur | DRIVER_OK:
            self.status = v
            if not self.device.activate():
                log.warning("virtio-mmio: %s failed to activate", type(self.device).__name__)
                self.status |= DEVICE_NEEDS_RESET
                self.interrupt_status |= INT_CONFIG
                self.interrupt()
                return
            # A driver may have kicked before DRIVER_OK (those notifies were dropped): catch up.
            for i, q in enumerate(self.device.queues):
                if q.state.ready:
                    self.device.queue_notify(i)
        elif v != cur:
            log.warning("virtio-mmio: status transition %#x -> %#x ignored", cur, v)

    def reset(self) -> None:
        self.device.reset()
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0

    # -- snapshots ------------------------------------------------------------------------
    def state(self) -> dict:
        with self.device.lock:
            return {
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "device": self.device.state(),
            }

    def set_state(self, state: dict) -> None:
        with self.device.lock:
            for key in (
                "status",
                "device_features_sel",
                "driver_features_sel",
                "queue_sel",
                "interrupt_status",
                "config_generation",
            ):
                setattr(self, key, int(state[key]))
            self.device.set_state(state["device"])
