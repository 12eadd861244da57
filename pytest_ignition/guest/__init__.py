"""The guest image: a minimal Linux kernel and a busybox + agent initramfs, built and cached.

Public API used by the engines and the nested harness. ``python -m pytest_ignition.guest build``
drives the same functions from the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import build as _build
from .build import GuestBuildError, cache_dir

__all__ = [
    "DEFAULT_CMDLINE",
    "GuestBuildError",
    "GuestImage",
    "HostKernel",
    "build_guest",
    "build_host_kernel",
    "cache_dir",
    "find_guest",
    "find_host_kernel",
]

# Kernel command line engines should use for the guest (append device/rootfs arguments,
# e.g. ``virtio_mmio.device=4K@0xd0001000:5`` or ``ignition.rootfs=/dev/vda``).
# reboot=k: reset through the keyboard controller (no ACPI); panic=-1: reboot at once on panic,
# so a crashed guest ends the VM instead of hanging it.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"

GUEST_FRAGMENT = "kernel/x86_64.config"
HOST_FRAGMENT = "kernel/host-x86_64.config"


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel (bzImage), uncompressed vmlinux (PVH entry), initramfs, .config."""

    kernel: Path
    vmlinux: Path
    initrd: Path
    config: Path
    key: str


@dataclass(frozen=True)
class HostKernel:
    """The nested harness's hypervisor-host kernel (KVM, virtio-pci, 9p)."""

    kernel: Path
    config: Path
    key: str


def _guest_image(kdir: Path, kkey: str, initrd: Path, ikey: str) -> GuestImage:
    return GuestImage(
        kernel=kdir / "bzImage",
        vmlinux=kdir / "vmlinux",
        initrd=initrd,
        config=kdir / "config",
        key=f"{kkey}-{ikey}",
    )


def build_guest(
    kernel_source: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> GuestImage:
    """Build (or fetch from the cache) the guest kernel and initramfs."""
    src = _build.guest_src_dir()
    kdir, kkey = _build.build_kernel(
        "guest", src / GUEST_FRAGMENT, kernel_source, want_vmlinux=True, progress=progress
    )
    initrd, ikey = _build.build_initrd(progress)
    return _guest_image(kdir, kkey, initrd, ikey)


def build_host_kernel(
    kernel_source: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> HostKernel:
    """Build (or fetch from the cache) the nested harness's host kernel."""
    src = _build.guest_src_dir()
    kdir, key = _build.build_kernel(
        "host", src / HOST_FRAGMENT, kernel_source, want_vmlinux=False, progress=progress
    )
    return HostKernel(kernel=kdir / "bzImage", config=kdir / "config", key=key)


def find_guest() -> GuestImage | None:
    """The cached default guest if it is already built, else None (fast; never builds)."""
    try:
        src = _build.guest_src_dir()
    except GuestBuildError:
        return None
    kdir = _build.find_kernel("guest", src / GUEST_FRAGMENT)
    found = _build.find_initrd()
    if kdir is None or found is None:
        return None
    return _guest_image(kdir, kdir.name, found[0], found[1])


def find_host_kernel() -> HostKernel | None:
    """The cached default host kernel if it is already built, else None."""
    try:
        src = _build.guest_src_dir()
    except GuestBuildError:
        return None
    kdir = _build.find_kernel("host", src / HOST_FRAGMENT)
    if kdir is None:
        return None
    return HostKernel(kernel=kdir / "bzImage", config=kdir / "config", key=kdir.name)
