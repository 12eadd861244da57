"""``python -m pytest_ignition.vmm boot ...``: one microVM per process.

    python -m pytest_ignition.vmm boot --kernel K [--initrd I] [--mem 512M] [--cpus N]
        [--cmdline ...] [--vsock PATH] [--disk IMG]... [--console stdio|PATH|none]
        [--boot-timer] [--control PATH] [--paused] [--store DIR --name NAME]
    python -m pytest_ignition.vmm restore --store DIR --name NAME [--vsock PATH]
        [--console ...] [--control PATH] [--paused] [--sync-agent]
        [--kernel K] [--initrd I] [--mem M] [--cpus N] [--cmdline ...]   (must match)

``boot --store/--name`` set where the control command ``snapshot`` writes by default (its
``settle``: seconds to wait first for vsock connections to close, so that restores need no
transport reset);
``restore`` maps the snapshot's memory lazily and logs ``Restore-time = <us> us <ms> ms``.
The process serves a JSON-lines control socket (:mod:`.control`: status, pause, resume,
shutdown, snapshot, rollback), dies with its parent (``PR_SET_PDEATHSIG``), and removes its sockets on every
exit path (guest reboot/power-off, SIGTERM, SIGINT, SIGHUP, control ``shutdown``).

Exit status: 0 when the guest rebooted or powered off or a shutdown was requested, 1 when
the VM broke (KVM internal error, failed entry, crash), 2 when it could not be set up (bad
arguments or paths, no /dev/kvm, a kernel that cannot be loaded): one line on stderr, never
a traceback (set ``IGNITION_VMM_DEBUG=1`` to get one); 3 when the guest halted for good: every
vCPU halted with interrupts disabled (x86 Linux's ``halt``, and its ``poweroff`` when the
kernel has no power-off device, as the default guest, which has no ACPI; see ``halt.py``).

Test hook: ``IGNITION_VMM_FAULT=boot`` (or ``restore``) makes that command fail on purpose with
status 1 after the VM is set up and before any vCPU runs (KVM_RUN), as a broken VMM would; the
plugin's engine fallback is tested with it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

# Taken at import, before argument parsing and KVM setup: the boot timer measures from here
# (Firecracker measures from its process start too).
LAUNCH_NS = time.monotonic_ns()

PROG = "python -m pytest_ignition.vmm"
# Snapshots the fork server (.forkserver) loaded and checked before forking this process, by
# store/name path: a restore uses them instead of reading the state file again.
PRELOADED: dict[str, Any] = {}
EXIT_SETUP = 2
PR_SET_PDEATHSIG = 1
# The longest a snapshot request may ask the VMM to wait for vsock connections to close.
MAX_SETTLE_S = 30

log = logging.getLogger("pytest_ignition.vmm")


class SetupError(Exception):
    """Bad arguments or environment: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument; left to itself the formatter
        # imports shutil (+ bz2, lzma) just to read the terminal width. Same width rule here.
        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
        return self.formatter_class(prog=self.prog, width=max(columns, 1) - 2)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_SETUP)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``1GiB``, ``536870912`` -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (try 512M or 2G)")
    n = int(m.group(1)) << (10 * "_kmgt".index(m.group(2).lower() or "_"))
    if not m.group(2) and n < 1 << 20:
        n <<= 20  # a bare small number means MiB, as QEMU's -m does
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The bundled pytest-ignition microVM monitor (KVM).")
    # prog given: otherwise argparse builds a help formatter (importing shutil) to compute it
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, prog=PROG)
    b = sub.add_parser("boot", help="boot a kernel in a new microVM and serve it until it stops")
    b.add_argument("--kernel", required=True, help="bzImage or uncompressed vmlinux (PVH)")
    b.add_argument("--initrd", help="initramfs to load")
    b.add_argument("--mem", type=parse_size, default=512 << 20, help="guest RAM (default 512M)")
    b.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    b.add_argument("--cmdline", help="kernel command line (default: the project's guest one)")
    b.add_argument("--vsock", metavar="PATH", help="virtio-vsock over this Unix socket path")
    b.add_argument("--vsock-cid", type=int, default=3, help="guest CID (default 3)")
    b.add_argument(
        "--net",
        metavar="connect:PATH|listen:PATH",
        help="virtio-net over passt's stream protocol (connect to passt, or listen for a switch)",
    )
    b.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="IMG",
        help="virtio-blk over IMG, copy-on-write (repeatable)",
    )
    b.add_argument("--disk-read-only", action="store_true", help="present disks read-only")
    b.add_argument("--no-rng", action="store_true", help="no virtio-rng device")
    b.add_argument(
        "--console",
        default="stdio",
        metavar="stdio|PATH|none",
        help="serial console: this terminal (default; Ctrl-A x quits), a file, or nowhere",
    )
    b.add_argument(
        "--boot-timer",
        action="store_true",
        help="boot-timer device at 0xd0000000 (logs Guest-boot-time)",
    )
    b.add_argument("--control", metavar="PATH", help="JSON-lines control socket path")
    b.add_argument(
        "--paused",
        action="store_true",
        help="create the VM but start the vCPUs only on a control 'resume'",
    )
    _store_args(b, required=False)
    b.add_argument("--kvm-device", default="/dev/kvm", help=argparse.SUPPRESS)
    b.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    r = sub.add_parser(
        "restore",
        help="restore a snapshot from a store in a new microVM and serve it until it stops",
    )
    _store_args(r, required=True)
    r.add_argument("--vsock", metavar="PATH", help="vsock socket path (default: the snapshot's)")
    r.add_argument("--net", metavar="connect:PATH|listen:PATH", help="virtio-net backend")
    r.add_argument("--console", default="stdio", metavar="stdio|PATH|none", help="serial console")
    r.add_argument("--control", metavar="PATH", help="JSON-lines control socket path")
    r.add_argument("--paused", action="store_true", help="restore, but run only on 'resume'")
    r.add_argument(
        "--no-rollback",
        action="store_true",
        help="no dirty-page logging (faster first writes on AMD/nested hosts); "
        "control 'rollback' is then refused until a 'snapshot'",
    )
    r.add_argument(
        "--sync-agent",
        action="store_true",
        help="after restoring, set the guest agent's clock and reseed its entropy (vsock)",
    )
    g = r.add_argument_group(
        "expected configuration",
        "given ones must match the snapshot's fingerprint, or the restore is refused",
    )
    g.add_argument("--kernel", help="the kernel the snapshot must have been booted with")
    g.add_argument("--initrd", help="the initrd the snapshot must have been booted with")
    g.add_argument("--mem", type=parse_size, help="guest RAM the snapshot must have")
    g.add_argument("--cpus", type=int, help="vCPUs the snapshot must have")
    g.add_argument("--cmdline", help="base command line the snapshot must have been booted with")
    r.add_argument("--kvm-device", default="/dev/kvm", help=argparse.SUPPRESS)
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _store_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    what = "restore from" if required else "write (control 'snapshot' default)"
    p.add_argument("--store", metavar="DIR", required=required, help=f"snapshot store to {what}")
    p.add_argument("--name", metavar="NAME", required=required, help="snapshot name in the store")


# -- process plumbing -------------------------------------------------------------------
def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when the parent dies (best effort, Linux only: elsewhere
    the serving loop polls the parent)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.warning("prctl unavailable: %s", e)


class _Console:
    """The serial console's host end: stdio (raw mode on a tty, restored), a file, or none."""

    def __init__(self, where: str):
        self.where = where
        self.out: Any = None
        self.in_fd: int | None = None
        self._saved_tty: list | None = None
        self._file = None
        if where == "none":
            return
        if where == "stdio":
            self.out = sys.stdout.buffer
            try:
                fd = sys.stdin.fileno()
            except (ValueError, OSError, AttributeError):
                fd = None
            if fd is not None:
                self.in_fd = fd
                if os.isatty(fd):
                    import termios
                    import tty

                    self._saved_tty = termios.tcgetattr(fd)
                    tty.setraw(fd)
            return
        try:
            self._file = open(where, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise SetupError(f"console file {where!r}: {e.strerror}") from None
        self.out = self._file

    @property
    def raw(self) -> bool:
        return self._saved_tty is not None

    def close(self) -> None:
        if self._saved_tty is not None and self.in_fd is not None:
            import termios

            try:
                termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved_tty)
            except termios.error:
                pass
            self._saved_tty = None
        if self._file is not None:
            self._file.close()
            self._file = None


class _EscapeFilter:
    """Ctrl-A x on a raw terminal quits the VMM (as in QEMU); Ctrl-A Ctrl-A sends one Ctrl-A."""

    CTRL_A = 0x01

    def __init__(self, quit: Callable[[], None]):
        self.quit = quit
        self.pending = False

    def __call__(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self.pending:
                self.pending = False
                if b in (ord("x"), ord("X")):
                    self.quit()
                    break
                if b == self.CTRL_A:
                    out.append(b)
                continue  # unknown escape: dropped
            if b == self.CTRL_A:
                self.pending = True
            else:
                out.append(b)
        return bytes(out)


class _CrlfHandler(logging.StreamHandler):
    """Log lines end in CRLF while the terminal is raw, so they do not staircase."""

    def __init__(self, console: _Console | None = None):
        super().__init__(sys.stderr)
        self.console = console

    def format(self, record: logging.LogRecord) -> str:
        s = super().format(record)
        if self.console is not None and self.console.raw:
            s = s.replace("\n", "\r\n") + "\r"
        return s


def _check_paths(args: argparse.Namespace) -> None:
    def readable(path: str, what: str) -> None:
        if not os.path.exists(path):
            raise SetupError(f"{what} {path!r}: no such file")
        if os.path.isdir(path):
            raise SetupError(f"{what} {path!r}: is a directory")
        if not os.access(path, os.R_OK):
            raise SetupError(f"{what} {path!r}: permission denied")

    if args.command == "boot" or args.kernel:
        readable(args.kernel, "kernel")
    if args.initrd:
        readable(args.initrd, "initrd")
    for d in getattr(args, "disk", []):
        readable(d, "disk")
    if args.store and not args.name or args.name and not args.store:
        raise SetupError("--store and --name go together")
    if args.name:
        from .snapshot import SnapshotError, check_name

        try:
            check_name(args.name)
        except SnapshotError as e:
            raise SetupError(str(e)) from None
    for path, what in ((args.vsock, "vsock socket"), (args.control, "control socket")):
        if path:
            parent = os.path.dirname(os.path.abspath(path)) or "."
            if not os.path.isdir(parent):
                raise SetupError(f"{what} {path!r}: directory {parent!r} does not exist")
            if len(os.fsencode(os.path.abspath(path))) > 107 and len(os.fsencode(path)) > 107:
                raise SetupError(f"{what} {path!r}: too long for a Unix socket path (max 107)")
    if args.console not in ("stdio", "none"):
        parent = os.path.dirname(os.path.abspath(args.console))
        if not os.path.isdir(parent):
            raise SetupError(f"console file {args.console!r}: directory {parent!r} does not exist")
    if args.cpus is not None and args.cpus < 1:
        raise SetupError(f"--cpus {args.cpus}: must be at least 1")


@dataclass
class _MachineKind:
    """How this process builds its machine: the x86_64 one on KVM (``vmm/machine.py``) or the
    aarch64 one on a hypervisor backend (``vmm/arch/aarch64/machine.py``)."""

    create: Callable[[dict[str, Any]], Any]  # MachineSpec keywords -> a created machine
    restore: Callable[..., Any]  # (snapshot or path, **keywords) -> a restored machine
    check_kernel_file: Callable[[str], object]
    # the machine's own failures (its MachineError first: also what control requests may
    # raise), and what else means a setup failure: one line, exit status 2
    errors: tuple[type[BaseException], ...]
    hypervisor: str


def _machine_kind(args: argparse.Namespace, hypervisor: str | None) -> _MachineKind:
    """The machine for this host (aarch64 hosts and ``--hypervisor hvf``: the aarch64 one)."""
    from .memory import GuestMemoryError

    if hypervisor is None and os.uname().machine != "aarch64":
        from .arch.x86_64.loader import KernelLoadError, check_kernel_file
        from .hypervisor.kvm import KvmUnavailable
        from .machine import Machine, MachineError, MachineSpec
        from .vcpu import install_kick_handler

        install_kick_handler()
        return _MachineKind(
            create=lambda kw: Machine.create(MachineSpec(**kw, kvm_device=args.kvm_device)),
            restore=lambda where, **kw: Machine.restore(where, kvm_device=args.kvm_device, **kw),
            check_kernel_file=check_kernel_file,
            errors=(MachineError, KernelLoadError, KvmUnavailable, GuestMemoryError),
            hypervisor="kvm",
        )
    from .arch.aarch64 import machine as am
    from .errors import MachineError as ArmMachineError

    name = hypervisor or "kvm"
    factory = am.hypervisor_factory(name, kvm_device=args.kvm_device)
    if name == "hvf":
        log.warning("EXPERIMENTAL: the aarch64 machine on hvf has never been run on a Mac before")
    return _MachineKind(
        create=lambda kw: am.Aarch64Machine.create(am.Aarch64Spec(**kw, hypervisor=name), factory),
        restore=lambda where, **kw: am.Aarch64Machine.restore(
            where, factory, hypervisor_name=name, **kw
        ),
        check_kernel_file=am.check_kernel_file,
        errors=(ArmMachineError, GuestMemoryError),
        hypervisor=name,
    )


def cmd_boot(args: argparse.Namespace, hypervisor: str | None = None) -> int:
    """``boot`` and ``restore``: build the VM, serve it until it stops. ``hypervisor``: None
    for this host's KVM (x86_64 or aarch64 machine by the host), or an aarch64 backend name."""
    set_parent_death_signal()
    parent = os.getppid()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    restoring = args.command == "restore"
    console: _Console | None = None
    machine: Any = None
    kind: _MachineKind | None = None
    control = None
    sockets: list[str] = []  # socket files this process created: removed on every exit path
    try:
        _check_paths(args)
        console = _Console(args.console)
        handler = _CrlfHandler(console)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(args.log_level.upper())
        kind = _machine_kind(args, hypervisor)
        if not restoring:
            kind.check_kernel_file(args.kernel)
        # a raw terminal is read here (for the Ctrl-A x escape); anything else by the VM
        console_in = None if console.raw else console.in_fd
        if restoring:
            where = os.path.join(args.store, args.name)
            machine = kind.restore(
                PRELOADED.get(where, where),
                expected=_expected_fingerprint(args),
                vsock=args.vsock,
                net=args.net,
                console_out=console.out,
                console_in=console_in,
                start=False,
                launch_ns=LAUNCH_NS,
                rollback=not args.no_rollback,
            )
            if machine.spec.vsock:
                sockets.append(machine.spec.vsock)
        else:
            machine = kind.create(
                dict(
                    kernel=args.kernel,
                    initrd=args.initrd,
                    mem_size=args.mem,
                    cpus=args.cpus,
                    cmdline=args.cmdline,
                    vsock=args.vsock,
                    vsock_cid=args.vsock_cid,
                    net=args.net,
                    disks=list(args.disk),
                    disk_read_only=args.disk_read_only,
                    rng=not args.no_rng,
                    boot_timer=args.boot_timer,
                    console_out=console.out,
                    console_in=console_in,
                    launch_ns=LAUNCH_NS,
                )
            )
            if args.vsock:
                sockets.append(args.vsock)
        fault = os.environ.get("IGNITION_VMM_FAULT", "")
        if fault == args.command:
            sys.stderr.write(f"{PROG}: IGNITION_VMM_FAULT={fault}: failing before KVM_RUN\n")
            return 1
        if console.raw and console.in_fd is not None:
            _attach_tty(machine, console.in_fd, _EscapeFilter(stop.set))
            log.info("console: Ctrl-A x quits")
        if args.control:
            from .control import ControlServer

            control = ControlServer(
                args.control, _control_handler(machine, stop, args, kind.errors[:1])
            )
        # Start before the control socket appears: a client that sees the socket sees the VM
        # in its final state (running, or created under --paused).
        if not args.paused:
            if restoring:
                _start_restored(machine)
            else:
                machine.start()
        if control is not None:
            control.start()
            sockets.append(args.control)
        if restoring and args.sync_agent:
            threading.Thread(target=_sync_agent, args=(machine,), daemon=True).start()
        while not stop.is_set():
            if machine.wait(0.25) is not None:
                break
            if os.getppid() != parent:  # the death signal was lost (e.g. set too late)
                log.info("parent process %d went away; shutting down", parent)
                break
        if received:
            log.info("signal %s: shutting down", signal.Signals(received[0]).name)
        if not machine.stopped:
            machine.shutdown()
        return machine.exit_status or 0
    except SetupError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return EXIT_SETUP
    except Exception as e:
        msg = _setup_failure(e, kind)
        if msg is None:
            raise
        sys.stderr.write(f"{PROG}: {msg}\n")
        return EXIT_SETUP
    finally:
        if control is not None:
            control.close()
        if machine is not None:
            try:
                machine.close()
            except Exception as e:  # teardown must not turn into a traceback
                log.error("teardown: %s", e)
        for path in sockets:
            try:
                os.unlink(path)
            except OSError:
                pass
        if console is not None:
            console.close()


def _setup_failure(e: Exception, kind: _MachineKind | None) -> str | None:
    """The one line for a VM that could not be set up (exit status 2), or None for a bug."""
    from .errors import MachineError

    kvm = sys.modules.get(__package__ + ".hypervisor.kvm")  # loaded only where KVM was used
    if kvm is not None and isinstance(e, kvm.KvmError):
        return f"cannot create the VM: {e}"
    known = (MachineError, OSError, _snapshot_error(), *(kind.errors if kind else ()))
    return str(e) if isinstance(e, known) else None


def _snapshot_error() -> type[Exception]:
    """SnapshotError, imported only when an error is being matched: a boot does not load
    the snapshot module (and its hashlib/json imports) otherwise."""
    from .snapshot import SnapshotError

    return SnapshotError


def _start_restored(machine: Any) -> None:
    """Start a restored VM; the restore time counts up to the vCPUs entering their loops."""
    t0 = time.perf_counter_ns()
    machine.start()
    if machine.restore_time_us is not None:
        machine.restore_time_us += (time.perf_counter_ns() - t0) // 1000
    us = machine.restore_time_us
    log.info("Restore-time = %d us %d ms", us, us // 1000)


def _expected_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """The parts of a fingerprint the restore command line pins down."""
    from .snapshot import file_identity

    expected: dict[str, Any] = {}
    if args.kernel:
        expected["kernel"] = file_identity(args.kernel)
    if args.initrd:
        expected["initrd"] = file_identity(args.initrd)
    if args.mem is not None:
        expected["mem_size"] = args.mem
    if args.cpus is not None:
        expected["cpus"] = args.cpus
    if args.cmdline is not None:
        expected["cmdline"] = args.cmdline
    return expected


def _sync_agent(machine: Any, port: int = 52, timeout: float = 30.0) -> None:
    """Set the restored guest's clock and reseed its CRNG through the agent (best effort)."""
    from pytest_ignition.agent import AgentClient

    if not machine.spec.vsock:
        log.warning("--sync-agent: the VM has no vsock device")
        return
    try:
        client = AgentClient.connect_vsock_uds(machine.spec.vsock, port, timeout=timeout)
        with client:
            client.sync(time.time_ns(), os.urandom(256))
        log.info("guest agent: clock set and entropy reseeded")
    except Exception as e:
        log.warning("guest agent sync failed: %s", e)


def _attach_tty(machine: Any, fd: int, escape: _EscapeFilter) -> None:
    from .console import reader

    def feed(data: bytes) -> None:
        data = escape(data)
        if data and machine.uart is not None:
            machine.uart.feed(data)

    machine.loop.add_reader(fd, reader(machine.loop, fd, feed))


def _control_handler(
    machine: Any,
    stop: threading.Event,
    args: argparse.Namespace,
    machine_errors: tuple[type[BaseException], ...] = (),
):
    """The control socket's handler; ``machine_errors`` (the machine's MachineError) become
    ``{"ok": false, "error": ...}`` replies."""
    from .errors import MachineError

    refused = (MachineError, *machine_errors)

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        try:
            if cmd == "status":
                return {"ok": True, **machine.status()}
            if cmd == "pause":
                machine.pause()
                return {"ok": True, "state": machine.state}
            if cmd == "resume":
                if machine.state == "created" and machine.restore_time_us is not None:
                    _start_restored(machine)
                else:
                    machine.resume()
                return {"ok": True, "state": machine.state}
            if cmd == "shutdown":
                stop.set()
                return {"ok": True, "state": "stopping"}
            if cmd == "snapshot":
                store = req.get("store", args.store)
                name = req.get("name", args.name)
                if not isinstance(store, str) or not isinstance(name, str):
                    return {"ok": False, "error": "snapshot needs a store and a name (strings)"}
                settle = req.get("settle", 0)
                if isinstance(settle, bool) or not isinstance(settle, (int, float)):
                    return {"ok": False, "error": "snapshot: settle must be a number of seconds"}
                if not 0 <= settle <= MAX_SETTLE_S:
                    return {"ok": False, "error": f"snapshot: settle must be 0..{MAX_SETTLE_S} s"}
                t0 = time.perf_counter()
                path = machine.snapshot(store, name, settle=float(settle))
                ms = round((time.perf_counter() - t0) * 1000, 3)
                return {"ok": True, "path": str(path), "snapshot_ms": ms, "state": machine.state}
            if cmd == "rollback":
                info = machine.rollback()
                return {"ok": True, **info, "state": machine.state}
            if cmd == "probe":
                from .probe import probe

                return {"ok": True, **probe(machine), "state": machine.state}
        except (*refused, _snapshot_error()) as e:
            return {"ok": False, "error": str(e), "state": machine.state}
        except OSError as e:
            return {"ok": False, "error": f"{cmd}: {e}", "state": machine.state}
        return {
            "ok": False,
            "error": f"unknown command {cmd!r} "
            "(status, pause, resume, shutdown, snapshot, rollback, probe)",
        }

    return handle


_parser: argparse.ArgumentParser | None = None


def parser() -> argparse.ArgumentParser:
    """The command-line parser, built once (~2 ms; the fork server builds it before forking)."""
    global _parser
    if _parser is None:
        _parser = build_parser()
    return _parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:  # what this host's hypervisor offers (pytest_ignition.vmm.doctor)
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        if args.command in ("boot", "restore"):
            return cmd_boot(args)
    except Exception as e:  # the promise: one line, no traceback, unless asked
        if os.environ.get("IGNITION_VMM_DEBUG"):
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: internal error: {type(e).__name__}: {e}\n")
        return 1
    return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())
