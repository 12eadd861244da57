"""Dirty-page bitmaps decoded into runs (rollback copies one run back per read), and
run lists merged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ignition.vmm.memory import GuestMemory
from pytest_ignition.vmm.snapshot import bitmap_pages, bitmap_runs, is_zero, merge_runs


def _naive(bitmap: bytes, first: int) -> list[tuple[int, int]]:
    pages = [first + i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1]
    runs: list[list[int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(s, n) for s, n in runs]


@settings(max_examples=400)
@given(st.binary(max_size=300), st.integers(0, 1 << 20))
def test_runs_match_a_bit_by_bit_decoding(bitmap: bytes, first: int) -> None:
    assert bitmap_runs(bitmap, first) == _naive(bitmap, first)
    assert bitmap_pages(bytearray(bitmap), first) == [
        s + i for s, n in _naive(bitmap, first) for i in range(n)
    ]


@settings(max_examples=200)
@given(st.integers(1, 20000), st.lists(st.integers(0, 20000 * 8 - 1), max_size=40))
def test_sparse_bits_in_a_large_bitmap_survive_the_zero_scan(size: int, bits: list[int]) -> None:
    """Bitmaps past the zero scan's 4 KiB / 512 / 64-byte blocks (and not multiples of them),
    with a few bits anywhere, including the last byte."""
    bm = bytearray(size)
    for b in bits:
        if b < size * 8:
            bm[b >> 3] |= 1 << (b & 7)
    assert bitmap_runs(bytes(bm), 3) == _naive(bytes(bm), 3)
    assert is_zero(bm) == (not any(bm))


def test_runs_cross_byte_and_word_boundaries() -> None:
    bm = bytearray(32)
    for p in [*range(5, 70), 128, 130, *range(191, 256)]:
        bm[p >> 3] |= 1 << (p & 7)
    assert bitmap_runs(bm) == [(5, 65), (128, 1), (130, 1), (191, 65)]
    assert bitmap_runs(bytes(4096)) == []
    assert bitmap_runs(b"\xff" * 4096, 10) == [(10, 4096 * 8)]


def test_take_vmm_dirty_returns_and_clears(tmp_path) -> None:
    mem = GuestMemory.anonymous(2 << 20)
    mem._mark(3 << 12, 1)
    mem._mark((100 << 12) + 4000, 200)  # spans pages 100 and 101
    assert mem.take_vmm_dirty() == [3, 100, 101]
    assert mem.take_vmm_dirty() == []


@settings(max_examples=300)
@given(st.lists(st.lists(st.integers(0, 600), max_size=60), max_size=4))
def test_merged_runs_are_the_union_of_the_pages(page_sets: list[list[int]]) -> None:
    """Run lists decoded from separate bitmaps (KVM's log, the VMM's own, what an earlier
    read kept) merge into the runs of their union: sorted, adjacent runs joined."""
    lists = []
    for pages in page_sets:
        bm = bytearray(80)
        for p in pages:
            bm[p >> 3] |= 1 << (p & 7)
        lists.append(bitmap_runs(bytes(bm)))
    union = bytearray(80)
    for pages in page_sets:
        for p in pages:
            union[p >> 3] |= 1 << (p & 7)
    assert merge_runs(*lists) == bitmap_runs(bytes(union))


def test_merging_one_list_returns_it_and_none_returns_empty() -> None:
    runs = [(3, 2), (9, 1)]
    assert merge_runs(runs) is runs
    assert merge_runs([], runs, []) is runs
    assert merge_runs() == [] and merge_runs([], []) == []
    assert merge_runs([(0, 4)], [(2, 6)], [(8, 1)]) == [(0, 9)]
