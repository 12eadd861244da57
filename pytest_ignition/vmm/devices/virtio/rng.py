"""virtio-rng (device id 4): fills the driver's writable buffers from ``os.urandom``."""

from __future__ import annotations

import os

from pytest_ignition.vmm.devices.virtio.mmio import VirtioDevice
from pytest_ignition.vmm.devices.virtio.queue import DescriptorChain

VIRTIO_ID_RNG = 4
MAX_FILL = 64 * 1024  # per chain; the driver asks again if it wants more


class VirtioRng(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    queue_sizes = (256,)

    def queue_notify(self, index: int) -> None:
        self.process_queue(index, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        n = min(chain.writable_len, MAX_FILL)
        return chain.write(self.mem, os.urandom(n)) if n else 0
