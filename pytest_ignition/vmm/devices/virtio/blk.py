"""virtio-blk (device id 2) over a base image with a copy-on-write overlay.

The base image is opened read-only and never written. Guest writes land in an overlay of
4 KiB blocks kept in a sparse, already-unlinked file on disk (in ``$TMPDIR``: the engine points
it at the machine's directory; it vanishes with the process), not in RAM: ``overlay`` maps a
block index to its slot in that file. A saved :meth:`VirtioBlk.state` freezes the slots it
references (a later write of such a block goes to a fresh slot), so the state is a cheap copy
of the index and :meth:`VirtioBlk.revert_to` an index swap that also truncates the slots
written since (that is the rollback primitive). The file is capped (``max_overlay`` bytes;
default twice the image plus 64 MiB, ``IGNITION_DISK_OVERLAY_MAX`` overrides): a write that
needs a slot past it fails with VIRTIO_BLK_S_IOERR, logged. :meth:`save_overlay` /
:meth:`load_overlay` persist the overlay for snapshots (streamed, block by block). Requests:
IN, OUT, FLUSH (a no-op: nothing is volatile beyond the process), GET_ID. Sectors are
bounds-checked against the capacity (the base image's size rounded down to 512 bytes);
anything malformed completes with VIRTIO_BLK_S_IOERR / UNSUPP.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile

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


class OverlayFull(Exception):
    """The overlay file reached its cap: the guest's write fails."""


class _Store:
    """The overlay's sparse file: slots of one block each. Slots below ``frozen`` belong to a
    saved state and are never overwritten; ``next_slot`` is the first free one."""

    def __init__(self, max_bytes: int, directory: str | None = None) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - the device closes it
        self.fd = self.file.fileno()
        self.max_slots = max(0, max_bytes // BLOCK)
        self.next_slot = 0
        self.frozen = 0

    def read(self, slot: int) -> bytes:
        data = os.pread(self.fd, BLOCK, slot * BLOCK)
        return data + bytes(BLOCK - len(data))

    def write(self, slot: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        off = slot * BLOCK
        while view:
            n = os.pwrite(self.fd, view, off)
            view, off = view[n:], off + n

    def new_slot(self) -> int:
        if self.next_slot >= self.max_slots:
            raise OverlayFull
        self.next_slot += 1
        return self.next_slot - 1

    def drop_unfrozen(self) -> None:
        """Forget (and free on disk) every slot no saved state references."""
        if self.next_slot > self.frozen:
            self.next_slot = self.frozen
            os.ftruncate(self.fd, self.frozen * BLOCK)

    def close(self) -> None:
        self.file.close()


class OverlayState:
    """A saved overlay: the block -> slot index and the store whose slots it names."""

    __slots__ = ("index", "store")

    def __init__(self, store: _Store, index: dict[int, int]) -> None:
        self.store = store
        self.index = index

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OverlayState):
            return self.index == other.index and self.store is other.store
        return isinstance(other, dict) and self.index == other

    def __len__(self) -> int:
        return len(self.index)

    __hash__ = None  # type: ignore[assignment]


def _default_max_overlay(base_size: int) -> int:
    env = os.environ.get("IGNITION_DISK_OVERLAY_MAX", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            log.warning("IGNITION_DISK_OVERLAY_MAX=%r is not a number of bytes; ignored", env)
    return 2 * (-(-base_size // BLOCK) * BLOCK) + (64 << 20)


class VirtioBlk(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_sizes = (256,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        serial: str = "",
        max_overlay: int | None = None,
        overlay_dir: str | None = None,
    ):
        super().__init__()
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.base_size = os.fstat(self.fd).st_size
        self.capacity = self.base_size // SECTOR
        self.read_only = read_only
        self.serial = (serial or os.path.basename(self.path)).encode()[:ID_BYTES]
        self.max_overlay = (
            _default_max_overlay(self.base_size) if max_overlay is None else max_overlay
        )
        self._store = _Store(self.max_overlay, overlay_dir)
        self.overlay: dict[int, int] = {}  # block index -> slot in the overlay file
        self.overlay_full_errors = 0
        self.avail_features |= VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if read_only:
            self.avail_features |= VIRTIO_BLK_F_RO

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._store.close()

    @property
    def overlay_bytes(self) -> int:
        """Bytes of host disk the overlay's slots take (what the cap bounds)."""
        return self._store.next_slot * BLOCK

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
                try:
                    self._do_out(chain, sector, length)
                except OverlayFull:
                    self.overlay_full_errors += 1
                    log.warning(
                        "virtio-blk: %s: the copy-on-write overlay reached its cap of %d bytes; "
                        "write of sectors %d+%d fails (I/O error in the guest)",
                        self.path,
                        self.max_overlay,
                        sector,
                        length // SECTOR,
                    )
                    status = VIRTIO_BLK_S_IOERR
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
        slot = self.overlay.get(index)
        if slot is not None:
            return self._store.read(slot)
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
            slot = self.overlay.get(index)
            if slot is not None:
                out += self._store.read(slot)[off : off + n]
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

    def _slot_for_write(self, index: int) -> int:
        slot = self.overlay.get(index)
        if slot is not None and slot >= self._store.frozen:
            return slot  # written since the last saved state: overwrite in place
        return self._store.new_slot()  # OverlayFull past the cap

    def write_bytes(self, pos: int, data: bytes) -> None:
        """Write into the overlay; the base image is never touched. Raises OverlayFull when a
        block needs a slot past the cap (blocks before it are written)."""
        view = memoryview(data)
        done = 0
        while done < len(data):
            index, off = divmod(pos + done, BLOCK)
            n = min(BLOCK - off, len(data) - done)
            if n == BLOCK:
                block: bytes | bytearray | memoryview = view[done : done + n]
            else:
                block = bytearray(self._block(index))
                block[off : off + n] = view[done : done + n]
            slot = self._slot_for_write(index)
            self._store.write(slot, block)
            self.overlay[index] = slot
            done += n

    # -- rollback and snapshots ----------------------------------------------------------------
    def clear_overlay(self) -> None:
        self.overlay = {}
        self._store.drop_unfrozen()

    def _adopt(self, saved: object) -> None:
        """Make a saved overlay (an :class:`OverlayState`) the current one."""
        if isinstance(saved, dict) and all(isinstance(v, int) for v in saved.values()):
            # an index of this device's own file (what load_overlay just made): all frozen
            if any(v >= self._store.frozen for v in saved.values()):
                raise ValueError("virtio-blk overlay index names slots that are not saved")
            self.overlay = dict(saved)
            self._store.drop_unfrozen()
            return
        if not isinstance(saved, OverlayState):
            raise ValueError(f"not a saved virtio-blk overlay: {type(saved).__name__}")
        if saved.store is self._store:
            self.overlay = dict(saved.index)
            self._store.drop_unfrozen()
            return
        # Another device's state (same process): copy its blocks into our own file.
        self.overlay = {}
        self._store.drop_unfrozen()
        for index, slot in sorted(saved.index.items()):
            new = self._store.new_slot()
            self._store.write(new, saved.store.read(slot))
            self.overlay[index] = new
        self._store.frozen = self._store.next_slot

    def revert_to(self, state: dict) -> None:
        """Bring the disk back to a :meth:`state` taken earlier (queues untouched)."""
        self._adopt(state["overlay"])

    def state(self) -> dict:
        d = super().state()
        self._store.frozen = self._store.next_slot  # what this state names is never overwritten
        d.update(
            path=self.path,
            capacity=self.capacity,
            read_only=self.read_only,
            overlay=OverlayState(self._store, dict(self.overlay)),
        )
        return d

    def set_state(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"snapshot disk has {state['capacity']} sectors, image has {self.capacity}"
            )
        super().set_state(state)
        self._adopt(state["overlay"])

    def save_overlay(self, path: str | os.PathLike[str]) -> None:
        """Write the overlay as magic, count, then (block index, 4 KiB) records."""
        with open(path, "wb") as f:
            f.write(_OVERLAY_MAGIC + struct.pack("<Q", len(self.overlay)))
            for index in sorted(self.overlay):
                f.write(struct.pack("<Q", index))
                f.write(self._store.read(self.overlay[index]))

    def load_overlay(self, path: str | os.PathLike[str]) -> None:
        """Replace the overlay with a saved one (its blocks are copied into the overlay file
        and frozen: they are the state a rollback returns to)."""
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) != 16 or head[:8] != _OVERLAY_MAGIC:
                raise ValueError(f"{path}: not a virtio-blk overlay")
            (count,) = struct.unpack("<Q", head[8:])
            if count > self._store.max_slots:
                raise ValueError(f"{path}: {count} blocks, more than the overlay cap")
            self._store.frozen = 0
            self._store.drop_unfrozen()
            overlay: dict[int, int] = {}
            for _ in range(count):
                rec = f.read(8)
                block = f.read(BLOCK)
                if len(rec) != 8 or len(block) != BLOCK:
                    raise ValueError(f"{path}: truncated or out-of-range overlay")
                (index,) = struct.unpack("<Q", rec)
                if index * BLOCK >= self.base_size + BLOCK:
                    raise ValueError(f"{path}: truncated or out-of-range overlay")
                slot = overlay.get(index)
                if slot is None:
                    slot = self._store.new_slot()
                self._store.write(slot, block)
                overlay[index] = slot
        self.overlay = overlay
        self._store.frozen = self._store.next_slot
