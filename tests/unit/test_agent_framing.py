"""The agent protocol's framing on the host: encode/decode, resynchronisation, hostile input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ignition.agent import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    encode_frame,
)

frames = st.builds(
    Frame,
    type=st.integers(0, 0xFF),
    chan=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=300),
)


def decode_all(data: bytes, pieces: list[int] | None = None) -> list[Frame | FrameError]:
    dec = FrameDecoder()
    out: list[Frame | FrameError] = []
    if pieces is None:
        return dec.feed(data)
    pos = 0
    for n in pieces:
        out += dec.feed(data[pos : pos + n])
        pos += n
    out += dec.feed(data[pos:])
    return out


def test_header_layout_is_little_endian() -> None:
    raw = encode_frame(FrameType.EXEC, 0x01020304, b"xyz")
    assert raw[:HEADER_SIZE] == b"IG\x01\x02\x04\x03\x02\x01\x03\x00\x00\x00"
    assert raw[HEADER_SIZE:] == b"xyz"


def test_encode_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_frame(0x100, 1)
    with pytest.raises(ValueError):
        encode_frame(1, 1 << 32)
    with pytest.raises(ValueError):
        encode_frame(1, 1, b"\0" * (MAX_PAYLOAD + 1))
    assert len(encode_frame(1, 1, b"\0" * MAX_PAYLOAD)) == HEADER_SIZE + MAX_PAYLOAD


@given(st.lists(frames, max_size=8))
def test_round_trip(fs: list[Frame]) -> None:
    data = b"".join(encode_frame(f.type, f.chan, f.payload) for f in fs)
    assert decode_all(data) == fs


@settings(max_examples=30)
@given(st.lists(frames, min_size=1, max_size=3))
def test_split_at_every_byte_boundary(fs: list[Frame]) -> None:
    data = b"".join(encode_frame(f.type, f.chan, f.payload) for f in fs)
    for cut in range(len(data) + 1):
        assert decode_all(data, [cut]) == fs, cut


def test_byte_at_a_time() -> None:
    f = Frame(FrameType.STDOUT, 9, bytes(range(256)))
    data = encode_frame(f.type, f.chan, f.payload)
    dec = FrameDecoder()
    got: list[Frame | FrameError] = []
    for b in data:
        got += dec.feed(bytes([b]))
    assert got == [f]
    assert dec.pending == 0


@given(st.binary(max_size=200), frames)
def test_garbage_before_a_valid_frame(garbage: bytes, f: Frame) -> None:
    # Garbage that happens to contain the magic could parse as a frame of its own; keep it out.
    garbage = garbage.replace(b"I", b"i")
    out = decode_all(garbage + encode_frame(f.type, f.chan, f.payload))
    assert out[-1] == f
    errors = [x for x in out if isinstance(x, FrameError)]
    assert len(errors) == (1 if len(garbage) > 0 else 0)  # one error per run of garbage
    assert all(isinstance(x, FrameError) for x in out[:-1])


def test_garbage_ending_in_half_a_magic() -> None:
    f = Frame(1, 2, b"p")
    out = decode_all(b"xxI" + encode_frame(f.type, f.chan, f.payload))
    assert out == [FrameError("bad magic: skipping to the next frame"), f]


def test_bad_version_resyncs() -> None:
    bad = bytearray(encode_frame(1, 5, b"abc"))
    bad[2] = 2
    f = Frame(1, 6, b"ok")
    out = decode_all(bytes(bad) + encode_frame(f.type, f.chan, f.payload))
    assert out[-1] == f
    assert isinstance(out[0], FrameError) and "version" in out[0].reason


def test_oversize_payload_is_skipped() -> None:
    n = MAX_PAYLOAD + 10
    hdr = struct.pack("<HBBII", 0x4749, 1, FrameType.DATA, 3, n)
    f = Frame(FrameType.PING, 4, b"after")
    dec = FrameDecoder()
    out = dec.feed(hdr)
    assert len(out) == 1 and isinstance(out[0], FrameError) and out[0].chan == 3
    # The skipped payload may contain anything, even valid-looking frames.
    filler = (encode_frame(1, 1, b"inside") * (n // 18 + 1))[:n]
    out = dec.feed(filler[: n // 2]) + dec.feed(filler[n // 2 :])
    assert out == []
    assert dec.feed(encode_frame(f.type, f.chan, f.payload)) == [f]


def test_truncated_frame_waits() -> None:
    data = encode_frame(FrameType.STDERR, 1, b"0123456789")
    dec = FrameDecoder()
    assert dec.feed(data[:-1]) == []
    assert dec.pending == len(data) - 1
    assert dec.feed(data[-1:]) == [Frame(FrameType.STDERR, 1, b"0123456789")]


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_decoder_never_raises(chunks: list[bytes]) -> None:
    dec = FrameDecoder()
    for c in chunks:
        for item in dec.feed(c):
            assert isinstance(item, Frame | FrameError)
            if isinstance(item, Frame):
                assert len(item.payload) <= MAX_PAYLOAD


@given(st.lists(frames, max_size=4), st.binary(max_size=50), st.lists(frames, max_size=4))
def test_valid_frames_survive_interleaved_garbage(
    before: list[Frame], garbage: bytes, after: list[Frame]
) -> None:
    enc = b"".join(encode_frame(f.type, f.chan, f.payload) for f in before)
    tail = b"".join(encode_frame(f.type, f.chan, f.payload) for f in after)
    garbage = garbage.replace(b"I", b"i")
    out = decode_all(enc + garbage + tail)
    got = [x for x in out if isinstance(x, Frame)]
    assert got == before + after
