"""The arm64 nested harness: an arm64 hypervisor host under ``qemu-system-aarch64`` TCG at EL2.

``python -m pytest_ignition.nested run --arch aarch64 -- CMD`` boots Debian's own
``linux-image-*-arm64`` (KVM, GICv3 and the PL011 built in; virtio-mmio, 9p, overlayfs and vsock
as modules, loaded from a small initramfs) under
``-M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on`` (without ``pauth-impdef``
QEMU 7.2's pointer-auth emulation makes the boot ~3x slower), where KVM offers a real arm64
``/dev/kvm`` (VHE). The outer machine's ``/`` is x86_64 and useless in there, so the root is an
arm64 Python 3 + cffi tree made by ``mmdebstrap --variant=extract --arch=arm64`` (no qemu-user:
nothing of it runs at build time), shared read-only over virtio-9p with an overlayfs (tmpfs
upper) on top; busybox arm64 is copied in as ``/bin/busybox``. The caller's directory is shared
writable at the same path, and the project's virtualenv site-packages are appended to the
arm64 Python's path (pure-Python packages work; C extensions come from the arm64 tree).

The control protocol is :mod:`.nested`'s (``ignctl`` share: nonce, cwd, run.sh, rc; start and
exit markers on the console), so :func:`pytest_ignition.nested.run` drives both architectures;
this module provides the kernel, the initramfs, the root tree and the QEMU command line, each
fetched or built once into ``<cache>/nested-arm64/`` under a file lock.
"""

from __future__ import annotations

import compileall
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

QEMU = "qemu-system-aarch64"
QEMU_HINT = "apt-get install qemu-system-arm"
KERNEL_META = "linux-image-arm64"
PYROOT_PACKAGES = "python3-minimal,libpython3.11-stdlib,python3-cffi-backend,python3-cffi"
# Tools tests run inside the host (the e2e rootfs test builds an ext4 image with mke2fs), added
# to the Python tree under a marker so that a root cached before they were listed gets them too.
PYROOT_TOOLS = "e2fsprogs"
PYROOT_TOOLS_MARKER = ".ignition-tools"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Loaded in this order (Debian's arm64 kernel has no modules.dep until depmod runs).
MODULES = (
    "fs/netfs/netfs.ko",
    "fs/fscache/fscache.ko",
    "fs/overlayfs/overlay.ko",
    "drivers/virtio/virtio_mmio.ko",
    "net/9p/9pnet.ko",
    "net/9p/9pnet_virtio.ko",
    "fs/9p/9p.ko",
    "net/vmw_vsock/vsock.ko",
    "drivers/vhost/vhost_iotlb.ko",
    "drivers/vhost/vhost.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "drivers/vhost/vhost_vsock.ko",
    "drivers/char/hw_random/virtio-rng.ko",
)
INIT_VERSION = "1"


class HostSetupError(RuntimeError):
    """Something the arm64 harness needs is missing; the message says what to install or do."""


@dataclass(frozen=True)
class Arm64Host:
    kernel: Path  # Debian's vmlinuz: an uncompressed arm64 Image
    initrd: Path
    pyroot: Path


def _root() -> Path:
    from .guest import cache_dir

    return cache_dir() / "nested-arm64"


def _run(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip()[-800:]
        raise HostSetupError(f"{what} failed ({' '.join(cmd[:3])} ...): {tail}")
    return r.stdout


def _need(tool: str, pkg: str) -> None:
    if shutil.which(tool) is None:
        raise HostSetupError(f"{tool} not found (install with: apt-get install {pkg})")


def _kernel_package() -> str:
    """The versioned kernel package the metapackage depends on (linux-image-6.1.0-N-arm64)."""
    out = _run(["apt-cache", "depends", f"{KERNEL_META}:arm64"], "apt-cache depends")
    for line in out.splitlines():
        if not line.strip().startswith("Depends:"):
            continue
        word = line.strip().removeprefix("Depends:").strip().split(":")[0]
        if word.startswith("linux-image-") and word.endswith("-arm64") and word != KERNEL_META:
            return word
    raise HostSetupError(
        f"no arm64 kernel package behind {KERNEL_META} (dpkg --add-architecture arm64 && "
        "apt-get update)"
    )


def _fetch_kernel(dest: Path) -> None:
    _need("apt-get", "apt")
    _need("dpkg-deb", "dpkg")
    pkg = _kernel_package()
    with tempfile.TemporaryDirectory(prefix=".kernel-", dir=dest.parent) as tmpd:
        tmp = Path(tmpd)
        tmp.chmod(0o755)
        _run(["apt-get", "download", "-q", f"{pkg}:arm64"], f"apt-get download {pkg}", tmp)
        debs = sorted(tmp.glob("linux-image-*_arm64.deb"))
        if not debs:
            raise HostSetupError(f"apt-get download {pkg}:arm64 produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "x")], "dpkg-deb -x")
        vmlinuz = sorted((tmp / "x" / "boot").glob("vmlinuz-*"))
        moddirs = sorted((tmp / "x" / "lib" / "modules").glob("*"))
        if not vmlinuz or not moddirs:
            raise HostSetupError(f"{debs[0].name} has no vmlinuz or modules")
        out = tmp / "out"
        (out / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[0], out / "vmlinuz")
        for rel in MODULES:
            src = moddirs[0] / "kernel" / rel
            if not src.is_file():
                raise HostSetupError(f"{debs[0].name}: module {rel} is missing")
            shutil.copy2(src, out / "modules" / Path(rel).name)
        (out / "SOURCE").write_text(debs[0].name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(out, dest)


def _extract(packages: str, tree: Path) -> None:
    """Debian's arm64 ``packages`` and their dependencies unpacked into ``tree`` (no scripts run:
    nothing arm64 can run here)."""
    _run(
        [
            "mmdebstrap",
            "--mode=" + ("root" if os.geteuid() == 0 else "unshare"),
            "--variant=extract",
            "--arch=arm64",
            "--skip=check/qemu",
            f"--include={packages}",
            SUITE,
            str(tree),
            MIRROR,
        ],
        f"mmdebstrap (arm64 {packages})",
        timeout=900,
    )


def _fetch_pyroot(dest: Path) -> None:
    _need("mmdebstrap", "mmdebstrap")
    with tempfile.TemporaryDirectory(prefix=".pyroot-", dir=dest.parent) as tmpd:
        tree = Path(tmpd) / "root"
        _extract(PYROOT_PACKAGES, tree)
        # extract runs no maintainer scripts: no .pyc. The host's 3.11 writes the same magic,
        # and importing uncompiled modules under TCG costs seconds.
        if sys.version_info[:2] == (3, 11):
            for lib in (tree / "usr" / "lib").glob("python3*"):
                compileall.compile_dir(lib, quiet=2, stripdir=str(tree), prependdir="/")
        for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root"):
            (tree / d).mkdir(exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tree, dest)


def _marker_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _add_packages(root: Path, pyroot: Path, packages: str, marker: str) -> None:
    """Extract Debian's arm64 ``packages`` (with their dependencies) into ``pyroot``, keeping the
    files it already has, then write ``marker`` naming them. The caller holds the root's lock."""
    _need("mmdebstrap", "mmdebstrap")
    with tempfile.TemporaryDirectory(prefix=".add-", dir=root) as tmpd:
        tree = Path(tmpd) / "root"
        _extract(packages, tree)
        _run(["cp", "-an", f"{tree}/.", str(pyroot)], f"copying {packages} into the root")
    (pyroot / marker).write_text(packages + "\n")


def _init_script(module_names: list[str]) -> bytes:
    insmods = "\n".join(f"insmod /modules/{m} 2>/dev/console" for m in module_names)
    return f"""#!/bin/busybox sh
# PID 1 of the arm64 nested host (pytest_ignition/nested_arm64.py, init v{INIT_VERSION}).
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{insmods}
P9="trans=virtio,version=9p2000.L,msize=262144"
mkdir -p /lower /rw /newroot
mount -t 9p -o "$P9,ro,cache=loose" ignpy /lower || exit 1
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || exit 1
mkdir -p /newroot/bin /newroot/run/ignition-nested /newroot/proc /newroot/sys /newroot/dev
cp /bin/busybox /newroot/bin/busybox
chroot /newroot /bin/busybox --install -s /bin 2>/dev/null
mount -t 9p -o "$P9" ignctl /newroot/run/ignition-nested || exit 1
exec chroot /newroot /bin/busybox sh /run/ignition-nested/stage2.sh
""".encode()


STAGE2 = r"""# stage 2 of the arm64 nested host, in the overlay root (the nested.py protocol)
BB=/bin/busybox
$BB mount -t proc proc /proc
$BB mount -t sysfs sysfs /sys
$BB mount -t devtmpfs devtmpfs /dev
$BB mkdir -p /dev/pts /dev/shm /tmp
$BB mount -t devpts -o mode=0620,ptmxmode=0666 devpts /dev/pts
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm
$BB mount -t tmpfs -o mode=1777 tmpfs /tmp
CTL=/run/ignition-nested
P9="trans=virtio,version=9p2000.L,msize=262144"
read -r NONCE <"$CTL/nonce"
CWD=
[ -s "$CTL/cwd" ] && read -r CWD <"$CTL/cwd"
if [ -n "$CWD" ]; then
    $BB mkdir -p "$CWD"
    $BB mount -t 9p -o "$P9,cache=loose" igncwd "$CWD" || exit 1
fi
# the guest cache (built kernels, initramfs), read-only at its outer path
if [ -s "$CTL/cache" ]; then
    read -r CACHE <"$CTL/cache"
    $BB mkdir -p "$CACHE" && $BB mount -t 9p -o "$P9,ro,cache=loose" igncache "$CACHE"
fi
# the virtualenv's pure-Python packages, after the arm64 tree's own
[ -s "$CTL/venv-site" ] && $BB cp "$CTL/venv-site" /usr/lib/python3/dist-packages/zz-ignition-venv.pth
$BB ip link set lo up 2>/dev/null
echo 3 >/proc/sys/kernel/printk
$BB stty raw -echo </dev/ttyAMA0 2>/dev/null
printf '@@ignition-nested:%s:start@@\n' "$NONCE" >/dev/ttyAMA0
(. "$CTL/run.sh") </dev/null >/dev/ttyAMA0 2>&1
rc=$?
echo "$rc" >"$CTL/rc"
printf '@@ignition-nested:%s:exit=%s@@\n' "$NONCE" "$rc" >/dev/ttyAMA0
$BB sync
echo b >/proc/sysrq-trigger
"""


def _make_initrd(kdir: Path, busybox: Path, out: Path) -> None:
    from .guest.build import _Cpio

    cpio = _Cpio()
    cpio.dir(".")
    for d in ("bin", "dev", "proc", "sys", "modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    names = [Path(m).name for m in MODULES]
    for n in names:
        cpio.file(f"modules/{n}", (kdir / "modules" / n).read_bytes())
    cpio.file("init", _init_script(names), 0o755)
    tmp = out.with_suffix(".partial")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    os.rename(tmp, out)


def find_host() -> Arm64Host | None:
    """The arm64 host's pieces if they are already in the cache (never fetches)."""
    root = _root()
    host = Arm64Host(
        root / "kernel" / "vmlinuz", root / f"initrd-{INIT_VERSION}.gz", root / "pyroot"
    )
    ok = (
        host.kernel.is_file()
        and host.initrd.is_file()
        and (host.pyroot / "usr/bin/python3").exists()
    )
    return host if ok else None


def ensure_host(progress=None) -> Arm64Host:
    """Fetch and build what is missing (kernel package, Python tree, initramfs), once."""
    say = progress or (lambda m: print(f"[ignition nested-arm64] {m}", file=sys.stderr, flush=True))
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if not (root / "kernel" / "vmlinuz").is_file():
            say("downloading Debian's arm64 kernel package (apt-get download)")
            _fetch_kernel(root / "kernel")
        if not (root / "pyroot" / "usr" / "bin" / "python3").exists():
            say("making the arm64 Python tree (mmdebstrap --variant=extract --arch=arm64)")
            _fetch_pyroot(root / "pyroot")
        if _marker_text(root / "pyroot" / PYROOT_TOOLS_MARKER) != PYROOT_TOOLS:
            say(f"adding {PYROOT_TOOLS} to the arm64 Python tree (mmdebstrap --variant=extract)")
            _add_packages(root, root / "pyroot", PYROOT_TOOLS, PYROOT_TOOLS_MARKER)
        initrd = root / f"initrd-{INIT_VERSION}.gz"
        if not initrd.is_file():
            from .guest.build import fetch_busybox

            _make_initrd(root / "kernel", fetch_busybox("aarch64", say), initrd)
    host = find_host()
    assert host is not None
    return host


QEMU_PACKAGES = "qemu-system-arm"
QEMU_MARKER = ".ignition-qemu"


def find_qemu(host: Arm64Host) -> str | None:
    """The arm64 ``qemu-system-aarch64`` inside the host's root (its path in there), if added."""
    if (host.pyroot / QEMU_MARKER).is_file() and (host.pyroot / "usr/bin" / QEMU).exists():
        return f"/usr/bin/{QEMU}"
    return None


def ensure_qemu(progress=None) -> str:
    """Add Debian's arm64 ``qemu-system-arm`` (and its libraries) to the host's root, once, so
    that QEMU+KVM can run inside the arm64 host beside the bundled VMM (benchmarks compare
    the two there). ~185 MB, ~45 s of mmdebstrap; files the root already has are kept.
    Returns the binary's path inside the host."""
    say = progress or (lambda m: print(f"[ignition nested-arm64] {m}", file=sys.stderr, flush=True))
    host = ensure_host(progress)
    found = find_qemu(host)
    if found:
        return found
    _need("mmdebstrap", "mmdebstrap")
    root = _root()
    with FileLock(str(root / ".lock")):
        if not (host.pyroot / QEMU_MARKER).is_file():
            say("adding arm64 QEMU to the host's root (mmdebstrap --variant=extract)")
            _add_packages(root, host.pyroot, QEMU_PACKAGES, QEMU_MARKER)
    found = find_qemu(host)
    if found is None:
        raise HostSetupError(f"{QEMU} missing from {host.pyroot} after adding {QEMU_PACKAGES}")
    return found


def available() -> tuple[bool, str]:
    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not found ({QEMU_HINT})"
    host = find_host()
    if host is None:
        return True, f"{QEMU}; the arm64 host is fetched on first use into {_root()}"
    return True, f"{QEMU} + Debian arm64 kernel {host.kernel}"


def _qemu_path(path: str | os.PathLike[str]) -> str:
    return os.fspath(path).replace(",", ",,")


def build_qemu_argv(
    host: Arm64Host,
    ctl_dir: Path,
    cwd: Path | None,
    *,
    mem_mb: int,
    cpus: int,
    verbose: bool = False,
) -> list[str]:
    """The QEMU command line of the arm64 host (virtio-mmio 9p: virtio-pci is a module too)."""
    append = ["console=ttyAMA0", "rdinit=/init", "panic=-1"]
    if not verbose:
        append.append("quiet")
    argv = [
        QEMU,
        "-M",
        "virt,virtualization=on,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-accel",
        "tcg,thread=multi",
        "-m",
        str(mem_mb),
        "-smp",
        str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "stdio,id=con,signal=off",
        "-serial",
        "chardev:con",
        "-kernel",
        os.fspath(host.kernel),
        "-initrd",
        os.fspath(host.initrd),
        "-append",
        " ".join(append),
        "-fsdev",
        f"local,id=py,path={_qemu_path(host.pyroot)},security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-device,fsdev=py,mount_tag=ignpy",
        "-fsdev",
        f"local,id=ctl,path={_qemu_path(ctl_dir)},security_model=none",
        "-device",
        "virtio-9p-device,fsdev=ctl,mount_tag=ignctl",
        "-device",
        "virtio-rng-device",
    ]
    if cwd is not None:
        argv += [
            "-fsdev",
            f"local,id=cwd,path={_qemu_path(cwd)},security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-device,fsdev=cwd,mount_tag=igncwd",
        ]
    from .guest import cache_dir

    cache = cache_dir()
    if cache.is_dir() and (cwd is None or not cache.is_relative_to(cwd)):
        argv += [
            "-fsdev",
            f"local,id=cache,path={_qemu_path(cache)},security_model=none,readonly=on",
            "-device",
            "virtio-9p-device,fsdev=cache,mount_tag=igncache",
        ]
    return argv


def prepare_ctl(ctl: Path) -> None:
    """The arm64-only files of the control share: stage 2, the venv's site-packages path."""
    (ctl / "stage2.sh").write_text(STAGE2)
    from .guest import cache_dir

    if cache_dir().is_dir():
        (ctl / "cache").write_text(f"{cache_dir()}\n")
    venv = os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else "")
    if venv:
        site = sorted(Path(venv).glob("lib/python3*/site-packages"))
        if site:
            (ctl / "venv-site").write_text(f"{site[0]}\n")


def child_env(env: dict[str, str]) -> dict[str, str]:
    """The command's environment in the arm64 host: the arm64 tree's PATH (the outer
    ``.venv/bin/python`` is an x86_64 binary), ``python3`` being the arm64 interpreter, and the
    built arm64 guest as ``IGNITION_ARM64_KERNEL``/``IGNITION_ARM64_INITRD``."""
    out = dict(env)
    out["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    out.pop("VIRTUAL_ENV", None)
    # The arm64 guest's cache key hashes the cross tool chain's versions, which the host's
    # root does not have: find_guest() cannot work in there, so its answer goes in from here.
    if not out.get("IGNITION_ARM64_KERNEL"):
        from .guest import find_guest

        g = find_guest("aarch64")
        if g is not None:
            out["IGNITION_ARM64_KERNEL"] = str(g.kernel)
            out["IGNITION_ARM64_INITRD"] = str(g.initrd)
    return out
