"""The guest image pipeline: kernel (guest and nested-host flavours) and initramfs.

Inputs live in the repo's ``guest/`` (checkout) or ``pytest_ignition/_guest_src`` (wheel).
Outputs are cached under ``cache_dir()`` keyed by a hash of every input; builds run under a
file lock (one build across pytest-xdist workers) into a temp dir that is renamed into place,
so an interrupted build leaves nothing half-written behind.

Layout of the cache::

    src/<srckey>/linux-*/          extracted kernel tree (shared by both flavours)
    build/<flavour>-<srckey>/      out-of-tree object dir (kept: a fragment tweak rebuilds fast)
    guest/<key>/{bzImage,vmlinux,config,build.log}
    host/<key>/{bzImage,config,build.log}
    initrd-<key>.cpio.gz
    locks/*.lock
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
# header -> Debian package (objtool, built for every x86_64 kernel, needs libelf)
KERNEL_HEADERS = {"gelf.h": "libelf-dev"}

Progress = Callable[[str], None] | None


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


@contextmanager
def _lock(name: str, progress: Progress) -> Iterator[None]:
    """Hold ``locks/<name>.lock``, saying so when another process holds it first."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / f"{name}.lock"))
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


def _tarball_for(kernel_source: Path | None) -> Path:
    return DEFAULT_TARBALL if kernel_source is None else Path(kernel_source).resolve()


def _extracted_tree(kernel_source: Path | None, ident: str, progress: Progress) -> Path:
    """Extract the tarball once into the cache (under a lock) and return the tree."""
    root = cache_dir() / "src" / _sha(ident)
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
    """Hash of every input of a kernel build."""
    return _sha(
        "kernel",
        KERNEL_PIPELINE_VERSION,
        flavour,
        fragment,
        ident,
        _tool_version("gcc"),
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
    """Build (or find) one kernel flavour; returns (output dir, key)."""
    if not fragment_path.is_file():
        raise GuestBuildError(f"kernel config fragment {fragment_path} not found")
    fragment = fragment_path.read_text()
    kconfig.parse(fragment, strict=True)  # fail early on a typo
    ident, tree = _source_identity(kernel_source)
    key = kernel_key(flavour, fragment, ident)
    out = cache_dir() / flavour / key
    if (out / "config").is_file():
        return out, key
    require_tools(KERNEL_TOOLS, KERNEL_HEADERS)
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
        builddir = cache_dir() / "build" / f"{flavour}-{_sha(ident)}"
        builddir.mkdir(parents=True, exist_ok=True)
        log = builddir / "build.log"
        log.write_text(f"# {flavour} kernel, key {key}, source {ident}\n")
        make = ["make", "-C", str(tree), f"O={builddir}", "ARCH=x86_64"]
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
        targets = ["bzImage", "vmlinux"] if want_vmlinux else ["bzImage"]
        jobs = str(os.cpu_count() or 1)
        _emit(progress, f"{flavour} kernel: compiling ({' '.join(targets)}, -j{jobs})")
        _run_logged([*make, f"-j{jobs}", *targets], log, f"{flavour} kernel build", progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the kernel from other users
        try:
            shutil.copy2(builddir / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
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


def find_kernel(
    flavour: str, fragment_path: Path, kernel_source: Path | None = None
) -> Path | None:
    """The cached kernel output dir for these inputs, or None (never builds)."""
    try:
        fragment = fragment_path.read_text()
        ident, _ = _source_identity(kernel_source)
    except (OSError, GuestBuildError):
        return None
    out = cache_dir() / flavour / kernel_key(flavour, fragment, ident)
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


def initrd_key(src: Path, busybox: bytes) -> str:
    parts: list[str | bytes] = [
        "initrd",
        INITRD_PIPELINE_VERSION,
        hashlib.sha256(busybox).hexdigest(),
    ]
    for p in _init_files(src) + _agent_sources(src):
        parts += [str(p.relative_to(src)), p.read_bytes()]
    if any(p.suffix == ".c" for p in _agent_sources(src)):
        parts.append(_tool_version("gcc"))
        parts.append(str(Path(shutil.which("musl-gcc") or "musl-gcc")))
    return _sha(*parts)


def _busybox_applets(busybox: Path) -> list[str]:
    r = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise GuestBuildError(f"{busybox} --list-full failed: {r.stderr.strip()}")
    return sorted(a.strip() for a in r.stdout.splitlines() if a.strip() and ".." not in a)


def _compile_agent(src: Path, out: Path, log: Path, progress: Progress) -> bool:
    """Compile the agent; False (with a warning) while its C sources do not exist yet."""
    sources = [p for p in _agent_sources(src) if p.suffix == ".c"]
    if not sources:
        _emit(progress, f"WARNING: no agent sources in {src / 'agent'}; initramfs without agent")
        return False
    require_tools(INITRD_TOOLS)
    cmd = ["musl-gcc", "-static", "-Os", "-o", str(out), *map(str, sources)]
    _run_logged(cmd, log, "agent compile (musl-gcc)", progress)
    return True


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


def make_initrd_bytes(src: Path, busybox: Path, agent: Path | None) -> bytes:
    """The gzip'd newc cpio image (deterministic for the same inputs)."""
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
    for applet in _busybox_applets(busybox):
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


def build_initrd(progress: Progress = None) -> tuple[Path, str]:
    """Build (or find) the initramfs; returns (path, key)."""
    src = guest_src_dir()
    busybox = _check_static_busybox(BUSYBOX)
    key = initrd_key(src, busybox)
    out = cache_dir() / f"initrd-{key}.cpio.gz"
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
            key = initrd_key(snap, busybox)
            out = cache_dir() / f"initrd-{key}.cpio.gz"
            if out.is_file():
                return out, key
            log = tmp / "build.log"
            agent: Path | None = tmp / "ignition-agent"
            try:
                if not _compile_agent(snap, agent, log, progress):
                    agent = None
            except GuestBuildError as e:
                kept = cache_dir() / "initrd-failed.log"
                shutil.copy2(log, kept)  # the temp dir goes away; keep the log
                raise GuestBuildError(str(e).replace(str(log), str(kept))) from None
            data = make_initrd_bytes(snap, bb, agent)
            part = tmp / "initrd.cpio.gz"
            part.write_bytes(data)
            os.rename(part, out)
        _emit(progress, f"initramfs built in {time.monotonic() - t0:.1f}s: {out}")
    return out, key


def find_initrd() -> tuple[Path, str] | None:
    try:
        src = guest_src_dir()
        busybox = BUSYBOX.read_bytes()
    except (OSError, GuestBuildError):
        return None
    key = initrd_key(src, busybox)
    out = cache_dir() / f"initrd-{key}.cpio.gz"
    return (out, key) if out.is_file() else None


def main_progress(quiet: bool) -> Progress:
    if quiet:
        return None
    return lambda msg: print(f"[ignition guest] {msg}", file=sys.stderr, flush=True)
