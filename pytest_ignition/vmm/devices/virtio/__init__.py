"""virtio devices for the bundled VMM, on the virtio-mmio transport (version 2).

- :mod:`.mmio`: the transport (:class:`~.mmio.MmioTransport`, what sits on the MMIO bus) and
  the device base class (:class:`~.mmio.VirtioDevice`).
- :mod:`.queue`: the split virtqueue; every guest-supplied index, address and length checked.
- :mod:`.blk` (id 2), :mod:`.rng` (id 4), :mod:`.vsock` (id 19): the device models.
- :mod:`.driver`: a driver-side model used by tests and tools to play the guest.

Wiring: ``MmioTransport(device, guest_memory, interrupt)`` where ``interrupt()`` raises the
slot's (edge) interrupt, e.g. by writing an irqfd. Snapshots: ``transport.state()`` is plain
data; ``transport.set_state(state)`` on a freshly built transport + device restores it (vsock
connections are not kept: call ``VirtioVsock.send_transport_reset()`` after a restore).
"""
