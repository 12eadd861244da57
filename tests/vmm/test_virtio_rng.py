"""virtio-rng fills the driver's buffers (no vCPU)."""

from __future__ import annotations

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.devices.virtio.rng import VirtioRng
from pytest_ignition.vmm.memory import GuestMemory


def test_rng_fills_writable_buffers():
    mem = GuestMemory.anonymous(4 << 20)
    t = mmio.MmioTransport(VirtioRng(), mem, lambda: None)
    d = Driver(t, mem, Arena(0x1000, 4 << 20))
    assert d.init() & mmio.DRIVER_OK
    q = d.queues[0]
    a, b = d.arena.alloc(64), d.arena.alloc(4096)
    head = q.post([(a, 64, True), (b, 4096, True)])
    d.notify(0)
    assert q.take_used() == [(head, 4096 + 64)]
    assert mem.read(a, 64) != bytes(64)
    assert mem.read(b, 4096).count(0) < 100  # ~16 zero bytes expected out of 4096
    # A chain with only readable buffers gets nothing written.
    head = q.post([(a, 64, False)])
    d.notify(0)
    assert q.take_used() == [(head, 0)]
    mem.close()
