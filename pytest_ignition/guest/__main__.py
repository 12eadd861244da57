"""Command line: ``python -m pytest_ignition.guest build [--kernel-source DIR] [--host] [--quiet]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import GuestBuildError, build_guest, build_host_kernel
from .build import main_progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_ignition.guest")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) the guest kernel + initramfs")
    b.add_argument("--kernel-source", type=Path, help="kernel tree or tarball (default: Debian's)")
    b.add_argument("--host", action="store_true", help="build the nested harness's host kernel")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    shown = main_progress(args.quiet)
    said: list[str] = []

    def progress(msg: str) -> None:
        said.append(msg)  # anything said means something was built, extracted or waited for
        if shown is not None:
            shown(msg)

    t0 = time.monotonic()
    try:
        if args.host:
            host = build_host_kernel(args.kernel_source, progress=progress)
            print(f"kernel:    {host.kernel}")
            print(f"config:    {host.config}")
        else:
            img = build_guest(args.kernel_source, progress=progress)
            print(f"kernel:    {img.kernel}")
            print(f"vmlinux:   {img.vmlinux}")
            print(f"initramfs: {img.initrd}")
            print(f"config:    {img.config}")
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print("cache hit" if not said else f"built in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
