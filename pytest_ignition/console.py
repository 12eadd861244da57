"""The guest's serial console: an interactive pexpect handle and a rolling tail for reports.

Owns :class:`SerialConsole`, built from a Unix socket the VMM serves the serial port on
(interactive use, connected lazily on first access) and a log file the VMM appends every
byte of console output to (the tail shown in failure reports, available whether or not
anyone is connected). Guest output is untrusted: it is decoded with replacement and only
the last bytes of the log are ever read.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect

__all__ = ["SerialConsole", "read_tail"]


def read_tail(path: Path, max_chars: int = 4000) -> str:
    """The last ``max_chars`` characters of a console log (empty if it does not exist)."""
    if max_chars <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            # UTF-8 is at most 4 bytes a character: read enough, then trim by characters.
            f.seek(max(0, size - 4 * max_chars))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "")
    return text[-max_chars:]


class SerialConsole:
    """The serial console of one machine."""

    def __init__(self, socket_path: Path, log_path: Path, *, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path)
        self.timeout = timeout
        self._spawn: pexpect.fdpexpect.fdspawn | None = None
        self._final_tail: str | None = None

    @property
    def spawn(self) -> pexpect.fdpexpect.fdspawn:
        """A pexpect spawn on the console (text mode, undecodable bytes replaced)."""
        if self._spawn is None:
            if self._final_tail is not None:
                raise RuntimeError("the console is closed (the machine was closed)")
            # The spawn owns the descriptor (it closes it), so detach it from the socket.
            fd = self._connect().detach()
            self._spawn = pexpect.fdpexpect.fdspawn(
                fd,
                timeout=self.timeout,
                encoding="utf-8",
                codec_errors="replace",
                use_poll=True,
            )
        return self._spawn

    def _connect(self, attempts: int = 50) -> socket.socket:
        last: OSError | None = None
        for _ in range(attempts):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:  # Ctrl-C: no socket left open
                sock.close()
                raise
            time.sleep(0.02)
        raise ConnectionError(f"cannot connect to the serial console {self.socket_path}: {last}")

    def tail(self, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters of console output (kept after close)."""
        if self._final_tail is not None:
            return self._final_tail[-max_chars:] if max_chars > 0 else ""
        return read_tail(self.log_path, max_chars)

    def close(self, keep_chars: int = 64 * 1024) -> None:
        """Disconnect; remember the log's tail so that reports still have it. Idempotent."""
        if self._final_tail is None:
            self._final_tail = read_tail(self.log_path, keep_chars)
        if self._spawn is not None:
            try:
                self._spawn.close()
            except OSError:
                pass
            self._spawn = None
