"""Command line for the guest pipeline.

``python -m pytest_ignition.guest build [--kernel-source DIR] [--host] [--arch ARCH] [--quiet]``
builds (or finds) the guest (``--arch aarch64`` cross-builds the arm64 one);
``python -m pytest_ignition.guest clean [--all | --everything] [--dry-run]``
removes cached artefacts the current checkout would not use;
``python -m pytest_ignition.guest image SPEC [--packages P] [--arch A]`` builds (or finds) a
root image (``debian:SUITE``, ``oci-archive:PATH`` or an ext4 path) and prints its path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import (
    ARCHES,
    GUEST_FLAVOURS,
    HOST_FRAGMENT,
    GuestBuildError,
    build_guest,
    build_host_kernel,
)
from .build import cache_dir, clean_cache, human_size, main_progress

FRAGMENTS = {"host": HOST_FRAGMENT, **dict(GUEST_FLAVOURS.values())}


def _build(args: argparse.Namespace) -> int:
    shown = main_progress(args.quiet)
    said: list[str] = []

    def progress(msg: str) -> None:
        said.append(msg)  # anything said means something was built, extracted or waited for
        if shown is not None:
            shown(msg)

    t0 = time.monotonic()
    if args.host:
        if args.arch not in (None, "x86_64"):
            raise GuestBuildError(
                f"no {args.arch} host kernel flavour: the arm64 nested harness boots Debian's "
                "own linux-image-arm64"
            )
        host = build_host_kernel(args.kernel_source, progress=progress)
        print(f"kernel:    {host.kernel}")
        print(f"config:    {host.config}")
    else:
        img = build_guest(args.kernel_source, progress=progress, arch=args.arch)
        print(f"kernel:    {img.kernel}")
        print(f"vmlinux:   {img.vmlinux}")
        print(f"initramfs: {img.initrd}")
        print(f"config:    {img.config}")
    print("cache hit" if not said else f"built in {time.monotonic() - t0:.0f}s")
    return 0


def _clean(args: argparse.Namespace) -> int:
    root = cache_dir()
    if not root.exists():
        print(f"nothing to clean: {root} does not exist")
        return 0
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 1
    level = "everything" if args.everything else "all" if args.all else "stale"
    print(f"cache {root}" + (" (dry run: nothing is removed)" if args.dry_run else ""))
    try:
        r = clean_cache(
            FRAGMENTS, level, kernel_source=args.kernel_source, dry_run=args.dry_run, say=print
        )
    except OSError as e:  # e.g. an unreadable cache dir
        print(f"error: {e}", file=sys.stderr)
        return 1
    entries = f"{r.removed} entr{'y' if r.removed == 1 else 'ies'}"
    if args.dry_run:
        print(
            f"dry run: {r.files} files in {entries} would go, {human_size(r.freed)} would be freed"
        )
    else:
        print(f"{r.files} files in {entries} removed, {human_size(r.freed)} freed")
    if r.skipped:
        print(f"{r.skipped} entries skipped while a build holds their lock: run clean again later")
    if r.failed:
        print(f"error: {r.failed} entries could not be removed (see FAILED above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_ignition.guest")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) the guest kernel + initramfs")
    b.add_argument("--kernel-source", type=Path, help="kernel tree or tarball (default: Debian's)")
    b.add_argument("--host", action="store_true", help="build the nested harness's host kernel")
    b.add_argument(
        "--arch",
        choices=ARCHES,
        help="guest architecture (default: the host's; aarch64 on x86_64 cross-builds)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c = sub.add_parser(
        "clean",
        help="remove cached artefacts the current checkout would not use",
        description="Remove stale initramfs files and kernels, and leftovers of interrupted "
        "builds, from the guest cache. Keeps the current guest and host kernel, the current "
        "initramfs, and the kernel source and build trees (they make the next kernel build "
        "fast). Entries whose build lock is held by a running build are skipped.",
    )
    what = c.add_mutually_exclusive_group()
    what.add_argument(
        "--all", action="store_true", help="also remove the kernel source and build trees"
    )
    what.add_argument(
        "--everything",
        action="store_true",
        help="remove all the pipeline made but its empty lock files",
    )
    c.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    c.add_argument(
        "--kernel-source",
        type=Path,
        help="the kernel tree or tarball your builds use (default: Debian's); it is part of "
        "the current kernel keys",
    )
    i = sub.add_parser(
        "image",
        help="build (or find in the cache) a root image and print its path",
        description="Build (or find in the cache) the ext4 root image for SPEC and print its "
        "path on stdout (progress on stderr). SPEC is debian:SUITE (built with mmdebstrap), "
        "oci-archive:PATH (a docker save or OCI image archive) or the path of an ext4 file "
        "(checked and printed as is).",
    )
    i.add_argument("spec", metavar="SPEC", help="debian:SUITE, oci-archive:PATH or an ext4 path")
    i.add_argument("--packages", default="", help="extra Debian packages, comma or space separated")
    i.add_argument("--arch", default=None, help="x86_64 or aarch64 (default: this machine's)")
    i.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "image":
            import platform

            from .image import main_image

            arch = args.arch or platform.machine()
            return main_image(args.spec, args.packages, arch, args.quiet)
        return _clean(args) if args.cmd == "clean" else _build(args)
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
