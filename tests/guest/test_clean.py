"""``python -m pytest_ignition.guest clean`` on a fake cache in a temporary dir.

The current entries are named with the real key functions (the same ones the builders use);
a fake kernel tarball stands in for Debian's, so no kernel source needs to be installed. The
command runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_ignition._testing import require
from pytest_ignition.guest import GUEST_FRAGMENT, HOST_FRAGMENT
from pytest_ignition.guest import build as gbuild

OLD = 1_600_000_000  # an mtime well before any build in the fake cache
STALE_KEYS = ("a" * 20, "b" * 20)


def _file(path: Path, data: bytes = b"x" * 5000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _kernel(d: Path) -> None:
    for name in ("bzImage", "vmlinux", "build.log", "config"):
        _file(d / name)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _state(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in root.rglob("*")
    }


class FakeCache:
    """A cache with the current artefacts plus stale ones and build leftovers of every kind."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        require(
            gbuild.BUSYBOX.is_file(), f"{gbuild.BUSYBOX} missing (apt-get install busybox-static)"
        )
        self.root = tmp_path / "cache"
        self.tarball = tmp_path / "linux-source-fake.tar.xz"
        self.tarball.write_bytes(b"not really a tarball")
        monkeypatch.setenv("IGNITION_CACHE_DIR", str(self.root))
        src = gbuild.guest_src_dir()
        g = gbuild.current_kernel_key("guest", src / GUEST_FRAGMENT, self.tarball)
        h = gbuild.current_kernel_key("host", src / HOST_FRAGMENT, self.tarball)
        s = gbuild.current_source_key(self.tarball)
        i = gbuild.current_initrd_key()
        self.current = {
            f"guest/{g}",
            f"host/{h}",
            f"initrd-{i}.cpio.gz",
            f"src/{s}",
            f"build/guest-{s}",
            f"build/host-{s}",
        }
        old_s, old_k = STALE_KEYS
        self.stale = {
            f"guest/{old_k}",
            f"guest/.{g}-x1y2",  # temp dir of an interrupted build
            f"host/{old_k}",
            f"initrd-{old_k}.cpio.gz",
            f"initrd-{old_s}.cpio.gz",
            ".initrd-q7w8",
            "initrd-failed.log",  # older than the current initramfs
            f"src/{old_s}",  # tree of another kernel source
            "src/.extract-z9",
            f"build/guest-{old_s}",
            "build/.clean-host-123",  # an interrupted clean
        }
        self.trees = {f"src/{s}", f"build/guest-{s}", f"build/host-{s}"}
        for k in (f"guest/{g}", f"host/{h}", f"guest/{old_k}", f"host/{old_k}"):
            _kernel(self.root / k)
        _file(self.root / f"guest/.{g}-x1y2" / "bzImage")
        for k in (i, old_s, old_k):
            _file(self.root / f"initrd-{k}.cpio.gz")
        _file(self.root / ".initrd-q7w8" / "guest" / "init" / "etc" / "inittab")
        _file(self.root / "initrd-failed.log", b"error: undeclared_thing\n")
        os.utime(self.root / "initrd-failed.log", (OLD, OLD))
        for k in (s, old_s):
            _file(self.root / "src" / k / ".complete", b"tar:...\n")
            _file(self.root / "src" / k / "linux-6.1" / "Makefile")
            _file(self.root / "src" / k / "linux-6.1" / "kernel" / "fork.c")
        _file(self.root / "src/.extract-z9/linux-6.1/Makefile")
        for b in (f"guest-{s}", f"host-{s}", f"guest-{old_s}", ".clean-host-123"):
            _file(self.root / "build" / b / ".config")
            _file(self.root / "build" / b / "kernel" / "fork.o")
        for name in ("initrd", "kernel-guest", "kernel-host", "src"):
            _file(self.root / "locks" / f"{name}.lock", b"")
        _file(self.root / "notes.txt", b"not the pipeline's\n")  # left alone

    def run(self, *args: str, source: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, IGNITION_CACHE_DIR=str(self.root))
        src = ["--kernel-source", str(source or self.tarball)]
        return subprocess.run(
            [sys.executable, "-m", "pytest_ignition.guest", "clean", *src, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def top(self) -> set[str]:
        """The entries clean decides about (second level under guest/host/src/build)."""
        out = set()
        for p in self.root.iterdir():
            if p.name in ("guest", "host", "src", "build"):
                out |= {f"{p.name}/{c.name}" for c in p.iterdir()}
            else:
                out.add(p.name)
        return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCache:
    return FakeCache(tmp_path, monkeypatch)


def _assert_ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_default_removes_exactly_the_stale_entries(cache: FakeCache) -> None:
    before = cache.top()
    assert cache.stale < before and cache.current < before
    files = sum(
        1
        if (cache.root / rel).is_file()
        else sum(p.is_file() for p in (cache.root / rel).rglob("*"))
        for rel in cache.stale
    )
    assert files > len(cache.stale)  # some stale entries are trees
    r = cache.run()
    _assert_ok(r)
    assert cache.top() == before - cache.stale
    for rel in cache.stale:
        assert f"removed  {rel}" in r.stdout, rel
    assert "locks/initrd.lock" in _tree(cache.root)
    # the summary counts the files inside removed trees too
    assert f"{files} files in {len(cache.stale)} entries removed" in r.stdout
    assert "MiB freed" in r.stdout or "KiB freed" in r.stdout
    # nothing left to do the second time
    again = cache.run()
    _assert_ok(again)
    assert "0 files in 0 entries removed, 0 B freed" in again.stdout
    assert cache.top() == before - cache.stale


def test_dry_run_removes_nothing(cache: FakeCache) -> None:
    for p in (cache.root / "locks").iterdir():  # a dry run must not create lock files either
        p.unlink()
    state = _state(cache.root)
    r = cache.run("--dry-run")
    _assert_ok(r)
    assert _state(cache.root) == state
    for rel in cache.stale:
        assert f"would rm {rel}" in r.stdout, rel
    for rel in cache.current:
        assert f"keep     {rel}" in r.stdout, rel
    assert f"in {len(cache.stale)} entries would go" in r.stdout
    for flag in ("--all", "--everything"):
        r = cache.run("--dry-run", flag)
        _assert_ok(r)
        assert _state(cache.root) == state


def _run_holding(cache: FakeCache, lock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run clean while this process holds the build lock ``lock``, as a running build would."""
    held = FileLock(str(cache.root / "locks" / f"{lock}.lock"))
    with held:
        return cache.run(*args)


def test_held_lock_protects_what_it_guards(cache: FakeCache) -> None:
    before = cache.top()
    r = _run_holding(cache, "kernel-guest")
    _assert_ok(r)
    # the guest kernel lock guards guest kernels, their object dirs, and the source trees
    # (a guest build reads them)
    guarded = {rel for rel in cache.stale if rel.startswith(("guest/", "build/", "src/"))}
    assert guarded and guarded < cache.stale
    assert cache.top() == before - (cache.stale - guarded)
    assert "lock kernel-guest: another process holds it" in r.stdout
    for rel in guarded:
        assert f"skip     {rel}" in r.stdout, rel
    assert f"{len(guarded)} entries skipped" in r.stdout
    # once the build is over, the rest goes
    _assert_ok(cache.run())
    assert cache.top() == before - cache.stale


def test_held_initrd_lock(cache: FakeCache) -> None:
    before = cache.top()
    r = _run_holding(cache, "initrd")
    _assert_ok(r)
    guarded = {rel for rel in cache.stale if "initrd" in rel}
    assert len(guarded) == 4
    assert cache.top() == before - (cache.stale - guarded)


def test_all_removes_source_and_build_trees(cache: FakeCache) -> None:
    before = cache.top()
    r = cache.run("--all")
    _assert_ok(r)
    assert cache.top() == before - cache.stale - cache.trees
    assert not list((cache.root / "src").iterdir())
    assert not list((cache.root / "build").iterdir())
    for rel in cache.current - cache.trees:
        assert (cache.root / rel).exists(), rel
    assert (cache.root / "notes.txt").exists()


def test_everything_leaves_only_the_lock_files(cache: FakeCache) -> None:
    r = cache.run("--everything")
    _assert_ok(r)
    # IGNITION_CACHE_DIR might be a shared dir: what the pipeline did not make stays; the
    # empty lock files stay so that a build waiting on one cannot race the next one.
    assert sorted(p.name for p in cache.root.iterdir()) == ["locks", "notes.txt"]
    assert all(p.stat().st_size == 0 for p in (cache.root / "locks").iterdir())
    assert "keep     notes.txt" in r.stdout and "keep     locks" in r.stdout


def test_everything_keeps_what_a_running_build_guards(cache: FakeCache) -> None:
    r = _run_holding(cache, "kernel-host", "--everything")
    _assert_ok(r)
    left = ["build", "host", "locks", "notes.txt", "src"]
    assert sorted(p.name for p in cache.root.iterdir()) == left


def test_unknown_kernel_source_keeps_every_kernel(cache: FakeCache, tmp_path: Path) -> None:
    before = cache.top()
    r = cache.run(source=tmp_path / "no-such-kernel")
    _assert_ok(r)
    assert "note: kernel source:" in r.stdout and "keeping every kernel" in r.stdout
    kernelish = {
        rel for rel in cache.stale if rel.split("/")[0] in ("guest", "host", "src", "build")
    }
    leftovers = {rel for rel in kernelish if "/." in rel}  # temp dirs go whatever the key
    assert cache.top() == before - (cache.stale - kernelish) - leftovers


def test_recent_failure_log_is_kept(cache: FakeCache) -> None:
    os.utime(cache.root / "initrd-failed.log")  # newer than every initramfs
    r = cache.run()
    _assert_ok(r)
    assert (cache.root / "initrd-failed.log").exists()
    assert "keep     initrd-failed.log" in r.stdout


def test_missing_cache_dir(tmp_path: Path) -> None:
    env = dict(os.environ, IGNITION_CACHE_DIR=str(tmp_path / "none"))
    r = subprocess.run(
        [sys.executable, "-m", "pytest_ignition.guest", "clean"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_ok(r)
    assert "nothing to clean" in r.stdout
    assert not (tmp_path / "none").exists()


def test_human_size() -> None:
    assert gbuild.human_size(0) == "0 B"
    assert gbuild.human_size(1023) == "1023 B"
    assert gbuild.human_size(1536) == "1.5 KiB"
    assert gbuild.human_size(300 << 20) == "300.0 MiB"
    assert gbuild.human_size(3 << 40) == "3072.0 GiB"
