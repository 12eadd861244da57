"""Guest root images: ``debian:SUITE`` (mmdebstrap), ``oci-archive:PATH``, or an ext4 file.

``ensure_image`` turns an image spec into an ext4 file that the engines attach read-only (the
lower layer of the guest's overlay root). Built images are cached like kernels, under
``cache_dir()``::

    images/<key>/rootfs.ext4     the filesystem (sparse; sized to its content + headroom)
    images/<key>/image.json      what was built from what, the OCI Env/WorkingDir; written
                                 last, so its presence marks a complete entry
    images/<key>/build.log       mmdebstrap / mke2fs output
    images/<key>/last-used       touched on every cache hit (``clean`` drops entries unused
                                 for IMAGE_MAX_AGE_DAYS)
    images/.<key>-*/             a build in progress (or one killed with SIGKILL)

The key covers every input: the kind, suite, sorted packages, mirror, arch, mmdebstrap's and
mke2fs's versions and IMAGE_PIPELINE_VERSION; for OCI the archive's sha256. Builds run under
the ``image-<key>`` lock (one build across pytest-xdist workers and processes) in a temp dir
that is renamed into place; an error or Ctrl-C removes it, so nothing half-built stays.

An OCI archive is untrusted input: its layers are applied by ``_apply_layer`` which refuses
absolute names, ``..``, parents that are symlinks pointing out of the root and hard links out
of the tree, checks every digest it can (blob names, the config's ``diff_ids``) and bounds the
sizes it reads. An ext4 path is used as is: never copied, never written.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .build import GuestBuildError, _emit, _lock, _sha, cache_dir, require_tools

# Bump when the pipeline's behaviour changes in a way that affects the images it makes.
IMAGE_PIPELINE_VERSION = "1"

DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "IGNITION_DEBIAN_MIRROR"
HOSTNAME = "ignition"
PROGRESS_INTERVAL = 10.0
MMDEBSTRAP_TIMEOUT = 3600.0  # a stalled mirror must not hang a test session forever
MKE2FS_TIMEOUT = 1800.0
TERMINATE_GRACE = 20.0  # mmdebstrap unmounts what it mounted in the chroot on SIGTERM
IMAGE_MAX_AGE_DAYS = 30  # ``clean`` removes images unused for longer
# Bounds for untrusted OCI input.
MAX_JSON_BYTES = 4 << 20
MAX_IMAGE_BYTES = 32 << 30  # total uncompressed layer content
MAX_LAYERS = 256
MAX_SYMLINK_HOPS = 40

ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
BINFMT = {"aarch64": "qemu-aarch64", "x86_64": "qemu-x86_64"}
TOOLS_DEBIAN = {"mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs"}
TOOLS_MKE2FS = {"mke2fs": "e2fsprogs"}

IMAGE_FILE = "rootfs.ext4"
META_FILE = "image.json"
LOG_FILE = "build.log"
USED_FILE = "last-used"
IMAGES_DIR = "images"

Progress = Callable[[str], None] | None


class ImageBuildError(GuestBuildError):
    """An image could not be built or used; the message names the input and what to do."""


@dataclass(frozen=True)
class Image:
    """An ext4 root image ready to attach read-only."""

    path: Path  # ext4 file; callers attach it read-only
    spec: str  # normalised spec
    key: str  # cache key (hex)
    env: tuple[tuple[str, str], ...] = ()  # OCI config Env; () for debian/ext4
    workdir: str | None = None  # OCI WorkingDir; None otherwise


# --------------------------------------------------------------------------- entry point


def ensure_image(
    spec: str,
    packages: Sequence[str] = (),
    arch: str = "x86_64",
    progress: Callable[[str], None] | None = None,
) -> Image:
    """Build (or find in the cache) the image for ``spec`` and return it.

    Raises ImageBuildError (one line naming the input and what to do) when it cannot.
    """
    spec, pkgs = _normalise(spec, packages)
    if arch not in ARCHES:
        raise ImageBuildError(f"arch {arch!r}: use one of {', '.join(ARCHES)}")
    if spec.startswith("debian:"):
        return _ensure_debian(spec, pkgs, arch, progress)
    if pkgs:
        raise ImageBuildError(
            f"packages ({', '.join(pkgs)}) only apply to debian: images, not to {spec}: "
            "install them into the image itself, or drop the packages setting"
        )
    if spec.startswith("oci-archive:"):
        return _ensure_oci(spec, Path(spec[len("oci-archive:") :]), arch, progress)
    return _use_ext4(Path(spec), spec)


def image_key(spec: str, packages: Sequence[str] = (), arch: str = "x86_64") -> str:
    """The cache key ``ensure_image`` would use (hashes an OCI archive; never builds)."""
    spec, pkgs = _normalise(spec, packages)
    if spec.startswith("debian:"):
        return _debian_key(spec[len("debian:") :], pkgs, _mirror(), arch)
    if spec.startswith("oci-archive:"):
        return _oci_key(_archive_digest(Path(spec[len("oci-archive:") :])), arch)
    return _ext4_key(Path(spec))


def find_image(spec: str, packages: Sequence[str] = (), arch: str = "x86_64") -> Image | None:
    """The cached image for these inputs, or None (never builds)."""
    try:
        spec, pkgs = _normalise(spec, packages)
        if not spec.startswith(("debian:", "oci-archive:")):
            return _use_ext4(Path(spec), spec)
        key = image_key(spec, pkgs, arch)
    except GuestBuildError:
        return None
    return _cached(spec, key)


def images_root() -> Path:
    return cache_dir() / IMAGES_DIR


def _normalise(spec: str, packages: Sequence[str] | str) -> tuple[str, tuple[str, ...]]:
    from ..config import parse_image, parse_packages

    try:
        spec = parse_image(spec)
    except ValueError as e:
        msg = str(e)
        if "not an ext2/3/4" in msg:
            msg += (
                ": give an ext4 file (e.g. made with `mke2fs -t ext4 -d DIR img.ext4 512M`), "
                "debian:SUITE or oci-archive:PATH"
            )
        if str(spec).strip() not in msg:
            msg = f"{spec!r}: {msg}"
        raise ImageBuildError(msg if msg.startswith(("image", "OCI")) else f"image {msg}") from None
    try:
        pkgs = parse_packages(packages if isinstance(packages, str) else tuple(packages))
    except ValueError as e:
        raise ImageBuildError(f"packages: {e}") from None
    return spec, pkgs


def _cached(spec: str, key: str) -> Image | None:
    d = images_root() / key
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (d / IMAGE_FILE).is_file():
        return None
    with contextlib.suppress(OSError):  # a read-only shared cache still works
        (d / USED_FILE).touch()
    env = tuple((str(k), str(v)) for k, v in meta.get("env", []))
    wd = meta.get("workdir")
    return Image(path=d / IMAGE_FILE, spec=spec, key=key, env=env, workdir=wd or None)


# --------------------------------------------------------------------------- ext4 as is


def _ext4_key(path: Path) -> str:
    st = path.stat()
    return _sha("ext4", IMAGE_PIPELINE_VERSION, str(path), str(st.st_dev), str(st.st_ino),
                str(st.st_size), str(st.st_mtime_ns))  # fmt: skip


def _use_ext4(path: Path, spec: str) -> Image:
    """An existing ext4 file: checked, never copied or written."""
    try:
        with open(path, "rb") as f:
            f.seek(0x438)
            magic = f.read(2)
    except OSError as e:
        raise ImageBuildError(f"image {str(path)!r}: {e.strerror}") from None
    if magic != b"\x53\xef":
        raise ImageBuildError(
            f"image {str(path)!r} is not an ext2/3/4 filesystem (no ext superblock): give an "
            "ext4 file (e.g. made with `mke2fs -t ext4 -d DIR img.ext4 512M`), debian:SUITE or "
            "oci-archive:PATH"
        )
    return Image(path=path, spec=spec, key=_ext4_key(path))


# --------------------------------------------------------------------------- debian


_version_memo: dict[str, str] = {}


def _version(tool: str, args: tuple[str, ...]) -> str:
    if tool not in _version_memo:
        path = shutil.which(tool)
        if path is None:
            return f"{tool}:absent"
        if tool == "mmdebstrap":
            # a perl script: `mmdebstrap --version` costs ~0.3 s (1 s+ on a busy machine) on
            # every cache hit; its version line says the same
            with contextlib.suppress(OSError):
                with open(path, "rb") as f:
                    m = re.search(rb"^our \$VERSION = '([^']+)';", f.read(8192), re.M)
                if m:
                    _version_memo[tool] = f"{tool}:mmdebstrap {m[1].decode()}"
                    return _version_memo[tool]
        r = subprocess.run([path, *args], capture_output=True, text=True, timeout=60, check=False)
        text = (r.stdout + r.stderr).strip().splitlines()
        _version_memo[tool] = f"{tool}:{text[0] if text else r.returncode}"
    return _version_memo[tool]


def _host_mirror() -> str | None:
    """The Debian mirror this machine's apt uses (deb822 .sources or one-line .list)."""
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    with contextlib.suppress(OSError):
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                if any("-" not in s for s in suites) and "main" in fields.get("components", ""):
                    return fields.get("uris", "").split()[0] if fields.get("uris") else None
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
                if m and "-" not in m[2] and "main" in m[3].split():
                    return m[1]
    return None


def _mirror() -> str:
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        return env.rstrip("/")
    return (_host_mirror() or DEFAULT_MIRROR).rstrip("/")


def _debian_key(suite: str, pkgs: tuple[str, ...], mirror: str, arch: str) -> str:
    if shutil.which("mmdebstrap") is None:  # its version is part of the key
        _require({"mmdebstrap": "mmdebstrap"}, f"image debian:{suite}")
    return _sha(
        "debian",
        IMAGE_PIPELINE_VERSION,
        suite,
        ",".join(sorted(pkgs)),
        mirror,
        arch,
        _version("mmdebstrap", ("--version",)),
        _version("mke2fs", ("-V",)),
    )


def _require(tools: dict[str, str], what: str) -> None:
    try:
        require_tools(tools)
    except GuestBuildError as e:
        raise ImageBuildError(f"{what}: {e}") from None


def _ensure_debian(spec: str, pkgs: tuple[str, ...], arch: str, progress: Progress) -> Image:
    suite = spec[len("debian:") :]
    label = spec + (f" +{','.join(pkgs)}" if pkgs else "")
    _require(TOOLS_DEBIAN, f"image {label}")
    mirror = _mirror()
    key = _debian_key(suite, pkgs, mirror, arch)
    hit = _cached(spec, key)
    if hit is not None:
        return hit
    _check_foreign_arch(arch, label)
    fake = _needs_fakeroot(label, debian=True)
    with _lock(f"image-{key}", progress):
        hit = _cached(spec, key)
        if hit is not None:
            return hit
        _precheck_packages(suite, pkgs, mirror, arch, label)

        def populate(root: Path, log: Path) -> dict[str, Any]:
            if not fake:
                _mmdebstrap(suite, pkgs, mirror, arch, root, log, label, progress)
            else:
                # Not root: mmdebstrap's fakechroot mode writes a tar with the real owners;
                # fakeroot unpacks it and shows mke2fs (same state file) those owners.
                tarball = root.parent / "rootfs.tar"
                _mmdebstrap(suite, pkgs, mirror, arch, tarball, log, label, progress, fake=True)
                root.mkdir(mode=0o755)
                state = root.parent / FAKEROOT_STATE
                cmd = ["fakeroot", "-s", str(state), "--", "tar", "-xpf", str(tarball),
                       "--numeric-owner", "-C", str(root)]  # fmt: skip
                try:
                    _run(cmd, log, f"{label}: unpacking (fakeroot tar)", progress, MKE2FS_TIMEOUT)
                except _StepFailed as e:
                    raise ImageBuildError(
                        f"image {label}: unpacking mmdebstrap's tar failed: {_last_line(e.output)}"
                    ) from None
                tarball.unlink()
            _finish_debian_tree(root)
            return {"suite": suite, "packages": list(pkgs), "mirror": mirror}

        return _build(spec, key, arch, label, populate, progress)


FAKEROOT_STATE = "fakeroot.state"  # in a build's temp dir: its fakeroot session's owners


def _needs_fakeroot(label: str, *, debian: bool) -> bool:
    """True when not root: the tree is then made and read under fakeroot, so that the image's
    files are owned by root and device nodes are nodes (mke2fs -d copies what lstat says;
    Debian 12's e2fsprogs 1.47.0 cannot read a tar itself)."""
    if os.geteuid() == 0:
        return False
    tools = {"fakeroot": "fakeroot"}
    if debian:
        tools["fakechroot"] = "fakechroot"  # mmdebstrap --mode=fakechroot
    _require(tools, f"image {label} (building as a user, not root)")
    return True


def _check_foreign_arch(arch: str, label: str) -> None:
    if arch == platform.machine():
        return
    # maintainer scripts of a foreign-arch --variant=apt build run under binfmt emulation
    binfmt = Path("/proc/sys/fs/binfmt_misc") / BINFMT.get(arch, arch)
    try:
        enabled = binfmt.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        enabled = False
    if not enabled:
        raise ImageBuildError(
            f"image {label} for {arch} on a {platform.machine()} host needs emulation of "
            f"{arch} binaries ({binfmt} is not registered): apt-get install qemu-user-static "
            "binfmt-support"
        )


def _lists_name(mirror: str) -> str:
    """apt's lists/ file prefix for a mirror URI: scheme gone, '/' -> '_'."""
    rest = re.sub(r"^[a-z+]+://", "", mirror).rstrip("/")
    rest = re.sub(r"^[^@/]*@", "", rest)  # user:pass@
    return rest.replace("/", "_")


def _precheck_packages(
    suite: str, pkgs: tuple[str, ...], mirror: str, arch: str, label: str
) -> None:
    """Fail fast on a package name that does not exist, when this host's apt lists cover the
    same mirror, suite and arch (mmdebstrap only finds out after installing the essential set,
    30-70 s in). Without such lists the check is left to mmdebstrap (its log is parsed)."""
    if not pkgs or shutil.which("apt-cache") is None:
        return
    debarch = ARCHES[arch]
    lists = Path("/var/lib/apt/lists")
    prefix = f"{_lists_name(mirror)}_dists_{suite}_main_binary-{debarch}_Packages"
    try:
        if not any(p.name.startswith(prefix) for p in lists.iterdir()):
            return
    except OSError:
        return
    native = debarch == _native_debarch()
    names = []
    for p in pkgs:
        base = p.split("=", 1)[0]
        if ":" not in base and not native:
            base = f"{base}:{debarch}"
        names.append(base)
    try:
        r = subprocess.run(
            ["apt-cache", "policy", "--", *names],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    if r.returncode != 0:
        return
    known = {m[1] for m in re.finditer(r"^(\S+):$", r.stdout, re.M)}
    known |= {k.rsplit(":", 1)[0] for k in known}
    missing = [p for p, n in zip(pkgs, names, strict=True) if n not in known]
    if missing:
        raise ImageBuildError(_missing_packages_msg(label, missing, suite, mirror))


def _native_debarch() -> str:
    return ARCHES.get(platform.machine(), platform.machine())


def _missing_packages_msg(label: str, missing: Sequence[str], suite: str, mirror: str) -> str:
    s = "s" if len(missing) > 1 else ""
    return (
        f"image {label}: no package{s} {', '.join(missing)} in Debian {suite} at {mirror}: "
        f"check the name{s} (apt-cache search, https://packages.debian.org) in the packages setting"
    )


def _mmdebstrap(
    suite: str,
    pkgs: tuple[str, ...],
    mirror: str,
    arch: str,
    root: Path,
    log: Path,
    label: str,
    progress: Progress,
    *,
    fake: bool = False,
) -> None:
    cmd = [
        "mmdebstrap",
        "--variant=apt",
        "--mode=fakechroot" if fake else "--mode=root",
        "--format=tar" if fake else "--format=directory",
        f"--architectures={ARCHES[arch]}",
        "--components=main",
    ]
    if pkgs:
        cmd.append("--include=" + ",".join(pkgs))
    cmd += [suite, str(root), mirror]
    try:
        # its own temp tree (the whole system, in fakechroot mode) goes beside ours, not to a
        # possibly small /tmp
        tmpdir = {"TMPDIR": str(root.parent)}
        _run(cmd, log, f"{label}: mmdebstrap", progress, MMDEBSTRAP_TIMEOUT, _mmdebstrap_status,
             env=tmpdir)  # fmt: skip
    except _StepFailed as e:
        raise ImageBuildError(_explain_mmdebstrap(e, suite, mirror, label)) from None


def _mmdebstrap_status(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("I: ")]
    return lines[-1][3:].strip() if lines else "starting"


def _explain_mmdebstrap(e: _StepFailed, suite: str, mirror: str, label: str) -> str:
    text = e.output
    missing: list[str] = []
    for pat in (
        r"^E: Unable to locate package (\S+)",
        r"^E: Package '([^']+)' has no installation candidate",
        r"^E: Version '[^']+' for '([^']+)' was not found",
        r"^E: Couldn't find any package by \w+ '([^']+)'",
    ):
        missing += [m for m in re.findall(pat, text, re.M) if m not in missing]
    if missing:
        return _missing_packages_msg(label, missing, suite, mirror)
    if re.search(r"does not have a Release file|404\s+Not Found", text):
        return (
            f"image {label}: Debian has no suite {suite!r} at {mirror} "
            "(use a suite name such as bookworm or trixie, or set IGNITION_DEBIAN_MIRROR to a "
            "mirror that has it)"
        )
    if "unmet dependencies" in text or "held broken packages" in text:
        return (
            f"image {label}: the packages cannot be installed together in {suite} "
            f"(unmet dependencies; see {e.log_hint})"
        )
    if re.search(r"Could not resolve|Temporary failure resolving|Failed to fetch|"
                 r"Connection failed|Could not connect", text):  # fmt: skip
        return (
            f"image {label}: cannot download from the Debian mirror {mirror} "
            f"(set {MIRROR_ENV} to a reachable one); {_last_error(text)}"
        )
    return f"image {label}: {e.step} failed (exit {e.rc}): {_last_error(text)}"


def _last_error(text: str) -> str:
    errs = [
        ln.strip()
        for ln in text.splitlines()
        if ln.startswith("E: ") and "mmdebstrap failed" not in ln and "setup failed" not in ln
    ]
    if errs:
        return errs[0][3:]
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return tail[-1] if tail else "no output"


def _finish_debian_tree(root: Path) -> None:
    """What Debian's own images do: empty machine-id (systemd makes one per boot), a
    hostname; nothing else is baked in (the agent comes with the guest's init)."""
    etc = root / "etc"
    _write_plain(etc / "machine-id", b"")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        _write_plain(dbus_id, b"")
    _write_plain(etc / "hostname", f"{HOSTNAME}\n".encode())
    hosts = etc / "hosts"
    if not hosts.exists():
        _write_plain(
            hosts,
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost\n".encode(),
        )
    # mmdebstrap leaves the build host's resolv.conf behind only when it had to copy one in
    rc = etc / "resolv.conf"
    if rc.is_file() and not rc.is_symlink():
        rc.unlink()


def _write_plain(path: Path, data: bytes) -> None:
    """Replace ``path`` by a regular file (never writes through a symlink)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------- running steps


class _StepFailed(Exception):
    def __init__(self, step: str, rc: int, output: str, log_hint: str) -> None:
        super().__init__(f"{step} failed (exit {rc})")
        self.step, self.rc, self.output, self.log_hint = step, rc, output, log_hint


def _run(
    cmd: list[str],
    log: Path,
    step: str,
    progress: Progress,
    timeout: float,
    status: Callable[[str], str] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``cmd`` (niced) appending its output to ``log``; a progress line every
    PROGRESS_INTERVAL s; terminated (then killed) on timeout, error or Ctrl-C."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        start = fh.tell()
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            ["sh", "-c", _GROUP_WRAPPER, "sh", "nice", "-n", "10", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop it cleanly
            preexec_fn=_term_with_parent,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            while True:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    raise ImageBuildError(
                        f"{step} did not finish within {timeout:.0f}s (a stalled download?); "
                        f"stopped it; its log was {log}"
                    )
                try:
                    rc = proc.wait(timeout=min(PROGRESS_INTERVAL, left))
                    break
                except subprocess.TimeoutExpired:
                    what = ""
                    if status is not None:
                        with contextlib.suppress(OSError):
                            what = status(_read_from(log, start)) + ", "
                    _emit(progress, f"{step}: {what}{time.monotonic() - t0:.0f}s elapsed")
        except BaseException:
            _stop(proc)
            raise
    if rc != 0:
        raise _StepFailed(step, rc, _read_from(log, start), str(log))


def _term_with_parent() -> None:  # in the child, between fork and exec
    """SIGTERM the step if we die (SIGKILL, SIGTERM): mmdebstrap then unmounts its chroot's
    mounts and exits instead of building on as an orphan."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGTERM


def _read_from(log: Path, start: int) -> str:
    with open(log, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's whole process group (mmdebstrap's workers too: its main process
    alone would wait for the current stage to finish), wait until every member is gone (they
    unmount the chroot's mounts first), SIGKILL what is left after TERMINATE_GRACE."""
    pgid = proc.pid  # start_new_session: the group is the step's own
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE
    while time.monotonic() < deadline:
        proc.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# A builder killed by SIGKILL/SIGTERM cannot run _stop; PR_SET_PDEATHSIG sends this wrapper
# SIGTERM instead, and it passes it on to its whole group, as _stop would.
_GROUP_WRAPPER = (
    "trap 'trap - TERM; kill -TERM 0' TERM; \"$@\" & pid=$!; "
    "while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || exit $rc; done"
)


# --------------------------------------------------------------------------- building


def _build(
    spec: str,
    key: str,
    arch: str,
    label: str,
    populate: Callable[[Path, Path], dict[str, Any]],
    progress: Progress,
) -> Image:
    """Under the caller's lock: populate a tree, make the ext4, rename the entry into place."""
    _require(TOOLS_MKE2FS, f"image {label}")
    base = images_root()
    base.mkdir(parents=True, exist_ok=True)
    out = base / key
    for dead in base.glob(f".{key}-*"):  # we hold the key's lock: a killed build's leftovers
        _rmtree(dead)
    t0 = time.monotonic()
    _emit(progress, f"building image {label} ({arch}) -> {out}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=base))
    try:
        tmp.chmod(0o755)
        log = tmp / LOG_FILE
        log.write_text(f"# image {label}, arch {arch}, key {key}\n")
        root = tmp / "root"
        meta = populate(root, log)
        _ensure_mountpoints(root)
        state = tmp / FAKEROOT_STATE
        wrap = ["fakeroot", "-i", str(state), "--"] if state.exists() else []
        size = _make_ext4(root, tmp / IMAGE_FILE, key, log, label, progress, wrap)
        _rmtree(root)
        for scratch in (FAKEROOT_STATE, "unpack.json"):
            (tmp / scratch).unlink(missing_ok=True)
        meta = {
            "spec": spec,
            "arch": arch,
            "key": key,
            "pipeline": IMAGE_PIPELINE_VERSION,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
            "size": size,
            "env": [],
            "workdir": None,
            "tools": _tools_meta(spec),
            **meta,
        }
        (tmp / USED_FILE).touch()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks complete
        if out.exists():  # an entry without image.json (cannot come from here): replace it
            _rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        _rmtree(tmp)
        raise
    _emit(progress, f"image {label} built in {time.monotonic() - t0:.0f}s: {out / IMAGE_FILE}")
    hit = _cached(spec, key)
    if hit is None:
        raise ImageBuildError(f"image {label}: {out} vanished right after it was built")
    return hit


def _tools_meta(spec: str) -> dict[str, str]:
    """The tool versions in an image's key (clean compares them with the installed ones)."""
    tools = [("mke2fs", ("-V",))]
    if spec.startswith("debian:"):
        tools.append(("mmdebstrap", ("--version",)))
    return {t: _version(t, a) for t, a in tools if shutil.which(t)}


def _ensure_mountpoints(root: Path) -> None:
    """The guest's init mounts proc/sys/dev/run/tmp inside the image: make sure they exist."""
    for name, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                       ("tmp", 0o1777)):  # fmt: skip
        p = root / name
        if not os.path.lexists(p):
            p.mkdir()
            p.chmod(mode)


def _tree_usage(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inodes) of a tree; hard links counted once."""
    blocks, inodes = 1, 1
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                blocks += max(1, -(-st.st_size // 4096))
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                blocks += 1  # longer targets need a block (shorter ones live in the inode)
    return blocks * 4096, inodes


def _make_ext4(
    root: Path,
    img: Path,
    key: str,
    log: Path,
    label: str,
    progress: Progress,
    wrap: Sequence[str] = (),
) -> int:
    """mke2fs -d into a sparse file sized to fit: content + 10% + fixed headroom for metadata
    and the journal (the image is a read-only lower layer, so it needs little free space).
    Retried once at twice the size if mke2fs runs out of room."""
    data, inodes = _tree_usage(root)
    n_inodes = inodes + inodes // 4 + 1024
    size = data + data // 10 + n_inodes * 256 + (48 << 20)
    uuid = f"{key[:8]}-{key[8:12]}-4{key[13:16]}-8{key[17:20]}-{key[:12]}"
    for attempt in (1, 2):
        size = -(-size // (1 << 20)) * (1 << 20)
        with contextlib.suppress(FileNotFoundError):
            img.unlink()
        with open(img, "wb") as f:
            f.truncate(size)
        cmd = [
            *wrap, "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", str(n_inodes),
            "-L", "rootfs", "-U", uuid, "-E", "root_owner=0:0", "-d", str(root), str(img),
        ]  # fmt: skip
        try:
            _run(cmd, log, f"{label}: mke2fs", progress, MKE2FS_TIMEOUT)
            return size
        except _StepFailed as e:
            full = re.search(r"No space left|Could not allocate|not enough space", e.output, re.I)
            if attempt == 1 and full:
                size *= 2
                n_inodes *= 2
                continue
            raise ImageBuildError(
                f"image {label}: mke2fs -d failed (exit {e.rc}): {_last_line(e.output)}"
            ) from None
    raise AssertionError("unreachable")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    return lines[-1] if lines else "no output"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp.startswith(prefix) or mp == prefix.rstrip("/"):
                    out.append(mp)
    except OSError:
        pass
    return out


def _rmtree(path: Path) -> None:
    """Remove a build tree, first unmounting anything a killed mmdebstrap left mounted in it
    (rmtree through a bind-mounted /dev would delete the host's device nodes)."""
    if not os.path.lexists(path):
        return
    for mp in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=60, check=False)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(
            f"cannot remove {path}: still mounted there: {', '.join(left)} (unmount, then "
            "run `python -m pytest_ignition.guest clean`)"
        )
    dev = path.lstat().st_dev

    def onerror(func: Any, p: str, exc: Any) -> None:
        # read-only directories from an image: make them writable and retry once
        with contextlib.suppress(OSError):
            parent = os.path.dirname(p)
            if os.lstat(parent).st_dev == dev:
                os.chmod(parent, 0o700)
                func(p)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
    else:
        path.unlink()


# --------------------------------------------------------------------------- OCI


_digest_memo: dict[tuple[str, int, int, int, int], str] = {}


def _archive_digest(path: Path) -> str:
    """sha256 of the archive file (memoised per process by its identity)."""
    try:
        st = path.stat()
    except OSError as e:
        raise ImageBuildError(f"OCI archive {str(path)!r}: {e.strerror}") from None
    ident = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if ident not in _digest_memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digest_memo[ident] = h.hexdigest()
    return _digest_memo[ident]


def _oci_key(digest: str, arch: str) -> str:
    return _sha("oci", IMAGE_PIPELINE_VERSION, digest, arch, _version("mke2fs", ("-V",)))


def _ensure_oci(spec: str, archive: Path, arch: str, progress: Progress) -> Image:
    label = spec
    digest = _archive_digest(archive)
    key = _oci_key(digest, arch)
    hit = _cached(spec, key)
    if hit is not None:
        return hit
    fake = _needs_fakeroot(label, debian=False)
    with _lock(f"image-{key}", progress):
        hit = _cached(spec, key)
        if hit is not None:
            return hit

        def populate(root: Path, log: Path) -> dict[str, Any]:
            root.mkdir(mode=0o755)
            if fake:
                info = _unpack_under_fakeroot(archive, root, arch, label, log, progress)
            else:
                info = unpack_oci(archive, root, arch, progress=progress, label=label)
            with open(log, "a") as f:
                f.write(f"unpacked {len(info['layers'])} layers from {archive}\n")
            return {"archive": str(archive), "archive_sha256": digest, **info}

        return _build(spec, key, arch, label, populate, progress)


def _unpack_under_fakeroot(
    archive: Path, root: Path, arch: str, label: str, log: Path, progress: Progress
) -> dict[str, Any]:
    """unpack_oci in a child under fakeroot (its chown/mknod are recorded, not refused)."""
    state = root.parent / FAKEROOT_STATE
    out = root.parent / "unpack.json"
    cmd = ["fakeroot", "-s", str(state), "--", sys.executable, "-m", __name__, "unpack",
           str(archive), str(root), arch, label, str(out)]  # fmt: skip
    _emit(progress, f"{label}: applying layers (under fakeroot)")
    try:
        _run(cmd, log, f"{label}: unpacking", progress, MKE2FS_TIMEOUT)
    except _StepFailed as e:
        msg = [ln for ln in e.output.splitlines() if ln.startswith("ImageBuildError: ")]
        if msg:
            raise ImageBuildError(msg[-1][len("ImageBuildError: ") :]) from None
        raise ImageBuildError(f"{label}: unpacking failed: {_last_line(e.output)}") from None
    return json.loads(out.read_text())


class _Corrupt(Exception):
    """The archive is malformed; converted to ImageBuildError naming it."""


def unpack_oci(
    archive: Path,
    root: Path,
    arch: str = "x86_64",
    *,
    progress: Progress = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Apply the image's layers in order into the empty directory ``root``.

    Returns {"env", "workdir", "layers", "config_digest"}. Raises ImageBuildError naming the
    archive for anything malformed, truncated, mismatched or unsafe.
    """
    label = label or f"oci-archive:{archive}"
    try:
        with tarfile.open(archive, "r:*") as outer:
            members = {_norm_member(m.name): m for m in outer.getmembers()}
            reader = _Outer(outer, members)
            if "manifest.json" in members:
                config_raw, layers = _docker_manifest(reader)
            elif "index.json" in members:
                config_raw, layers = _oci_index(reader, arch)
            else:
                raise _Corrupt(
                    "neither manifest.json (docker save) nor index.json (OCI layout) in it"
                )
            config = _json(config_raw, "image config")
            _check_arch(config, arch)
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            if diff_ids and len(diff_ids) != len(layers):
                raise _Corrupt(f"config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
            budget = [MAX_IMAGE_BYTES]
            for i, (name, blob_digest) in enumerate(layers):
                _emit(progress, f"{label}: applying layer {i + 1}/{len(layers)}")
                want = diff_ids[i] if diff_ids else None
                _apply_blob(reader, name, blob_digest, want, root, budget)
    except Traversal as e:
        raise ImageBuildError(f"{label}: {e}; the archive is refused") from None
    except _Corrupt as e:
        raise ImageBuildError(
            f"{label}: not a usable image archive: {e} (re-create it with `docker save` or "
            "`skopeo copy ... oci-archive:FILE`)"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeError) as e:
        raise ImageBuildError(
            f"{label}: truncated or corrupt archive ({type(e).__name__}: {e}); re-create it "
            "with `docker save` or `skopeo copy ... oci-archive:FILE`"
        ) from None
    except OSError as e:
        raise ImageBuildError(f"{label}: {e.strerror or e} while unpacking") from None
    cfg = config.get("config") or {}
    env = []
    for item in cfg.get("Env") or []:
        if not isinstance(item, str) or "=" not in item:
            raise ImageBuildError(f"{label}: bad Env entry {item!r} in the image config")
        k, _, v = item.partition("=")
        env.append((k, v))
    workdir = cfg.get("WorkingDir") or None
    if workdir is not None and not isinstance(workdir, str):
        raise ImageBuildError(f"{label}: bad WorkingDir {workdir!r} in the image config")
    return {
        "env": env,
        "workdir": workdir,
        "layers": [n for n, _ in layers],
        "config_sha256": hashlib.sha256(config_raw).hexdigest(),
    }


def _norm_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


class _Outer:
    def __init__(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> None:
        self.tar, self.members = tar, members

    def open(self, name: str) -> IO[bytes]:
        m = self.members.get(_norm_member(name))
        if m is None:
            raise _Corrupt(f"{name} is listed but missing (a truncated archive?)")
        for _ in range(MAX_SYMLINK_HOPS):  # docker save links duplicate layers
            if not (m.issym() or m.islnk()):
                break
            target = m.linkname
            if m.issym():
                target = os.path.normpath(os.path.join(os.path.dirname(m.name), target))
            nxt = self.members.get(_norm_member(target))
            if nxt is None:
                raise _Corrupt(f"{name} links to missing {m.linkname}")
            m = nxt
        if not m.isfile():
            raise _Corrupt(f"{name} is not a file in the archive")
        f = self.tar.extractfile(m)
        if f is None:
            raise _Corrupt(f"{name} cannot be read")
        return f

    def read(self, name: str, what: str) -> bytes:
        f = self.open(name)
        data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise _Corrupt(f"{what} {name} is larger than {MAX_JSON_BYTES} bytes")
        return data


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        v = json.loads(data)
    except ValueError as e:
        raise _Corrupt(f"{what} is not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise _Corrupt(f"{what} is not a JSON object")
    return v


_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


def _blob_name(digest: Any) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise _Corrupt(f"unsupported digest {digest!r} (only sha256 is supported)")
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _verified_blob(reader: _Outer, digest: Any, what: str) -> bytes:
    name = _blob_name(digest)
    data = reader.read(name, what)
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise _Corrupt(f"{what} {name} does not match its digest")
    return data


def _docker_manifest(reader: _Outer) -> tuple[bytes, list[tuple[str, str | None]]]:
    raw = reader.read("manifest.json", "manifest.json")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise _Corrupt(f"manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise _Corrupt("manifest.json holds no image")
    if len(manifest) > 1:
        tags = [", ".join(m.get("RepoTags") or ["?"]) for m in manifest if isinstance(m, dict)]
        raise _Corrupt(
            f"it holds {len(manifest)} images ({'; '.join(tags)}): save one image per archive"
        )
    entry = manifest[0]
    cfg_name, layers = entry.get("Config"), entry.get("Layers")
    if not isinstance(cfg_name, str) or not isinstance(layers, list):
        raise _Corrupt("manifest.json has no Config or Layers")
    if not all(isinstance(layer, str) for layer in layers) or len(layers) > MAX_LAYERS:
        raise _Corrupt("manifest.json has bad Layers")
    config_raw = reader.read(cfg_name, "image config")
    hexname = re.search(r"([0-9a-f]{64})(?:\.json)?$", cfg_name)
    if hexname and hashlib.sha256(config_raw).hexdigest() != hexname[1]:
        raise _Corrupt(f"image config {cfg_name} does not match its digest")
    named = [(name, _digest_of_name(name)) for name in layers]
    return config_raw, named


def _digest_of_name(name: str) -> str | None:
    m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", _norm_member(name))
    return f"sha256:{m[1]}" if m else None


_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def _oci_index(reader: _Outer, arch: str) -> tuple[bytes, list[tuple[str, str | None]]]:
    index = _json(reader.read("index.json", "index.json"), "index.json")
    for _depth in range(4):  # index -> (nested index ->) manifest
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not manifests:
            raise _Corrupt("index.json lists no manifests")
        pick = _pick_manifest(manifests, arch)
        data = _verified_blob(reader, pick.get("digest"), "manifest")
        doc = _json(data, "manifest")
        if pick.get("mediaType") in _INDEX_TYPES or doc.get("mediaType") in _INDEX_TYPES:
            index = doc
            continue
        cfg = doc.get("config") or {}
        layers = doc.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise _Corrupt("manifest has no layers list")
        config_raw = _verified_blob(reader, cfg.get("digest"), "image config")
        out: list[tuple[str, str | None]] = []
        for layer in layers:
            if not isinstance(layer, dict):
                raise _Corrupt("manifest has a bad layer entry")
            mt = str(layer.get("mediaType", ""))
            if "zstd" in mt:
                raise _Corrupt(f"zstd layers ({mt}) are not supported: use gzip or none")
            out.append((_blob_name(layer.get("digest")), layer.get("digest")))
        return config_raw, out
    raise _Corrupt("index.json nests indexes too deep")


def _pick_manifest(manifests: list[Any], arch: str) -> dict[str, Any]:
    items = [m for m in manifests if isinstance(m, dict)]
    want = ARCHES[arch]
    with_platform = [m for m in items if isinstance(m.get("platform"), dict)]
    if with_platform:
        match = [m for m in with_platform if m["platform"].get("architecture") == want]
        if not match:
            have = sorted({str(m["platform"].get("architecture")) for m in with_platform})
            raise _Corrupt(f"no {want} image in it (has: {', '.join(have)})")
        return match[0]
    if len(items) != 1:
        raise _Corrupt(f"index.json lists {len(items)} manifests: keep one image per archive")
    return items[0]


def _check_arch(config: dict[str, Any], arch: str) -> None:
    have = config.get("architecture")
    if have and have != ARCHES[arch]:
        raise _Corrupt(f"the image is for {have}, the guest is {arch} ({ARCHES[arch]})")


class _HashingReader(io.RawIOBase):
    """Counts and hashes what is read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.h.update(data)
        self.n += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _apply_blob(
    reader: _Outer,
    name: str,
    blob_digest: str | None,
    diff_id: Any,
    root: Path,
    budget: list[int],
) -> None:
    raw = _HashingReader(reader.open(name))
    head = io.BufferedReader(raw, 1 << 16)
    magic = head.peek(4)[:4]
    if magic[:2] == b"\x1f\x8b":
        inner: _HashingReader = _HashingReader(gzip.GzipFile(fileobj=head, mode="rb"))  # type: ignore[arg-type]
    elif magic == b"\x28\xb5\x2f\xfd":
        raise _Corrupt(f"layer {name} is zstd-compressed: not supported (use gzip or none)")
    else:
        inner = _HashingReader(head)
    with tarfile.open(fileobj=io.BufferedReader(inner, 1 << 16), mode="r|") as layer:
        _apply_layer(layer, root, name, budget)
    inner.drain()
    if inner is not raw:
        head.read()  # the rest of the compressed stream, for its digest
    raw.drain()
    if blob_digest is not None and "sha256:" + raw.h.hexdigest() != blob_digest:
        raise _Corrupt(f"layer {name} does not match its digest {blob_digest}")
    if diff_id is not None and "sha256:" + inner.h.hexdigest() != diff_id:
        raise _Corrupt(f"layer {name} does not match its diff_id {diff_id}")


class Traversal(Exception):
    """A layer entry would reach outside the image's root (or past a bound); converted to
    ImageBuildError naming the archive."""


def _layer_path(name: str, layer: str) -> tuple[str, ...]:
    """A layer member name as path components; absolute names and '..' are refused."""
    if name.startswith("/"):
        raise Traversal(f"layer {layer}: absolute path {name!r} refused (path traversal)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise Traversal(f"layer {layer}: path {name!r} with '..' refused (path traversal)")
    return parts


def _resolve_parent(
    root: Path, parts: tuple[str, ...], layer: str, name: str, *, create: bool = True
) -> Path | None:
    """The real directory that holds ``parts[-1]``: symlinks among the parents are followed
    only while they stay inside ``root``; one that points out is refused. A missing parent is
    created (tar allows files before their directories), or None returned without ``create``."""
    stack = list(parts[:-1])[::-1]
    cur: list[str] = []
    hops = 0
    while stack:
        comp = stack.pop()
        if comp in ("", "."):
            continue
        if comp == "..":
            if not cur:
                raise Traversal(
                    f"layer {layer}: {name!r} goes through a symlink pointing out of the image "
                    "(path traversal)"
                )
            cur.pop()
            continue
        p = root.joinpath(*cur, comp)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(p, 0o755)
            cur.append(comp)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise Traversal(f"layer {layer}: {name!r}: too many symlinks")
            target = os.readlink(p)
            if target.startswith("/"):
                cur = []
            stack.extend(reversed([t for t in target.split("/") if t]))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _Corrupt(f"layer {layer}: {name!r} has a non-directory parent {comp!r}")
        cur.append(comp)
    return root.joinpath(*cur)


def _remove_entry(p: Path) -> None:
    st = os.lstat(p)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def _apply_layer(layer: tarfile.TarFile, root: Path, lname: str, budget: list[int]) -> None:
    """Apply one layer (a streamed tar) to ``root`` as OCI says: whiteouts delete lower
    layers' entries, an opaque marker empties a directory of lower layers' entries."""
    made: set[tuple[str, ...]] = set()  # entries this layer created (whiteouts spare them)
    dirs: list[tuple[Path, tarfile.TarInfo]] = []
    for m in layer:
        parts = _layer_path(m.name, lname)
        if not parts:
            if m.isdir():
                dirs.append((root, m))
            continue
        base = parts[-1]
        if base.startswith(".wh."):
            parent = _resolve_parent(root, parts, lname, m.name, create=False)
            if parent is None:  # whiting out something no lower layer has
                continue
            if base == ".wh..wh..opq":
                for child in os.listdir(parent):
                    if (*parts[:-1], child) not in made:
                        _remove_entry(parent / child)
            else:
                target = base[len(".wh.") :]
                if target in ("", ".", ".."):
                    raise Traversal(f"layer {lname}: bad whiteout {m.name!r} (path traversal)")
                if (*parts[:-1], target) not in made and os.path.lexists(parent / target):
                    _remove_entry(parent / target)
            continue
        parent = _resolve_parent(root, parts, lname, m.name)
        assert parent is not None
        path = parent / base
        made.add(parts)
        exists = os.path.lexists(path)
        if m.isdir():
            if exists and not (path.is_dir() and not path.is_symlink()):
                _remove_entry(path)
                exists = False
            if not exists:
                os.mkdir(path, 0o700)
            dirs.append((path, m))
            continue
        if exists:
            _remove_entry(path)
        if m.isreg():
            budget[0] -= m.size
            if budget[0] < 0:
                raise Traversal(
                    f"layer {lname}: the image unpacks to more than {MAX_IMAGE_BYTES} bytes"
                )
            src = layer.extractfile(m)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                if src is not None:
                    shutil.copyfileobj(src, out, 1 << 20)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            lparts = _layer_path(m.linkname, lname)
            if not lparts:
                raise Traversal(f"layer {lname}: hard link {m.name!r} to the root refused")
            src_parent = _resolve_parent_existing(root, lparts, lname, m)
            src_path = src_parent / lparts[-1]
            try:
                st = os.lstat(src_path)
            except FileNotFoundError:
                raise _Corrupt(
                    f"layer {lname}: hard link {m.name!r} to missing {m.linkname!r}"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise Traversal(f"layer {lname}: hard link {m.name!r} to a directory refused")
            os.link(src_path, path, follow_symlinks=False)
            continue  # a hard link shares its target's inode: no metadata of its own
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(path, 0o600)
        else:
            continue  # GNU sparse/long-name records are resolved by tarfile; others skipped
        _set_meta(path, m)
    for path, m in reversed(dirs):  # children first: setting a dir's mtime last keeps it
        _set_meta(path, m)


def _resolve_parent_existing(
    root: Path, parts: tuple[str, ...], lname: str, m: tarfile.TarInfo
) -> Path:
    """Like _resolve_parent for a hard link's source, but creates nothing."""
    cur = root
    for comp in parts[:-1]:
        nxt = cur / comp
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            raise _Corrupt(
                f"layer {lname}: hard link {m.name!r} to missing {m.linkname!r}"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            raise Traversal(
                f"layer {lname}: hard link {m.name!r} -> {m.linkname!r} goes through a "
                "symlink (path traversal)"
            )
        cur = nxt
    return cur


def _set_meta(path: Path, m: tarfile.TarInfo) -> None:
    is_link = m.issym()
    os.lchown(path, m.uid, m.gid)
    if not is_link:
        os.chmod(path, m.mode & 0o7777)  # after chown: chown clears setuid bits
    with contextlib.suppress(OSError, OverflowError, ValueError):
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


# --------------------------------------------------------------------------- clean


def _max_age_days() -> float:
    try:
        return float(os.environ.get("IGNITION_IMAGE_MAX_AGE_DAYS", IMAGE_MAX_AGE_DAYS))
    except ValueError:
        return float(IMAGE_MAX_AGE_DAYS)


def _entry_lock(entry: Path) -> str:
    """The build lock guarding an entry (a ``.KEY-xxxx`` temp dir: the same KEY's lock)."""
    return "image-" + entry.name.lstrip(".").split("-", 1)[0]


def image_locks() -> tuple[str, ...]:
    """The build locks of every entry under ``images/`` (for clean to try)."""
    d = images_root()
    try:
        return tuple(sorted({_entry_lock(e) for e in d.iterdir()}))
    except OSError:
        return ()


def _stale_reason(entry: Path, meta: dict[str, Any], now: float) -> str | None:
    """Why an image can never be a cache hit again (or has gone unused too long), or None.

    Images have no single current key (any spec may be asked for), so an entry is stale when
    the inputs recorded in its image.json can no longer produce its key (another pipeline
    version or tool version, an OCI archive that is gone), or when no ensure_image touched
    it for IGNITION_IMAGE_MAX_AGE_DAYS (default 30) days.
    """
    if meta.get("pipeline") != IMAGE_PIPELINE_VERSION:
        return f"built by image pipeline {meta.get('pipeline')}, now {IMAGE_PIPELINE_VERSION}"
    for tool, args in (("mmdebstrap", ("--version",)), ("mke2fs", ("-V",))):
        was = (meta.get("tools") or {}).get(tool)
        if was and shutil.which(tool) and was != _version(tool, args):
            return f"built with {was}, now {_version(tool, args)}"
    archive = meta.get("archive")
    if archive and not os.path.exists(archive):
        return f"its archive {archive} is gone"
    used = None
    for name in (USED_FILE, META_FILE):
        with contextlib.suppress(OSError):
            used = (entry / name).stat().st_mtime
            break
    days = _max_age_days()
    if used is not None and now - used > days * 86400:
        return f"unused for {(now - used) / 86400:.0f} days (more than {days:g})"
    return None


def plan_images(
    level: str,
) -> tuple[list[tuple[Path, str, tuple[str, ...]]], list[tuple[Path, str]]]:
    """(remove, keep) for the entries under ``images/``: (path, why, locks) / (path, why)."""
    remove: list[tuple[Path, str, tuple[str, ...]]] = []
    keep: list[tuple[Path, str]] = []
    d = images_root()
    now = time.time()
    try:
        items = sorted(d.iterdir())
    except OSError:
        return remove, keep
    for e in items:
        locks = (_entry_lock(e),)
        if e.name.startswith("."):
            remove.append((e, "leftover of an interrupted image build", locks))
            continue
        if level in ("all", "everything"):
            remove.append((e, f"image (--{level})", locks))
            continue
        try:
            meta = json.loads((e / META_FILE).read_text())
            if not isinstance(meta, dict):
                raise ValueError
        except (OSError, ValueError):
            remove.append((e, "incomplete image (no image.json)", locks))
            continue
        why = _stale_reason(e, meta, now)
        label = meta.get("spec", "?") + (
            f" +{','.join(meta['packages'])}" if meta.get("packages") else ""
        )
        if why is not None:
            remove.append((e, f"stale image {label}: {why}", locks))
        else:
            keep.append((e, f"image {label}; --all removes it"))
    return remove, keep


def main_image(argv_spec: str, packages: str, arch: str, quiet: bool) -> int:
    """``python -m pytest_ignition.guest image``: build or find, print the path."""

    def progress(msg: str) -> None:
        if not quiet:
            print(f"[ignition image] {msg}", file=sys.stderr, flush=True)

    img = ensure_image(argv_spec, packages, arch, progress)  # type: ignore[arg-type]
    print(img.path)
    return 0


def _unpack_main(argv: list[str]) -> int:
    """``python -m pytest_ignition.guest.image unpack ARCHIVE ROOT ARCH LABEL OUT``: run by
    ``_unpack_under_fakeroot``; the result goes to OUT as JSON, an error to stderr."""
    archive, root, arch, label, out = argv
    try:
        info = unpack_oci(Path(archive), Path(root), arch, label=label)
    except ImageBuildError as e:
        print(f"ImageBuildError: {e}", file=sys.stderr)
        return 2
    Path(out).write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["unpack"]:
        sys.exit(_unpack_main(sys.argv[2:]))
    sys.exit(
        "usage: python -m pytest_ignition.guest image SPEC (this module's own entry "
        "point is internal)"
    )
