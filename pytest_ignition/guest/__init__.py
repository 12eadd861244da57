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
    "ARCHES",
    "GuestBuildError",
    "GuestImage",
    "HostKernel",
    "build_guest",
    "build_host_kernel",
    "cache_dir",
    "find_guest",
    "find_host_kernel",
    "host_arch",
]

# Kernel command line engines should use for the guest (append device/rootfs arguments,
# e.g. ``virtio_mmio.device=4K@0xd0001000:5`` or ``ignition.rootfs=/dev/vda``).
# reboot=k: reset through the keyboard controller (no ACPI); panic=-1: reboot at once on panic,
# so a crashed guest ends the VM instead of hanging it.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"

GUEST_FRAGMENT = "kernel/x86_64.config"
HOST_FRAGMENT = "kernel/host-x86_64.config"
ARCHES = _build.ARCHES
# guest architecture -> (kernel flavour, fragment); flavour names are cache directory names
GUEST_FLAVOURS = {
    "x86_64": ("guest", GUEST_FRAGMENT),
    "aarch64": ("guest_aarch64", "kernel/aarch64.config"),
}


def host_arch() -> str:
    """This machine's architecture in the names the pipeline uses (``x86_64``, ``aarch64``)."""
    import platform

    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def _arch(arch: str | None) -> str:
    arch = host_arch() if arch is None else arch
    if arch not in GUEST_FLAVOURS:
        raise GuestBuildError(
            f"no guest for architecture {arch!r} (choose {' or '.join(GUEST_FLAVOURS)})"
        )
    return arch


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel, uncompressed kernel a VMM enters directly, initramfs, .config.

    x86_64: ``kernel`` is the bzImage, ``vmlinux`` the ELF (PVH entry). aarch64: both are the
    uncompressed arm64 ``Image`` (QEMU and VMMs boot it as it is).
    """

    kernel: Path
    vmlinux: Path
    initrd: Path
    config: Path
    key: str
    arch: str = "x86_64"


@dataclass(frozen=True)
class HostKernel:
    """The nested harness's hypervisor-host kernel (KVM, virtio-pci, 9p)."""

    kernel: Path
    config: Path
    key: str


def _guest_image(
    kdir: Path, kkey: str, initrd: Path, ikey: str, arch: str = "x86_64"
) -> GuestImage:
    if arch == "x86_64":
        kernel, vmlinux = kdir / "bzImage", kdir / "vmlinux"
    else:
        kernel = vmlinux = kdir / _build.KERNEL_ARCHES[arch].image_name
    return GuestImage(
        kernel=kernel,
        vmlinux=vmlinux,
        initrd=initrd,
        config=kdir / "config",
        key=f"{kkey}-{ikey}",
        arch=arch,
    )


def build_guest(
    kernel_source: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    arch: str | None = None,
) -> GuestImage:
    """Build (or fetch from the cache) the guest kernel and initramfs for ``arch``.

    ``arch`` defaults to the host's; ``aarch64`` on an x86_64 host cross-builds.
    """
    arch = _arch(arch)
    flavour, fragment = GUEST_FLAVOURS[arch]
    src = _build.guest_src_dir()
    kdir, kkey = _build.build_kernel(
        flavour, src / fragment, kernel_source, want_vmlinux=True, progress=progress
    )
    initrd, ikey = _build.build_initrd(progress, arch)
    return _guest_image(kdir, kkey, initrd, ikey, arch)


def build_host_kernel(
    kernel_source: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> HostKernel:
    """Build (or fetch from the cache) the nested harness's host kernel."""
    src = _build.guest_src_dir()
    kdir, key = _build.build_kernel(
        "host", src / HOST_FRAGMENT, kernel_source, want_vmlinux=False, progress=progress
    )
    return HostKernel(kernel=kdir / "bzImage", config=kdir / "config", key=key)


def find_guest(arch: str | None = None) -> GuestImage | None:
    """The cached default guest for ``arch`` (default: the host's) if it is already built,
    else None (fast; never builds)."""
    try:
        arch = _arch(arch)
        src = _build.guest_src_dir()
    except GuestBuildError:
        return None
    flavour, fragment = GUEST_FLAVOURS[arch]
    kdir = _build.find_kernel(flavour, src / fragment)
    found = _build.find_initrd(arch)
    if kdir is None or found is None:
        return None
    return _guest_image(kdir, kdir.name, found[0], found[1], arch)


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
