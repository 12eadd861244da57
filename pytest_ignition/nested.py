"""The nested harness: run a command inside a QEMU-TCG "hypervisor host" that offers /dev/kvm.

This machine's own KVM (PVM) emulates guest CPL0 code, so a Linux guest cannot boot on it in useful
time. This module boots the guest pipeline's *host* kernel (``guest/kernel/host-x86_64.config``)
under ``qemu-system-x86_64 -M q35 -accel tcg -cpu EPYC,+svm,+npt``, where KVM_AMD gives a real
``/dev/kvm``, and runs one command there:

- the root is this machine's ``/`` over virtio-9p, read-only, with an overlayfs (tmpfs upper) on
  top, so HOME, caches, /var are writable in RAM and nothing leaks out;
- the current directory is shared *writable* at the same path (results come back; it is
  mounted with ``cache=loose`` for speed, so changes made to it from outside during the run
  may not be seen inside; everything written inside is flushed before the host stops);
- the network is loopback plus a dummy interface with a default route (``ign-dummy0``,
  192.0.2.2/24), which passt (``network=user``) needs in order to start; destinations other
  than loopback and that /24 are unreachable (two ``unreachable`` /1 routes), so connects to
  them fail at once;
- /tmp, /run, /dev/shm are fresh tmpfs; the environment is PATH, HOME, locale, PYTHON*,
  IGNITION_*, VIRTUAL_ENV (+ ``env``), with ``IGNITION_NESTED=1`` and
  ``PYTHONDONTWRITEBYTECODE=1`` added; stdin is /dev/null;
- the command's output (stdout and stderr, merged, through the serial console) streams out as it
  runs, and its exit code becomes ours.

The guest side is ``nested_init.sh`` (run as PID 1). A per-run control directory, shared as
``ignctl``, carries ``run.sh`` (cd + env + exec of the command), a nonce for the console markers,
and ``rc`` written back.

Command line::

    python -m pytest_ignition.nested run [--mem 3072] [--cpus 2] [--timeout S] [--] CMD...
    python -m pytest_ignition.nested run --arch aarch64 -- CMD...   # the arm64 host
    python -m pytest_ignition.nested check      # is the harness usable here?

``--arch aarch64`` boots an arm64 hypervisor host instead (:mod:`.nested_arm64`: Debian's arm64
kernel under ``qemu-system-aarch64`` TCG at EL2, an arm64 Python tree as the root); the same
control protocol, cwd share and exit codes. There, ``python3`` is the arm64 interpreter.

At most ``IGNITION_NESTED_SLOTS`` hosts run at once on a machine (default: one per two CPUs;
each is ``-smp 2`` under TCG, and more than the cores can carry only make every guest miss its
deadlines); a run that finds them all busy waits, saying so (:mod:`._harness_slots`).
``IGNITION_NESTED_HOST_ARGS`` adds words to the x86 host's kernel command line (debugging;
``tests/nested/test_tsc_rate.py`` boots a host with a deliberately wrong ``tsc_early_khz``).

The host builds KVM in, so KVM reads the host's TSC rate before the host kernel refines its
calibration; when the refined rate differs by more than 250 ppm, KVM's default rate for new
vCPUs is stale, and the bundled VMM asks for the current one
(``vmm.arch.x86_64.state.use_host_tsc_rate``). QEMU asks for no rate, so the host's KVM also gets
a 1% tolerance (``kvm.tsc_tolerance_ppm``), within which it takes the refined rate for every vCPU.

Exit status: CMD's; 124 on timeout; 125 when the harness itself fails (no host kernel, no QEMU,
kernel panic, host died before CMD ended); 130 on Ctrl-C or SIGTERM. QEMU is killed and the
control directory removed in every case (QEMU also dies with us on SIGKILL: PR_SET_PDEATHSIG).
``--retries N`` runs CMD again in a new host, up to N times, when the host's own kernel panicked
(saying so; never when CMD failed or timed out). The error ends with the oops's telling lines
(:func:`oops_digest`), so that the end of a CI log shows what died.

The VMM's end-to-end tests run inside it (``tests/nested/`` skip anywhere else)::

    python -m pytest_ignition.nested run -- .venv/bin/python -m pytest tests/nested -q

(``make test-nested`` runs exactly that, with ``-v``.) Measured on the 2-core development
machine under load from other jobs (2026-11-27): ``run -- true`` 3.4-4.5 s wall (host boot to
the command ~3.5 s); ``python3 -c pass`` inside 0.9 s cold, 0.3 s warm; ``import pytest`` from
the venv 5-16 s (9p + TCG); QEMU+KVM inside boots the default guest to its agent in 4-11 s.

From Python: :func:`run` returns a :class:`NestedResult` (raises :class:`NestedError` when the
harness fails, :class:`NestedTimeout` on timeout); :func:`available` says whether it can run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_CPUS",
    "DEFAULT_MEM_MB",
    "DEFAULT_TIMEOUT",
    "NestedError",
    "NestedResult",
    "NestedTimeout",
    "available",
    "build_qemu_argv",
    "inside",
    "main",
    "oops_digest",
    "run",
]

QEMU = "qemu-system-x86_64"
DEFAULT_MEM_MB = 3072
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 3600.0
INIT_SCRIPT = Path(__file__).resolve().with_name("nested_init.sh")
BUSYBOX = "/bin/busybox"

EXIT_TIMEOUT = 124
EXIT_HARNESS = 125
EXIT_INTERRUPTED = 130

# The console tail kept for error reports, and how long QEMU may take to go away after CMD ended.
_TAIL_BYTES = 16 * 1024
_SHUTDOWN_GRACE = 20.0
# How long QEMU may take to exit once its console closed: a kill before that would turn the
# status of a host that reset itself (-no-reboot: QEMU exits 0) into a bare -9.
_EXIT_GRACE = 15.0
# QEMU's reset log (-d cpu_reset): says "Triple fault" when the host's CPU reset it that way.
_QEMU_LOG = "qemu-reset.log"
_QEMU_LOG_TAIL = 64 * 1024

# Variables carried into the host. Others (SSH agents, terminals, pytest-xdist internals) mean
# nothing in there.
_ENV_NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "COLUMNS"}
_ENV_NAMES |= {"VIRTUAL_ENV", "PYTEST_ADDOPTS", "NO_COLOR", "FORCE_COLOR"}
_ENV_PREFIXES = ("IGNITION_", "PYTHON", "LC_")
_ENV_DROP = {"PYTHONHOME"}  # would point python at nothing useful if it was set for the outside


class NestedError(RuntimeError):
    """The harness failed (not the command): boot failure, panic, missing kernel or QEMU."""

    def __init__(self, message: str, console_tail: str = "", *, host_reset: bool = False) -> None:
        super().__init__(message)
        self.console_tail = console_tail
        self.host_reset = host_reset

    @property
    def host_panicked(self) -> bool:
        """The host's own kernel died (not the command): worth one more try in a new host."""
        return _panicked(self.console_tail)

    @property
    def host_died(self) -> bool:
        """The host went away under CMD (a panic, or a reset it asked for or triple-faulted
        into): CMD's result is unknown, not failed, so one more try in a new host is fair."""
        return self.host_panicked or self.host_reset

    def __str__(self) -> str:
        msg = super().__str__()
        if self.console_tail:
            msg += "\n--- console tail ---\n" + self.console_tail.rstrip() + "\n---"
        digest = oops_digest(self.console_tail)
        if digest:  # last, so that a log viewer showing only the end still shows what died
            msg += "\n--- the host kernel's oops, in short ---\n" + digest + "\n---"
        return msg


def _panicked(console: str) -> bool:
    return "Kernel panic" in console


# The lines of a kernel oops that say what died and where (the rest is registers and code bytes).
_OOPS_START = re.compile(
    r"BUG: |Oops: |general protection fault|kernel BUG at|Unable to handle kernel|"
    r"Kernel panic - not syncing|WARNING: CPU:"
)
_OOPS_KEEP = re.compile(
    _OOPS_START.pattern
    + r"|CPU: \d+ PID: |RIP: |Call Trace:|^\s+(\? )?[A-Za-z_][\w.]*\+0x|Modules linked"
)
_OOPS_MAX_LINES = 40


def oops_digest(console: str) -> str:
    """The telling lines of the first kernel oops (or panic) in ``console``; "" when none.

    The host kernel has kallsyms, so its call traces name functions; the digest keeps the
    first oops's header (what, which CPU, process and RIP) and its symbolic trace, and the
    "Kernel panic" line, at most ``_OOPS_MAX_LINES`` lines.
    """
    lines = console.splitlines()
    start = next((i for i, line in enumerate(lines) if _OOPS_START.search(line)), None)
    if start is None:
        return ""
    kept: list[str] = []
    for line in lines[start:]:
        line = line.rstrip()
        if _OOPS_KEEP.search(line) and line not in kept[-1:]:
            kept.append(line)
        if "Kernel panic" in line or len(kept) >= _OOPS_MAX_LINES:
            break
    return "\n".join(kept)


class NestedTimeout(NestedError):
    """The command did not finish within the timeout; QEMU was killed."""


@dataclass(frozen=True)
class NestedResult:
    """What a nested run produced: CMD's exit code and merged output, and timings in seconds."""

    exit_code: int
    output: str
    duration: float  # QEMU launch to QEMU exit
    boot_time: float  # QEMU launch to CMD starting inside

    @property
    def output_bytes(self) -> bytes:
        return self.output.encode("utf-8", "surrogateescape")


def inside() -> bool:
    """True when this process runs inside the nested harness."""
    return os.environ.get("IGNITION_NESTED") == "1"


def _host_kernel() -> Path | None:
    env = os.environ.get("IGNITION_NESTED_KERNEL")
    if env:
        return Path(env)
    try:
        from .guest import find_host_kernel
    except ImportError:  # pragma: no cover - guest pipeline absent
        return None
    found = find_host_kernel()
    return found.kernel if found else None


def available() -> tuple[bool, str]:
    """Whether :func:`run` can work here, and if not, why (with what to do about it)."""
    if inside():
        return False, "already inside the nested harness (TCG inside TCG is not supported)"
    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not found (apt-get install qemu-system-x86)"
    kernel = _host_kernel()
    if kernel is None:
        return False, (
            "the nested host kernel is not built (python -m pytest_ignition.guest build --host)"
        )
    if not kernel.is_file():
        return False, f"the nested host kernel {kernel} does not exist"
    if not INIT_SCRIPT.is_file():
        return False, f"{INIT_SCRIPT} is missing"
    return True, f"{QEMU} + host kernel {kernel}"


def _qemu_path(path: str | os.PathLike[str]) -> str:
    """A path as a QEMU option value: commas are doubled."""
    return os.fspath(path).replace(",", ",,")


def build_qemu_argv(
    kernel: Path,
    ctl_dir: Path,
    cwd: Path | None,
    *,
    mem_mb: int = DEFAULT_MEM_MB,
    cpus: int = DEFAULT_CPUS,
    verbose: bool = False,
) -> list[str]:
    """The QEMU command line that boots the hypervisor host (exposed for tests and debugging)."""
    init = os.fspath(INIT_SCRIPT)
    if any(c.isspace() for c in init):
        raise NestedError(f"the init script's path must not contain whitespace: {init!r}")
    rootflags = "trans=virtio,version=9p2000.L,msize=262144,cache=loose"
    append = [
        "console=ttyS0",
        "root=ignroot",
        "rootfstype=9p",
        f"rootflags={rootflags}",
        "ro",
        "panic=-1",
        "reboot=k",
        # TCG's TSC is the outer machine's (constant, shared by all vCPUs), but the boot-time
        # sync check fails under TCG's jitter and leaves the host on HPET, where every clock read
        # is an emulated MMIO access instead of a vDSO rdtsc.
        "tsc=reliable",
        # The host's early TSC calibration fails under TCG now and then (about one boot in
        # two here: "Fast TSC calibration failed", HPET gives ~780 ppm low) and the refined
        # one, a second later, is right. KVM took the early rate at init and then refuses it
        # for every new vCPU as "below hardware speed" (outside its 250 ppm tolerance, and
        # emulated SVM has no TSC scaling), which leaves the vCPU's TSC scaling ratio unset:
        # KVM's view of the guest TSC stands still, so a guest's TSC-deadline timer never
        # fires (LOC 1, RCU "timer wakeup didn't happen", sleep and ip-link hang) for QEMU+KVM
        # and the bundled VMM alike. The kernel keeps a refinement only within 1% of the early
        # value, so a 1% tolerance always accepts it.
        "kvm.tsc_tolerance_ppm=10000",
    ]
    # After "--" the kernel hands the words to init: [sh] SCRIPT SCRIPT (=$1, its own path).
    # A static busybox starts much faster under TCG than dash with its shared libraries.
    if os.access(BUSYBOX, os.X_OK):
        append += [f"init={BUSYBOX}"]
        init_args = ["sh", init, init]
    else:
        append += ["init=/bin/sh"]
        init_args = [init, init]
    # extra host kernel arguments, for debugging the host (e.g. tsc_early_khz=: see tests/nested)
    append += os.environ.get("IGNITION_NESTED_HOST_ARGS", "").split()
    if not verbose:
        append.append("quiet")
    append += ["--", *init_args]
    argv = [
        QEMU,
        "-M",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "EPYC,+svm,+npt",
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
        os.fspath(kernel),
        "-append",
        " ".join(append),
        "-fsdev",
        "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=root,mount_tag=ignroot",
        "-fsdev",
        f"local,id=ctl,path={_qemu_path(ctl_dir)},security_model=none",
        "-device",
        "virtio-9p-pci,fsdev=ctl,mount_tag=ignctl",
        "-device",
        "virtio-rng-pci",
    ]
    if cwd is not None:
        argv += [
            "-fsdev",
            f"local,id=cwd,path={_qemu_path(cwd)},security_model=none,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=cwd,mount_tag=igncwd",
        ]
    return argv


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = {
        k: v
        for k, v in os.environ.items()
        if (k in _ENV_NAMES or k.startswith(_ENV_PREFIXES)) and k not in _ENV_DROP
    }
    out.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    out.setdefault("HOME", "/root")
    if env:
        out.update(env)
    out["IGNITION_NESTED"] = "1"
    out["PYTHONDONTWRITEBYTECODE"] = "1"
    out["TMPDIR"] = "/tmp"
    return out


def _run_script(cmd: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    for k in env:
        if not k or "=" in k or "\0" in k:
            raise ValueError(f"bad environment variable name {k!r}")
    for s in [*cmd, *env.values(), os.fspath(cwd)]:
        if "\0" in s:
            raise ValueError("NUL byte in the command, the environment or the directory")
    env_cmd = f"{BUSYBOX} env" if os.access(BUSYBOX, os.X_OK) else "env"
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    return (
        "# generated by pytest_ignition.nested\n"
        f"cd -- {shlex.quote(os.fspath(cwd))} || exit {EXIT_HARNESS}\n"
        f"exec {env_cmd} -i {assigns} {shlex.join(cmd)}\n"
    )


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    # QEMU dies with us even when we are SIGKILLed (PR_SET_PDEATHSIG = 1).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class _Splitter:
    """Separates the boot log, CMD's output and the exit marker in the console stream."""

    def __init__(self, nonce: str, sink: Callable[[bytes], None]) -> None:
        self._start = f"@@ignition-nested:{nonce}:start@@\n".encode()
        self._exit_re = re.compile(rb"@@ignition-nested:" + nonce.encode() + rb":exit=(\d{1,3})@@")
        self._exit_prefix = f"@@ignition-nested:{nonce}:exit=".encode()
        self._sink = sink
        self._pending = b""
        self.started = False
        self.exit_code: int | None = None
        self.tail = b""  # the last bytes seen on the console (boot log and output alike)

    def feed(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
        if self.exit_code is not None:
            return
        buf = self._pending + data
        if not self.started:
            i = buf.find(self._start)
            if i < 0:
                self._pending = buf[-len(self._start) :]
                return
            self.started = True
            buf = buf[i + len(self._start) :]
        m = self._exit_re.search(buf)
        if m:
            self._emit(buf[: m.start()])
            self._pending = b""
            self.exit_code = _exit_code(m.group(1))
            return
        # Hold back whatever could be the beginning of the exit marker.
        keep = len(self._exit_prefix) + 8
        cut = buf.find(b"@@", max(0, len(buf) - keep))
        if cut < 0:
            cut = len(buf) - 1 if buf.endswith(b"@") else len(buf)
        self._emit(buf[:cut])
        self._pending = buf[cut:]

    def flush(self) -> None:
        """At EOF: emit what was held back (the marker never came)."""
        if self.started and self.exit_code is None and self._pending:
            self._emit(self._pending)
        self._pending = b""

    def _emit(self, data: bytes) -> None:
        if data:
            self._sink(data)


def _exit_code(raw: bytes | str) -> int | None:
    """An exit status the guest reported, if it is one (0-255); None for anything else."""
    try:
        n = int(raw.strip())
    except ValueError:
        return None
    return n if 0 <= n <= 255 else None


def _read_rc(path: Path) -> int | None:
    """The rc file the guest wrote: read little, follow no symlink, trust nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return _exit_code(os.read(fd, 16))
    except OSError:
        return None
    finally:
        os.close(fd)


def _reset_cause(log: Path) -> str:
    """Why a host whose QEMU exited 0 under -no-reboot (and left no exit code) went away."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - _QEMU_LOG_TAIL))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    if "Triple fault" in text:
        return "the host's CPU triple-faulted; QEMU reset it"
    # -no-reboot turns any reset into an exit 0: the kernel's reboot, or a firmware reset.
    return "the host reset itself without a kernel panic"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait()


def run(
    cmd: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    mem_mb: int = DEFAULT_MEM_MB,
    cpus: int = DEFAULT_CPUS,
    kernel: str | os.PathLike[str] | None = None,
    stream: Callable[[bytes], None] | None = None,
    console: Callable[[bytes], None] | None = None,
    verbose: bool = False,
    keep_output: bool = True,
    arch: str = "x86_64",
) -> NestedResult:
    """Run ``cmd`` (an argv) inside the hypervisor host; return its exit code and output.

    ``cwd`` (default: the current directory) is shared writable at the same path and is where
    ``cmd`` starts. ``stream`` receives CMD's output as it arrives; ``console`` receives the
    console bytes up to CMD's start (the boot log). With ``keep_output=False`` the result's
    ``output`` is empty (for long streamed runs). Raises NestedError/NestedTimeout when the harness fails.
    """
    if not cmd:
        raise ValueError("no command given")
    cmd = [os.fspath(c) for c in cmd]
    workdir = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if not workdir.is_dir():
        raise NestedError(f"{workdir} is not a directory")
    a64 = None
    if arch == "aarch64":
        from . import nested_arm64 as a64

        ok, reason = a64.available()
        if not ok:
            raise NestedError(reason)
        try:
            host = a64.ensure_host()
        except (a64.HostSetupError, OSError) as e:
            raise NestedError(f"the arm64 host cannot be set up: {e}") from None
        kpath = host.kernel
    elif arch != "x86_64":
        raise NestedError(f"no nested host for {arch!r} (x86_64 or aarch64)")
    elif kernel is None:
        ok, reason = available()
        if not ok:
            raise NestedError(reason)
        kpath = _host_kernel()
        assert kpath is not None
    else:
        kpath = Path(kernel)
        if not kpath.is_file():
            raise NestedError(f"host kernel {kpath} does not exist")
        if shutil.which(QEMU) is None:
            raise NestedError(f"{QEMU} not found (apt-get install qemu-system-x86)")

    nonce = secrets.token_hex(8)
    chunks: list[bytes] = []

    def sink(data: bytes) -> None:
        if keep_output:
            chunks.append(data)
        if stream is not None:
            stream(data)

    splitter = _Splitter(nonce, sink)
    ctl = Path(tempfile.mkdtemp(prefix="ignition-nested-"))
    proc: subprocess.Popen[bytes] | None = None
    stderr_file = None
    held = contextlib.ExitStack()  # the harness slot (see _harness_slots), until QEMU is gone
    try:
        (ctl / "nonce").write_text(nonce + "\n")
        share = None if workdir == Path("/") else workdir
        (ctl / "cwd").write_text(os.fspath(share) if share else "")
        if a64 is not None:
            a64.prepare_ctl(ctl)
            script = _run_script(cmd, workdir, a64.child_env(_child_env(env)))
            argv = a64.build_qemu_argv(host, ctl, share, mem_mb=mem_mb, cpus=cpus, verbose=verbose)
        else:
            script = _run_script(cmd, workdir, _child_env(env))
            argv = build_qemu_argv(kpath, ctl, share, mem_mb=mem_mb, cpus=cpus, verbose=verbose)
        (ctl / "run.sh").write_text(script)
        # A host that resets under CMD says nothing on its console; QEMU's reset log tells a
        # triple fault (TCG's emulated CPU) from a reset the host's kernel asked for.
        argv += ["-d", "cpu_reset", "-D", os.fspath(ctl / _QEMU_LOG)]
        stderr_file = tempfile.TemporaryFile(prefix="ignition-nested-qemu-")
        from . import _harness_slots
        from .guest.build import cache_dir

        try:
            held.enter_context(_harness_slots.slot(cache_dir() / "locks"))
        except (_harness_slots.SlotTimeout, ValueError) as e:
            raise NestedError(str(e)) from None
        t0 = time.monotonic()  # after the wait for a slot: the timeout is the run's own
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            start_new_session=True,  # Ctrl-C reaches us, not QEMU; we kill it ourselves
            preexec_fn=_set_pdeathsig,
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = None if timeout is None else t0 + timeout
        boot_time = 0.0
        ended_at: float | None = None
        while True:
            now = time.monotonic()
            if ended_at is not None and now - ended_at > _SHUTDOWN_GRACE:
                break  # CMD is done and rc is known; the host just did not reboot in time
            if deadline is not None and now > deadline and ended_at is None:
                _kill(proc)
                raise NestedTimeout(
                    f"nested run timed out after {timeout:g} s "
                    f"({'command running' if splitter.started else 'host still booting'})",
                    splitter.tail.decode("utf-8", "replace"),
                )
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - now))
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                grace = _EXIT_GRACE if deadline is None else min(_EXIT_GRACE, deadline - now)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, grace))
                break
            was_started = splitter.started
            splitter.feed(data)
            if console is not None and not was_started:
                console(data)
            if splitter.started and not was_started:
                boot_time = time.monotonic() - t0
            if splitter.exit_code is not None and ended_at is None:
                ended_at = time.monotonic()
        splitter.flush()
        _kill(proc)
        duration = time.monotonic() - t0
        from_file = _read_rc(ctl / "rc")  # the file is the authority; the marker a fallback
        rc = from_file if from_file is not None else splitter.exit_code
        tail = splitter.tail.decode("utf-8", "replace")
        if rc is None:
            stderr_file.seek(0)
            qerr = stderr_file.read()[-4096:].decode("utf-8", "replace").strip()
            why = "the command never started" if not splitter.started else "the command never ended"
            reset = _reset_cause(ctl / _QEMU_LOG) if proc.returncode == 0 else None
            if _panicked(tail):
                why += " (kernel panic)"
            elif reset is not None:
                why += f" ({reset})"
            msg = f"nested host exited (QEMU status {proc.returncode}): {why}"
            if qerr:
                msg += f"\nQEMU said: {qerr}"
            raise NestedError(msg, tail, host_reset=reset is not None and splitter.started)
        output = b"".join(chunks).decode("utf-8", "surrogateescape")
        return NestedResult(exit_code=rc, output=output, duration=duration, boot_time=boot_time)
    finally:
        if proc is not None:
            _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        held.close()
        if stderr_file is not None:
            stderr_file.close()
        shutil.rmtree(ctl, ignore_errors=True)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pytest_ignition.nested",
        description="Run a command inside a QEMU-TCG hypervisor host that has /dev/kvm.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run CMD inside the host; exit with its exit code")
    r.add_argument("--mem", type=int, default=DEFAULT_MEM_MB, help="host memory in MiB")
    r.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="host vCPUs")
    r.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds, boot included (0: none)"
    )
    r.add_argument("--kernel", help="host kernel (default: the guest pipeline's host build)")
    r.add_argument(
        "--arch",
        choices=("x86_64", "aarch64"),
        default="x86_64",
        help="the host's architecture (aarch64: Debian's arm64 kernel under TCG)",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="show the host's boot log")
    r.add_argument("--times", action="store_true", help="print boot and total time to stderr")
    r.add_argument(
        "--retries",
        type=int,
        default=0,
        help="run CMD again in a new host this many times when the host's kernel panics or "
        "the host resets under CMD (never when CMD fails or times out)",
    )
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    sub.add_parser("check", help="say whether the harness can run here")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``cmd`` loses a leading ``--``. Exits 2 on errors."""
    p = _parser()
    args = p.parse_args(argv)
    if args.command == "run":
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            p.error("run: no command given (usage: run [options] -- CMD...)")
        if args.mem < 256:
            p.error("--mem must be at least 256 (MiB)")
        if args.cpus < 1:
            p.error("--cpus must be at least 1")
        if args.timeout < 0:
            p.error("--timeout must not be negative")
        if args.retries < 0:
            p.error("--retries must not be negative")
        args.cmd = cmd
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "check":
        ok, reason = available()
        print(("usable: " if ok else "not usable: ") + reason)
        return 0 if ok else 1

    out = sys.stdout.buffer

    def stream(data: bytes) -> None:
        out.write(data)
        out.flush()

    def console(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through run()'s cleanup: QEMU killed, files removed

    signal.signal(signal.SIGTERM, on_term)
    attempt = 0
    while True:
        try:
            res = run(
                args.cmd,
                timeout=args.timeout or None,
                mem_mb=args.mem,
                cpus=args.cpus,
                kernel=args.kernel,
                stream=stream,
                console=console if args.verbose else None,
                verbose=args.verbose,
                keep_output=False,
                arch=args.arch,
            )
            break
        except NestedTimeout as e:
            print(f"pytest_ignition.nested: {e}", file=sys.stderr)
            return EXIT_TIMEOUT
        except NestedError as e:
            print(f"pytest_ignition.nested: {e}", file=sys.stderr)
            if not (e.host_died and attempt < args.retries):
                return EXIT_HARNESS
            attempt += 1
            # The TCG-emulated host died under CMD (see the oops or the reset cause above):
            # CMD's result is unknown, not failed, so it runs once more in a fresh host, saying so.
            what = "kernel panicked" if e.host_panicked else "machine reset"
            print(
                f"pytest_ignition.nested: the host's {what} (not the command); "
                f"running the command again in a new host (retry {attempt} of {args.retries})",
                file=sys.stderr,
                flush=True,
            )
        except KeyboardInterrupt:
            print("pytest_ignition.nested: interrupted; host stopped", file=sys.stderr)
            return EXIT_INTERRUPTED
    if args.times:
        print(
            f"pytest_ignition.nested: host boot to command {res.boot_time:.2f} s, "
            f"total {res.duration:.2f} s, exit code {res.exit_code}",
            file=sys.stderr,
        )
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
