"""virtio-mmio transport registers, the status state machine and feature negotiation (no vCPU)."""

from __future__ import annotations

import logging

import pytest

from pytest_ignition.vmm.devices.virtio import mmio
from pytest_ignition.vmm.devices.virtio.driver import Arena, Driver
from pytest_ignition.vmm.devices.virtio.rng import VirtioRng
from pytest_ignition.vmm.memory import MMIO_START, GuestMemory

MEM = 16 << 20


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(MEM)
    yield m
    m.close()


@pytest.fixture
def rig(mem):
    irqs = []
    t = mmio.MmioTransport(VirtioRng(), mem, lambda: irqs.append(1))
    return t, Driver(t, mem, Arena(0x10_0000, MEM)), irqs


def test_identity_registers(rig):
    t, d, _ = rig
    assert d.read(mmio.MAGIC_VALUE) == 0x74726976
    assert d.read(mmio.VERSION) == 2
    assert d.read(mmio.DEVICE_ID) == 4
    assert d.read(mmio.STATUS) == 0
    # Non-4-byte register accesses read as zero and writes are ignored.
    data = bytearray(2)
    t.read(mmio.MAGIC_VALUE, data)
    assert data == b"\0\0"
    t.write(mmio.STATUS, b"\x01")
    assert d.read(mmio.STATUS) == 0


def test_features_paged_by_select(rig):
    _, d, _ = rig
    features = d.device_features()
    assert features & mmio.VIRTIO_F_VERSION_1
    d.write(mmio.DEVICE_FEATURES_SEL, 7)
    assert d.read(mmio.DEVICE_FEATURES) == 0


def test_negotiation_and_activation(rig):
    t, d, _ = rig
    status = d.init()
    assert status == mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK
    assert t.device.active
    assert t.device.acked_features == d.device_features()
    assert len(d.queues) == 1
    d.write(mmio.QUEUE_SEL, 0)
    assert d.read(mmio.QUEUE_READY) == 1


def test_features_ok_refused_without_version_1(rig):
    _, d, _ = rig
    status = d.init(features=mmio.VIRTIO_F_INDIRECT_DESC)
    assert not status & mmio.FEATURES_OK


def test_unoffered_features_are_dropped(rig):
    t, d, _ = rig
    d.init(features=(1 << 64) - 1)
    assert t.device.acked_features == d.device_features()


def test_driver_features_ignored_outside_driver_state(rig):
    t, d, _ = rig
    d.init()
    before = t.device.acked_features
    d.write(mmio.DRIVER_FEATURES_SEL, 0)
    d.write(mmio.DRIVER_FEATURES, 0)
    assert t.device.acked_features == before


def test_status_skipping_steps_is_ignored(rig):
    _, d, _ = rig
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    assert d.read(mmio.STATUS) == 0
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE)
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    assert d.read(mmio.STATUS) == mmio.ACKNOWLEDGE


def test_reset_clears_everything(rig):
    t, d, _ = rig
    d.init()
    d.write(mmio.STATUS, 0)
    assert d.read(mmio.STATUS) == 0
    assert not t.device.active
    assert t.device.acked_features == 0
    d.write(mmio.QUEUE_SEL, 0)
    assert d.read(mmio.QUEUE_READY) == 0


def _to_features_ok(d):
    d.write(mmio.STATUS, 0)
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE)
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
    d.write(mmio.DRIVER_FEATURES_SEL, 1)
    d.write(mmio.DRIVER_FEATURES, 1)  # VERSION_1
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)


def test_queue_register_validation(rig, mem):
    t, d, _ = rig
    q = t.device.queues[0]
    # Before FEATURES_OK: ignored.
    d.write(mmio.QUEUE_SEL, 0)
    d.write(mmio.QUEUE_NUM, 16)
    assert q.state.size == 0
    _to_features_ok(d)
    assert d.read(mmio.QUEUE_NUM_MAX) == 256
    for bad in (0, 3, 100, 512):
        d.write(mmio.QUEUE_NUM, bad)
        assert q.state.size == 0
    d.write(mmio.QUEUE_NUM, 16)
    assert q.state.size == 16
    # Out-of-range selector: num_max reads 0, writes go nowhere.
    d.write(mmio.QUEUE_SEL, 5)
    assert d.read(mmio.QUEUE_NUM_MAX) == 0
    d.write(mmio.QUEUE_NUM, 32)
    d.write(mmio.QUEUE_READY, 1)
    d.write(mmio.QUEUE_SEL, 0)
    assert q.state.size == 16
    # Rings in the MMIO gap or past RAM: ready refused.
    for addr in (MMIO_START, MEM - 8, 1 << 40, 0x1008):  # last one: misaligned descriptor table
        d.write(mmio.QUEUE_DESC_LOW, addr)
        d.write(mmio.QUEUE_DESC_HIGH, addr >> 32)
        d.write(mmio.QUEUE_AVAIL_LOW, 0x2000)
        d.write(mmio.QUEUE_USED_LOW, 0x3000)
        d.write(mmio.QUEUE_READY, 1)
        assert d.read(mmio.QUEUE_READY) == 0, hex(addr)
    d.write(mmio.QUEUE_DESC_LOW, 0x1000)
    d.write(mmio.QUEUE_DESC_HIGH, 0)
    d.write(mmio.QUEUE_READY, 1)
    assert d.read(mmio.QUEUE_READY) == 1
    assert (q.state.desc_table, q.state.avail_ring, q.state.used_ring) == (0x1000, 0x2000, 0x3000)
    # A ready queue's addresses can no longer change.
    d.write(mmio.QUEUE_DESC_LOW, 0x5000)
    assert q.state.desc_table == 0x1000


def test_notify_before_driver_ok_is_ignored(rig):
    t, d, irqs = rig
    _to_features_ok(d)
    d.notify(0)
    assert irqs == []


def test_interrupt_status_and_ack(rig, mem):
    t, d, irqs = rig
    d.init()
    q = d.queues[0]
    buf = d.arena.alloc(64)
    q.post([(buf, 64, True)])
    d.notify(0)
    assert irqs == [1]
    assert d.read(mmio.INTERRUPT_STATUS) == mmio.INT_VRING
    d.write(mmio.INTERRUPT_ACK, mmio.INT_VRING)
    assert d.read(mmio.INTERRUPT_STATUS) == 0
    assert q.take_used() == [(0, 64)]


def test_recheck_raises_again_only_an_interrupt_left_unacknowledged(rig, mem):
    t, d, irqs = rig
    d.init()
    assert not t.recheck_interrupt() and irqs == []  # nothing pending: nothing to do
    q = d.queues[0]
    q.post([(d.arena.alloc(64), 64, True)])
    d.notify(0)
    assert irqs == [1]
    # First look only notes the pending status; an unacknowledged one at the next look is raised.
    assert not t.recheck_interrupt()
    assert t.recheck_interrupt() and irqs == [1, 1]
    assert t.recheck_interrupt() and irqs == [1, 1, 1]  # and again, until the driver acks
    d.write(mmio.INTERRUPT_ACK, mmio.INT_VRING)
    assert not t.recheck_interrupt() and not t.recheck_interrupt()
    # A driver that acked between two looks, with new work pending again, is not nagged.
    q.post([(d.arena.alloc(64), 64, True)])
    d.notify(0)
    assert not t.recheck_interrupt()
    d.write(mmio.INTERRUPT_ACK, 0)  # an ack, even of nothing, shows the driver is alive
    assert not t.recheck_interrupt()
    assert irqs == [1, 1, 1, 1]


def test_config_generation_and_config_reads(rig):
    t, d, _ = rig
    assert d.read(mmio.CONFIG_GENERATION) == 0
    data = bytearray(8)
    t.read(0xFFC, data)  # straddles the end of the slot
    assert data == bytes(8)


def test_transport_state_round_trip(rig, mem):
    t, d, irqs = rig
    d.init()
    q = d.queues[0]
    buf = d.arena.alloc(32)
    q.post([(buf, 32, True)])
    d.notify(0)
    state = t.state()
    t2 = mmio.MmioTransport(VirtioRng(), mem, lambda: irqs.append(2))
    t2.set_state(state)
    assert t2.state() == state
    d.t = t2
    q.post([(buf, 16, True)])
    d.notify(0)
    assert q.take_used() == [(0, 32), (1, 16)]
    assert irqs[-1] == 2
    assert d.read(mmio.STATUS) & mmio.DRIVER_OK


def test_buffers_posted_before_driver_ok_are_served_at_driver_ok(rig, mem):
    t, d, irqs = rig
    _to_features_ok(d)
    q = d.setup_queue(0, 16)
    buf = d.arena.alloc(32)
    q.post([(buf, 32, True)])
    d.notify(0)  # too early: dropped
    assert q.take_used() == []
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    assert q.take_used() == [(0, 32)]
    assert irqs


def test_activation_failure_sets_needs_reset(mem, tmp_path):
    from pytest_ignition.vmm.devices.virtio.vsock import VirtioVsock
    from pytest_ignition.vmm.eventloop import EventLoop

    loop = EventLoop()
    dev = VirtioVsock(str(tmp_path / "v.sock"), loop)
    irqs = []
    t = mmio.MmioTransport(dev, mem, lambda: irqs.append(1))
    d = Driver(t, mem, Arena(0x10_0000, MEM))
    _to_features_ok(d)
    d.setup_queue(0, 16)  # the tx and event queues are left unset
    d.write(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    assert d.read(mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
    assert d.read(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG and irqs
    d.write(mmio.STATUS, 0)
    assert d.read(mmio.STATUS) == 0
    assert d.init() & mmio.DRIVER_OK
    dev.close()
    loop.stop()


def test_guest_triggered_warnings_are_rate_limited(rig, caplog):
    from pytest_ignition.vmm.devices.virtio import mmio as mmio_module

    _, d, _ = rig
    mmio_module.log.reset()
    caplog.set_level(logging.WARNING)
    for _ in range(10_000):
        d.write(0x0FC, 1)  # a read-only register: one warning each
    lines = [r for r in caplog.records if "read-only register" in r.getMessage()]
    assert 1 <= len(lines) <= mmio_module.log.burst + 50
    assert mmio_module.log.suppressed > 0
