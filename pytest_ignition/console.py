"""The guest's serial console: an interactive pexpect handle and a rolling tail for reports.

Owns :class:`SerialConsole`, built from a Unix socket the VMM serves the serial port on
(interactive use, connected lazily on first access) and a log file the VMM appends every
byte of console output to (the tail shown in failure reports, available whether or not
anyone is connected). Guest output is untrusted: it is decoded with replacement and only
the last bytes of the log are ever read.

Also owns the cap on the logs a guest can grow (console, VMM stderr): :data:`log_guard`
watches registered files and, past :data:`LOG_CAP` bytes, keeps their last ``LOG_CAP`` bytes in
``<name>.1`` and truncates them (the writers open them ``O_APPEND``, so writing goes on at the
new end). :func:`read_tail` reads across the two, so report tails keep working; on disk a log
takes at most about twice the cap.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pexpect
import pexpect.fdpexpect

__all__ = ["LOG_CAP", "LogGuard", "SerialConsole", "log_guard", "read_tail"]


def _log_cap() -> int:
    try:  # IGNITION_LOG_CAP (bytes): for tests that flood a console on purpose
        return max(4096, int(os.environ.get("IGNITION_LOG_CAP", "")))
    except ValueError:
        return 8 << 20


LOG_CAP = _log_cap()  # bytes a guest-fed log keeps (and as much again in <name>.1)


def _read_last(path: Path, nbytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - nbytes))
            return f.read(nbytes)
    except OSError:
        return b""


def read_tail(path: Path, max_chars: int = 4000) -> str:
    """The last ``max_chars`` characters of a console log (empty if it does not exist),
    continued from its rotated ``<name>.1`` when the current file is shorter."""
    if max_chars <= 0:
        return ""
    path = Path(path)
    want = 4 * max_chars  # UTF-8 is at most 4 bytes a character: read enough, trim by characters
    data = _read_last(path, want)
    if len(data) < want:
        data = _read_last(path.with_name(path.name + ".1"), want - len(data)) + data
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "")
    return text[-max_chars:]


def rotate(path: Path, cap: int = LOG_CAP) -> bool:
    """If ``path`` is over ``cap`` bytes: its last ``cap`` bytes to ``<name>.1``, then truncate
    it (its writer appends, so it goes on at offset 0). True if it rotated."""
    try:
        size = os.stat(path).st_size
        if size <= cap:
            return False
        with open(path, "rb") as f:
            f.seek(max(0, size - cap))
            keep = f.read(size - max(0, size - cap))
            rotated = path.with_name(path.name + ".1")
            tmp = path.with_name(path.name + ".1.tmp")
            tmp.write_bytes(keep)
            os.replace(tmp, rotated)
            # What the writer appended while .1 was written goes there too, read right before
            # the truncate: only the bytes of that instant can be lost (copytruncate's race).
            f.seek(size)
            late = f.read()
            os.truncate(path, 0)
        if late:
            with open(rotated, "ab") as out:
                out.write(late)
        return True
    except OSError:
        return False


class LogGuard:
    """One daemon thread that keeps registered logs under their cap (polls every ``interval``
    seconds: between two looks a log can overshoot by what the guest writes meanwhile)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._paths: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.rotations = 0

    def watch(self, path: Path, cap: int = LOG_CAP) -> None:
        with self._lock:
            self._paths[Path(path)] = cap
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ignition-log-guard", daemon=True
                )
                self._thread.start()

    def unwatch(self, path: Path) -> None:
        with self._lock:
            self._paths.pop(Path(path), None)

    def check(self) -> None:
        with self._lock:
            items = list(self._paths.items())
        for path, cap in items:
            if rotate(path, cap):
                self.rotations += 1

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with contextlib.suppress(Exception):
                self.check()


log_guard = LogGuard()


class SerialConsole:
    """The serial console of one machine."""

    def __init__(
        self,
        socket_path: Path,
        log_path: Path,
        *,
        timeout: float = 30.0,
        other_logs: tuple[Path, ...] = (),
    ) -> None:
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path)
        # The console log and the VMM's own log (``other_logs``) are capped while the VM runs.
        self._capped = (self.log_path, *map(Path, other_logs))
        for path in self._capped:
            log_guard.watch(path)
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
            for path in self._capped:
                log_guard.unwatch(path)
        if self._spawn is not None:
            try:
                self._spawn.close()
            except OSError:
                pass
            self._spawn = None
