"""A CPL3 guest drives a real virtqueue: it negotiates with the virtio-mmio transport in front
of virtio-rng through MMIO exits, lays out a split queue in its RAM, posts a writable buffer,
notifies, and finds the used element the device wrote back."""

from __future__ import annotations

import struct

import cpl3
import pytest

from pytest_ignition.vmm.devices.virtio import mmio as vm
from pytest_ignition.vmm.devices.virtio.rng import VirtioRng

pytestmark = pytest.mark.kvm

SLOT = 0xD000_1000
TABLE = cpl3.DATA_ADDR  # (offset, value) register writes the guest replays
DESC = cpl3.DATA_ADDR + 0x1000
AVAIL = DESC + 0x80
USED = DESC + 0x200
BUF = cpl3.DATA_ADDR + 0x2000
BUF_LEN = 64
QSIZE = 8


def imm64(v: int) -> bytes:
    return struct.pack("<Q", v)


def register_writes() -> list[tuple[int, int]]:
    """The driver's side of virtio 1.x initialisation (section 3.1.1), as register writes."""
    return [
        (vm.STATUS, 0),
        (vm.STATUS, vm.ACKNOWLEDGE),
        (vm.STATUS, vm.ACKNOWLEDGE | vm.DRIVER),
        (vm.DRIVER_FEATURES_SEL, 1),
        (vm.DRIVER_FEATURES, 1),  # VIRTIO_F_VERSION_1 (bit 32)
        (vm.DRIVER_FEATURES_SEL, 0),
        (vm.DRIVER_FEATURES, 0),
        (vm.STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK),
        (vm.QUEUE_SEL, 0),
        (vm.QUEUE_NUM, QSIZE),
        (vm.QUEUE_DESC_LOW, DESC),
        (vm.QUEUE_DESC_HIGH, 0),
        (vm.QUEUE_AVAIL_LOW, AVAIL),
        (vm.QUEUE_AVAIL_HIGH, 0),
        (vm.QUEUE_USED_LOW, USED),
        (vm.QUEUE_USED_HIGH, 0),
        (vm.QUEUE_READY, 1),
        (vm.STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK | vm.DRIVER_OK),
    ]


def guest_code(nwrites: int) -> bytes:
    return b"".join(
        [
            b"\x48\xbb" + imm64(SLOT),  # mov rbx, SLOT
            # report the magic value: the transport answers MMIO reads
            b"\x8b\x03",  # mov eax, [rbx]
            b"\x66\xba\x00\x05",  # mov dx, 0x500
            b"\xef",  # out dx, eax
            # replay the (offset, value) table into the registers
            b"\x48\xbe" + imm64(TABLE),  # mov rsi, TABLE
            b"\xb9" + struct.pack("<I", nwrites),  # mov ecx, nwrites
            # next:
            b"\xad",  # lodsd                 (offset)
            b"\x89\xc2",  # mov edx, eax
            b"\xad",  # lodsd                 (value)
            b"\x89\x04\x13",  # mov [rbx+rdx], eax
            b"\xe2\xf7",  # loop next
            # descriptor 0: BUF, BUF_LEN bytes, device-writable
            b"\x48\xbf" + imm64(DESC),  # mov rdi, DESC
            b"\x48\xb8" + imm64(BUF),  # mov rax, BUF
            b"\x48\x89\x07",  # mov [rdi], rax
            b"\xc7\x47\x08" + struct.pack("<I", BUF_LEN),  # mov dword [rdi+8], BUF_LEN
            b"\x66\xc7\x47\x0c\x02\x00",  # mov word [rdi+12], VIRTQ_DESC_F_WRITE
            b"\x66\xc7\x47\x0e\x00\x00",  # mov word [rdi+14], 0
            # avail ring: ring[0] = 0, then idx = 1
            b"\x48\xbf" + imm64(AVAIL),  # mov rdi, AVAIL
            b"\x66\xc7\x47\x04\x00\x00",  # mov word [rdi+4], 0
            b"\x66\xc7\x47\x02\x01\x00",  # mov word [rdi+2], 1
            # notify queue 0
            b"\xc7\x43\x50\x00\x00\x00\x00",  # mov dword [rbx+0x50], 0
            # wait for used.idx != 0
            b"\x48\xbf" + imm64(USED),  # mov rdi, USED
            # wait:
            b"\x0f\xb7\x47\x02",  # movzx eax, word [rdi+2]
            b"\x85\xc0",  # test eax, eax
            b"\x74\xf8",  # jz wait
            # report used.ring[0].len and the interrupt status
            b"\x66\xba\x00\x05",  # mov dx, 0x500 (the table loop clobbered edx)
            b"\x8b\x47\x08",  # mov eax, [rdi+8]
            b"\xef",  # out dx, eax
            b"\x8b\x43\x60",  # mov eax, [rbx+0x60]   (InterruptStatus)
            b"\xef",  # out dx, eax
            b"\xc7\x43\x64\x01\x00\x00\x00",  # mov dword [rbx+0x64], 1 (InterruptACK)
            b"\x8b\x43\x60",  # mov eax, [rbx+0x60]
            b"\xef",  # out dx, eax
            b"\xe6\xf4",  # out 0xf4, al
        ]
    )


class Sink:
    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(int.from_bytes(data, "little"))


def test_guest_drives_virtio_rng(kvm_system):
    writes = register_writes()
    g = cpl3.Cpl3Guest(kvm_system, guest_code(len(writes)))
    g.mem.write(TABLE, b"".join(struct.pack("<II", off, val) for off, val in writes))
    interrupts: list[int] = []
    transport = vm.MmioTransport(VirtioRng(), g.mem, lambda: interrupts.append(1))
    g.mmio.insert(transport, SLOT, vm.SLOT_SIZE)
    sink = Sink()
    g.pio.insert(sink, 0x500, 4)
    try:
        reason = g.run()
        assert reason.kind == "requested", reason
        magic, used_len, isr, isr_after_ack = sink.values
        assert magic == vm.MMIO_MAGIC
        assert transport.status == 0xF  # DRIVER_OK reached, FEATURES_OK kept
        assert used_len == BUF_LEN
        assert isr == vm.INT_VRING and isr_after_ack == 0
        assert interrupts == [1]
        assert g.mem.read(BUF, BUF_LEN) != bytes(BUF_LEN)  # the device filled it
        assert struct.unpack("<HHII", g.mem.read(USED, 12)) == (0, 1, 0, BUF_LEN)
    finally:
        g.close()
