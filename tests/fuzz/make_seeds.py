"""Write the small seed corpus of tests/fuzz (kept in git): well-formed inputs of each target.

Run: .venv/bin/python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pytest_ignition.agent import FrameType as T
from pytest_ignition.agent import encode_frame

HERE = Path(__file__).resolve().parent
STAT = struct.Struct("<IQ")

STATE = {
    "id": "seed",
    "memory": {"size": 4096, "regions": [[0, 4096]]},
    "vcpus": [{"regs": {"rip": 1048576}, "msrs": {"$d": [[16, 0]]}}],
    "vm": {"clock": 123, "irqchip": {"$b": "AAECAw=="}},
    "devices": {"virtio": [{"kind": "blk", "overlay": {"$d": [[0, {"$b": "AA=="}]]}}]},
    "config": {"kernel": {"sha256": "00"}, "cpus": 1},
}


def seeds() -> dict[str, dict[str, bytes]]:
    frames = {
        "exit": encode_frame(T.PONG, 1, b"x")
        + encode_frame(T.EXIT, 2, struct.pack("<iiI", 0, 0, 0)),
        "split": encode_frame(T.STDOUT, 3, b"hello" * 10) + encode_frame(T.STDERR, 3),
        "garbage": b"xyI" + encode_frame(T.ERROR, 0, struct.pack("<I", 1001) + b"bad magic"),
        "oversize": encode_frame(T.DATA, 4)[:8] + struct.pack("<I", (1 << 20) + 5) + b"z" * 40,
    }
    listing = STAT.pack(0o40755, 0) + b"dir\0" + STAT.pack(0o100644, 5) + b"dir/file\0"
    payloads = {
        "list": listing,
        "error": struct.pack("<I", 2) + b"No such file or directory",
        "escape": STAT.pack(0o100644, 1) + b"../etc/passwd\0",
    }
    payload = json.dumps(STATE, separators=(",", ":")).encode()
    return {
        "agent_frames": {k: bytes([7]) + v for k, v in frames.items()},
        "agent_payloads": payloads,
        "snapshot_state": {"state": b"\0" + payload, "bad_magic": b"\1" + b"NOTSNAP\0" + payload},
    }


def main() -> None:
    for target, items in seeds().items():
        d = HERE / "seeds" / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in items.items():
            (d / name).write_bytes(data)


if __name__ == "__main__":
    main()
