"""The guest image pipeline: kernel (guest and nested-host flavours) and initramfs.

Inputs live in the repo's ``guest/`` (checkout) or ``pytest_ignition/_guest_src`` (wheel).
Outputs are cached under ``cache_dir()`` keyed by a hash of every input; builds run under a
file lock (one build across pytest-xdist workers) into a temp dir that is renamed into place,
so an interrupted build leaves nothing half-written behind.

Layout of the cache::

    src/<srckey>/linux-*/          extracted kernel tree (shared by every flavour)
    build/<flavour>-<srckey>/      out-of-tree object dir (kept: a fragment tweak rebuilds fast)
    guest/<key>/{bzImage,vmlinux,config,build.log}
    host/<key>/{bzImage,config,build.log}
    guest_aarch64/<key>/{Image,config,build.log}   arm64 guest, cross-built
    initrd-<key>.cpio.gz                           x86_64 initramfs
    initrd-aarch64-<key>.cpio.gz                   arm64 initramfs (busybox + agent for arm64)
    tools/busybox-aarch64/busybox                  Debian's busybox-static:arm64, downloaded
    locks/*.lock

Two guest architectures: ``x86_64`` (the host's tools) and ``aarch64`` (cross-built with
``gcc-aarch64-linux-gnu``; the agent with ``aarch64-linux-musl-gcc`` from ``musl-dev:arm64``;
busybox taken from ``busybox-static:arm64`` by ``apt-get download`` + ``dpkg-deb -x``, because a
multiarch install of it would replace the host's amd64 busybox). A flavour's architecture is
its ``_aarch64`` suffix (:func:`flavour_arch`); flavour names never contain ``-``.

``clean_cache`` (``python -m pytest_ignition.guest clean``) removes what the current inputs
would not use, under the same locks.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from . import kconfig

# Bump when the pipeline's own behaviour changes in a way that affects outputs (separately,
# so an initramfs change never forces a kernel rebuild).
KERNEL_PIPELINE_VERSION = "1"
INITRD_PIPELINE_VERSION = "2"

DEFAULT_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX = Path("/bin/busybox")
PROGRESS_INTERVAL = 10.0
LOG_TAIL_LINES = 40

# tool -> Debian package that provides it
KERNEL_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "xz": "xz-utils",
    "tar": "tar",
    "perl": "perl",
}
INITRD_TOOLS = {"musl-gcc": "musl-tools"}
ARM64_MULTIARCH = "after: dpkg --add-architecture arm64 && apt-get update"
INITRD_TOOLS_AARCH64 = {"aarch64-linux-musl-gcc": f"musl-dev:arm64 ({ARM64_MULTIARCH})"}
# The musl specs pass -nostdinc: the agent's <linux/vm_sockets.h> comes from these.
ARM64_KERNEL_HEADERS = Path("/usr/aarch64-linux-gnu/include")
ARM64_HEADERS_PKG = "linux-libc-dev-arm64-cross"
ARCHES = ("x86_64", "aarch64")
# header -> Debian package (objtool, built for every x86_64 kernel, needs libelf)
KERNEL_HEADERS = {"gelf.h": "libelf-dev"}

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class KernelArch:
    """How to build a kernel for one architecture (``make ARCH=...``, output file)."""

    make_arch: str
    cross_compile: str  # CROSS_COMPILE= prefix, "" for a native build
    image: str  # the boot image, relative to the build dir
    image_name: str  # its name in the cache
    cc: str  # the compiler whose version is part of the key
    tools: dict[str, str]  # extra tool -> Debian package
    headers: dict[str, str]  # host headers the build needs -> Debian package


KERNEL_ARCHES = {
    # objtool, built for every x86_64 kernel, needs libelf
    "x86_64": KernelArch(
        "x86_64", "", "arch/x86/boot/bzImage", "bzImage", "gcc", {}, KERNEL_HEADERS
    ),
    "aarch64": KernelArch(
        "arm64",
        "aarch64-linux-gnu-",
        "arch/arm64/boot/Image",
        "Image",
        "aarch64-linux-gnu-gcc",
        {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"},
        {},
    ),
}


def flavour_arch(flavour: str) -> str:
    """``guest``/``host`` build x86_64 kernels; ``<name>_aarch64`` arm64 ones."""
    return "aarch64" if flavour.endswith("_aarch64") else "x86_64"


def _check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise GuestBuildError(f"unknown guest architecture {arch!r} (choose {' or '.join(ARCHES)})")
    return arch


class GuestBuildError(Exception):
    """A build step failed; the message names the missing package or the step and its log."""


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """``$IGNITION_CACHE_DIR`` or ``~/.cache/pytest-ignition``."""
    env = os.environ.get("IGNITION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pytest-ignition"


def guest_src_dir() -> Path:
    """The ``guest/`` input tree: the checkout's, else the copy shipped in the wheel."""
    pkg = Path(__file__).resolve().parent.parent
    checkout = pkg.parent / "guest"
    if (checkout / "kernel" / "x86_64.config").is_file():
        return checkout
    shipped = pkg / "_guest_src"
    if (shipped / "kernel" / "x86_64.config").is_file():
        return shipped
    raise GuestBuildError(f"guest sources not found (looked in {checkout} and {shipped})")


def _emit(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def _lock_path(name: str) -> Path:
    return cache_dir() / "locks" / f"{name}.lock"


@contextmanager
def _lock(name: str, progress: Progress) -> Iterator[None]:
    """Hold ``locks/<name>.lock``, saying so when another process holds it first."""
    path = _lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _emit(progress, f"waiting for another process building {name} ({lock.lock_file})")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- tools


def require_tools(tools: dict[str, str], headers: dict[str, str] | None = None) -> None:
    """Raise GuestBuildError naming the Debian packages for every missing tool or header."""
    missing = {t: pkg for t, pkg in tools.items() if shutil.which(t) is None}
    for h, pkg in (headers or {}).items():
        if not any((Path(d) / h).is_file() for d in ("/usr/include", "/usr/local/include")):
            missing[h] = pkg
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise GuestBuildError(
            f"missing build tools: {', '.join(sorted(missing))} "
            f"(install with: apt-get install {pkgs})"
        )


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        return f"{tool}:absent"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return f"{tool}:{out.stdout.splitlines()[0] if out.stdout else out.returncode}"


def _check_static_busybox(path: Path) -> bytes:
    if not path.is_file():
        raise GuestBuildError(
            f"{path} not found: the initramfs needs a static busybox "
            "(install with: apt-get install busybox-static)"
        )
    data = path.read_bytes()
    if _elf_has_interp(data):
        raise GuestBuildError(
            f"{path} is dynamically linked: install the static one (apt-get install busybox-static)"
        )
    return data


def _elf_has_interp(data: bytes) -> bool:
    """True when a 64-bit little-endian ELF has a PT_INTERP segment (dynamically linked)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            break
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return True
    return False


# --------------------------------------------------------------------------- kernel source


def _source_identity(kernel_source: Path | None) -> tuple[str, Path | None]:
    """Cheap identity of the kernel source (no hashing of the 138 MB tarball).

    Returns (identity, tree) where tree is the directory to build from, or None when the
    tarball still has to be extracted.
    """
    if kernel_source is None:
        if not DEFAULT_TARBALL.is_file():
            raise GuestBuildError(
                f"{DEFAULT_TARBALL} not found (install with: apt-get install linux-source-6.1), "
                "or pass --kernel-source DIR"
            )
        st = DEFAULT_TARBALL.stat()
        return f"tar:{DEFAULT_TARBALL}:{st.st_size}:{st.st_mtime_ns}", None
    src = Path(kernel_source).resolve()
    if src.is_file():
        st = src.stat()
        return f"tar:{src}:{st.st_size}:{st.st_mtime_ns}", None
    if not (src / "Makefile").is_file() or not (src / "Kconfig").is_file():
        raise GuestBuildError(f"{src} is not a kernel source tree (no Makefile/Kconfig)")
    ident = f"tree:{src}"
    if (src / ".git").exists():
        out = subprocess.run(
            ["git", "-C", str(src), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            check=False,
        )
        ident += f":git:{out.stdout.strip()}"
    else:
        st = (src / "Makefile").stat()
        ident += f":{st.st_mtime_ns}"
    return ident, src


def _srckey(ident: str) -> str:
    """Names the extracted tree ``src/<srckey>`` and the object dirs ``build/<flavour>-<srckey>``."""
    return _sha(ident)


def _tarball_for(kernel_source: Path | None) -> Path:
    return DEFAULT_TARBALL if kernel_source is None else Path(kernel_source).resolve()


def _extracted_tree(kernel_source: Path | None, ident: str, progress: Progress) -> Path:
    """Extract the tarball once into the cache (under a lock) and return the tree."""
    root = cache_dir() / "src" / _srckey(ident)
    done = root / ".complete"
    if not done.exists():
        with _lock("src", progress):
            if not done.exists():
                tarball = _tarball_for(kernel_source)
                require_tools({"tar": "tar", "xz": "xz-utils"})
                root.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root.parent))
                _emit(progress, f"extracting {tarball} ...")
                t0 = time.monotonic()
                try:
                    r = subprocess.run(
                        ["nice", "tar", "-xf", str(tarball), "-C", str(tmp)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                except BaseException:  # Ctrl-C: leave no half-extracted tree behind
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                if r.returncode != 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise GuestBuildError(f"extracting {tarball} failed: {r.stderr.strip()}")
                (tmp / ".complete").write_text(ident + "\n")
                if root.exists():
                    shutil.rmtree(root)
                os.rename(tmp, root)
                _emit(progress, f"extracted in {time.monotonic() - t0:.0f}s")
    trees = [p for p in root.iterdir() if p.is_dir() and (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise GuestBuildError(f"unexpected layout in extracted kernel source {root}")
    return trees[0]


# --------------------------------------------------------------------------- kernel build


def kernel_key(flavour: str, fragment: str, ident: str) -> str:
    """Hash of every input of a kernel build (the compiler is the flavour's: cross for arm64)."""
    return _sha(
        "kernel",
        KERNEL_PIPELINE_VERSION,
        flavour,
        fragment,
        ident,
        _tool_version(KERNEL_ARCHES[flavour_arch(flavour)].cc),
        _tool_version("make"),
    )


def _run_logged(
    cmd: list[str], log: Path, step: str, progress: Progress, *, cwd: Path | None = None
) -> None:
    """Run a (niced) command appending to ``log``; progress every PROGRESS_INTERVAL seconds."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            ["nice", "-n", "10", *cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=cwd
        )
        try:
            while True:
                try:
                    rc = proc.wait(timeout=PROGRESS_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    objs = _count_objects(log)
                    _emit(
                        progress,
                        f"{step}: {objs} objects compiled, {time.monotonic() - t0:.0f}s elapsed",
                    )
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        raise GuestBuildError(f"{step} failed (exit {rc}); log: {log}\n--- log tail ---\n{tail}")


_CC_LINE = re.compile(rb"^\s+(CC|AS)\s", re.M)


def _count_objects(log: Path) -> int:
    try:
        return len(_CC_LINE.findall(log.read_bytes()))
    except OSError:
        return 0


def build_kernel(
    flavour: str,
    fragment_path: Path,
    kernel_source: Path | None,
    *,
    want_vmlinux: bool,
    progress: Progress = None,
) -> tuple[Path, str]:
    """Build (or find) one kernel flavour; returns (output dir, key).

    ``want_vmlinux`` also keeps the ELF ``vmlinux`` (x86_64: the PVH entry). arm64 builds
    the uncompressed ``Image``, which VMMs enter directly.
    """
    if not fragment_path.is_file():
        raise GuestBuildError(f"kernel config fragment {fragment_path} not found")
    fragment = fragment_path.read_text()
    kconfig.parse(fragment, strict=True)  # fail early on a typo
    ident, tree = _source_identity(kernel_source)
    key = kernel_key(flavour, fragment, ident)
    out = cache_dir() / flavour / key
    if (out / "config").is_file():
        return out, key
    ka = KERNEL_ARCHES[flavour_arch(flavour)]
    require_tools({**KERNEL_TOOLS, **ka.tools}, ka.headers)
    want_vmlinux = want_vmlinux and ka.make_arch == "x86_64"
    with _lock(f"kernel-{flavour}", progress):
        if (out / "config").is_file():  # another process built it while we waited
            return out, key
        if tree is None:
            tree = _extracted_tree(kernel_source, ident, progress)
        if (tree / ".config").exists() or (tree / "include" / "config").exists():
            raise GuestBuildError(
                f"{tree} is not clean (has a .config): run 'make mrproper' there, "
                "the pipeline builds out of tree"
            )
        builddir = cache_dir() / "build" / f"{flavour}-{_srckey(ident)}"
        builddir.mkdir(parents=True, exist_ok=True)
        log = builddir / "build.log"
        log.write_text(f"# {flavour} kernel, key {key}, source {ident}\n")
        make = ["make", "-C", str(tree), f"O={builddir}", f"ARCH={ka.make_arch}"]
        if ka.cross_compile:
            make.append(f"CROSS_COMPILE={ka.cross_compile}")
        t0 = time.monotonic()
        _emit(progress, f"{flavour} kernel: configuring (tinyconfig + {fragment_path.name})")
        _run_logged([*make, "tinyconfig"], log, "make tinyconfig", progress)
        cfg = builddir / ".config"
        cfg.write_text(kconfig.merge(cfg.read_text(), fragment))
        _run_logged([*make, "olddefconfig"], log, "make olddefconfig", progress)
        bad = kconfig.verify(fragment, cfg.read_text())
        if bad:
            raise GuestBuildError(
                f"{fragment_path}: {len(bad)} option(s) did not survive olddefconfig "
                "(a dependency is missing from the fragment):\n  "
                + "\n  ".join(str(b) for b in bad)
                + f"\nfinal config: {cfg}"
            )
        targets = [ka.image_name, "vmlinux"] if want_vmlinux else [ka.image_name]
        jobs = str(os.cpu_count() or 1)
        _emit(progress, f"{flavour} kernel: compiling ({' '.join(targets)}, -j{jobs})")
        _run_logged([*make, f"-j{jobs}", *targets], log, f"{flavour} kernel build", progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the kernel from other users
        try:
            shutil.copy2(builddir / ka.image, tmp / ka.image_name)
            if want_vmlinux:
                shutil.copy2(builddir / "vmlinux", tmp / "vmlinux")
            shutil.copy2(log, tmp / "build.log")
            shutil.copy2(cfg, tmp / "config")  # last: its presence marks a complete output
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _emit(progress, f"{flavour} kernel built in {time.monotonic() - t0:.0f}s: {out}")
    return out, key


def current_kernel_key(flavour: str, fragment_path: Path, kernel_source: Path | None = None) -> str:
    """The key ``build_kernel`` would use for these inputs; never builds nor extracts.

    Raises GuestBuildError (saying why) when an input is missing.
    """
    try:
        fragment = fragment_path.read_text()
    except OSError as e:
        raise GuestBuildError(f"kernel config fragment {fragment_path}: {e.strerror}") from None
    ident, _ = _source_identity(kernel_source)
    return kernel_key(flavour, fragment, ident)


def current_source_key(kernel_source: Path | None = None) -> str:
    """The ``<srckey>`` of ``src/<srckey>`` and ``build/<flavour>-<srckey>`` for this source."""
    return _srckey(_source_identity(kernel_source)[0])


def find_kernel(
    flavour: str, fragment_path: Path, kernel_source: Path | None = None
) -> Path | None:
    """The cached kernel output dir for these inputs, or None (never builds)."""
    try:
        key = current_kernel_key(flavour, fragment_path, kernel_source)
    except GuestBuildError:
        return None
    out = cache_dir() / flavour / key
    return out if (out / "config").is_file() else None


# --------------------------------------------------------------------------- initramfs


def _agent_sources(src: Path) -> list[Path]:
    agent = src / "agent"
    if not agent.is_dir():
        return []
    return sorted(p for p in agent.iterdir() if p.suffix in (".c", ".h") and p.is_file())


def _init_files(src: Path) -> list[Path]:
    init = src / "init"
    return sorted(p for p in init.rglob("*") if p.is_file()) if init.is_dir() else []


def initrd_key(src: Path, busybox: bytes, arch: str = "x86_64") -> str:
    parts: list[str | bytes] = ["initrd", INITRD_PIPELINE_VERSION]
    if arch != "x86_64":  # (x86_64 keys stay what they were before arm64 existed)
        parts.append(arch)
    parts.append(hashlib.sha256(busybox).hexdigest())
    for p in _init_files(src) + _agent_sources(src):
        parts += [str(p.relative_to(src)), p.read_bytes()]
    if any(p.suffix == ".c" for p in _agent_sources(src)):
        if arch == "x86_64":
            parts.append(_tool_version("gcc"))
            parts.append(str(Path(shutil.which("musl-gcc") or "musl-gcc")))
        else:
            parts.append(_tool_version("aarch64-linux-gnu-gcc"))
            parts.append(str(Path(shutil.which("aarch64-linux-musl-gcc") or "absent")))
    return _sha(*parts)


def initrd_name(key: str, arch: str = "x86_64") -> str:
    """``initrd-<key>.cpio.gz`` (x86_64) or ``initrd-<arch>-<key>.cpio.gz``."""
    return f"initrd-{key}.cpio.gz" if arch == "x86_64" else f"initrd-{arch}-{key}.cpio.gz"


# busybox keeps its applet names as one sorted NUL-separated table that starts with "[" "[[".
_APPLET_TABLE = b"[\0[[\0"


def applet_names(busybox: bytes) -> list[str]:
    """The applet names compiled into a busybox binary, read from its name table.

    For a busybox that cannot run here (another architecture). Raises GuestBuildError when
    the table is not found.
    """
    start = busybox.find(_APPLET_TABLE)
    if start < 0:
        raise GuestBuildError("no applet name table in this busybox binary")
    names: list[str] = []
    pos = start
    while True:
        end = busybox.find(b"\0", pos)
        name = busybox[pos:end] if end > 0 else b""
        if not name or len(name) > 64 or not all(0x21 <= c < 0x7F and c != 0x2F for c in name):
            break
        names.append(name.decode())
        pos = end + 1
    if len(names) < 10 or names != sorted(names):
        raise GuestBuildError(f"busybox applet table looks wrong ({len(names)} names)")
    return names


def _busybox_applets(busybox: Path, arch: str = "x86_64") -> list[str]:
    """Full paths of the applets (``/bin/sh``, ...) for the initramfs's symlinks."""
    if arch == "x86_64":
        r = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            raise GuestBuildError(f"{busybox} --list-full failed: {r.stderr.strip()}")
        return sorted(a.strip() for a in r.stdout.splitlines() if a.strip() and ".." not in a)
    # A foreign busybox cannot say where its applets go: take the host busybox's places for
    # the names it knows (Debian builds both from one config), /bin for the rest.
    places: dict[str, str] = {}
    if BUSYBOX.is_file():
        for full in _busybox_applets(BUSYBOX):
            places[full.rsplit("/", 1)[-1]] = full
    return sorted(places.get(n, f"bin/{n}") for n in applet_names(busybox.read_bytes()))


def _compile_agent(
    src: Path, out: Path, log: Path, progress: Progress, arch: str = "x86_64"
) -> bool:
    """Compile the agent; False (with a warning) while its C sources do not exist yet."""
    sources = [p for p in _agent_sources(src) if p.suffix == ".c"]
    if not sources:
        _emit(progress, f"WARNING: no agent sources in {src / 'agent'}; initramfs without agent")
        return False
    if arch == "x86_64":
        require_tools(INITRD_TOOLS)
        cmd = ["musl-gcc", "-static", "-Os", "-o", str(out), *map(str, sources)]
        _run_logged(cmd, log, "agent compile (musl-gcc)", progress)
        return True
    require_tools(INITRD_TOOLS_AARCH64)
    # musl's specs use -nostdinc, so the kernel's uapi headers come in by -isystem, through a
    # directory holding only linux/ asm/ asm-generic/ (the cross glibc headers must not).
    kinc = out.parent / "kinc"
    kinc.mkdir(exist_ok=True)
    for d in ("linux", "asm", "asm-generic"):
        if not (ARM64_KERNEL_HEADERS / d).is_dir():
            raise GuestBuildError(
                f"{ARM64_KERNEL_HEADERS / d} not found: the arm64 agent needs the kernel headers "
                f"(install with: apt-get install {ARM64_HEADERS_PKG})"
            )
        link = kinc / d
        if not link.is_symlink():
            link.symlink_to(ARM64_KERNEL_HEADERS / d)
    cmd = ["aarch64-linux-musl-gcc", "-static", "-Os", "-isystem", str(kinc)]
    cmd += ["-o", str(out), *map(str, sources)]
    _run_logged(cmd, log, "agent compile (aarch64-linux-musl-gcc)", progress)
    return True


def _elf_machine(data: bytes) -> int | None:
    """e_machine of an ELF (62 x86-64, 183 AArch64), None when not an ELF."""
    if data[:4] != b"\x7fELF" or len(data) < 20:
        return None
    return int.from_bytes(data[18:20], "little")


_ELF_MACHINE = {"x86_64": 62, "aarch64": 183}


def _busybox_aarch64_fetch_dir() -> Path:
    return cache_dir() / "tools" / "busybox-aarch64"


def find_busybox(arch: str = "x86_64") -> Path | None:
    """The static busybox for ``arch`` if it is at hand; never downloads.

    x86_64: ``/bin/busybox``. aarch64: ``$IGNITION_BUSYBOX_AARCH64``, else the copy
    ``fetch_busybox`` downloaded into the cache.
    """
    if arch == "x86_64":
        return BUSYBOX if BUSYBOX.is_file() else None
    env = os.environ.get("IGNITION_BUSYBOX_AARCH64")
    if env:
        return Path(env)
    got = _busybox_aarch64_fetch_dir() / "busybox"
    return got if got.is_file() else None


def fetch_busybox(arch: str, progress: Progress) -> Path:
    """The static busybox for ``arch``; an arm64 one is downloaded from Debian once.

    ``apt-get download busybox-static:arm64`` + ``dpkg-deb -x``: installing the package
    through multiarch would remove the host's amd64 busybox (they conflict).
    """
    found = find_busybox(arch)
    if found is not None:
        return found
    require_tools({"apt-get": "apt", "dpkg-deb": "dpkg"})
    dest = _busybox_aarch64_fetch_dir()
    with _lock("initrd", progress):
        if (dest / "busybox").is_file():
            return dest / "busybox"
        dest.parent.mkdir(parents=True, exist_ok=True)
        _emit(progress, "downloading busybox-static:arm64 from Debian (apt-get download)")
        with tempfile.TemporaryDirectory(prefix=".busybox-", dir=dest.parent) as tmpd:
            tmp = Path(tmpd)
            tmp.chmod(0o755)  # apt's _apt user writes here
            r = subprocess.run(
                ["apt-get", "download", "-q", "busybox-static:arm64"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            debs = sorted(tmp.glob("busybox-static_*_arm64.deb"))
            if r.returncode != 0 or not debs:
                raise GuestBuildError(
                    "apt-get download busybox-static:arm64 failed "
                    f"({ARM64_MULTIARCH}; or set IGNITION_BUSYBOX_AARCH64 to a static arm64 "
                    f"busybox): {(r.stderr or r.stdout).strip()[-500:]}"
                )
            x = subprocess.run(
                ["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if x.returncode != 0 or not (tmp / "x" / "bin" / "busybox").is_file():
                raise GuestBuildError(f"dpkg-deb -x {debs[0].name} failed: {x.stderr.strip()}")
            out = tmp / "out"
            out.mkdir()
            shutil.copy2(tmp / "x" / "bin" / "busybox", out / "busybox")
            (out / "SOURCE").write_text(debs[0].name + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(out, dest)
    return dest / "busybox"


def _check_busybox(path: Path, arch: str) -> bytes:
    """The bytes of a static busybox for ``arch``; GuestBuildError says what is wrong."""
    if arch == "x86_64":
        return _check_static_busybox(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GuestBuildError(f"arm64 busybox {path}: {e.strerror}") from None
    if _elf_machine(data) != _ELF_MACHINE[arch] or _elf_has_interp(data):
        raise GuestBuildError(f"{path} is not a static {arch} busybox")
    return data


class _Cpio:
    """Deterministic newc cpio writer (mtime 0, root-owned, sequential inode numbers)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        nameb = name.encode() + b"\0"
        fields = [
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0,
        ]  # fmt: skip
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


AGENT_INITTAB_MARK = "/sbin/ignition-agent"


def make_initrd_bytes(
    src: Path, busybox: Path, agent: Path | None, applets: list[str] | None = None
) -> bytes:
    """The gzip'd newc cpio image (deterministic for the same inputs).

    ``applets`` are the full paths to link to busybox (default: what it lists itself).
    """
    init = src / "init"
    entries: dict[str, tuple[str, object]] = {}

    def add_dirs(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), ("dir", 0o755))

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/init.d", "dev", "proc", "sys",
              "tmp", "run", "root", "mnt", "rootfs", "var"):  # fmt: skip
        add_dirs(d + "/x")
    entries["tmp"] = ("dir", 0o1777)
    entries["root"] = ("dir", 0o700)
    entries["bin/busybox"] = ("file", (busybox.read_bytes(), 0o755))
    for applet in applets if applets is not None else _busybox_applets(busybox):
        rel = applet.lstrip("/")
        if rel in entries or rel == "bin/busybox":
            continue
        add_dirs(rel)
        entries[rel] = ("symlink", "/bin/busybox")
    entries["init"] = ("symlink", "/bin/busybox")  # busybox init, found as argv[0] "init"
    for p in _init_files(src):
        rel = p.relative_to(init).as_posix()
        data = p.read_bytes()
        if rel == "etc/inittab" and agent is None:
            # no agent yet: do not let init respawn a missing binary in a tight loop
            data = b"".join(
                b"# (agent not built) " + ln if AGENT_INITTAB_MARK.encode() in ln else ln
                for ln in data.splitlines(keepends=True)
            )
        perm = 0o755 if os.access(p, os.X_OK) or rel.startswith("etc/init.d/") else 0o644
        add_dirs(rel)
        entries[rel] = ("file", (data, perm))
    if agent is not None:
        entries["sbin/ignition-agent"] = ("file", (agent.read_bytes(), 0o755))
    # The kernel opens /dev/console before anything mounts devtmpfs.
    entries["dev/console"] = ("chardev", (5, 1, 0o600))
    entries["dev/null"] = ("chardev", (1, 3, 0o666))
    cpio = _Cpio()
    cpio.dir(".")
    for name in sorted(entries):  # sorted: every directory precedes its contents
        kind, val = entries[name]
        if kind == "chardev":
            major, minor, perm = val  # type: ignore[misc]
            cpio.chardev(name, major, minor, perm)
        elif kind == "dir":
            cpio.dir(name, val)  # type: ignore[arg-type]
        elif kind == "symlink":
            cpio.symlink(name, val)  # type: ignore[arg-type]
        else:
            data, perm = val  # type: ignore[misc]
            cpio.file(name, data, perm)
    raw = cpio.finish()
    return gzip.compress(raw, compresslevel=9, mtime=0)


def build_initrd(progress: Progress = None, arch: str = "x86_64") -> tuple[Path, str]:
    """Build (or find) the initramfs for ``arch``; returns (path, key)."""
    _check_arch(arch)
    src = guest_src_dir()
    busybox = _check_busybox(fetch_busybox(arch, progress) if arch != "x86_64" else BUSYBOX, arch)
    key = initrd_key(src, busybox, arch)
    out = cache_dir() / initrd_name(key, arch)
    if out.is_file():
        return out, key
    with _lock("initrd", progress):
        if out.is_file():
            return out, key
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".initrd-", dir=cache_dir()) as tmpd:
            tmp = Path(tmpd)
            # Build from a snapshot of the inputs, keyed by that snapshot: a source edited
            # mid-build (the agent, by its author) cannot end up under a stale key.
            snap = tmp / "guest"
            shutil.copytree(src, snap, ignore=shutil.ignore_patterns("kernel"))
            bb = tmp / "busybox"
            bb.write_bytes(busybox)
            bb.chmod(0o755)
            key = initrd_key(snap, busybox, arch)
            out = cache_dir() / initrd_name(key, arch)
            if out.is_file():
                return out, key
            log = tmp / "build.log"
            agent: Path | None = tmp / "ignition-agent"
            try:
                if not _compile_agent(snap, agent, log, progress, arch):
                    agent = None
            except GuestBuildError as e:
                kept = cache_dir() / "initrd-failed.log"
                shutil.copy2(log, kept)  # the temp dir goes away; keep the log
                raise GuestBuildError(str(e).replace(str(log), str(kept))) from None
            data = make_initrd_bytes(snap, bb, agent, _busybox_applets(bb, arch))
            part = tmp / "initrd.cpio.gz"
            part.write_bytes(data)
            os.rename(part, out)
        _emit(progress, f"initramfs built in {time.monotonic() - t0:.1f}s: {out}")
    return out, key


def current_initrd_key(arch: str = "x86_64") -> str:
    """The key ``build_initrd`` would use now; never builds. GuestBuildError says why not."""
    src = guest_src_dir()
    path = find_busybox(arch)
    if path is None:
        raise GuestBuildError(
            f"no {arch} busybox yet (python -m pytest_ignition.guest build --arch {arch} "
            "downloads it)"
        )
    try:
        busybox = path.read_bytes()
    except OSError as e:
        raise GuestBuildError(
            f"{path}: {e.strerror} (install with: apt-get install busybox-static)"
        ) from None
    return initrd_key(src, busybox, arch)


def find_initrd(arch: str = "x86_64") -> tuple[Path, str] | None:
    try:
        key = current_initrd_key(arch)
    except GuestBuildError:
        return None
    out = cache_dir() / initrd_name(key, arch)
    return (out, key) if out.is_file() else None


# --------------------------------------------------------------------------- clean

CLEAN_LEVELS = ("stale", "all", "everything")
_INITRD_NAME = re.compile(r"initrd-([0-9a-f]{20})\.cpio\.gz")
_INITRD_ARCH_NAME = re.compile(r"initrd-(aarch64)-([0-9a-f]{20})\.cpio\.gz")
TOOLS_DIR = "tools"  # downloaded inputs (the arm64 busybox), guarded by the initrd lock
FAILED_INITRD_LOG = "initrd-failed.log"
_CLEAN_PREFIX = ".clean-"  # a directory clean renamed before deleting it (an interrupted clean)


@dataclass(frozen=True)
class CleanItem:
    """A cache entry (file or tree) to remove and the build locks that guard it."""

    path: Path
    why: str
    locks: tuple[str, ...]


@dataclass
class CleanPlan:
    """What ``clean`` would remove, what it keeps (and why), and what it could not decide."""

    remove: list[CleanItem] = field(default_factory=list)
    keep: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_clean(
    fragments: dict[str, str], level: str = "stale", kernel_source: Path | None = None
) -> CleanPlan:
    """Sort the entries of an existing ``cache_dir()`` into remove and keep; removes nothing.

    ``fragments`` maps each kernel flavour to its fragment under ``guest_src_dir()``. The
    current keys come from the same functions the builders use, without building or
    extracting anything. Whatever a key cannot be computed for is kept, with a note saying why.
    """
    if level not in CLEAN_LEVELS:
        raise ValueError(f"level must be one of {CLEAN_LEVELS}, not {level!r}")
    root = cache_dir()
    plan = CleanPlan()
    kernel_locks = tuple(f"kernel-{f}" for f in fragments)
    # The builders read the extracted tree while holding only their kernel lock.
    src_locks = ("src", *kernel_locks)
    entries = sorted(root.iterdir())

    if level == "everything":
        for e in entries:
            if e.name == "locks":
                continue
            if e.name == "images" and e.is_dir():
                _plan_images(plan, level)
                continue
            if e.name == "snapshots" and e.is_dir():
                _plan_snapshots(plan, level)
                continue
            if e.name in fragments:
                locks: tuple[str, ...] = (f"kernel-{e.name}",)
            elif e.name == "src" or e.name.startswith(_CLEAN_PREFIX):
                locks = src_locks
            elif e.name == "build":
                locks = kernel_locks
            elif (
                _INITRD_NAME.fullmatch(e.name)
                or _INITRD_ARCH_NAME.fullmatch(e.name)
                or e.name.startswith(".initrd-")
                or e.name == TOOLS_DIR
            ):
                locks = ("initrd",)
            elif e.name == FAILED_INITRD_LOG:
                locks = ("initrd",)
            else:
                # IGNITION_CACHE_DIR may point at a shared directory: only our own entries go.
                plan.keep.append((e, "not made by the guest pipeline: left alone"))
                continue
            plan.remove.append(CleanItem(e, "--everything", locks))
        if (root / "locks").exists():
            # A builder blocked on a lock file we deleted would lock the orphaned inode while
            # the next builder creates a new file: two builds at once. The files are empty.
            plan.keep.append(
                (root / "locks", "build lock files (empty; a waiting build needs them)")
            )
        return plan

    full = level == "all"
    try:
        ident: str | None = _source_identity(kernel_source)[0]
    except GuestBuildError as e:
        ident = None
        plan.notes.append(
            f"kernel source: {e}; keeping every kernel, kernel source tree and build tree"
        )
    kkeys: dict[str, str | None] = {}
    for flavour, rel in fragments.items():
        kkeys[flavour] = None
        if ident is None:
            continue
        try:
            fragment = (guest_src_dir() / rel).read_text()
        except (OSError, GuestBuildError) as e:
            why = e.strerror if isinstance(e, OSError) else str(e)
            plan.notes.append(
                f"{flavour} kernel fragment {rel}: {why}; keeping every {flavour} kernel"
            )
            continue
        kkeys[flavour] = kernel_key(flavour, fragment, ident)
    srckey = None if ident is None else _srckey(ident)
    try:
        ikey: str | None = current_initrd_key()
    except (OSError, GuestBuildError) as e:
        ikey = None
        plan.notes.append(f"initramfs key unknown ({e}); keeping every initramfs")
    # Other architectures' initramfs keys: unknown until their busybox was fetched.
    akeys: dict[str, str | None] = {}
    for arch in ARCHES[1:]:
        try:
            akeys[arch] = current_initrd_key(arch)
        except (OSError, GuestBuildError):
            akeys[arch] = None

    def rm(path: Path, why: str, locks: tuple[str, ...]) -> None:
        plan.remove.append(CleanItem(path, why, locks))

    def keep(path: Path, why: str) -> None:
        plan.keep.append((path, why))

    initrds = [
        e for e in entries if _INITRD_NAME.fullmatch(e.name) or _INITRD_ARCH_NAME.fullmatch(e.name)
    ]
    for e in entries:
        name = e.name
        if name == "locks":
            continue
        if name in fragments and e.is_dir():
            _plan_kernels(plan, e, name, kkeys[name])
        elif name == "images" and e.is_dir():
            _plan_images(plan, level)
        elif name == "snapshots" and e.is_dir():
            _plan_snapshots(plan, level)
        elif name == "src" and e.is_dir():
            for t in sorted(e.iterdir()):
                if t.name.startswith("."):
                    rm(t, "leftover of an interrupted extraction", src_locks)
                elif not (t / ".complete").exists():
                    rm(t, "incomplete kernel source tree", src_locks)
                elif full:
                    rm(t, "kernel source tree (--all)", src_locks)
                elif srckey is None:
                    keep(t, "kernel source unknown")
                elif t.name == srckey:
                    keep(t, "current kernel source tree; --all removes it")
                else:
                    rm(t, "tree of another kernel source", src_locks)
        elif name == "build" and e.is_dir():
            for t in sorted(e.iterdir()):
                flavour, _, key = t.name.partition("-")
                locks = (f"kernel-{flavour}",) if flavour in fragments else kernel_locks
                if t.name.startswith("."):
                    rm(t, "leftover of an interrupted clean", kernel_locks)
                elif full:
                    rm(t, "kernel build tree (--all)", locks)
                elif srckey is None:
                    keep(t, "kernel source unknown")
                elif key == srckey and flavour in fragments:
                    keep(t, f"current {flavour} kernel build tree; --all removes it")
                else:
                    rm(t, "build tree of another kernel source", locks)
        elif m := _INITRD_NAME.fullmatch(name):
            if ikey is None:
                keep(e, "initramfs key unknown")
            elif m[1] == ikey:
                keep(e, "current initramfs")
            else:
                rm(e, "stale initramfs", ("initrd",))
        elif m := _INITRD_ARCH_NAME.fullmatch(name):
            akey = akeys.get(m[1])
            if akey is None:
                keep(e, f"{m[1]} initramfs key unknown (its busybox is not at hand)")
            elif m[2] == akey:
                keep(e, f"current {m[1]} initramfs")
            else:
                rm(e, f"stale {m[1]} initramfs", ("initrd",))
        elif name == TOOLS_DIR and e.is_dir():
            keep(e, "downloaded build inputs (arm64 busybox); --everything removes them")
        elif name == FAILED_INITRD_LOG:
            # Only the log of the latest failure is worth keeping.
            newest = max((i.stat().st_mtime for i in initrds), default=None)
            if full or (newest is not None and e.stat().st_mtime < newest):
                rm(e, "log of an initramfs build failure since fixed", ("initrd",))
            else:
                keep(e, "log of the last initramfs build failure")
        elif name.startswith(".initrd-"):
            rm(e, "leftover of an interrupted initramfs build", ("initrd",))
        elif name.startswith(_CLEAN_PREFIX):
            rm(e, "leftover of an interrupted clean", src_locks)
        else:
            keep(e, "not made by the guest pipeline: left alone")
    if ikey is not None and not (root / f"initrd-{ikey}.cpio.gz").exists():
        plan.notes.append(f"the current initramfs (key {ikey}) is not built yet")
    for flavour, key in kkeys.items():
        if flavour_arch(flavour) != "x86_64" and not (root / flavour).exists():
            continue  # another architecture this cache never built: no news
        if key is not None and not (root / flavour / key / "config").is_file():
            plan.notes.append(f"the current {flavour} kernel (key {key}) is not built yet")
    return plan


def _plan_snapshots(plan: CleanPlan, level: str) -> None:
    """Prepared snapshots kept between runs (``--ignition-reuse``); see ``reuse.plan_snapshots``."""
    from pytest_ignition.reuse import plan_snapshots

    remove, keep = plan_snapshots(level)
    plan.remove += [CleanItem(p, why, locks) for p, why, locks in remove]
    plan.keep += keep


def _plan_images(plan: CleanPlan, level: str) -> None:
    """Root images (``images/<key>``): no current key, so stale means unusable or unused for
    long; see ``image.plan_images``."""
    from .image import plan_images

    remove, keep = plan_images(level)
    plan.remove += [CleanItem(p, why, locks) for p, why, locks in remove]
    plan.keep += keep


def _plan_kernels(plan: CleanPlan, d: Path, flavour: str, key: str | None) -> None:
    locks = (f"kernel-{flavour}",)
    for e in sorted(d.iterdir()):
        if e.name.startswith("."):
            plan.remove.append(CleanItem(e, f"leftover of an interrupted {flavour} build", locks))
        elif key is None:
            plan.keep.append((e, f"{flavour} kernel key unknown"))
        elif e.name != key:
            plan.remove.append(CleanItem(e, f"stale {flavour} kernel", locks))
        elif (e / "config").is_file():
            plan.keep.append((e, f"current {flavour} kernel"))
        else:  # cannot happen through build_kernel (it renames a complete dir into place)
            plan.remove.append(CleanItem(e, f"incomplete {flavour} kernel", locks))


def _usage(path: Path) -> tuple[int, int]:
    """(files, bytes on disk) of a file or a tree; symlinks are not followed."""

    def du(st: os.stat_result) -> int:
        return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size

    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0, 0
    if not stat.S_ISDIR(st.st_mode):
        return 1, du(st)
    files, size = 0, du(st)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            try:
                sub = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            size += du(sub)
            files += not stat.S_ISDIR(sub.st_mode)
    return files, size


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _remove(path: Path) -> None:
    """Delete a file, or a tree after renaming it aside: a tree half-deleted by an interrupted
    clean must never look like a complete entry (``.complete``/``config`` checks) to a build."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    trash = path
    if not path.name.startswith("."):
        trash = path.with_name(f"{_CLEAN_PREFIX}{path.name}-{os.getpid()}")
        os.rename(path, trash)
    shutil.rmtree(trash)


@contextmanager
def _try_locks(names: tuple[str, ...], *, create: bool) -> Iterator[dict[str, str]]:
    """Take each build lock without waiting; yields {name: why} for those it could not take.

    Without ``create`` a missing lock file counts as free and is not created (dry runs).
    """
    busy: dict[str, str] = {}
    held: list[FileLock] = []
    try:
        for name in names:
            path = _lock_path(name)
            if not create and not path.exists():
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock = FileLock(str(path))
                lock.acquire(timeout=0)
            except Timeout:
                busy[name] = "another process holds it: a build, or another clean"
                continue
            except OSError as e:
                busy[name] = f"cannot take {path}: {e.strerror}"
                continue
            held.append(lock)
        yield busy
    finally:
        for lock in reversed(held):
            lock.release()


@dataclass
class CleanResult:
    removed: int = 0  # entries
    files: int = 0
    freed: int = 0
    skipped: int = 0
    failed: int = 0


def clean_cache(
    fragments: dict[str, str],
    level: str = "stale",
    *,
    kernel_source: Path | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
) -> CleanResult:
    """Remove (or with ``dry_run`` list) what ``plan_clean`` picks, under the build locks.

    Each build lock is tried without waiting; the entries a held lock guards are skipped and
    said so. Lines for the user go to ``say``; the caller prints the summary.
    """
    root = cache_dir()
    result = CleanResult()
    from pytest_ignition.reuse import snapshot_locks

    from .image import image_locks

    all_locks = (
        "initrd",
        "src",
        *(f"kernel-{f}" for f in fragments),
        *image_locks(),
        *snapshot_locks(),
    )
    with _try_locks(all_locks, create=not dry_run) as busy:
        plan = plan_clean(fragments, level, kernel_source)
        for name, why in busy.items():
            say(f"note: lock {name}: {why}; skipping what it guards")
        for note in plan.notes:
            say(f"note: {note}")
        for path, why in plan.keep:
            say(f"keep     {_rel(path, root)}  ({why})")
        for item in plan.remove:
            rel = _rel(item.path, root)
            held = [n for n in item.locks if n in busy]
            if held:
                say(f"skip     {rel}  ({item.why}; lock held: {', '.join(held)})")
                result.skipped += 1
                continue
            files, size = _usage(item.path)
            if not dry_run:
                try:
                    _remove(item.path)
                except OSError as e:
                    say(f"FAILED   {rel}: {e}")
                    result.failed += 1
                    continue
            verb = "would rm" if dry_run else "removed "
            say(f"{verb} {rel}  {human_size(size)}  ({item.why})")
            result.removed += 1
            result.files += files
            result.freed += size
    return result


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel + "/" if path.is_dir() and not path.is_symlink() else rel


def main_progress(quiet: bool) -> Progress:
    if quiet:
        return None
    return lambda msg: print(f"[ignition guest] {msg}", file=sys.stderr, flush=True)
