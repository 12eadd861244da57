"""Write the libFuzzer seed corpus for fuzz_frames.c: one well-formed request of each kind.

Byte 0 of every input is the harness's control byte (bit 0: serial connection, bits 1-7: where the
stream is split into two reads); the rest is the host->agent stream, built with the host's own
encoder so the seeds follow the protocol as the host speaks it.
Run: .venv/bin/python guest/agent/fuzz/make_seeds.py guest/agent/fuzz/seeds
"""

import struct
import sys
from pathlib import Path

from pytest_ignition.agent import FrameType as T
from pytest_ignition.agent import encode_frame


def _exec(argv: list[bytes], env: list[bytes], cwd: bytes, flags: int = 0) -> bytes:
    head = struct.pack("<IIII", 1000, flags, len(argv), len(env))
    return head + b"".join(a + b"\0" for a in argv + env) + cwd + b"\0"


SEEDS = {
    "ping": encode_frame(T.PING, 1, b"hello"),
    "reset": encode_frame(T.RESET, 0, b"x"),
    "exec": encode_frame(T.EXEC, 3, _exec([b"true"], [b"A=1"], b"/")),
    "exec_shell_stdin": encode_frame(T.EXEC, 4, _exec([b"cat"], [], b"", 3))
    + encode_frame(T.STDIN, 4, b"data")
    + encode_frame(T.STDIN, 4)
    + encode_frame(T.SIGNAL, 4, struct.pack("<I", 9)),
    "put_file": encode_frame(T.PUT, 5, struct.pack("<II", 0o644, 0) + b"/d/f\0")
    + encode_frame(T.DATA, 5, b"content")
    + encode_frame(T.DATA, 5),
    "put_dir_get": encode_frame(T.PUT, 6, struct.pack("<II", 0o755, 1) + b"/d/e\0")
    + encode_frame(T.GET, 7, b"/d\0")
    + encode_frame(T.GET, 8, b"/d/e\0" + struct.pack("<I", 1)),
    "sync": encode_frame(T.SYNC, 9, struct.pack("<Q", 10**18) + bytes(32)),
    "oversize": encode_frame(T.PING, 1)[:8] + struct.pack("<I", (1 << 20) + 1) + b"x" * 64,
    "garbage_resync": b"xxIIG" + encode_frame(T.PING, 2),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, stream in SEEDS.items():
        for ctl, tag in ((0x40, "sock"), (0x41, "serial")):
            (out / f"{name}-{tag}").write_bytes(bytes([ctl]) + stream)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
