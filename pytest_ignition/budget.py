"""Host memory admission: how many VMs may run at once on this host.

Owns the ``memory_budget`` setting's meaning and its accounting. Before a VM starts (a boot
for a snapshot, a restore, a background prefetch), its guest memory plus a per-VM overhead
estimate is reserved against one budget shared by every pytest process of this user on this
host: all xdist workers, and separate pytest runs too. A reservation is a small JSON file in
``<cache dir>/budget-<hostname>/`` naming the holder's pid, the holder's start time (so a
reused pid does not count), the kernel's boot id (so nothing survives a reboot) and the MiB;
the directory is guarded by a :class:`filelock.FileLock`. Reservations of processes that are
gone are stale: ignored and removed, so a crashed worker never leaks memory from the budget.

A cache dir this process cannot write (a read-only mount, e.g. a guest cache shared into a
nested host) does not stop the plugin: the reservations go to a per-user runtime directory
instead (``/run/user/<uid>/pytest-ignition/``, else ``<tmp>/pytest-ignition-<uid>/``, made
0700 and refused unless this user owns it), and the report header says where and why. Only
processes that see the same fallback share it (:func:`state_directory`).

A request that does not fit waits (polling, with a deadline, printing what it waits for)
instead of letting the host swap or the OOM killer pick a victim; one that could never fit
(larger than the whole budget, or larger than what this process's own VMs leave free) is an
error at once that names the setting.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

# Memory a VM costs beyond its guest RAM, in MiB. QEMU 7.2 TCG microvm, measured here: a
# restored 512 MiB guest's QEMU had 98 MiB RSS idle and 109 MiB after some shell work, of
# which ~45 MiB were guest pages: ~55-65 MiB of its own (TCG translation cache included).
# The bundled VMM's Python process: an estimate (interpreter + cffi + its modules).
OVERHEAD_MIB = {"qemu": 64, "ignition": 48}
DEFAULT_OVERHEAD_MIB = 64
DEFAULT_WAIT_SECONDS = 900.0
POLL_SECONDS = 0.2
LOCK_SECONDS = 60.0
PROGRESS_EVERY = 10.0
SETTING_HELP = "--ignition-memory-budget / IGNITION_MEMORY_BUDGET / ini ignition_memory_budget"


class BudgetError(Exception):
    """A VM cannot be admitted: too large for the budget, or no room before the deadline."""


class BudgetBusy(BudgetError):
    """No room right now (raised only for ``wait=False`` requests, e.g. prefetches)."""


def host_memory_mib() -> int:
    """MemTotal, capped by this process's cgroup v2 ``memory.max`` when that is lower."""
    total = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024
                break
    if total is None:
        raise BudgetError("/proc/meminfo has no MemTotal line")
    limit = _cgroup_limit_mib()
    return min(total, limit) if limit else total


def _cgroup_limit_mib() -> int | None:
    try:
        rel = ""
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip()
        text = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) >> 20 if text.isdigit() else None


def resolve_mib(text: str, host_mib: int | None = None) -> int:
    """The budget in MiB for a ``memory_budget`` value: ``75%`` (of host memory) or a size."""
    from pytest_ignition.config import parse_size

    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
    if m:
        host = host_memory_mib() if host_mib is None else host_mib
        return max(1, int(host * float(m.group(1)) / 100))
    return max(1, parse_size(s) >> 20)


def describe(text: str, source: str = "default", host_mib: int | None = None) -> str:
    """One line for the report header: the budget, where it came from, and the host's memory."""
    host = host_memory_mib() if host_mib is None else host_mib
    mib = resolve_mib(text, host)
    how = f"{text} of {host} MiB host memory" if text.strip().endswith("%") else text.strip()
    return f"{mib} MiB ({how}; {source}) for all VMs on this host"


def header_line(setting: str, source: str = "default") -> str:
    """The report header's line for the budget (never raises)."""
    try:
        line = f"memory budget {describe(setting, source)}: a VM waits for room past it"
        _, why = state_directory()
        return line + (f" ({why})" if why else "")
    except (OSError, ValueError, BudgetError) as e:
        return f"memory budget unknown ({e})"


def _writable_dir(directory: Path) -> None:
    """Make ``directory`` and prove a lock file can be opened there for writing (or raise)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    os.close(fd)


def _private_dir(directory: Path) -> Path:
    """``directory`` made 0700 if missing; refused unless it is a real directory of this user
    (it may sit in a world-writable place such as /tmp)."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(
            f"{directory} is not a directory of uid {os.getuid()} closed to others "
            "(a symlink, another user's, or group/world-writable)"
        )
    return directory


def fallback_roots() -> list[Path]:
    """Per-user runtime directories for the budget's state when the cache dir is read-only,
    best first. Fixed paths (not $XDG_RUNTIME_DIR/$TMPDIR alone), so that every process of
    this user on this host picks the same one."""
    uid = os.getuid()
    roots = []
    run = Path(f"/run/user/{uid}")
    if run.is_dir():
        roots.append(run / "pytest-ignition")
    roots.append(Path(tempfile.gettempdir()) / f"pytest-ignition-{uid}")
    return roots


def state_directory() -> tuple[Path, str | None]:
    """The directory of the reservation files and its lock, and why it is not the usual one.

    Normally ``<cache dir>/budget-<hostname>`` (reason ``None``). When that cannot be written
    (``OSError``: read-only file system, permissions), the first usable
    :func:`fallback_roots` entry, with a reason naming both places. Raises
    :class:`BudgetError` when no candidate is writable.
    """
    from pytest_ignition.guest import cache_dir

    name = f"budget-{_safe(socket.gethostname())}"
    primary = cache_dir() / name
    try:
        _writable_dir(primary)
        return primary, None
    except OSError as e:
        first = e
    problems = [f"{primary}: {first.strerror or first}"]
    for root in fallback_roots():
        try:
            directory = _private_dir(root) / name
            _writable_dir(directory)
        except OSError as e:
            problems.append(f"{root}: {e.strerror or e}")
            continue
        return directory, (
            f"reservations in {directory}: the cache dir cannot be written "
            f"({first.strerror or first}: {primary}); only processes that see the same cache "
            "this way share the budget"
        )
    raise BudgetError(
        "no writable place for the host memory budget's reservations ("
        + "; ".join(problems)
        + "); set IGNITION_CACHE_DIR to a writable directory"
    )


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie holds no VM
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Holder:
    """One reservation as read from its file."""

    path: Path
    pid: int
    start: int
    boot: str
    mib: int
    what: str

    def alive(self, current_boot: str) -> bool:
        return self.boot == current_boot and process_start(self.pid) == self.start


class Reservation:
    """Memory held for one VM; :meth:`release` (idempotent) gives it back."""

    def __init__(self, budget: HostBudget, path: Path, mib: int, what: str) -> None:
        self.budget = budget
        self.path = path
        self.mib = mib
        self.what = what
        self.retiring = False  # its VM is being closed: it will be released without us
        self._released = False

    def retire(self) -> None:
        """Mark the VM as closing: it no longer counts as this process's own use."""
        self.retiring = True

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        # No lock needed: an unlink is atomic, and a reader that lists the file first just
        # finds it gone.
        self.path.unlink(missing_ok=True)
        with self.budget._own_lock:
            self.budget._own.discard(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class HostBudget:
    """The host's VM memory budget as seen from this process."""

    def __init__(
        self,
        budget_mib: int,
        directory: Path,
        *,
        setting: str = "75%",
        source: str = "default",
        progress: Callable[[str], None] | None = None,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.budget_mib = budget_mib
        self.directory = directory
        self.setting = setting
        self.source = source
        self.progress = progress
        self.poll = poll
        directory.mkdir(parents=True, exist_ok=True)
        # One lock file descriptor per thread (FileLock's default): flock then also keeps this
        # process's own threads apart. Held only to read and write the small files.
        self.lock = FileLock(str(directory / ".lock"), timeout=LOCK_SECONDS)
        self._boot = boot_id()
        self._pid = os.getpid()
        self._start = process_start(self._pid) or 0
        self._own: set[Reservation] = set()
        self._own_lock = threading.Lock()

    @classmethod
    def for_settings(
        cls,
        setting: str,
        source: str = "default",
        *,
        progress: Callable[[str], None] | None = None,
    ) -> HostBudget:
        """The budget for a ``memory_budget`` setting, its state in :func:`state_directory`
        (a fallback's reason goes to ``progress`` once)."""
        directory, why = state_directory()
        if why and progress is not None:
            progress(f"memory budget: {why}")
        return cls(
            resolve_mib(setting), directory, setting=setting, source=source, progress=progress
        )

    def _setting_text(self) -> str:
        return f"memory_budget={self.setting} ({self.source})"

    def holders(self) -> list[Holder]:
        """Live reservations; stale ones (dead or restarted holders, other boots) are removed.

        Call with :attr:`lock` held.
        """
        live: list[Holder] = []
        for p in self.directory.glob("*.tmp"):  # writes happen under the lock: debris
            p.unlink(missing_ok=True)
        for p in self.directory.glob("*.json"):
            try:
                d = json.loads(p.read_text())
                h = Holder(
                    p,
                    int(d["pid"]),
                    int(d["start"]),
                    str(d["boot"]),
                    int(d["mib"]),
                    str(d.get("what", "?")),
                )
            except (OSError, ValueError, KeyError, TypeError):
                # Unreadable: a file being written cannot exist (writes happen under the
                # lock and are renamed into place), so it is debris.
                p.unlink(missing_ok=True)
                continue
            if h.alive(self._boot):
                live.append(h)
            else:
                p.unlink(missing_ok=True)
        return live

    def used_mib(self) -> int:
        with self.lock:
            return sum(h.mib for h in self.holders())

    def own_mib(self) -> int:
        """MiB this process holds for VMs it still uses (not those being closed)."""
        with self._own_lock:
            return sum(r.mib for r in self._own if not r.retiring)

    def reserve(
        self,
        mib: int,
        what: str,
        *,
        wait: bool = True,
        timeout: float = DEFAULT_WAIT_SECONDS,
        on_wait: Callable[[], object] | None = None,
    ) -> Reservation:
        """Reserve ``mib`` for ``what`` (e.g. "restore of 512 MiB guest").

        ``wait=False`` raises :class:`BudgetBusy` when there is no room now. Otherwise it waits
        up to ``timeout`` seconds for other VMs to close; ``on_wait`` is called once before
        waiting (the plugin drops its idle prefetched VMs there). Raises :class:`BudgetError`
        when the request can never fit or the deadline passes.
        """
        if mib > self.budget_mib:
            raise BudgetError(
                f"{what} needs {mib} MiB, more than the whole host memory budget of "
                f"{self.budget_mib} MiB ({self._setting_text()}); raise it with {SETTING_HELP} "
                "(e.g. 90% or 32G), or give the VM less memory"
            )
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        next_note = started
        called_on_wait = False
        while True:
            try:
                with self.lock:
                    live = self.holders()
                    used = sum(h.mib for h in live)
                    if used + mib <= self.budget_mib:
                        return self._write(mib, what)
            except Timeout:
                raise BudgetError(
                    f"the host memory budget's lock {self.lock.lock_file} stayed taken for "
                    f"{LOCK_SECONDS:.0f} s (a process is stuck holding it; find it with "
                    f"`fuser {self.lock.lock_file}`)"
                ) from None
            if not wait:
                raise BudgetBusy(f"no room for {what} ({used}/{self.budget_mib} MiB held)")
            if not called_on_wait and on_wait is not None:
                called_on_wait = True
                on_wait()
                continue
            own = self.own_mib()
            if own + mib > self.budget_mib:
                raise BudgetError(
                    f"{what} needs {mib} MiB, but this process's own VMs already hold {own} of "
                    f"the {self.budget_mib} MiB host memory budget ({self._setting_text()}), so "
                    f"waiting cannot help; raise it with {SETTING_HELP}, or use fewer VMs at once"
                )
            now = time.monotonic()
            if now >= deadline:
                raise BudgetError(
                    f"waited {now - started:.0f} s for host memory for {what} ({mib} MiB): "
                    f"{_summary(live, self._pid)} of the {self.budget_mib} MiB budget "
                    f"({self._setting_text()}); raise it with {SETTING_HELP}, run fewer "
                    "xdist workers (-n), or give VMs less memory"
                )
            if now >= next_note and self.progress is not None:
                self.progress(
                    f"waiting for host memory: {what} needs {mib} MiB; "
                    f"{_summary(live, self._pid)} of the {self.budget_mib} MiB budget "
                    f"({self._setting_text()}); waited {now - started:.0f} s of {timeout:.0f} s"
                )
                next_note = now + PROGRESS_EVERY
            time.sleep(min(self.poll, max(0.0, deadline - now)))

    def _write(self, mib: int, what: str) -> Reservation:
        name = f"{self._pid}-{uuid.uuid4().hex[:12]}"
        path = self.directory / f"{name}.json"
        tmp = self.directory / f"{name}.tmp"
        tmp.write_text(
            json.dumps(
                {
                    "pid": self._pid,
                    "start": self._start,
                    "boot": self._boot,
                    "mib": mib,
                    "what": what,
                    "since": time.time(),
                }
            )
        )
        os.replace(tmp, path)
        r = Reservation(self, path, mib, what)
        with self._own_lock:
            self._own.add(r)
        return r


def vm_mib(memory_mib: int, engine_name: str) -> int:
    """What one VM of ``memory_mib`` guest RAM is charged against the budget."""
    return memory_mib + OVERHEAD_MIB.get(engine_name, DEFAULT_OVERHEAD_MIB)


def _summary(live: list[Holder], me: int) -> str:
    if not live:
        return "nothing held"
    pids = {h.pid for h in live}
    mine = sum(h.mib for h in live if h.pid == me)
    used = sum(h.mib for h in live)
    return f"{len(live)} VM(s) of {len(pids)} process(es) hold {used} MiB" + (
        f" ({mine} MiB by this one)" if mine else ""
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "host"
