"""The guest image pipeline: built configs, cache, lock, errors, and a real boot under QEMU.

Kernel builds take minutes, so these tests use the kernels already in the cache
(``python -m pytest_ignition.guest build [--host]``) and exercise the cache and lock logic on
the initramfs, which builds in about a second into a temporary cache dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from filelock import FileLock

from pytest_ignition._testing import require
from pytest_ignition.guest import (
    DEFAULT_CMDLINE,
    GuestBuildError,
    build_guest,
    find_guest,
    find_host_kernel,
    kconfig,
)
from pytest_ignition.guest import build as gbuild

BUILD_HINT = "run: python -m pytest_ignition.guest build"


def _guest():
    img = find_guest()
    require(img is not None, f"guest image not built ({BUILD_HINT})")
    assert img is not None
    return img


def test_guest_config_has_every_fragment_option() -> None:
    img = _guest()
    fragment = (gbuild.guest_src_dir() / "kernel" / "x86_64.config").read_text()
    assert kconfig.verify(fragment, img.config.read_text()) == []
    assert img.kernel.stat().st_size > 0 and img.vmlinux.stat().st_size > img.kernel.stat().st_size


def test_host_config_has_every_fragment_option() -> None:
    host = find_host_kernel()
    require(host is not None, f"host kernel not built ({BUILD_HINT} --host)")
    assert host is not None
    fragment = (gbuild.guest_src_dir() / "kernel" / "host-x86_64.config").read_text()
    assert kconfig.verify(fragment, host.config.read_text()) == []


def test_vmlinux_has_pvh_entry_note() -> None:
    img = _guest()
    out = subprocess.run(["readelf", "-n", str(img.vmlinux)], capture_output=True, text=True)
    require(out.returncode == 0, "readelf (binutils) unavailable")
    # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) in a "Xen" note: the PVH entry point.
    assert "Xen" in out.stdout and ("0x00000012" in out.stdout or "PHYS32_ENTRY" in out.stdout)


def test_second_build_is_cache_hit() -> None:
    _guest()
    img = build_guest()  # (re)builds the initramfs if the agent changed since; never the kernel
    stamps = {p: p.stat().st_mtime_ns for p in (img.kernel, img.vmlinux, img.initrd, img.config)}
    messages: list[str] = []
    again = build_guest(progress=messages.append)
    assert again == img
    assert messages == []  # nothing was built, extracted or waited for
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_initrd_is_deterministic_and_complete(tmp_path: Path) -> None:
    src = gbuild.guest_src_dir()
    a = gbuild.make_initrd_bytes(src, gbuild.BUSYBOX, None)
    b = gbuild.make_initrd_bytes(src, gbuild.BUSYBOX, None)
    assert a == b
    (tmp_path / "i.cpio.gz").write_bytes(a)
    listing = subprocess.run(
        f"zcat {tmp_path / 'i.cpio.gz'} | cpio -itv", shell=True, capture_output=True, text=True
    ).stdout
    names = {ln.split()[-1] if " -> " not in ln else ln.split(" -> ")[0].split()[-1]
             for ln in listing.splitlines()}  # fmt: skip
    for need in ("init", "bin/busybox", "bin/sh", "sbin/init", "etc/inittab", "etc/init.d/rcS",
                 "etc/profile", "dev/console", "proc", "sys", "tmp", "rootfs"):  # fmt: skip
        assert need in names, need
    # Without an agent binary the inittab must not respawn it.
    raw = subprocess.run(
        f"zcat {tmp_path / 'i.cpio.gz'} | cpio -i --to-stdout etc/inittab",
        shell=True,
        capture_output=True,
        text=True,
    ).stdout
    assert all(ln.startswith("#") for ln in raw.splitlines() if "ignition-agent" in ln)


def _initrd_proc(cache: Path) -> subprocess.Popen[str]:
    code = (
        "import sys; from pytest_ignition.guest import build as b; "
        "p, k = b.build_initrd(lambda m: print('PROGRESS', m, flush=True)); print('OUT', p)"
    )
    env = dict(os.environ, IGNITION_CACHE_DIR=str(cache))
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, bufsize=1
    )


def test_concurrent_builds_build_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "locks").mkdir(parents=True)
    held = FileLock(str(cache / "locks" / "initrd.lock"))
    held.acquire()
    procs = [_initrd_proc(cache), _initrd_proc(cache)]
    try:
        # Both processes find no output and queue up on the lock held here.
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith("PROGRESS waiting for another process"), line
        assert not list(cache.glob("initrd-*"))
    finally:
        held.release()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    built = [o for o in outs if "initramfs built" in o]
    assert len(built) == 1, outs
    paths = {ln.split(" ", 1)[1] for o in outs for ln in o.splitlines() if ln.startswith("OUT ")}
    assert len(paths) == 1
    assert len(list(cache.glob("initrd-*.cpio.gz"))) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".initrd-")]  # temp dir gone


def test_initrd_key_tracks_inputs(tmp_path: Path) -> None:
    src = tmp_path / "guest"
    shutil.copytree(gbuild.guest_src_dir(), src)
    bb = gbuild.BUSYBOX.read_bytes()
    k0 = gbuild.initrd_key(src, bb)
    (src / "init" / "etc" / "profile").write_text("# changed\n")
    k1 = gbuild.initrd_key(src, bb)
    (src / "agent").mkdir(exist_ok=True)
    (src / "agent" / "extra.h").write_text("/* changed */\n")
    k2 = gbuild.initrd_key(src, bb)
    assert len({k0, k1, k2}) == 3
    assert gbuild.initrd_key(src, bb + b"x") != k2


def test_kernel_key_tracks_fragment_and_source() -> None:
    k = gbuild.kernel_key("guest", "CONFIG_A=y\n", "tar:/x:1:2")
    assert gbuild.kernel_key("guest", "CONFIG_A=y\n", "tar:/x:1:2") == k
    assert gbuild.kernel_key("guest", "CONFIG_B=y\n", "tar:/x:1:2") != k
    assert gbuild.kernel_key("guest", "CONFIG_A=y\n", "tar:/x:1:3") != k
    assert gbuild.kernel_key("host", "CONFIG_A=y\n", "tar:/x:1:2") != k


def test_missing_tool_names_the_package(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PATH=str(empty), IGNITION_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-m", "pytest_ignition.guest", "build", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "missing build tools" in r.stderr and "apt-get install" in r.stderr
    for pkg in ("make", "gcc", "flex", "bison", "bc", "xz-utils"):
        assert pkg in r.stderr
    with pytest.raises(GuestBuildError, match="apt-get install musl-tools"):
        gbuild.require_tools({"musl-gcc-not-here": "musl-tools"})
    with pytest.raises(GuestBuildError, match="apt-get install libelf-dev"):
        gbuild.require_tools({}, {"no-such-header-here.h": "libelf-dev"})
    gbuild.require_tools({"sh": "dash"}, {"stdio.h": "libc6-dev"})  # present: no error


def test_dynamic_busybox_is_rejected(tmp_path: Path) -> None:
    dyn = Path(sys.executable).resolve()  # a dynamically linked ELF
    with pytest.raises(GuestBuildError, match="busybox-static"):
        gbuild._check_static_busybox(dyn)
    with pytest.raises(GuestBuildError, match="busybox-static"):
        gbuild._check_static_busybox(tmp_path / "nope")


def _qemu_microvm(img, *extra: str, cmdline: str = DEFAULT_CMDLINE) -> pexpect.spawn:
    qemu = shutil.which("qemu-system-x86_64")
    require(qemu is not None, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    assert qemu is not None
    args = ["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
            "-nodefaults", "-no-user-config", "-serial", "stdio",
            # microvm has no keyboard controller; reboot=k needs one to reset (and exit)
            "-device", "i8042",
            *extra,
            "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", cmdline]  # fmt: skip
    return pexpect.spawn(qemu, args, encoding="utf-8", timeout=90)


def _reboot(child: pexpect.spawn) -> None:
    child.sendline("reboot")
    child.expect(pexpect.EOF, timeout=60)  # -no-reboot: the guest's reboot ends QEMU
    child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


@pytest.mark.vm
def test_guest_boots_under_qemu_microvm() -> None:
    img = _guest()
    child = _qemu_microvm(img)
    try:
        child.expect_exact("ignition: init done")
        child.expect_exact("ignition:/# ")
        child.sendline("echo $((6*7)); hostname; cat /proc/mounts | grep -c tmpfs")
        child.expect(r"42\r+\nignition\r+\n(\d+)\r+\n")  # the serial line adds a CR
        assert int(child.match.group(1)) >= 2
        # The boot-timer write: /dev/mem reaches MMIO outside RAM (no STRICT_DEVMEM).
        child.sendline("devmem 0xd0000000 8 123 && echo devmem-$((40+2))")
        child.expect_exact("devmem-42")
        child.sendline("cd /proc")
        child.expect_exact("ignition:/proc# ")
        _reboot(child)
    finally:
        child.close(force=True)


@pytest.mark.vm
def test_guest_mounts_rootfs_from_virtio_blk(tmp_path: Path) -> None:
    img = _guest()
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/sbin:/usr/sbin")
    require(mke2fs is not None, "mke2fs not installed (apt-get install e2fsprogs)")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "marker").write_text("rootfs-marker-7\n")
    disk = tmp_path / "rootfs.ext4"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", str(tree), str(disk)], check=True)
    child = _qemu_microvm(
        img,
        "-drive", f"id=d0,file={disk},format=raw,if=none",
        "-device", "virtio-blk-device,drive=d0",
        cmdline=DEFAULT_CMDLINE + " ignition.rootfs=/dev/vda",
    )  # fmt: skip
    try:
        child.expect_exact("ignition: init done")
        child.expect_exact("ignition:/# ")
        child.sendline("cat /rootfs/marker; grep -c '^/dev/vda /rootfs ext4' /proc/mounts")
        child.expect(r"rootfs-marker-7\r+\n1\r+\n")
        # overlayfs over the ext4 root (how tests get a writable, throwaway view)
        child.sendline(
            "mkdir /tmp/u /tmp/w && mount -t overlay o -o "
            "lowerdir=/rootfs,upperdir=/tmp/u,workdir=/tmp/w /mnt && echo ov-$((1+1))"
        )
        child.expect_exact("ov-2")
        _reboot(child)
    finally:
        child.close(force=True)


def test_agent_compile_error_keeps_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require(
        shutil.which("musl-gcc") is not None, "musl-gcc not installed (apt-get install musl-tools)"
    )
    src = tmp_path / "guest"
    shutil.copytree(gbuild.guest_src_dir(), src)
    (src / "agent" / "zz_broken.c").write_text("int main(void) { return undeclared_thing; }\n")
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gbuild, "guest_src_dir", lambda: src)
    with pytest.raises(GuestBuildError, match=r"agent compile \(musl-gcc\) failed") as ei:
        gbuild.build_initrd()
    log = tmp_path / "cache" / "initrd-failed.log"
    assert str(log) in str(ei.value)
    assert "undeclared_thing" in log.read_text()
    assert not list((tmp_path / "cache").glob("initrd-*.cpio.gz"))


def test_dropped_fragment_option_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reuse an already extracted tree (as --kernel-source); only tinyconfig + olddefconfig run.
    trees = sorted(gbuild.cache_dir().glob("src/*/linux-*/Makefile"))
    require(trees, f"no extracted kernel tree in the cache ({BUILD_HINT})")
    tree = trees[0].parent
    frag = tmp_path / "broken.config"
    # VIRTIO_VSOCKETS depends on VSOCKETS and NET, which this fragment forgets.
    frag.write_text(
        "CONFIG_64BIT=y\nCONFIG_VIRTIO_MENU=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_VSOCKETS=y\n"
    )
    monkeypatch.setenv("IGNITION_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(GuestBuildError, match="did not survive olddefconfig") as ei:
        gbuild.build_kernel("guest", frag, tree, want_vmlinux=False)
    msg = str(ei.value)
    assert "CONFIG_VIRTIO_VSOCKETS wanted =y, got not set" in msg
    assert "CONFIG_VIRTIO_MMIO" not in msg  # satisfied options are not listed
    assert not list((tmp_path / "cache").glob("guest/*"))  # no output on failure
