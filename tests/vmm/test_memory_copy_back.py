"""GuestMemory.copy_back: the rollback's page revert from the backing file (no VM needed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ignition.vmm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

SIZE = 64 * PAGE_SIZE


def _file(tmp_path: Path, name: str = "memory.bin") -> tuple[Path, bytes]:
    data = bytes((i * 7 + i // PAGE_SIZE) & 0xFF for i in range(SIZE))
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def mapped(tmp_path: Path) -> Iterator[tuple[GuestMemory, Path, bytes]]:
    """Guest RAM privately mapped from a memory file of known bytes."""
    path, data = _file(tmp_path)
    mem = GuestMemory.from_file(path, SIZE)
    yield mem, path, data
    mem.close()


def test_copy_back_restores_exactly_the_pages_asked(mapped) -> None:
    mem, path, data = mapped
    r = mem.regions[0]
    mem.write(3 * PAGE_SIZE, b"\xaa" * (4 * PAGE_SIZE))  # pages 3..6
    mem.copy_back(r, 4, 2)  # pages 4, 5 back; 3 and 6 keep the write
    got = mem.read(0, SIZE)
    assert got[3 * PAGE_SIZE : 4 * PAGE_SIZE] == b"\xaa" * PAGE_SIZE
    assert got[4 * PAGE_SIZE : 6 * PAGE_SIZE] == data[4 * PAGE_SIZE : 6 * PAGE_SIZE]
    assert got[6 * PAGE_SIZE : 7 * PAGE_SIZE] == b"\xaa" * PAGE_SIZE
    mem.copy_back(r, 0, SIZE // PAGE_SIZE)
    assert mem.read(0, SIZE) == data
    assert path.read_bytes() == data  # the file itself is never written


def test_copy_back_reads_the_file_that_was_mapped_even_if_the_path_is_replaced(
    mapped, tmp_path: Path
) -> None:
    mem, path, data = mapped
    mem.write(0, b"\x01" * PAGE_SIZE)
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"\xee" * SIZE)
    os.replace(replacement, path)  # a snapshot store replacing its entry
    mem.copy_back(mem.regions[0], 0, 1)
    assert mem.read(0, PAGE_SIZE) == data[:PAGE_SIZE]


def test_copy_back_refuses_ranges_outside_the_region_and_anonymous_memory(mapped) -> None:
    mem = mapped[0]
    for first, count in [(-1, 1), (0, -1), (63, 2), (64, 1)]:
        with pytest.raises(GuestMemoryError):
            mem.copy_back(mem.regions[0], first, count)
    anon = GuestMemory.anonymous(SIZE)
    try:
        with pytest.raises(GuestMemoryError, match="not mapped from a file"):
            anon.copy_back(anon.regions[0], 0, 1)
    finally:
        anon.close()


def test_the_backing_file_is_held_while_mapped_and_closed_with_the_memory(tmp_path: Path) -> None:
    path, _ = _file(tmp_path)
    before = _fds()
    mem = GuestMemory.from_file(path, SIZE)
    first = mem.backing_fd
    assert os.path.samefile(f"/proc/self/fd/{first}", path)
    other, _ = _file(tmp_path, "other.bin")
    fd = os.open(other, os.O_RDONLY | os.O_CLOEXEC)
    mem.set_backing(fd)  # as a snapshot's in-place remap hands over its file
    assert mem.backing_fd == fd
    with pytest.raises(OSError):
        os.fstat(first)  # the first one was closed
    mem.close()
    assert mem.backing_fd == -1 and _fds() == before


def test_a_short_memory_file_is_refused_without_leaking_its_fd(tmp_path: Path) -> None:
    path, _ = _file(tmp_path)
    before = _fds()
    with pytest.raises(GuestMemoryError, match="expected"):
        GuestMemory.from_file(path, SIZE * 2)
    assert _fds() == before
