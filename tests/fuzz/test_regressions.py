"""Inputs the fuzz targets found, kept as regression tests (each crashed a parser once)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from pytest_ignition.vmm import snapshot

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets  # noqa: E402

BASE = {"memory": {"size": 4096}, "vcpus": [], "vm": {}, "devices": {}, "config": {}}


def _file(payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).digest()
    head = snapshot.HEADER.pack(snapshot.MAGIC, snapshot.FORMAT_VERSION, 0, len(payload), digest)
    return head + payload


@pytest.mark.parametrize(
    "memory",
    [
        {},  # snapshot_state found this: KeyError 'size' out of Snapshot.load
        [],
        "4096",
        {"size": "4096"},
        {"size": -1},
        {"size": True},
        {"size": None},
    ],
)
def test_state_without_a_valid_memory_size_is_a_snapshot_error(memory: object) -> None:
    state = snapshot.decode_state(_file(json.dumps(dict(BASE, memory=memory)).encode()), "v")
    with pytest.raises(snapshot.SnapshotError, match="no valid memory size"):
        snapshot.check_state(state, "v")


def test_valid_state_passes() -> None:
    state = snapshot.decode_state(_file(json.dumps(BASE).encode()), "v")
    assert snapshot.check_state(state, "v") == 4096


def test_deeply_nested_state_is_a_snapshot_error() -> None:
    payload = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(snapshot.SnapshotError, match="undecodable"):
        snapshot.decode_state(_file(payload), "v")


def test_found_input_replays_cleanly() -> None:
    # the fuzzer's own input (target byte 0 even: framed payload): memory without "size"
    data = b"\0" + json.dumps(dict(BASE, memory={"sizf": 4096})).encode()
    targets.snapshot_state(data)  # raised KeyError before the fix


@pytest.mark.parametrize("fingerprint", [[1], 5, "x", True])
def test_malformed_fingerprint_is_a_snapshot_error(fingerprint: object) -> None:
    # snapshot_state found this once check_fingerprint joined the target: AttributeError
    state = dict(BASE, fingerprint=fingerprint)
    with pytest.raises(snapshot.SnapshotError, match="malformed fingerprint"):
        snapshot.check_fingerprint(state, {"memory_mib": 256}, "v")
    targets.snapshot_state(b"\0" + json.dumps(state).encode())
