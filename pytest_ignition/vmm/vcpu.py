"""The vCPU run loop: one thread per vCPU calling KVM_RUN and dispatching its exits.

Owns: exit dispatch (PIO and MMIO to the buses, HLT, SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR,
SYSTEM_EVENT), pause/resume/stop of a vCPU from another thread, and reporting why a vCPU
stopped (:class:`StopReason`) to its owner through a callback.

Kicking a vCPU out of KVM_RUN: the controller sets ``kvm_run.immediate_exit`` and sends
:data:`KICK_SIGNAL` to the vCPU thread with ``pthread_kill``. The vCPU thread keeps that
signal blocked, but tells KVM (``KVM_SET_SIGNAL_MASK``) to unblock it while in the guest, so
a pending kick makes KVM_RUN return ``EINTR`` and is never delivered to userspace (the
run loop then consumes it with ``sigtimedwait``). No handler is needed, so runners can be
created from any thread. ``immediate_exit`` covers the race where the kick lands just before
KVM_RUN is entered. With ``immediate_exit`` set, KVM also completes a pending ``in``/MMIO
read before returning, so state read while paused is consistent (snapshots rely on that).

PIO ``in``: the device's bytes are written into the ``kvm_run`` data area and RIP is left
alone; KVM finishes the instruction on the next KVM_RUN.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .devices.bus import Bus, RateLimitedLog
from .hypervisor import kvm
from .threads import VmmThread

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN + 6

_RUN_SIZE = kvm.ffi.sizeof("struct kvm_run")
_ONES = {n: b"\xff" * n for n in range(1, 9)}

_kick_lock = threading.Lock()


def _noop_handler(signum: int, frame: object) -> None:
    pass


def install_kick_handler() -> None:
    """Optional safety net: a no-op process-wide handler for :data:`KICK_SIGNAL`, so that a
    kick reaching a thread that does not block it (it never should) cannot kill the process.
    Installs only from the main thread and only over the default action; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with _kick_lock:
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, _noop_handler)


def _drain_kicks() -> None:
    """Consume kicks pending on this thread (real-time signals queue, one per kick)."""
    while signal.sigtimedwait((KICK_SIGNAL,), 0) is not None:
        pass


@dataclass(frozen=True)
class StopReason:
    """Why a vCPU thread ended.

    ``kind`` is one of: ``requested`` (the owner asked), ``shutdown`` (guest power-off, e.g.
    SYSTEM_EVENT shutdown), ``reset`` (guest reboot request: SYSTEM_EVENT reset or i8042),
    ``crash``, ``triple_fault`` (KVM_EXIT_SHUTDOWN), ``halt`` (HLT with no in-kernel
    irqchip), ``fail_entry``, ``internal_error``, ``unknown_exit``, ``kvm_error``.
    """

    kind: str
    detail: str = ""
    vcpu: int = -1

    @property
    def is_error(self) -> bool:
        return self.kind not in ("requested", "shutdown", "reset", "halt")

    def __str__(self) -> str:
        s = f"vcpu{self.vcpu}: {self.kind}" if self.vcpu >= 0 else self.kind
        return f"{s}: {self.detail}" if self.detail else s


StopCallback = Callable[[StopReason], None]


def format_regs(vcpu: kvm.Vcpu) -> str:
    """A one-paragraph register dump for error reports (never raises)."""
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except Exception as e:  # the vCPU may be unusable; the dump is best effort
        return f"(registers unavailable: {e})"
    gp = " ".join(f"{n}={v:#x}" for n, v in r.to_dict().items())
    return (
        f"{gp} cs={s.cs.selector:#x} ss={s.ss.selector:#x} cr0={s.cr0:#x} cr2={s.cr2:#x} "
        f"cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x}"
    )


class VcpuRunner:
    """Runs one vCPU on its own thread until the guest stops it or the owner does."""

    def __init__(
        self,
        vcpu: kvm.Vcpu,
        pio: Bus,
        mmio: Bus,
        on_stop: StopCallback | None = None,
        *,
        name: str | None = None,
    ):
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.on_stop = on_stop
        self.name = name or f"vcpu{vcpu.index}"
        self.exits: Counter[int] = Counter()
        self.stop_reason: StopReason | None = None
        self._thread: VmmThread | None = None
        self._cond = threading.Condition()
        self._pause_req = False
        self._paused = False
        self._stop_req: StopReason | None = None
        self._ratelog = RateLimitedLog(log)
        self._io = vcpu.kvm_run.io  # views into the shared kvm_run page, fixed for its life
        self._mmio = vcpu.kvm_run.mmio
        self._run_mv = vcpu._run_mv
        self._mmap_size = vcpu.mmap_size
        install_kick_handler()

    # -- control (any thread) -----------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._thread = VmmThread(self._thread_main, self.name)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    def _kick(self) -> None:
        # Order matters: the flag is set before immediate_exit (see _handle_interrupt).
        self.vcpu.set_immediate_exit(True)  # a no-op once the vCPU is closed
        t = self._thread
        # ident None: the thread has not run yet, and its first KVM_RUN sees immediate_exit
        if t is not None and t.ident is not None and not t.is_current() and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread just ended

    def pause(self, timeout: float | None = 5.0) -> bool:
        """Park the vCPU outside KVM_RUN with pending I/O completed; True once parked or ended.

        Called from the vCPU's own thread (a device handler), it only flags the request and
        returns True at once: the vCPU parks right after KVM completes the current exit.
        """
        with self._cond:
            self._pause_req = True
        self._kick()
        if self._thread is None or self._thread.is_current():
            return True
        with self._cond:
            return self._cond.wait_for(
                lambda: self._paused or not self.running or self.stop_reason is not None,
                timeout,
            )

    def resume(self) -> None:
        with self._cond:
            self._pause_req = False
            self._cond.notify_all()

    def request_stop(self, reason: StopReason | None = None) -> None:
        """Ask the vCPU to end with ``reason`` (default ``requested``); does not wait.

        Safe from the vCPU's own thread (a device handler asking for a reset) and from others.
        """
        if reason is None:
            reason = StopReason("requested", vcpu=self.vcpu.index)
        elif reason.vcpu < 0:
            reason = dataclasses.replace(reason, vcpu=self.vcpu.index)
        with self._cond:
            if self._stop_req is None:
                self._stop_req = reason
            self._cond.notify_all()
        self._kick()

    def join(self, timeout: float | None = None) -> bool:
        t = self._thread
        if t is not None and not t.is_current():
            t.join(timeout)
            return not t.is_alive()
        return True

    def stop(self, timeout: float | None = 5.0) -> StopReason | None:
        """Request a stop and wait for the thread; returns the reason it ended with."""
        self.request_stop()
        self.join(timeout)
        return self.stop_reason

    # -- the vCPU thread ------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            # Block kicks in this thread, unblock them inside KVM_RUN (see the module doc).
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
            self.vcpu.set_signal_mask({int(s) for s in old} - {int(KICK_SIGNAL)})
            with self.vcpu.run_lock:
                reason = self._loop()
        except BaseException as e:  # a bug here must still tell the owner the vCPU is gone
            log.exception("%s: run loop crashed", self.name)
            reason = StopReason("kvm_error", f"run loop crashed: {e!r}", self.vcpu.index)
        with self._cond:
            self.stop_reason = reason
            self._paused = False
            self._cond.notify_all()
        if reason.is_error:
            log.error("%s stopped: %s", self.name, reason)
        else:
            log.info("%s stopped: %s", self.name, reason)
        if self.on_stop is not None:
            try:
                self.on_stop(reason)
            except Exception:
                log.exception("%s: on_stop callback raised", self.name)

    def _handle_interrupt(self) -> StopReason | None:
        """After EINTR: honour a stop or pause request; None means keep running."""
        # Clear immediate_exit *before* reading the flags: a request that lands in between
        # sets it again, so the next KVM_RUN returns at once and we look again.
        self.vcpu.set_immediate_exit(False)
        _drain_kicks()
        with self._cond:
            if self._stop_req is not None:
                return self._stop_req
            if not self._pause_req:
                return None
            self._paused = True
            self._cond.notify_all()
            while self._pause_req and self._stop_req is None:
                self._cond.wait()
            self._paused = False
            return self._stop_req

    def _loop(self) -> StopReason:
        vcpu = self.vcpu
        run = vcpu.kvm_run
        fd = vcpu.fd
        idx = vcpu.index
        ioctl = kvm._libc.ioctl
        req = kvm.KVM_RUN
        zero = kvm._ULONG_ZERO
        exits = self.exits
        pio_exit = self._pio_exit
        mmio_exit = self._mmio_exit
        while True:
            stop = self._stop_req  # a plain read: request_stop also sets immediate_exit
            if stop is not None:
                return stop
            if ioctl(fd, req, zero) < 0:
                err = kvm.ffi.errno
                if err == errno.EINTR:
                    reason = self._handle_interrupt()
                    if reason is not None:
                        return reason
                    continue
                if err == errno.EAGAIN:
                    continue
                detail = str(kvm.KvmError("KVM_RUN", err))
                if vcpu.staged:  # KVM refused the registers a rollback left for this run
                    detail += f" loading the registers staged in kvm_run ({vcpu.staged:#x})"
                return StopReason("kvm_error", detail + "; " + format_regs(vcpu), idx)
            er = run.exit_reason
            exits[er] += 1
            if er == kvm.KVM_EXIT_IO:
                pio_exit(run)
            elif er == kvm.KVM_EXIT_MMIO:
                mmio_exit(run)
            elif er == kvm.KVM_EXIT_INTR:
                reason = self._handle_interrupt()
                if reason is not None:
                    return reason
            else:
                reason = self._other_exit(er)
                if reason is not None:
                    return reason

    def _pio_exit(self, run: object) -> None:
        # The hot path (one call per guest port access): cached cdata, few attribute reads.
        io = self._io
        size = io.size
        count = io.count
        port = io.port
        off = io.data_offset
        end = off + size * count
        if size not in (1, 2, 4) or count == 0 or off < _RUN_SIZE or end > self._mmap_size:
            self._ratelog(
                logging.WARNING,
                "pio-bad",
                "%s: malformed PIO exit port=%#x size=%d count=%d data_offset=%#x",
                self.name,
                port,
                size,
                count,
                off,
            )
            return
        mv = self._run_mv
        pio = self.pio
        if io.direction == kvm.KVM_EXIT_IO_OUT:
            for pos in range(off, end, size):
                chunk = mv[pos : pos + size].tobytes()
                if not pio.write(port, chunk):
                    self._ratelog(
                        logging.DEBUG,
                        "pio-unhandled-out",
                        "%s: out to unhandled port %#x size %d value %s",
                        self.name,
                        port,
                        size,
                        chunk.hex(),
                    )
        else:
            for pos in range(off, end, size):
                buf = bytearray(_ONES[size])
                if not pio.read(port, buf):
                    buf = bytearray(_ONES[size])
                    self._ratelog(
                        logging.DEBUG,
                        "pio-unhandled-in",
                        "%s: in from unhandled port %#x size %d",
                        self.name,
                        port,
                        size,
                    )
                elif len(buf) != size:  # a device must not resize the buffer; do not trust it
                    buf = bytearray(_ONES[size])
                mv[pos : pos + size] = buf

    def _mmio_exit(self, run: object) -> None:
        m = self._mmio
        addr, n = m.phys_addr, m.len
        if not 1 <= n <= 8:
            self._ratelog(logging.WARNING, "mmio-bad", "%s: odd MMIO exit len=%d", self.name, n)
            return
        if m.is_write:
            chunk = bytes(kvm.ffi.buffer(m.data, n))
            if not self.mmio.write(addr, chunk):
                self._ratelog(
                    logging.WARNING,
                    "mmio-unhandled-write",
                    "%s: MMIO write to unhandled address %#x (%d bytes: %s)",
                    self.name,
                    addr,
                    n,
                    chunk.hex(),
                )
        else:
            buf = bytearray(_ONES[n])
            if not self.mmio.read(addr, buf) or len(buf) != n:
                buf = bytearray(_ONES[n])
                self._ratelog(
                    logging.WARNING,
                    "mmio-unhandled-read",
                    "%s: MMIO read from unhandled address %#x (%d bytes); returning all-ones",
                    self.name,
                    addr,
                    n,
                )
            kvm.ffi.memmove(m.data, bytes(buf), n)

    def _other_exit(self, er: int) -> StopReason | None:
        vcpu = self.vcpu
        run = vcpu.kvm_run
        idx = vcpu.index
        if er == kvm.KVM_EXIT_HLT:
            return StopReason("halt", "guest executed HLT with no in-kernel irqchip", idx)
        if er == kvm.KVM_EXIT_SHUTDOWN:
            return StopReason(
                "triple_fault",
                "guest triple-faulted (KVM_EXIT_SHUTDOWN); " + format_regs(vcpu),
                idx,
            )
        if er == kvm.KVM_EXIT_FAIL_ENTRY:
            fe = run.fail_entry
            return StopReason(
                "fail_entry",
                f"VM entry failed: hardware reason {fe.hardware_entry_failure_reason:#x} "
                f"on cpu {fe.cpu}; " + format_regs(vcpu),
                idx,
            )
        if er == kvm.KVM_EXIT_INTERNAL_ERROR:
            ie = run.internal
            nd = min(ie.ndata, 16)
            data = " ".join(f"{ie.data[i]:#x}" for i in range(nd))
            names = {1: "emulation failure", 2: "simultaneous exceptions", 3: "delivery event"}
            what = names.get(ie.suberror, f"suberror {ie.suberror}")
            if ie.suberror == kvm.KVM_INTERNAL_ERROR_EMULATION and nd >= 3 and ie.data[0] & 1:
                # struct emulation_failure: flags, then insn_size and up to 15 bytes
                raw = b"".join(ie.data[i].to_bytes(8, "little") for i in (1, 2))
                what += f" at instruction {raw[1 : 1 + min(raw[0], 15)].hex()}"
            return StopReason(
                "internal_error",
                f"KVM internal error: {what} [{data}]; " + format_regs(vcpu),
                idx,
            )
        if er == kvm.KVM_EXIT_SYSTEM_EVENT:
            t = run.system_event.type
            if t == kvm.KVM_SYSTEM_EVENT_SHUTDOWN:
                return StopReason("shutdown", "guest requested power-off", idx)
            if t == kvm.KVM_SYSTEM_EVENT_RESET:
                return StopReason("reset", "guest requested a reset", idx)
            if t == kvm.KVM_SYSTEM_EVENT_CRASH:
                return StopReason("crash", "guest reported a crash", idx)
            self._ratelog(logging.WARNING, "sysevent", "%s: ignoring system event %d", self.name, t)
            return None
        name = kvm.EXIT_NAMES.get(er, str(er))
        return StopReason("unknown_exit", f"unexpected exit {name}; " + format_regs(vcpu), idx)
