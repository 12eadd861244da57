"""Host side of the guest agent protocol (docs/agent-protocol.md).

Owns the wire format on the host (``encode_frame``, the incremental ``FrameDecoder``; the guest's
copy is ``guest/agent/protocol.h``) and ``AgentClient``, which runs commands and moves files over one
framed byte stream (virtio-serial, Firecracker-style vsock over a Unix socket, or a plain Unix
socket). One reader thread demultiplexes the guest's frames by channel id, so any number of
threads may use one client at once.

Everything the guest sends is hostile input: the decoder never raises on garbage, every payload is
length-checked before it is unpacked, and paths the guest names are validated before they touch
the host's filesystem. Files from the guest (``get_tree``) are written by a walk with directory
file descriptors (``O_NOFOLLOW`` at every step, a fresh ``O_EXCL`` temp file renamed into place),
so neither a guest-sent name nor a symlink already on the host can redirect a write; they never
get setuid/setgid/sticky bits, and symlinks, devices, FIFOs and sockets are skipped. Transfers take
a byte cap (``limit``): past it the transfer is cancelled and :class:`AgentTransferLimit` raised.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import math
import os
import posixpath
import queue
import socket
import stat as stat_mod
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = 0x4749  # the bytes "IG" on the wire
MAGIC_BYTES = b"IG"
VERSION = 1
HEADER = struct.Struct("<HBBII")  # magic, version, type, chan, len
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
CHUNK = 64 * 1024  # payload size for STDIN and DATA frames the host sends

DEFAULT_VSOCK_PORT = 52
REQUEST_TIMEOUT = 120.0  # file transfers, sync: a guest that is alive answers well within this
SPILL = 4 << 20  # get_file: bytes kept in memory before the rest streams to a temp file
SEND_TIMEOUT = 120.0  # a guest that reads nothing for this long while the host sends is gone
HOST_TIMEOUT_GRACE = 5.0  # past an exec's own timeout, before the host kills it itself
KILL_GRACE = 5.0  # after the host's SIGKILL, for the EXIT to arrive
# After a SIGKILL for too much output, the agent still flushes what it had queued (up to ~1 MiB
# plus the pipes): wait KILL_GRACE past the last frame, but never longer than this in all.
DRAIN_LIMIT = 60.0


class FrameType(enum.IntEnum):
    PING = 0x01
    EXEC = 0x02
    STDIN = 0x03
    SIGNAL = 0x04
    PUT = 0x05
    DATA = 0x06
    GET = 0x07
    SYNC = 0x08
    RESET = 0x09
    WINSIZE = 0x0A
    # TCP tunnels (pytest_ignition/tunnel.py; docs/agent-protocol.md "TCP tunnels")
    TCP_CONNECT = 0x10
    TCP_DATA = 0x11
    TCP_CREDIT = 0x12
    TCP_SHUTDOWN = 0x13
    TCP_CLOSE = 0x14
    TCP_LISTEN = 0x15
    TCP_ATTACH = 0x16
    TCP_REJECT = 0x17
    TCP_CONNECTED = 0x90
    TCP_RDATA = 0x91
    TCP_RCREDIT = 0x92
    TCP_EOF = 0x93
    TCP_CLOSED = 0x94
    TCP_ACCEPT = 0x95
    PONG = 0x81
    STDOUT = 0x83
    STDERR = 0x84
    EXIT = 0x85
    OK = 0x87
    STAT = 0x88
    LIST = 0x89
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """Protocol error codes in ERROR frames; codes below 1000 are Linux errno values."""

    BAD_MAGIC = 1001
    BAD_VERSION = 1002
    UNKNOWN_TYPE = 1003
    TOO_LARGE = 1004
    BAD_PAYLOAD = 1005
    UNKNOWN_CHAN = 1006
    CHAN_BUSY = 1007
    LIMIT = 1008
    STARTED = 1009  # on channel 0: an agent (re)opened its virtio-serial port


EXEC_SHELL = 0x1
EXEC_STDIN = 0x2
EXEC_PTY = 0x4
EXIT_TIMED_OUT = 0x1
PUT_FILE = 0
PUT_DIR = 1
GET_STAT_ONLY = 0x1

_EXEC_HEAD = struct.Struct("<IIII")  # timeout_ms, flags, argc, envc
_EXIT = struct.Struct("<iiI")  # exit code or -1, signal or 0, flags
_STAT = struct.Struct("<IQ")  # st_mode, size
_ERROR_HEAD = struct.Struct("<I")
_WINSIZE = struct.Struct("<HHHH")  # rows, cols, xpixel, ypixel


# ---------------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Frame:
    type: int
    chan: int
    payload: bytes


@dataclass(frozen=True)
class FrameError:
    """Something in the stream that is not a frame; the decoder has skipped past it."""

    reason: str
    chan: int = 0


def encode_frame(ftype: int, chan: int, payload: bytes = b"") -> bytes:
    """One frame: the 12-byte header and the payload."""
    if not 0 <= ftype <= 0xFF:
        raise ValueError(f"frame type {ftype} out of range")
    if not 0 <= chan <= 0xFFFFFFFF:
        raise ValueError(f"channel {chan} out of range")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, VERSION, ftype, chan, len(payload)) + bytes(payload)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get complete frames back.

    Never raises on garbage. Bytes that do not start with the magic are skipped up to the next
    magic (one FrameError per run of garbage); a header with another version is treated as garbage;
    a frame longer than MAX_PAYLOAD yields a FrameError and its payload is skipped. The same rules
    as the guest's decoder, so both sides resynchronise alike.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._resyncing = False

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        buf = self._buf
        buf += data
        out: list[Frame | FrameError] = []
        while True:
            if self._skip:
                k = min(self._skip, len(buf))
                del buf[:k]
                self._skip -= k
                if self._skip:
                    break
                continue
            if len(buf) < 2:
                break
            if buf[0] != MAGIC_BYTES[0] or buf[1] != MAGIC_BYTES[1]:
                if not self._resyncing:
                    out.append(FrameError("bad magic: skipping to the next frame"))
                self._resyncing = True
                i = buf.find(MAGIC_BYTES, 1)
                if i < 0:  # keep a trailing first magic byte: its partner may come next
                    i = len(buf) - 1 if buf[-1] == MAGIC_BYTES[0] else len(buf)
                del buf[:i]
                continue
            if len(buf) < HEADER_SIZE:
                break
            _, version, ftype, chan, length = HEADER.unpack_from(buf)
            if version != VERSION:
                if not self._resyncing:
                    out.append(FrameError(f"unsupported version {version}", chan))
                self._resyncing = True
                del buf[:2]
                continue
            self._resyncing = False
            if length > MAX_PAYLOAD:
                out.append(FrameError(f"payload of {length} bytes exceeds {MAX_PAYLOAD}", chan))
                del buf[:HEADER_SIZE]
                self._skip = length
                continue
            end = HEADER_SIZE + length
            if len(buf) < end:
                break
            out.append(Frame(ftype, chan, bytes(buf[HEADER_SIZE:end])))
            del buf[:end]
        return out


# ---------------------------------------------------------------------------------- client


@dataclass
class ExecResult:
    exit_code: int | None  # None when the process was killed by a signal
    signal: int | None  # None when it exited
    stdout: bytes
    stderr: bytes
    duration: float
    timed_out: bool


class AgentError(Exception):
    """The agent refused a request or broke the protocol. ``code``: errno or ErrorCode, if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AgentTimeout(AgentError):
    """No answer in time. For exec, the command was killed; ``result`` holds the partial output."""

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message, errno.ETIMEDOUT)
        self.result = result

    @property
    def stdout(self) -> bytes:
        return self.result.stdout if self.result else b""

    @property
    def stderr(self) -> bytes:
        return self.result.stderr if self.result else b""


class AgentDisconnected(AgentError):
    """The byte stream to the agent closed."""


class AgentTransferLimit(AgentError):
    """A file or tree from the guest was larger than the ``limit`` bytes of the call; the transfer
    was cancelled (the host read nothing past the limit)."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message, errno.EFBIG)
        self.limit = limit


class AgentOutputLimit(AgentError):
    """An exec wrote more than its ``max_output`` bytes (stdout and stderr together).

    The host kept the first ``limit`` bytes in arrival order, killed the process group (SIGNAL 9)
    and drained the channel up to the EXIT. ``.result`` holds the kept output and how the process
    ended (``exit_code``/``signal`` both None if no EXIT came within the drain limit).
    """

    def __init__(self, message: str, limit: int, result: ExecResult) -> None:
        super().__init__(message, errno.EFBIG)
        self.limit = limit
        self.result = result

    @property
    def stdout(self) -> bytes:
        return self.result.stdout

    @property
    def stderr(self) -> bytes:
        return self.result.stderr


_DISCONNECTED = object()


def _fsencode(value: str | bytes, what: str) -> bytes:
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte: {value!r}")
    return raw


def _error_from(frame: Frame, what: str) -> AgentError:
    if len(frame.payload) < _ERROR_HEAD.size:
        return AgentError(f"{what}: malformed ERROR frame from the agent")
    (code,) = _ERROR_HEAD.unpack_from(frame.payload)
    message = frame.payload[_ERROR_HEAD.size :].decode("utf-8", "replace")
    return AgentError(f"{what}: {message} (code {code})", code)


def decode_list(payload: bytes, what: str) -> list[tuple[int, int, str]]:
    """One LIST payload -> (st_mode, size, relative path) entries; AgentError when malformed or
    when a path would leave the listed directory."""
    entries: list[tuple[int, int, str]] = []
    pos = 0
    while pos < len(payload):
        if len(payload) - pos < _STAT.size:
            raise AgentError(f"{what}: truncated entry")
        emode, esize = _STAT.unpack_from(payload, pos)
        nul = payload.find(b"\0", pos + _STAT.size)
        if nul < 0:
            raise AgentError(f"{what}: unterminated entry name")
        rel = os.fsdecode(payload[pos + _STAT.size : nul])
        if not _check_rel_path(rel):
            raise AgentError(f"{what}: refusing entry path {rel!r}")
        entries.append((emode, esize, rel))
        pos = nul + 1
    return entries


def _encode_env(env: Mapping[str, str | bytes] | None) -> list[bytes]:
    """``NAME=value`` entries of an EXEC request; a name that is empty or has ``=`` is refused."""
    envs = []
    for key, value in (env or {}).items():
        k = _fsencode(key, "environment name")
        if not k or b"=" in k:
            raise ValueError(f"bad environment variable name {key!r}")
        envs.append(k + b"=" + _fsencode(value, "environment value"))
    return envs


def _check_rel_path(rel: str) -> bool:
    """A guest-supplied relative path that stays inside the directory it is joined to."""
    if not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


class AgentClient:
    """A connection to one guest agent. Thread-safe: requests run concurrently on channels."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        # A guest that stops reading must not block a sender for ever: past SEND_TIMEOUT a
        # send fails, and a half-sent frame means the stream is given up (see _send).
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0)
            )
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._chans: dict[int, queue.SimpleQueue[object]] = {}
        # Start somewhere random: a serial stream may still carry an earlier session's channels.
        self._next_chan = int.from_bytes(os.urandom(4), "little") % 0x7FFFFFFF + 1
        self._closed = False
        self._disconnected: str | None = None
        self._session = False  # set once wait_ready succeeded: an agent restart is then fatal
        self.request_timeout = REQUEST_TIMEOUT
        # ERROR frames nobody waits for (garbage, late replies): (chan, code, message), newest last
        self.protocol_errors: deque[tuple[int, int, str]] = deque(maxlen=100)
        self._reader = threading.Thread(
            target=self._read_loop, name="ignition-agent-reader", daemon=True
        )
        self._reader.start()

    # -- connecting

    @classmethod
    def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 10.0) -> AgentClient:
        """Connect to a Unix socket the agent (or QEMU's chardev) listens on; retry until timeout."""
        return cls(_connect_unix_retry(os.fspath(path), timeout))

    @classmethod
    def connect_vsock_uds(
        cls, uds_path: str | os.PathLike[str], port: int = DEFAULT_VSOCK_PORT, timeout: float = 10.0
    ) -> AgentClient:
        """Firecracker's host-initiated vsock: ``CONNECT <port>\\n`` answered by ``OK <n>\\n``."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"vsock port {port} via {uds_path}: not connected ({last})")
            sock = _connect_unix_retry(os.fspath(uds_path), remaining)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.sendall(f"CONNECT {port}\n".encode())
                line = b""
                while not line.endswith(b"\n") and len(line) < 64:
                    b = sock.recv(1)  # byte by byte: nothing past the line may be consumed
                    if not b:
                        break
                    line += b
                if line.startswith(b"OK ") and line.endswith(b"\n"):
                    return cls(sock)
                last = f"answer {line!r}"
            except OSError as e:
                last = str(e)
            except BaseException:  # Ctrl-C mid-handshake: no socket left open
                sock.close()
                raise
            sock.close()
            time.sleep(0.05)

    # -- plumbing

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        reason = "agent closed the connection"
        try:
            while True:
                data = self._sock.recv(256 * 1024)
                if not data:
                    break
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        log.warning("agent stream: %s", item.reason)
                        self.protocol_errors.append((item.chan, -1, item.reason))
                        continue
                    with self._lock:
                        q = self._chans.get(item.chan)
                    if q is not None:
                        q.put(item)
                    elif item.type == FrameType.ERROR:
                        err = _error_from(item, "agent")
                        if item.chan == 0 and err.code == ErrorCode.STARTED and self._session:
                            # virtio-serial: the agent this session talked to died and init
                            # started another; whatever was in flight is lost.
                            reason = (
                                "the guest agent restarted (the agent serving this connection died)"
                            )
                            break
                        self.protocol_errors.append((item.chan, err.code or 0, str(err)))
                        log.debug("agent error on idle channel %d: %s", item.chan, err)
                else:
                    continue
                break
        except OSError as e:
            reason = f"connection to the agent failed: {e}"
        with self._lock:
            self._disconnected = "client closed" if self._closed else reason
            waiting = list(self._chans.values())
        for q in waiting:
            q.put(_DISCONNECTED)

    def _open_chan(self) -> tuple[int, queue.SimpleQueue[object]]:
        with self._lock:
            if self._disconnected is not None or self._closed:
                raise AgentDisconnected(self._disconnected or "client closed")
            chan = self._next_chan
            self._next_chan = self._next_chan % 0xFFFFFFFF + 1  # never 0: that is "no channel"
            q: queue.SimpleQueue[object] = queue.SimpleQueue()
            self._chans[chan] = q
            return chan, q

    def open_channel(self, sink: ChannelSink) -> int:
        """A fresh channel whose frames go to ``sink.put`` on the reader thread (which must not
        block there); ``sink.put`` gets a :class:`Frame`, or ``None`` once the stream is gone.
        Free it with :meth:`close_channel`."""
        adapter = _SinkAdapter(sink)
        with self._lock:
            if self._disconnected is not None or self._closed:
                raise AgentDisconnected(self._disconnected or "client closed")
            chan = self._next_chan
            self._next_chan = self._next_chan % 0xFFFFFFFF + 1
            self._chans[chan] = adapter  # type: ignore[assignment]
            return chan

    def close_channel(self, chan: int) -> None:
        """Stop routing ``chan``'s frames (later frames on it count as idle-channel traffic)."""
        self._close_chan(chan)

    def send_frame(self, ftype: int, chan: int, payload: bytes = b"") -> None:
        """Send one frame (raises :class:`AgentDisconnected` when the stream is gone)."""
        self._send(ftype, chan, payload)

    def _close_chan(self, chan: int) -> None:
        with self._lock:
            self._chans.pop(chan, None)

    def _send(self, ftype: int, chan: int, payload: bytes = b"") -> None:
        frame = encode_frame(ftype, chan, payload)
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                # Part of a frame may have gone: the stream cannot be trusted any more.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                raise AgentDisconnected(
                    f"the agent read nothing for {SEND_TIMEOUT:g} s (sending a frame); "
                    "connection given up"
                ) from e
            raise AgentDisconnected(f"sending to the agent failed: {e}") from e

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the stream as they are (tests use it to send malformed frames)."""
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as e:
            raise AgentDisconnected(f"sending to the agent failed: {e}") from e

    def _recv(self, q: queue.SimpleQueue[object], deadline: float | None, what: str) -> Frame:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            waited = "" if timeout is None else f" for {timeout:.1f} s"
            raise AgentTimeout(f"{what}: no answer from the agent{waited}") from None
        if item is _DISCONNECTED:
            raise AgentDisconnected(f"{what}: {self._disconnected or 'disconnected'}")
        assert isinstance(item, Frame)
        return item

    def _deadline(self) -> float:
        return time.monotonic() + self.request_timeout

    # -- requests

    def ping(self, payload: bytes = b"", timeout: float | None = 5.0) -> float:
        """Round trip of a PING; returns the seconds it took."""
        return self._ping(FrameType.PING, payload, timeout)

    def _ping(self, ftype: int, payload: bytes, timeout: float | None) -> float:
        chan, q = self._open_chan()
        try:
            start = time.monotonic()
            self._send(ftype, chan, payload)
            deadline = None if timeout is None else start + timeout
            frame = self._recv(q, deadline, "ping")
            if frame.type == FrameType.ERROR:
                raise _error_from(frame, "ping")
            if frame.type != FrameType.PONG or frame.payload != payload:
                raise AgentError(f"ping: unexpected answer (type 0x{frame.type:02x})")
            return time.monotonic() - start
        finally:
            self._close_chan(chan)

    def wait_ready(self, timeout: float) -> None:
        """Ping until the agent answers; this starts a fresh session.

        Early bytes may be lost while a serial port comes up. The pings are RESET frames: the
        agent ends whatever an earlier host session left running on this stream (a virtio-serial
        reconnect can be too quick for the guest to notice), so call this before any request.
        """
        deadline = time.monotonic() + timeout
        attempt = 0.25
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"agent not ready after {timeout:.1f} s")
            try:
                self._ping(FrameType.RESET, b"", timeout=min(attempt, remaining))
                self._session = True
                return
            except AgentTimeout:
                attempt = min(attempt * 1.5, 2.0)

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | None = None,
        timeout: float | None = None,
        max_output: int | None = None,
        on_output: Callable[[bool, bytes], None] | None = None,
    ) -> ExecResult:
        """Run a command: a str through ``/bin/sh -c``, a sequence as an argv (never interpreted).

        Raises AgentTimeout (with the partial output in ``.result``) when ``timeout`` passes; the
        command's whole process group has been killed by then.

        ``max_output`` caps the bytes kept of stdout and stderr together (None or 0: no cap).
        Past it nothing more is kept, the process group gets SIGKILL, the channel is drained to
        its EXIT and AgentOutputLimit is raised with the first ``max_output`` bytes.

        ``on_output(is_stdout, data)``, when given, gets the output as it arrives instead of it
        being kept (the result's stdout and stderr are then empty; ``max_output`` still counts).
        """
        if isinstance(cmd, str | bytes):
            argv = [_fsencode(cmd, "command")]
            flags = EXEC_SHELL
        else:
            argv = [_fsencode(a, "argument") for a in cmd]
            flags = 0
            if not argv:
                raise ValueError("empty argv")
        if not argv[0]:
            raise ValueError("empty command")
        envs = _encode_env(env)
        timeout_ms = 0
        if timeout is not None:
            if timeout <= 0:
                raise ValueError("timeout must be positive")
            timeout_ms = min(max(1, math.ceil(timeout * 1000)), 0xFFFFFFFF)
        if max_output is not None and (isinstance(max_output, bool) or max_output < 0):
            raise ValueError(f"max_output must be a number of bytes >= 0, not {max_output!r}")
        limit = max_output or None
        if input is not None:
            flags |= EXEC_STDIN
        payload = b"".join(
            [_EXEC_HEAD.pack(timeout_ms, flags, len(argv), len(envs))]
            + [a + b"\0" for a in argv]
            + [e + b"\0" for e in envs]
            + [_fsencode(cwd or "", "cwd") + b"\0"]
        )
        if len(payload) > MAX_PAYLOAD:
            raise ValueError("command, environment and cwd exceed the 1 MiB frame limit")

        chan, q = self._open_chan()
        stop = threading.Event()
        writer: threading.Thread | None = None
        out, err = bytearray(), bytearray()
        streamed = 0  # bytes handed to on_output
        out_eof = err_eof = False
        start = time.monotonic()
        host_deadline = None if timeout is None else start + timeout + HOST_TIMEOUT_GRACE
        try:
            self._send(FrameType.EXEC, chan, payload)
            if input is not None:
                data = memoryview(bytes(input))
                if len(data) <= CHUNK:
                    self._send_stdin(chan, data, stop)
                else:  # stdin and stdout must flow at once: a big `cat` would deadlock otherwise
                    writer = threading.Thread(
                        target=self._send_stdin, args=(chan, data, stop), daemon=True
                    )
                    writer.start()
            killed = False  # the host sent SIGKILL because the command ran past its timeout
            overflow_at: float | None = None  # when the output passed the cap (and SIGKILL went)
            while True:
                try:
                    frame = self._recv(q, host_deadline, "exec")
                except AgentTimeout:
                    if overflow_at is not None:
                        result = ExecResult(
                            None, None, bytes(out), bytes(err), time.monotonic() - start, False
                        )
                        raise AgentOutputLimit(
                            f"exec {cmd!r}: output exceeded {limit} bytes; no exit after SIGKILL",
                            limit or 0,
                            result,
                        ) from None
                    if killed:
                        result = ExecResult(
                            None, None, bytes(out), bytes(err), time.monotonic() - start, True
                        )
                        raise AgentTimeout(f"exec {cmd!r}: no exit after SIGKILL", result) from None
                    killed = True
                    self._kill(chan)
                    host_deadline = time.monotonic() + KILL_GRACE
                    continue
                if overflow_at is not None:  # draining: every frame is progress towards EXIT
                    host_deadline = min(time.monotonic() + KILL_GRACE, overflow_at + DRAIN_LIMIT)
                if frame.type in (FrameType.STDOUT, FrameType.STDERR):
                    is_out = frame.type == FrameType.STDOUT
                    if (out_eof if is_out else err_eof) or not frame.payload:
                        if is_out:
                            out_eof = True
                        else:
                            err_eof = True
                        continue
                    if overflow_at is not None:
                        continue  # past the cap: dropped
                    data = frame.payload
                    if limit is not None and streamed + len(out) + len(err) + len(data) > limit:
                        data = data[: limit - streamed - len(out) - len(err)]
                        overflow_at = time.monotonic()
                        stop.set()  # no more stdin for a process that is being killed
                        if not killed:
                            self._kill(chan)
                        host_deadline = overflow_at + KILL_GRACE
                    if on_output is not None:
                        streamed += len(data)
                        on_output(is_out, data)
                    else:
                        (out if is_out else err).extend(data)
                elif frame.type == FrameType.EXIT:
                    if len(frame.payload) != _EXIT.size:
                        raise AgentError(f"exec {cmd!r}: malformed EXIT frame")
                    code, sig, xflags = _EXIT.unpack(frame.payload)
                    timed_out = bool(xflags & EXIT_TIMED_OUT) or killed
                    result = ExecResult(
                        exit_code=code if code >= 0 else None,
                        signal=sig if sig > 0 else None,
                        stdout=bytes(out),
                        stderr=bytes(err),
                        duration=time.monotonic() - start,
                        timed_out=timed_out,
                    )
                    if overflow_at is not None:
                        raise AgentOutputLimit(
                            f"exec {cmd!r}: output exceeded {limit} bytes; killed",
                            limit or 0,
                            result,
                        )
                    if timed_out:
                        raise AgentTimeout(f"exec {cmd!r}: timed out after {timeout} s", result)
                    return result
                elif frame.type == FrameType.ERROR:
                    e = _error_from(frame, f"exec {cmd!r}")
                    if e.code == ErrorCode.UNKNOWN_CHAN:
                        continue  # stdin or a signal sent after the process had gone: harmless
                    raise e
                else:
                    log.warning("exec: unexpected frame type 0x%02x from the agent", frame.type)
        finally:
            stop.set()
            self._close_chan(chan)

    def exec_pty(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> PtyProcess:
        """Start ``argv`` under a new pty in the guest (session leader, controlling tty).

        Returns at once; the :class:`PtyProcess` carries the terminal's bytes both ways.
        """
        args = [_fsencode(a, "argument") for a in argv]
        if not args or not args[0]:
            raise ValueError("empty argv")
        envs = _encode_env(env)
        payload = b"".join(
            [_EXEC_HEAD.pack(0, EXEC_PTY, len(args), len(envs))]
            + [a + b"\0" for a in args]
            + [e + b"\0" for e in envs]
            + [_fsencode(cwd or "", "cwd") + b"\0"]
        )
        if len(payload) > MAX_PAYLOAD:
            raise ValueError("command, environment and cwd exceed the 1 MiB frame limit")
        chan, q = self._open_chan()
        try:
            self._send(FrameType.EXEC, chan, payload)
            proc = PtyProcess(self, chan, q)
            proc.resize(rows, cols)  # right behind the EXEC: the agent applies it before sh runs
        except BaseException:
            self._close_chan(chan)
            raise
        return proc

    def _kill(self, chan: int) -> None:
        """SIGKILL the process group of the exec on ``chan`` (a lost connection is seen anyway)."""
        try:
            self._send(FrameType.SIGNAL, chan, struct.pack("<I", 9))
        except AgentDisconnected:
            pass  # the reader reports the disconnect to the waiting exec

    def _send_stdin(self, chan: int, data: memoryview, stop: threading.Event) -> None:
        try:
            for off in range(0, len(data), CHUNK):
                if stop.is_set():
                    return
                self._send(FrameType.STDIN, chan, bytes(data[off : off + CHUNK]))
            if not stop.is_set():
                self._send(FrameType.STDIN, chan, b"")
        except AgentDisconnected:
            pass  # the reader reports the disconnect to the waiting exec

    def put_file(self, guest_path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file in the guest atomically (temp file + rename); parents are created."""
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:o} out of range")
        header = struct.pack("<II", mode, PUT_FILE) + _fsencode(guest_path, "path") + b"\0"
        chan, q = self._open_chan()
        try:
            self._send(FrameType.PUT, chan, header)
            view = memoryview(bytes(data))
            for off in range(0, len(view), CHUNK):
                try:  # stop early if the agent already refused (ENOSPC, EACCES, ...)
                    early = q.get_nowait()
                except queue.Empty:
                    early = None
                if early is not None:
                    self._send(FrameType.DATA, chan, b"")
                    return self._expect_ok(early, f"put {guest_path}")
                self._send(FrameType.DATA, chan, bytes(view[off : off + CHUNK]))
            self._send(FrameType.DATA, chan, b"")
            self._expect_ok(
                self._recv(q, self._deadline(), f"put {guest_path}"), f"put {guest_path}"
            )
        finally:
            self._close_chan(chan)

    def _expect_ok(self, item: object, what: str) -> None:
        if item is _DISCONNECTED:
            raise AgentDisconnected(f"{what}: {self._disconnected or 'disconnected'}")
        assert isinstance(item, Frame)
        if item.type == FrameType.ERROR:
            raise _error_from(item, what)
        if item.type != FrameType.OK:
            raise AgentError(f"{what}: unexpected answer (type 0x{item.type:02x})")

    def _put_dir(self, guest_path: str, mode: int) -> None:
        payload = struct.pack("<II", mode, PUT_DIR) + _fsencode(guest_path, "path") + b"\0"
        chan, q = self._open_chan()
        try:
            self._send(FrameType.PUT, chan, payload)
            self._expect_ok(
                self._recv(q, self._deadline(), f"mkdir {guest_path}"), f"mkdir {guest_path}"
            )
        finally:
            self._close_chan(chan)

    def _get(self, guest_path: str, flags: int) -> tuple[int, queue.SimpleQueue[object], int, int]:
        """Send a GET and read its STAT; the caller closes the returned channel."""
        payload = _fsencode(guest_path, "path") + b"\0"
        if flags:
            payload += struct.pack("<I", flags)
        chan, q = self._open_chan()
        try:
            self._send(FrameType.GET, chan, payload)
            frame = self._recv(q, self._deadline(), f"get {guest_path}")
            if frame.type == FrameType.ERROR:
                raise _error_from(frame, f"get {guest_path}")
            if frame.type != FrameType.STAT or len(frame.payload) != _STAT.size:
                raise AgentError(f"get {guest_path}: expected STAT, got type 0x{frame.type:02x}")
            mode, size = _STAT.unpack(frame.payload)
            return chan, q, mode, size
        except BaseException:
            self._close_chan(chan)
            raise

    def stat(self, guest_path: str) -> tuple[int, int]:
        """(st_mode, size) of a guest path, symlinks followed."""
        chan, _, mode, size = self._get(guest_path, GET_STAT_ONLY)
        self._close_chan(chan)
        return mode, size

    def _stream(self, q: queue.SimpleQueue[object], ftype: int, what: str) -> Iterator[bytes]:
        """The payloads of ``ftype`` frames on a channel, up to the empty one that ends them."""
        while True:
            frame = self._recv(q, self._deadline(), what)
            if frame.type == FrameType.ERROR:
                raise _error_from(frame, what)
            if frame.type != ftype:
                raise AgentError(f"{what}: unexpected frame type 0x{frame.type:02x}")
            if not frame.payload:
                return
            yield frame.payload

    def _cancel_get(self, chan: int) -> None:
        """Ask the agent to stop streaming a GET (SIGNAL on its channel); best effort."""
        with contextlib.suppress(AgentError):
            self._send(FrameType.SIGNAL, chan, struct.pack("<I", 9))

    def get_file(self, guest_path: str, limit: int = 0) -> bytes:
        """The contents of a regular file in the guest; at most ``limit`` bytes (0: no limit),
        else :class:`AgentTransferLimit` (nothing past the limit is read)."""
        chan, q, mode, size = self._get(guest_path, 0)
        try:
            if not stat_mod.S_ISREG(mode):
                code = errno.EISDIR if stat_mod.S_ISDIR(mode) else errno.EINVAL
                raise AgentError(f"get {guest_path}: not a regular file", code)
            out = bytearray()
            if limit and size > limit:
                self._cancel_get(chan)
                raise AgentTransferLimit(
                    f"get {guest_path}: {size} bytes, more than the limit of {limit}", limit
                )
            # Past SPILL bytes the data goes to an unlinked temp file and is read back in one
            # piece: the host holds the file once (the returned bytes), not twice.
            spill = None
            total = 0
            try:
                for chunk in self._stream(q, FrameType.DATA, f"get {guest_path}"):
                    total += len(chunk)
                    if limit and total > limit:
                        self._cancel_get(chan)  # the file grew past its stat size
                        raise AgentTransferLimit(
                            f"get {guest_path}: more than the limit of {limit} bytes", limit
                        )
                    if spill is None and total > SPILL:
                        spill = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
                        spill.write(out)
                        out = bytearray()
                    if spill is not None:
                        spill.write(chunk)
                    else:
                        out += chunk
                if spill is None:
                    return bytes(out)
                spill.seek(0)
                return spill.read()
            finally:
                if spill is not None:
                    spill.close()
        finally:
            self._close_chan(chan)

    def _get_into(self, guest_path: str, fd: int, limit: int) -> int:
        """Stream a guest regular file into the host file ``fd``; returns its size. ``limit``:
        bytes allowed (0: none), else :class:`AgentTransferLimit` (the file is partial then)."""
        chan, q, mode, size = self._get(guest_path, 0)
        try:
            if not stat_mod.S_ISREG(mode):
                raise AgentError(f"get {guest_path}: not a regular file", errno.EINVAL)
            if limit and size > limit:
                self._cancel_get(chan)
                raise AgentTransferLimit(f"get {guest_path}: {size} bytes, over the limit", limit)
            done = 0
            for chunk in self._stream(q, FrameType.DATA, f"get {guest_path}"):
                done += len(chunk)
                if limit and done > limit:
                    self._cancel_get(chan)
                    raise AgentTransferLimit(f"get {guest_path}: over the limit", limit)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            return done
        finally:
            self._close_chan(chan)

    def _list(self, guest_path: str, limit: int = 0) -> list[tuple[int, int, str]]:
        """The guest's recursive listing of a directory: (st_mode, size, relative path), never
        following symlinks. ``limit``: bytes of host memory the listing may take (0: none)."""
        chan, q, mode, _ = self._get(guest_path, 0)
        entries: list[tuple[int, int, str]] = []
        received = 0
        try:
            if not stat_mod.S_ISDIR(mode):
                raise AgentError(f"list {guest_path}: not a directory", errno.ENOTDIR)
            for p in self._stream(q, FrameType.LIST, f"list {guest_path}"):
                received += len(p)
                if limit and received > limit:
                    self._cancel_get(chan)
                    raise AgentTransferLimit(f"list {guest_path}: listing over the limit", limit)
                entries += decode_list(p, f"list {guest_path}")
            return entries
        finally:
            self._close_chan(chan)

    def put_tree(self, host_path: Path, guest_path: str) -> None:
        """Copy a host file or directory tree into the guest, modes kept.

        Symlinks to files are copied as files; symlinked directories, sockets and devices are
        skipped. Directories are made writable while they are filled and get their modes last.
        """
        root = Path(host_path)
        if not root.is_dir():
            st = root.stat()
            self.put_file(guest_path, root.read_bytes(), stat_mod.S_IMODE(st.st_mode))
            return
        dirs: list[tuple[str, int]] = []
        for dirpath, _dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            gdir = guest_path if rel == "." else posixpath.join(guest_path, rel)
            mode = stat_mod.S_IMODE(os.stat(dirpath).st_mode)
            self._put_dir(gdir, mode | 0o700)
            dirs.append((gdir, mode))
            for name in sorted(filenames):
                hp = Path(dirpath, name)
                try:
                    st = hp.stat()
                except OSError:
                    continue  # a dangling symlink
                if stat_mod.S_ISREG(st.st_mode):
                    self.put_file(
                        posixpath.join(gdir, name), hp.read_bytes(), stat_mod.S_IMODE(st.st_mode)
                    )
        for gdir, mode in reversed(dirs):
            self._put_dir(gdir, mode)

    def get_tree(
        self, guest_path: str, host_path: Path, mode: int | None = None, limit: int = 0
    ) -> list[str]:
        """Copy a guest file or directory tree to the host; returns the entries skipped.

        ``mode``: the guest path's st_mode when the caller has just asked :meth:`stat`.
        ``limit``: bytes the whole copy may write (0: none; every entry counts at least 4 KiB,
        what it costs the host's disk), else :class:`AgentTransferLimit` (files already copied
        stay). Host safety, whatever the guest sends: permission bits are kept without
        setuid/setgid/sticky; symlinks, devices, FIFOs and sockets are skipped (logged, and in
        the returned list); below ``host_path`` every step is opened with ``O_NOFOLLOW`` from
        its parent's descriptor and every file is a new ``O_EXCL`` file renamed into place, so
        a symlink on the host (or one the guest made) never redirects a write.
        """
        dest = Path(host_path)
        if mode is None:
            mode, _ = self.stat(guest_path)
        budget = _Budget(limit)
        if not stat_mod.S_ISDIR(mode):
            if not stat_mod.S_ISREG(mode):
                raise AgentError(
                    f"get {guest_path}: not a regular file or directory (mode {mode:o})",
                    errno.EINVAL,
                )
            dest.parent.mkdir(parents=True, exist_ok=True)  # the caller's path: theirs to follow
            pfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._fetch_file(guest_path, pfd, dest.name, mode, budget)
            finally:
                os.close(pfd)
            return []
        entries = self._list(guest_path, limit)
        dest.mkdir(parents=True, exist_ok=True)
        skipped: list[str] = []
        dirs: list[tuple[str, int]] = []
        with _DirWalker(dest) as walker:
            for emode, _size, rel in entries:
                parts = rel.split("/")
                kind = _special_kind(emode)
                if kind is not None:
                    skipped.append(f"{rel} ({kind})")
                    continue
                try:
                    pfd = walker.parent_fd(parts[:-1])
                    if stat_mod.S_ISDIR(emode):
                        budget.charge(0, rel)
                        walker.mkdir(pfd, parts[-1])
                        dirs.append((rel, stat_mod.S_IMODE(emode) & 0o777))
                    else:
                        self._fetch_file(
                            posixpath.join(guest_path, rel), pfd, parts[-1], emode, budget
                        )
                except _Unsafe as e:
                    skipped.append(f"{rel} ({e})")
            for rel, m in reversed(dirs):
                with contextlib.suppress(_Unsafe, OSError):
                    fd = walker.open_dir(rel.split("/"))
                    os.fchmod(fd, m)
            root_fd = walker.root
            os.fchmod(root_fd, stat_mod.S_IMODE(mode) & 0o777)
        for entry in skipped:
            log.warning("copy from the guest's %s: skipped %s", guest_path, entry)
        return skipped

    def _fetch_file(self, guest_path: str, pfd: int, name: str, mode: int, budget: _Budget) -> None:
        """One guest file into ``name`` in the directory ``pfd``: written to a fresh O_EXCL
        temp file, then renamed over whatever ``name`` was (a symlink is replaced, not followed)."""
        tmp = f".{name[:100]}.ignition-{os.urandom(6).hex()}"
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        ok = False
        try:
            try:
                size = self._get_into(guest_path, fd, budget.left())
            except AgentTransferLimit:
                raise AgentTransferLimit(
                    f"get {guest_path}: the transfer passed its limit of {budget.limit} bytes",
                    budget.limit,
                ) from None
            budget.charge(size, guest_path)
            os.fchmod(fd, stat_mod.S_IMODE(mode) & 0o777)  # never setuid/setgid/sticky
            os.close(fd)
            fd = -1
            try:
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except IsADirectoryError:
                raise _Unsafe("a directory of that name exists on the host") from None
            ok = True
        finally:
            if fd >= 0:
                os.close(fd)
            if not ok:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)

    @staticmethod
    def _sync_payload(time_ns: int | None, entropy: bytes | None) -> bytes:
        t = time.time_ns() if time_ns is None else time_ns
        e = os.urandom(64) if entropy is None else bytes(entropy)
        if not 32 <= len(e) <= 4096:
            raise ValueError("entropy must be 32 to 4096 bytes")
        if not 0 <= t < 1 << 64:
            raise ValueError("time_ns out of range")
        return struct.pack("<Q", t) + e

    def ready_and_sync(
        self, timeout: float, time_ns: int | None = None, entropy: bytes | None = None
    ) -> None:
        """:meth:`wait_ready` then :meth:`sync` in one round trip, for a stream that loses no
        bytes (vsock): the RESET ping and the SYNC go out back to back and the agent, which
        handles frames in stream order, answers both. Where the ping gets no answer in time
        (a stream still coming up) it falls back to :meth:`wait_ready` and :meth:`sync`."""
        payload = self._sync_payload(time_ns, entropy)
        deadline = time.monotonic() + timeout
        ping, pq = self._open_chan()
        chan, q = self._open_chan()
        try:
            self._send(FrameType.RESET, ping, b"")
            self._send(FrameType.SYNC, chan, payload)
            try:
                frame = self._recv(pq, min(deadline, time.monotonic() + 0.5), "ready")
            except AgentTimeout:
                frame = None
            if frame is not None:
                if frame.type == FrameType.ERROR:
                    raise _error_from(frame, "ready")
                if frame.type != FrameType.PONG or frame.payload:
                    raise AgentError(f"ready: unexpected answer (type 0x{frame.type:02x})")
                self._session = True
                self._expect_ok(self._recv(q, deadline, "sync"), "sync")
                return
        finally:
            self._close_chan(ping)
            self._close_chan(chan)
        self.wait_ready(max(0.1, deadline - time.monotonic()))
        self.sync(time_ns, entropy)

    def sync(self, time_ns: int | None = None, entropy: bytes | None = None) -> None:
        """Set the guest's clock and reseed its CRNG (after a restore, two guests must differ)."""
        payload = self._sync_payload(time_ns, entropy)
        chan, q = self._open_chan()
        try:
            self._send(FrameType.SYNC, chan, payload)
            self._expect_ok(self._recv(q, self._deadline(), "sync"), "sync")
        finally:
            self._close_chan(chan)

    def close(self) -> None:
        """Close the stream; requests in flight raise AgentDisconnected."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    @property
    def connected(self) -> bool:
        return not self._closed and self._disconnected is None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Unsafe(OSError):
    """An entry of a guest tree that would not be safe to write on the host (skipped in a tree;
    raised for a single file)."""


_MIN_ENTRY_COST = 4096  # host disk a file or directory costs at least, for the transfer cap
_MAX_DEPTH = 256


class _Budget:
    """Bytes a get_tree may still write (``limit`` 0: unlimited)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def left(self) -> int:
        return 0 if not self.limit else max(1, self.limit - self.used)

    def charge(self, size: int, what: str) -> None:
        self.used += max(size, _MIN_ENTRY_COST)
        if self.limit and self.used > self.limit:
            raise AgentTransferLimit(
                f"copy from the guest: more than the limit of {self.limit} bytes at {what}",
                self.limit,
            )


def _special_kind(mode: int) -> str | None:
    """Why an entry of this type is never created on the host (None: a file or directory)."""
    if stat_mod.S_ISREG(mode) or stat_mod.S_ISDIR(mode):
        return None
    for test, name in (
        (stat_mod.S_ISLNK, "symlink"),
        (stat_mod.S_ISCHR, "character device"),
        (stat_mod.S_ISBLK, "block device"),
        (stat_mod.S_ISFIFO, "FIFO"),
        (stat_mod.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return f"unknown file type {mode:o}"


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirWalker:
    """Directory descriptors below a root, opened one step at a time with ``O_NOFOLLOW``.

    Keeps the descriptors of the current path only (a guest listing is depth first), so a tree
    of any size uses at most its depth in descriptors.
    """

    def __init__(self, root: Path) -> None:
        self.root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._stack: list[tuple[str, int]] = []

    def parent_fd(self, parts: list[str]) -> int:
        """The descriptor of the directory ``parts`` (made 0700 where missing)."""
        if len(parts) > _MAX_DEPTH:
            raise _Unsafe(f"deeper than {_MAX_DEPTH} directories")
        keep = 0
        while keep < len(self._stack) and keep < len(parts) and self._stack[keep][0] == parts[keep]:
            keep += 1
        for _, fd in self._stack[keep:]:
            os.close(fd)
        del self._stack[keep:]
        for name in parts[keep:]:
            parent = self._stack[-1][1] if self._stack else self.root
            fd = self._open_or_make(parent, name)
            self._stack.append((name, fd))
        return self._stack[-1][1] if self._stack else self.root

    def open_dir(self, parts: list[str]) -> int:
        return self.parent_fd(parts)

    def mkdir(self, pfd: int, name: str) -> None:
        os.close(self._open_or_make(pfd, name))

    @staticmethod
    def _open_or_make(pfd: int, name: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            pass
        except (NotADirectoryError, OSError) as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Unsafe("a symlink or file of that name is in the way on the host") from None
            raise
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _Unsafe("a symlink or file of that name is in the way on the host") from None
            raise

    def close(self) -> None:
        for _, fd in self._stack:
            os.close(fd)
        self._stack.clear()
        os.close(self.root)

    def __enter__(self) -> _DirWalker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PtyProcess:
    """A process under a guest pty (:meth:`AgentClient.exec_pty`): write keystrokes, read the
    terminal's output, resize it; ``exit_code`` once it has ended (128 + n for signal n)."""

    def __init__(self, client: AgentClient, chan: int, q: queue.SimpleQueue[object]) -> None:
        self._client = client
        self.chan = chan
        self._q = q
        self.exit_code: int | None = None
        self.error: AgentError | None = None  # why it ended without an EXIT (agent gone, ERROR)
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def write(self, data: bytes) -> None:
        """Bytes typed on the terminal (Ctrl-C is ``b"\\x03"``: the guest's tty makes it SIGINT)."""
        for off in range(0, len(data), CHUNK):
            self._client._send(FrameType.STDIN, self.chan, bytes(data[off : off + CHUNK]))

    def resize(self, rows: int, cols: int) -> None:
        """Set the guest terminal's size (the foreground job gets SIGWINCH)."""
        clamp = lambda v: max(0, min(int(v), 0xFFFF))  # noqa: E731
        self._client._send(
            FrameType.WINSIZE, self.chan, _WINSIZE.pack(clamp(rows), clamp(cols), 0, 0)
        )

    def signal(self, signo: int) -> None:
        """Send ``signo`` to the process group of the session leader."""
        self._client._send(FrameType.SIGNAL, self.chan, struct.pack("<I", signo))

    def read(self, timeout: float | None = None) -> bytes | None:
        """The next output bytes; b"" when ``timeout`` passed with none; None once it has ended."""
        while not self._ended:
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                return b""
            if item is _DISCONNECTED:
                self._end(AgentDisconnected(self._client._disconnected or "disconnected"))
                return None
            assert isinstance(item, Frame)
            if item.type == FrameType.STDOUT:
                if item.payload:
                    return item.payload
                continue  # EOF of the terminal: the EXIT follows
            if item.type == FrameType.EXIT:
                if len(item.payload) != _EXIT.size:
                    self._end(AgentError("pty exec: malformed EXIT frame"))
                    return None
                code, sig, _ = _EXIT.unpack(item.payload)
                self.exit_code = code if code >= 0 else 128 + max(sig, 0)
                self._end(None)
                return None
            if item.type == FrameType.ERROR:
                e = _error_from(item, "pty exec")
                if e.code == ErrorCode.UNKNOWN_CHAN:
                    continue  # a keystroke or resize after the process had gone
                self._end(e)
                return None
            log.warning("pty exec: unexpected frame type 0x%02x from the agent", item.type)
        return None

    def _end(self, error: AgentError | None) -> None:
        if self._ended:
            return  # the first reason stands
        self._ended = True
        self.error = error
        self._client._close_chan(self.chan)

    def close(self) -> None:
        """Kill the process group if it still runs, and free the channel (a thread blocked in
        :meth:`read` returns None)."""
        if not self._ended:
            with contextlib.suppress(AgentError):
                self.signal(9)
            self._end(AgentError("closed by the host"))
            self._q.put(_DISCONNECTED)


class ChannelSink:
    """What :meth:`AgentClient.open_channel` routes a channel's frames to."""

    def put(self, item: Frame | None) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _SinkAdapter:
    """Looks like a channel queue to the reader loop; turns its disconnect marker into None."""

    def __init__(self, sink: ChannelSink) -> None:
        self._sink = sink

    def put(self, item: object) -> None:
        try:
            self._sink.put(item if isinstance(item, Frame) else None)
        except Exception:  # a sink must never kill the reader thread
            log.exception("agent channel sink failed")


def _connect_unix_retry(path: str, timeout: float) -> socket.socket:
    """Connect to a Unix socket that may not exist yet (a VMM or agent still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise AgentTimeout(f"cannot connect to {path}: {e}") from e
            time.sleep(0.02)
        except BaseException:  # other errors, and Ctrl-C: no socket left open
            sock.close()
            raise
