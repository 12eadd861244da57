"""Guest physical memory: the host mappings behind guest RAM and checked access to them.

Invariants:
- RAM is one or two regions: ``[0, min(size, MMIO_START))`` and, for guests larger than
  the low window, ``[4 GiB, 4 GiB + rest)``. ``[MMIO_START, 4 GiB)`` is the 32-bit MMIO gap
  (virtio-mmio devices, the boot timer, the IOAPIC/LAPIC pages); it is never RAM.
- Every access from device code goes through :meth:`GuestMemory.read` /
  :meth:`GuestMemory.write` / :meth:`GuestMemory.view`, which raise
  :class:`GuestMemoryError` for any range that is not wholly inside one region. Guest
  addresses are hostile input: callers catch the error, fail the request, keep running.
- Writes made by the VMM itself are recorded in a page bitmap (``vmm_dirty``) because KVM's
  dirty log only sees writes made by the vCPUs; in-place rollback needs both.
- A mapping made from a snapshot file is ``MAP_PRIVATE``: the file is never written (a
  guest write lands in a private copy of the page). Python's ``mmap.mmap(-1, n)`` would be
  MAP_SHARED, where that does not hold. The file stays open (``backing_fd``) for as long as
  it backs the mappings, so :meth:`GuestMemory.copy_back` reads exactly the bytes that were
  mapped even if the path has been replaced since.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from dataclasses import dataclass

PAGE_SIZE = 4096
MMIO_START = 0xD000_0000
FOUR_GIB = 1 << 32


class GuestMemoryError(Exception):
    """A guest physical range that is not wholly inside guest RAM."""


@dataclass
class Region:
    """One contiguous run of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mm: mmap.mmap
    file_offset: int = 0  # where this region starts in the backing file (0 for anonymous)

    @property
    def host_addr(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    @property
    def end(self) -> int:
        return self.gpa + self.size


def layout(size: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes of RAM into (gpa, length) regions around the MMIO gap."""
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"guest memory size must be a positive multiple of 4 KiB, got {size}")
    low = min(size, MMIO_START)
    regions = [(0, low)]
    if size > low:
        regions.append((FOUR_GIB, size - low))
    return regions


class GuestMemory:
    """Guest RAM. Construct with :meth:`anonymous` (fresh boot) or :meth:`from_file` (restore)."""

    def __init__(self, regions: list[Region]):
        self.regions = regions
        self.size = sum(r.size for r in regions)
        self.vmm_dirty = bytearray((self._page_span() + 7) // 8)
        # vCPU threads (MMIO handlers) and the event-loop thread (vsock rx) both write guest
        # memory; the bitmap's read-modify-write must not lose a bit, or rollback misses a page.
        self._dirty_lock = threading.Lock()
        self.backing_fd = -1  # the file the regions are privately mapped from (-1: anonymous)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def anonymous(cls, size: int) -> GuestMemory:
        regions = []
        for gpa, length in layout(size):
            mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            regions.append(Region(gpa, length, mm))
        return cls(regions)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], size: int) -> GuestMemory:
        """Map a memory file privately: pages load lazily and the file is never written."""
        regions = []
        offset = 0
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise GuestMemoryError(f"{path}: memory file is {actual} bytes, expected {size}")
            for gpa, length in layout(size):
                mm = mmap.mmap(
                    fd,
                    length,
                    flags=mmap.MAP_PRIVATE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=offset,
                )
                regions.append(Region(gpa, length, mm, offset))
                offset += length
        except BaseException:
            for r in regions:
                r.mm.close()
            os.close(fd)
            raise
        mem = cls(regions)
        mem.backing_fd = fd
        return mem

    def set_backing(self, fd: int) -> None:
        """Take ownership of ``fd``, the file the regions were just mapped from again (a
        snapshot remapped in place); the previous backing file is closed."""
        old, self.backing_fd = self.backing_fd, fd
        if old >= 0:
            os.close(old)

    def copy_back(self, region: Region, first_page: int, count: int) -> None:
        """Overwrite ``count`` pages of ``region`` from ``first_page`` with the backing file's
        bytes: the page contents the mapping started from (rollback).

        Why a copy rather than ``MADV_DONTNEED``, which also brings the file's pages back:
        dropping a page makes KVM zap its mapping (an MMU-notifier call) and the guest fault
        it in again on its next touch; a copy keeps every mapping (and the private copies:
        a VM's memory use stays at the pages its guest has written). On this PVM host 100k
        pages took 25 ms to copy and 53 ms to drop."""
        if self.backing_fd < 0:
            raise GuestMemoryError("guest RAM is not mapped from a file: nothing to copy back")
        start = first_page * PAGE_SIZE
        end = start + count * PAGE_SIZE
        if first_page < 0 or count < 0 or end > region.size:
            raise GuestMemoryError(f"pages {first_page}+{count} are not inside the region")
        with memoryview(region.mm) as view:
            pos = start
            while pos < end:  # one read returns at most ~2 GiB
                n = os.preadv(self.backing_fd, [view[pos:end]], region.file_offset + pos)
                if n <= 0:
                    raise GuestMemoryError(
                        f"backing file ends at {region.file_offset + pos:#x}, inside guest RAM"
                    )
                pos += n

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass  # an exported view is still alive; the mapping goes with the process
        self.set_backing(-1)

    # -- checked access ------------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r, gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not inside guest RAM")

    def check(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._locate(gpa, length)
        return r.mm[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        r, off = self._locate(gpa, len(data))
        r.mm[off : off + len(data)] = data
        self._mark(gpa, len(data))

    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        """A zero-copy view of a checked range; ``writable`` marks the pages VMM-dirty."""
        r, off = self._locate(gpa, length)
        if writable:
            self._mark(gpa, length)
        return memoryview(r.mm)[off : off + length]

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value & 0xFFFF))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value & 0xFFFF_FFFF))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))

    # -- VMM-side dirty tracking -----------------------------------------------------------
    def _page_span(self) -> int:
        return max(r.end for r in self.regions) // PAGE_SIZE

    def _mark(self, gpa: int, length: int) -> None:
        if length == 0:
            return
        first = gpa >> 12
        last = (gpa + length - 1) >> 12
        bm = self.vmm_dirty
        with self._dirty_lock:
            if first == last:
                bm[first >> 3] |= 1 << (first & 7)
            else:
                for page in range(first, last + 1):
                    bm[page >> 3] |= 1 << (page & 7)

    def take_vmm_dirty_bitmap(self) -> bytearray:
        """The bitmap (bit n = guest page n) of pages the VMM wrote since the last take; clears
        it. Also what a caller that only wants it cleared calls (no decoding)."""
        with self._dirty_lock:
            bm = self.vmm_dirty
            self.vmm_dirty = bytearray(len(bm))
        return bm

    def take_vmm_dirty(self) -> list[int]:
        """Guest page numbers the VMM wrote since the last take; clears the bitmap."""
        from .snapshot import bitmap_pages

        return bitmap_pages(self.take_vmm_dirty_bitmap())
