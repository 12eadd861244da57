"""virtio-blk (device id 2) over a base image with a copy-on-write overlay.

The base image is opened read-only and never written. Guest writes land in an in-memory
overlay of 4 KiB blocks (``dict[int, bytes]``; values are immutable, so :meth:`VirtioBlk.state`
is a cheap shallow copy and :meth:`VirtioBlk.revert_to` an O(1) swap; that is the rollback
primitive). :meth:`save_overlay` / :meth:`load_overlay` persist it for snapshots. Requests:
IN, OUT, FLUSH (a no-op: nothing is volatile beyond the process), GET_ID. Sectors are
bounds-checked against the capacity (the base image's size rounded down to 512 bytes);
anything malformed completes with VIRTIO_BLK_S_IOERR / UNSUPP.
"""

from __future__ import annotations

import logging
import os
import struct

from pytest_ignition.vmm.devices.virtio.mmio import VirtioDevice
from pytest_ignition.vmm.devices.virtio.queue import DescriptorChain
from pytest_ignition.vmm.devices.virtio.ratelimit import GuestLog

log = GuestLog(logging.getLogger(__name__))

VIRTIO_ID_BLOCK = 2
SECTOR = 512
BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // SECTOR

VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

ID_BYTES = 20
CHUNK = 1 << 20  # copy large requests in pieces so a request never allocates its full size

_HDR = struct.Struct("<IIQ")
_OVERLAY_MAGIC = b"IGNBLKO1"


class VirtioBlk(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_sizes = (256,)

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False, serial: str = ""):
        super().__init__()
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.base_size = os.fstat(self.fd).st_size
        self.capacity = self.base_size // SECTOR
        self.read_only = read_only
        self.serial = (serial or os.path.basename(self.path)).encode()[:ID_BYTES]
        self.overlay: dict[int, bytes] = {}
        self.avail_features |= VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if read_only:
            self.avail_features |= VIRTIO_BLK_F_RO

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- config space: capacity, size_max, seg_max, geometry, blk_size --------------------
    def config_space(self) -> bytes:
        seg_max = self.queue_sizes[0] - 2  # header and status take two descriptors
        return struct.pack("<QIIHBBI", self.capacity, 0, seg_max, 0, 0, 0, SECTOR)

    # -- request processing ---------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        self.process_queue(index, self._request)

    def _request(self, chain: DescriptorChain) -> int:
        mem = self.mem
        if chain.writable_len < 1 or chain.readable_len < _HDR.size:
            log.warning("virtio-blk: chain without header or status byte")
            return 0
        rtype, _, sector = _HDR.unpack(chain.read(mem, 0, _HDR.size))
        data_in = chain.writable_len - 1  # bytes before the status byte
        status, used = VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_IN:
            if self._range_ok(sector, data_in):
                self._do_in(chain, sector, data_in)
                used = data_in
            else:
                status = VIRTIO_BLK_S_IOERR
        elif rtype == VIRTIO_BLK_T_OUT:
            length = chain.readable_len - _HDR.size
            if self.read_only:
                status = VIRTIO_BLK_S_IOERR
            elif self._range_ok(sector, length):
                self._do_out(chain, sector, length)
            else:
                status = VIRTIO_BLK_S_IOERR
        elif rtype == VIRTIO_BLK_T_FLUSH:
            pass
        elif rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, data_in)]
            used = chain.write(mem, ident)
        else:
            status = VIRTIO_BLK_S_UNSUPP
        chain.write(mem, bytes([status]), offset=chain.writable_len - 1)
        return used + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        if length % SECTOR:
            log.warning("virtio-blk: length %d is not a multiple of %d", length, SECTOR)
            return False
        if sector > self.capacity or length // SECTOR > self.capacity - sector:
            log.warning(
                "virtio-blk: sectors %d+%d beyond capacity %d",
                sector,
                length // SECTOR,
                self.capacity,
            )
            return False
        return True

    def _do_in(self, chain: DescriptorChain, sector: int, length: int) -> None:
        pos = sector * SECTOR
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            chain.write(self.mem, self.read_bytes(pos + done, n), offset=done)
            done += n

    def _do_out(self, chain: DescriptorChain, sector: int, length: int) -> None:
        pos = sector * SECTOR
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            self.write_bytes(pos + done, chain.read(self.mem, _HDR.size + done, n))
            done += n

    # -- the copy-on-write image ------------------------------------------------------------
    def _block(self, index: int) -> bytes:
        data = self.overlay.get(index)
        if data is None:
            data = os.pread(self.fd, BLOCK, index * BLOCK)
            if len(data) < BLOCK:
                data += bytes(BLOCK - len(data))
        return data

    def read_bytes(self, pos: int, length: int) -> bytes:
        """Disk contents (overlay over base) at byte ``pos``; caller has bounds-checked."""
        if not self.overlay:
            data = os.pread(self.fd, length, pos)
            return data + bytes(length - len(data))
        out = bytearray()
        end = pos + length
        while pos < end:
            index, off = divmod(pos, BLOCK)
            n = min(BLOCK - off, end - pos)
            if index in self.overlay:
                out += self.overlay[index][off : off + n]
                pos += n
                continue
            # Read the run of blocks not in the overlay with one pread.
            run_end = pos + n
            while run_end < end and run_end // BLOCK not in self.overlay:
                run_end = min(end, (run_end // BLOCK + 1) * BLOCK)
            data = os.pread(self.fd, run_end - pos, pos)
            out += data + bytes(run_end - pos - len(data))
            pos = run_end
        return bytes(out)

    def write_bytes(self, pos: int, data: bytes) -> None:
        """Write into the overlay; the base image is never touched."""
        view = memoryview(data)
        done = 0
        while done < len(data):
            index, off = divmod(pos + done, BLOCK)
            n = min(BLOCK - off, len(data) - done)
            if n == BLOCK:
                self.overlay[index] = bytes(view[done : done + n])
            else:
                block = bytearray(self._block(index))
                block[off : off + n] = view[done : done + n]
                self.overlay[index] = bytes(block)
            done += n

    # -- rollback and snapshots ----------------------------------------------------------------
    def clear_overlay(self) -> None:
        self.overlay = {}

    def revert_to(self, state: dict) -> None:
        """Bring the disk back to a :meth:`state` taken earlier (queues untouched)."""
        self.overlay = dict(state["overlay"])

    def state(self) -> dict:
        d = super().state()
        d.update(
            path=self.path,
            capacity=self.capacity,
            read_only=self.read_only,
            overlay=dict(self.overlay),  # blocks are immutable bytes: a shallow copy suffices
        )
        return d

    def set_state(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"snapshot disk has {state['capacity']} sectors, image has {self.capacity}"
            )
        super().set_state(state)
        self.overlay = dict(state["overlay"])

    def save_overlay(self, path: str | os.PathLike[str]) -> None:
        """Write the overlay as magic, count, then (block index, 4 KiB) records."""
        with open(path, "wb") as f:
            f.write(_OVERLAY_MAGIC + struct.pack("<Q", len(self.overlay)))
            for index in sorted(self.overlay):
                f.write(struct.pack("<Q", index))
                f.write(self.overlay[index])

    def load_overlay(self, path: str | os.PathLike[str]) -> None:
        with open(path, "rb") as f:
            head = f.read(16)
            if head[:8] != _OVERLAY_MAGIC:
                raise ValueError(f"{path}: not a virtio-blk overlay")
            (count,) = struct.unpack("<Q", head[8:])
            overlay = {}
            for _ in range(count):
                (index,) = struct.unpack("<Q", f.read(8))
                block = f.read(BLOCK)
                if len(block) != BLOCK or index * BLOCK >= self.base_size + BLOCK:
                    raise ValueError(f"{path}: truncated or out-of-range overlay")
                overlay[index] = block
        self.overlay = overlay
