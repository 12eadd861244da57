"""Snapshots of the bundled VMM: the state file, the memory file, the named-snapshot store.

A snapshot is a directory holding

- ``vmstate``: a header (magic ``IGNSNAP\\0``, format version, payload length, sha256 of the
  payload) followed by the payload, a tagged JSON encoding of plain data (``bytes`` become
  ``{"$b": base64}``, dicts with non-string keys ``{"$d": [[k, v], ...]}``): per vCPU
  state (``arch.x86_64.state.save_vcpu_state``), VM state (``save_vm_state``), every device's
  state, the machine configuration and its fingerprint;
- ``memory.bin``: guest RAM, regions back to back, holes where whole chunks are zero. It is
  never written after the snapshot is committed: restores map it ``MAP_PRIVATE``;
- ``disk<N>.overlay``: a virtio-blk copy-on-write overlay (its sha256 is in the state).

:class:`SnapshotStore` keeps named snapshots under one directory. A snapshot is written into
a temporary sibling directory and renamed into place, so a failed write leaves any previous
snapshot of that name untouched. Every defect of a snapshot (missing, truncated, corrupt,
another format version, a memory file of the wrong size, another configuration) raises
:class:`SnapshotError` naming the file.

The configuration fingerprint (:func:`fingerprint`) covers what a snapshot can only be used
with: the kernel and initrd contents, memory size, vCPU count, command line and devices
(disk images by size and modification time). Restoring under a different expected
fingerprint is refused (:func:`check_fingerprint`).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import heapq
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .memory import PAGE_SIZE, GuestMemory

MAGIC = b"IGNSNAP\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s")  # magic, version, flags, length, sha256
STATE_FILE = "vmstate"
MEMORY_FILE = "memory.bin"
MAX_STATE = 256 << 20  # a state file is KiBs (plus inline device data); refuse absurd lengths
ZERO_CHUNK = 1 << 20  # memory.bin is written in chunks of this size, all-zero ones as holes

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class SnapshotError(Exception):
    """A snapshot cannot be used; the message names the file and says why."""


class ConfigMismatch(SnapshotError):
    """The snapshot was taken with another kernel or configuration."""


# -- tagged JSON --------------------------------------------------------------------------
def _enc(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            if "$b" in obj or "$d" in obj:
                return {"$d": [[k, _enc(v)] for k, v in obj.items()]}
            return {k: _enc(v) for k, v in obj.items()}
        return {"$d": [[_enc(k), _enc(v)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_enc(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "to_dict"):
        return _enc(obj.to_dict())
    raise TypeError(f"cannot encode {type(obj).__name__} in a snapshot")


def _hook(obj: dict[str, Any]) -> Any:
    # json calls this bottom-up for every object, so inner tags are already decoded
    if len(obj) == 1:
        if "$b" in obj:
            return base64.b64decode(obj["$b"], validate=True)
        if "$d" in obj:
            return {_hashable(k): v for k, v in obj["$d"]}
    return obj


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def encode_state(state: dict[str, Any]) -> bytes:
    """Plain data -> the state file's bytes (header + payload)."""
    payload = json.dumps(_enc(state), separators=(",", ":"), sort_keys=False).encode()
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), digest) + payload


def decode_state(data: bytes, where: str | os.PathLike[str]) -> dict[str, Any]:
    """The state file's bytes -> plain data; any defect raises :class:`SnapshotError`."""
    where = os.fspath(where)
    if len(data) < HEADER.size:
        raise SnapshotError(f"{where}: truncated snapshot state file ({len(data)} bytes)")
    magic, version, _flags, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{where}: not a pytest-ignition snapshot state file (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{where}: snapshot format version {version}, this VMM reads version "
            f"{FORMAT_VERSION}; take the snapshot again"
        )
    payload = data[HEADER.size :]
    if length > MAX_STATE or len(payload) != length:
        raise SnapshotError(
            f"{where}: truncated or padded snapshot state file "
            f"(payload {len(payload)} bytes, header says {length})"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{where}: snapshot state file is corrupt (sha256 mismatch)")
    try:
        state = json.loads(payload, object_hook=_hook)
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise SnapshotError(f"{where}: undecodable snapshot state: {e}") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{where}: snapshot state is not an object")
    return state


def write_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    data = encode_state(state)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE + HEADER.size + 1)
    except FileNotFoundError:
        raise SnapshotError(f"{os.fspath(path)}: snapshot state file does not exist") from None
    except OSError as e:
        raise SnapshotError(f"{os.fspath(path)}: cannot read snapshot state: {e}") from None
    return decode_state(data, path)


# -- memory -------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _swap_active() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True  # cannot tell: assume pages may be swapped out


def resident_pages(addr: int, length: int) -> bytes | None:
    """mincore(2) over an anonymous mapping: one byte per page, bit 0 set if resident. A
    never-touched anonymous page is not resident and reads as zero, so a scan can skip it
    (unless swap is on, where a non-resident page may hold data: None then)."""
    if _swap_active():
        return None
    vec = ctypes.create_string_buffer((length + PAGE_SIZE - 1) // PAGE_SIZE)
    if _libc.mincore(addr, length, vec) != 0:
        return None
    return vec.raw


def write_memory(path: str | os.PathLike[str], mem: GuestMemory, *, anonymous: bool = False) -> int:
    """Write guest RAM (regions back to back) to ``path``, leaving all-zero chunks as holes.
    With ``anonymous`` (RAM is a private anonymous mapping), chunks with no resident page
    are known to be zero and are not even read. Returns the bytes actually written."""
    zero = bytes(ZERO_CHUNK)
    per_chunk = ZERO_CHUNK // PAGE_SIZE
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, mem.size)
        file_off = 0
        for r in mem.regions:
            mm = r.mm
            resident = resident_pages(r.host_addr, r.size) if anonymous else None
            for off in range(0, r.size, ZERO_CHUNK):
                n = min(ZERO_CHUNK, r.size - off)
                if resident is not None:
                    page = off // PAGE_SIZE
                    if resident.count(0, page, page + per_chunk) == len(
                        resident[page : page + per_chunk]
                    ):
                        continue
                chunk = mm[off : off + n]
                if chunk != zero[:n]:
                    os.pwrite(fd, chunk, file_off + off)
                    written += n
            file_off += r.size
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def copy_sparse(src: str | os.PathLike[str], dst: str | os.PathLike[str], size: int) -> None:
    """Copy ``src`` to a new ``dst`` of ``size`` bytes, in the kernel (``copy_file_range``,
    which reflinks where the filesystem can) and only its data extents: holes stay holes."""
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        i, o = fs.fileno(), fd.fileno()
        os.ftruncate(o, size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(i, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = min(os.lseek(i, start, os.SEEK_HOLE), size)
            while start < end:
                n = os.copy_file_range(i, o, end - start, start, start)
                if n <= 0:
                    raise OSError(f"{src}: copy_file_range copied nothing at {start}")
                start += n
            pos = end


def write_memory_delta(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    mem: GuestMemory,
    runs: list[list[tuple[int, int]]],
) -> int:
    """Write guest RAM as ``base`` (the file it is privately mapped from) plus the pages that
    changed since: ``runs[i]`` lists (first page, count) within region ``i``. Clean pages are
    never read, so a large, mostly untouched guest snapshots fast. Returns bytes written."""
    copy_sparse(base, path, mem.size)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        file_off = 0
        for r, region_runs in zip(mem.regions, runs, strict=True):
            for first, count in region_runs:
                off, n = first * PAGE_SIZE, count * PAGE_SIZE
                os.pwrite(fd, r.mm[off : off + n], file_off + off)
                written += n
            file_off += r.size
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- configuration fingerprint --------------------------------------------------------------
_ID_CACHE: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def file_identity(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Size and sha256 of a kernel/initrd (cached per path, inode, size and mtime)."""
    if path is None:
        return None
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    ident = _ID_CACHE.get(key)
    if ident is None:
        ident = _ID_CACHE[key] = {"size": st.st_size, "sha256": file_sha256(path)}
    return ident


def disk_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A disk image by size and modification time (hashing gigabytes per restore is too slow)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(
    *,
    kernel: str | os.PathLike[str] | None,
    initrd: str | os.PathLike[str] | None,
    mem_size: int,
    cpus: int,
    cmdline: str | None,
    disks: Iterable[str] = (),
    disk_read_only: bool = False,
    vsock: bool = False,
    vsock_cid: int = 3,
    rng: bool = True,
    boot_timer: bool = False,
) -> dict[str, Any]:
    """What a snapshot may only be restored with (plain data, compared key by key)."""
    return {
        "kernel": file_identity(kernel),
        "initrd": file_identity(initrd),
        "mem_size": int(mem_size),
        "cpus": int(cpus),
        "cmdline": cmdline,
        "devices": {
            "disks": [disk_identity(d) for d in disks],
            "disk_read_only": bool(disk_read_only),
            "vsock": bool(vsock),
            "vsock_cid": int(vsock_cid) if vsock else None,
            "rng": bool(rng),
            "boot_timer": bool(boot_timer),
        },
    }


def check_machine(
    state: dict[str, Any], arch: str, hypervisor: str, where: str | os.PathLike[str]
) -> None:
    """Refuse (:class:`SnapshotError`) a snapshot of another architecture or hypervisor than
    the machine restoring it: its vCPU and interrupt-controller state mean nothing there. A
    snapshot without the tags is an x86_64 one on KVM (written before they were recorded)."""
    have = (state.get("arch", "x86_64"), state.get("hypervisor", "kvm"))
    if have != (arch, hypervisor):
        raise SnapshotError(
            f"{os.fspath(where)}: a snapshot of an {have[0]} VM on {have[1]}; this VMM restores "
            f"{arch} on {hypervisor}: restore it where it was taken"
        )


def check_fingerprint(
    state: dict[str, Any], expected: dict[str, Any], where: str | os.PathLike[str]
) -> None:
    """Raise :class:`ConfigMismatch` naming every difference between the snapshot's
    fingerprint and ``expected``; keys whose expected value is ``None`` (e.g. no cmdline
    given) are not compared."""
    have = state.get("fingerprint") or {}
    if not isinstance(have, dict):  # found by tests/fuzz (snapshot_state): AttributeError before
        raise SnapshotError(f"{os.fspath(where)}: snapshot state has a malformed fingerprint")
    diffs = []
    for key, want in expected.items():
        if want is None and key == "cmdline":
            continue
        got = have.get(key)
        if got != want:
            diffs.append(f"{key}: snapshot has {_short(got)}, asked for {_short(want)}")
    if diffs:
        raise ConfigMismatch(
            f"{os.fspath(where)}: snapshot was taken with another configuration "
            f"({'; '.join(diffs)}); refusing to restore it"
        )


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


# -- the store ------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """A committed snapshot on disk, its state loaded and checked."""

    path: Path
    state: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY_FILE

    @property
    def id(self) -> str:
        return str(self.state.get("id", ""))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Read and validate a snapshot directory (state checksum, memory file size)."""
        p = Path(path)
        if not p.is_dir():
            raise SnapshotError(f"{p}: no such snapshot (not a directory)")
        state = read_state(p / STATE_FILE)
        want = check_state(state, p / STATE_FILE)
        mem = p / MEMORY_FILE
        try:
            size = os.stat(mem).st_size
        except FileNotFoundError:
            raise SnapshotError(f"{mem}: snapshot memory file does not exist") from None
        if size != want:
            raise SnapshotError(
                f"{mem}: snapshot memory file is {size} bytes, the state says {want} "
                "(truncated or replaced)"
            )
        return cls(p, state)

    def overlay_path(self, index: int) -> Path:
        return self.path / f"disk{index}.overlay"


def check_state(state: dict[str, Any], where: str | os.PathLike[str]) -> int:
    """The checks a decoded state must pass before a restore reads it; returns its memory
    size (bytes). Raises :class:`SnapshotError`."""
    for key in ("memory", "vcpus", "vm", "devices", "config"):
        if key not in state:
            raise SnapshotError(f"{os.fspath(where)}: snapshot state lacks {key!r}")
    mem = state["memory"]
    size = mem.get("size") if isinstance(mem, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        # found by tests/fuzz (snapshot_state): a KeyError/TypeError traceback before
        raise SnapshotError(f"{os.fspath(where)}: snapshot state has no valid memory size")
    return size


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SnapshotError(
            f"bad snapshot name {name!r}: use letters, digits, '_', '.', '-' "
            "(not starting with '.' or '-', at most 128 characters)"
        )
    return name


class SnapshotStore:
    """Named snapshots under ``root`` (created if missing): ``root/<name>/``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def exists(self, name: str) -> bool:
        return (self.path(name) / STATE_FILE).exists()

    def load(self, name: str) -> Snapshot:
        return Snapshot.load(self.path(name))

    def write(self, name: str, fill: Callable[[Path], None]) -> Path:
        """Create snapshot ``name``: ``fill(tmpdir)`` writes its files, then the directory is
        renamed into place (replacing an older snapshot of that name only once complete)."""
        final = self.path(name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SnapshotError(f"{self.root}: cannot create snapshot store: {e}") from None
        import shutil  # the write path only: restore does without these imports
        import tempfile
        import uuid

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.root))
        try:
            fill(tmp)
            _fsync_dir(tmp)
            if final.exists():
                old = self.root / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(old, final)  # put the previous snapshot back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def delete(self, name: str) -> None:
        import shutil

        shutil.rmtree(self.path(name), ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_id() -> str:
    import uuid

    return f"{int(time.time())}-{uuid.uuid4().hex[:12]}"


# -- dirty-page runs ------------------------------------------------------------------------
# The zero scan: 4 KiB, then 512-byte, then 64-byte slices compared with zeros (memcmp),
# so a mostly-zero bitmap costs a few compares per 4 KiB instead of a pass over every byte.
_Z4K, _Z512, _Z64 = bytes(4096), bytes(512), bytes(64)


def _nonzero_blocks(bitmap: bytes | bytearray) -> list[int]:
    """The offsets, in order, of the 64-byte blocks of ``bitmap`` that hold a set bit (a
    short last block is always listed; decoding it finds no bits if it has none)."""
    out = []
    n = len(bitmap)
    for a in range(0, n, 4096):
        if bitmap[a : a + 4096] == _Z4K:
            continue
        for c in range(a, min(a + 4096, n), 512):
            if bitmap[c : c + 512] == _Z512:
                continue
            for d in range(c, min(c + 512, n), 64):
                if bitmap[d : d + 64] != _Z64:
                    out.append(d)
    return out


def is_zero(bitmap: bytes | bytearray) -> bool:
    """Whether no bit is set (a compare with zeros per 4 KiB, at memcmp speed)."""
    n = len(bitmap)
    return all(
        bitmap[a : a + 4096] == (_Z4K if a + 4096 <= n else bytes(n - a)) for a in range(0, n, 4096)
    )


def bitmap_runs(bitmap: bytes | bytearray, first_page: int = 0) -> list[tuple[int, int]]:
    """(first page, page count) runs of set bits in an LSB-first page bitmap, adjacent pages
    merged into one run. The bitmap is mostly zero (16 KiB for a 512 MiB guest, one dirty
    page after a trivial test): its zero stretches are skipped by comparing slices with zeros
    (:func:`_nonzero_blocks`), and each non-zero 64-byte block is decoded as one integer."""
    runs: list[tuple[int, int]] = []
    start = end = -1
    for at in _nonzero_blocks(bitmap):
        w = int.from_bytes(bitmap[at : at + 64], "little")
        base = first_page + (at << 3)
        while w:
            low = (w & -w).bit_length() - 1
            x = w >> low
            n = (x ^ (x + 1)).bit_length() - 1  # trailing ones of x
            s = base + low
            if end == s:
                end += n
            else:
                if end > start:
                    runs.append((start, end - start))
                start, end = s, s + n
            w = x >> n << (low + n)
    if end > start:
        runs.append((start, end - start))
    return runs


def bitmap_pages(bitmap: bytes | bytearray, first_page: int = 0) -> list[int]:
    """Every set bit's page number (LSB-first bitmap), in order."""
    return [s + i for s, n in bitmap_runs(bitmap, first_page) for i in range(n)]


def merge_runs(*lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of (first page, count) run lists, each sorted: sorted, overlapping and
    adjacent runs merged. One non-empty list is returned as it is (no copy)."""
    nonempty = [r for r in lists if r]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else []
    out: list[tuple[int, int]] = []
    start = end = -1
    for s, n in heapq.merge(*nonempty):
        if s <= end:
            end = max(end, s + n)
            continue
        if end > start:
            out.append((start, end - start))
        start, end = s, s + n
    if end > start:
        out.append((start, end - start))
    return out


__all__ = [
    "FORMAT_VERSION",
    "MEMORY_FILE",
    "PAGE_SIZE",
    "STATE_FILE",
    "ConfigMismatch",
    "Snapshot",
    "SnapshotError",
    "SnapshotStore",
    "bitmap_runs",
    "check_fingerprint",
    "decode_state",
    "encode_state",
    "fingerprint",
    "read_state",
    "write_memory",
    "write_state",
]
