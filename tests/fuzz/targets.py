"""Fuzz targets for the host-side parsers of untrusted bytes (issue 16).

Each target takes one input (bytes) and checks invariants; any exception other than the
parser's documented error is a finding. Run by ``tests/fuzz/test_fuzz.py`` (briefly, in CI) and
``python -m tests.fuzz.run TARGET SECONDS`` (atheris, coverage-guided; ``make fuzz``).

* ``agent_frames``: :class:`pytest_ignition.agent.FrameDecoder` over a stream cut into chunks the
  input chooses; the guest's side of the wire, so hostile.
* ``agent_payloads``: the payload decoders a guest's frames reach (``decode_list``, ``_error_from``).
* ``snapshot_state``: :func:`pytest_ignition.vmm.snapshot.decode_state` on raw bytes, and on a
  correctly framed and checksummed payload (so that the JSON/tag decoding is reached), then the
  checks a restore makes of the decoded state (:func:`check_machine`, :func:`check_fingerprint`,
  :func:`check_state`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pytest_ignition import agent
from pytest_ignition.vmm import snapshot


def agent_frames(data: bytes) -> None:
    if not data:
        return
    step = 1 + data[0] % 64  # chunk sizes 1..64 bytes, then the rest in one go
    stream = data[1:]
    dec = agent.FrameDecoder()
    out: list[agent.Frame | agent.FrameError] = []
    pos = 0
    while pos < len(stream):
        n = step if pos < 4 * step else len(stream)
        out += dec.feed(stream[pos : pos + n])
        pos += n
        assert dec.pending <= agent.HEADER_SIZE + agent.MAX_PAYLOAD
    # one feed of everything gives the same frames as any chunking
    whole = agent.FrameDecoder().feed(stream)
    assert [f for f in out if isinstance(f, agent.Frame)] == [
        f for f in whole if isinstance(f, agent.Frame)
    ]
    for f in out:
        if isinstance(f, agent.Frame):
            assert len(f.payload) <= agent.MAX_PAYLOAD
            assert 0 <= f.type <= 0xFF and 0 <= f.chan <= 0xFFFFFFFF
            # a decoded frame re-encodes to bytes that decode to itself
            assert agent.FrameDecoder().feed(agent.encode_frame(f.type, f.chan, f.payload)) == [f]


def agent_payloads(data: bytes) -> None:
    try:
        entries = agent.decode_list(data, "list /x")
    except agent.AgentError:
        pass
    else:
        for mode, size, rel in entries:
            assert 0 <= mode < 2**32 and 0 <= size < 2**64
            assert rel and not rel.startswith("/")
            assert ".." not in rel.split("/") and "" not in rel.split("/")
            parent = Path("/base")
            assert (parent / rel).resolve().is_relative_to(parent)  # no escape by name
    err = agent._error_from(agent.Frame(agent.FrameType.ERROR, 1, data), "exec")
    assert isinstance(err, agent.AgentError)


def _framed(payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).digest()
    return (
        snapshot.HEADER.pack(snapshot.MAGIC, snapshot.FORMAT_VERSION, 0, len(payload), digest)
        + payload
    )


def snapshot_state(data: bytes) -> None:
    if not data:
        return
    # half the inputs as a whole file, half as a payload behind a valid header (the JSON path)
    raw = data[1:] if data[0] & 1 else _framed(data[1:])
    try:
        state = snapshot.decode_state(raw, "fuzz/vmstate")
    except snapshot.SnapshotError:
        return
    assert isinstance(state, dict)
    # the tag and fingerprint checks a restore makes before it reads anything else
    try:
        snapshot.check_machine(state, "x86_64", "kvm", "fuzz/vmstate")
    except snapshot.SnapshotError as e:
        assert "restore it where it was taken" in str(e)
    try:
        snapshot.check_fingerprint(state, {"memory_mib": 256, "cmdline": None}, "fuzz/vmstate")
    except snapshot.SnapshotError:
        pass
    try:
        snapshot.check_state(state, "fuzz/vmstate")
    except snapshot.SnapshotError:
        return
    # a state that passes the checks encodes again (plain data only)
    json.dumps(snapshot._enc(state))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "agent_frames": agent_frames,
    "agent_payloads": agent_payloads,
    "snapshot_state": snapshot_state,
}
