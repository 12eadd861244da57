"""The plugin's fixtures and the per-session machinery behind them.

Owns :class:`IgnitionSession` (one per pytest process: engine choice, the default guest,
snapshots by config key, a restore pool per config, background closing, restore timings)
and the fixtures ``ignition_snapshot`` (session), ``ignition_vm`` and ``ignition_vm_factory``
(function).

Snapshots live under a directory shared by pytest-xdist workers (the parent of each
worker's basetemp) and are created under a :class:`filelock.FileLock`, so ``pytest -n N``
boots and prepares each configuration once. Each restore pool keeps the next test's VM
restoring in a background thread while the current test runs; VMs are closed in the
background too (``IGNITION_PREFETCH=0`` turns the background restore off). Everything is
torn down in ``pytest_sessionfinish`` and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from pytest_ignition import config as cfgmod

if TYPE_CHECKING:
    from pytest_ignition.engines.base import Engine, VMConfig
    from pytest_ignition.vm import VM

SESSION_KEY = pytest.StashKey["IgnitionSession"]()
ITEM_VMS_KEY = pytest.StashKey[list]()  # [(label, VM)] used by the failure report
FAILED_KEY = pytest.StashKey[bool]()  # set by the plugin when a test's setup or call failed
KEPT_PROPERTY = "ignition_kept"  # user_properties entry per kept VM (reaches xdist's controller)
REUSE_PROPERTY = "ignition_reuse"  # "<key> <reused|new> (<why>)" per snapshot, --ignition-reuse
RESTORE_PROPERTY = "ignition_restore_seconds"
BOOT_PROPERTY = "ignition_boot_seconds"
FALLBACK_PROPERTY = "ignition_engine_fallback"
SNAPSHOT_SUBDIR = "ignition-snapshots"
FALLBACK_MARKER = "ENGINE_FALLBACK"  # in the shared snapshot root: why `auto` left the VMM
MARKER = "ignition"


@dataclass(frozen=True)
class Snapshot:
    """A prepared snapshot of one guest configuration, ready to restore."""

    key: str
    config: VMConfig
    directory: Path
    engine: Engine
    boot_seconds: float | None  # None when another worker (or an earlier run) made it


def _worker_id(config: pytest.Config) -> str:
    """The xdist worker id ("gw0", ...), or "main" outside xdist."""
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput.get("workerid", "main")) if workerinput else "main"


class Pool:
    """Hands out VMs of one snapshot; keeps one restoring in the background."""

    def __init__(self, session: IgnitionSession, snapshot: Snapshot, reset: str) -> None:
        self.session = session
        self.snapshot = snapshot
        self.reset = reset
        # Rolled back in place, a test's VM becomes the next test's (give_back): a restore
        # prefetched beside it would only block that and be thrown away.
        self.rolls_back = reset == "rollback" and snapshot.engine.supports_rollback
        self.pending: Future[tuple[VM, float]] | None = None
        self.lock = threading.Lock()
        self.closed = False

    def _restore(self) -> tuple[VM, float]:
        # A prefetch never waits for host memory: without room, acquire() restores in the
        # foreground, and waits there.
        vm, seconds = self.session.restore_vm(self.snapshot, self.reset, wait=False)
        # Warm up off the critical path: a just-restored guest's first command is slow (under
        # TCG every code path is translated afresh; ~300 ms here against ~30 ms after).
        try:
            vm.run("true", timeout=30)
        except Exception:
            # A guest that cannot run `true` is no use to a test: drop it, and acquire()
            # restores afresh in the foreground (where a repeated error is reported).
            self.session.close_vm(vm, background=False)
            raise
        vm.history.clear()
        return vm, seconds

    def acquire(self, prefetch: bool) -> tuple[VM, float]:
        """A fresh VM and its restore seconds; start restoring the next one if ``prefetch``."""
        with self.lock:
            fut, self.pending = self.pending, None
        vm_and_time: tuple[VM, float] | None = None
        if fut is not None:
            try:
                vm_and_time = fut.result()
            except Exception:
                # A background restore that failed is retried in the foreground, where its
                # error (if it happens again) is reported against the test.
                vm_and_time = None
        if vm_and_time is None:
            vm_and_time = self.session.restore_vm(self.snapshot, self.reset)
        if prefetch and not self.rolls_back:
            self.start_prefetch()
        return vm_and_time

    def start_prefetch(self) -> None:
        with self.lock:
            if self.pending is None and not self.closed:
                self.pending = self.session.restorer.submit(self._restore)

    def give_back(self, vm: VM) -> bool:
        """Roll ``vm`` back in place and keep it as the next VM; False if that is not possible."""
        with self.lock:
            if self.closed or self.pending is not None:
                return False

            def rollback() -> tuple[VM, float]:
                t0 = time.monotonic()
                try:
                    vm.reset()
                except BaseException:
                    self.session.close_vm(vm)
                    raise
                vm.history.clear()  # the next test's report lists its own commands only
                return vm, time.monotonic() - t0

            self.pending = self.session.restorer.submit(rollback)
            return True

    def close(self) -> None:
        with self.lock:
            self.closed = True
            fut, self.pending = self.pending, None
        if fut is None:
            return
        if fut.cancel():
            return
        try:
            vm, _ = fut.result()
        except Exception:
            return
        self.session.close_vm(vm, background=False)


class IgnitionSession:
    """Per-process plugin state; created in ``pytest_configure``, closed in ``pytest_sessionfinish``."""

    def __init__(
        self,
        config: pytest.Config,
        settings: cfgmod.Settings | None,
        settings_error: str | None = None,
    ) -> None:
        self.config = config
        self._settings = settings
        self.fallback: str | None = None  # why `auto` fell back from the bundled VMM to QEMU
        self._fallback_reported = False
        # Why the IGNITION_* / ini settings are invalid: raised at the first VM use, not before.
        self.settings_error = settings_error
        self.vm_items = 0  # collected tests that use a VM fixture or the marker
        self.lock = threading.RLock()
        self._engine: Engine | None = None
        self._engine_reason = ""
        self._engine_error: str | None = None
        self._guests: dict[str, Any] = {}  # arch -> the bundled guest image
        self._images: dict[Any, Any] = {}
        # VMConfig.key() -> prepare function used instead of the users' hooks (the browser)
        self.preparers: dict[str, Callable[[VM], None]] = {}
        self._image_failures: dict[Any, str] = {}
        self.root: Path | None = None  # snapshots, shared by xdist workers
        self._budget: Any = None  # budget.HostBudget, made on first use
        self._tmp: Path | None = None  # short per-process directory for VM workdirs (sockets)
        self.snapshots: dict[str, Snapshot] = {}
        self.failures: dict[str, str] = {}
        self.pools: dict[tuple[str, str], Pool] = {}
        self.live: set[Any] = set()
        self.kept_dirs: list[Path] = []  # work dirs of kept VMs (--ignition-keep-failed)
        self.reuse_states: dict[str, tuple[Any, str, str]] = {}  # config key -> reuse_info()
        self.reuse_shown: set[str] = set()  # config keys whose reused/new the header showed
        self.reuse_unreported: list[str] = []  # for the terminal summary, via user_properties
        self._inflight: list[list[Any]] = []  # machines of restores still in progress
        self.boots: list[tuple[str, float]] = []
        self._boots_reported = 0  # boots already attached to a test report
        # Tests per marker signature still to run: prefetching for a configuration no test
        # needs again would only waste CPU.
        self.remaining: Counter[cfgmod.Overrides] = Counter()
        # IGNITION_PREFETCH=0 turns the background restore off (for benchmarks and debugging).
        self.prefetch = cfgmod.env_switch("IGNITION_PREFETCH")
        self.restorer = ThreadPoolExecutor(1, thread_name_prefix="ignition-restore")
        self.closer = ThreadPoolExecutor(1, thread_name_prefix="ignition-close")
        self.closed = False
        atexit.register(self.close)

    @property
    def settings(self) -> cfgmod.Settings:
        """The resolved settings; a UsageError when they are invalid."""
        if self._settings is None:
            raise pytest.UsageError(self.settings_error or "pytest-ignition: no settings")
        return self._settings

    # ------------------------------------------------------------------ engine and guest

    def skip_or_fail(self, message: str) -> None:
        from pytest_ignition.distributed import where

        message = where(self.config) + message  # a remote xdist worker names its host
        if self.settings.require:
            pytest.fail(f"IGNITION_REQUIRE=1 but: {message}", pytrace=False)
        pytest.skip(message)

    def engine_info(self) -> tuple[Engine | None, str]:
        """The engine (or None) and the reason it was chosen (or why there is none)."""
        with self.lock:
            if self._engine is None and self._engine_error is None:
                from pytest_ignition.engines.base import EngineUnavailable

                try:
                    from pytest_ignition.engines.select import select_engine

                    self._engine, self._engine_reason = select_engine(
                        self.settings.engine, arch=self.settings.arch
                    )
                except ImportError as e:
                    self._engine_error = f"the engine modules failed to import: {e}"
                except EngineUnavailable as e:
                    self._engine_error = f"no usable VM engine ({self.settings.engine}): {e.reason}"
                    if e.hint:
                        self._engine_error += f"; to fix: {e.hint}"
            if self._engine is None:
                return None, self._engine_error or "no engine"
            return self._engine, self._engine_reason

    def engine(self) -> Engine:
        engine, reason = self.engine_info()
        if engine is None:
            self.skip_or_fail(reason)
        assert engine is not None
        return engine

    def fall_back(self, engine: Engine, reason: str | None) -> bool:
        """Under ``auto``, switch this session from the bundled VMM to QEMU because of ``reason``
        (a failure of the VMM, see ``select.vmm_fault``); False when that does not apply."""
        if reason is None or engine.name != "ignition" or self.settings.engine != "auto":
            return False
        from pytest_ignition.engines.select import select_engine

        try:
            new, _ = select_engine("qemu", arch=self.settings.arch)
        except Exception as e:  # no QEMU either: the VMM's error stands
            self._progress(f"the bundled VMM failed ({reason}); no QEMU to fall back to: {e}")
            return False
        with self.lock:
            if self._engine is engine:
                self._engine = new
                self._engine_reason = f"auto: fell back from the bundled VMM to QEMU: {reason}"
                self.fallback = reason
        if self.root is not None:  # the other xdist workers fall back without trying again
            with contextlib.suppress(OSError):
                (self.root / FALLBACK_MARKER).write_text(reason)
        self._progress(f"the bundled VMM failed: {reason}; falling back to QEMU for this run")
        return True

    def describe_kernel(self) -> str:
        s = self.settings
        if s.kernel is not None:
            return f"{s.kernel}" + (f" + {s.initrd}" if s.initrd else "")
        try:
            from pytest_ignition.guest import find_guest, host_arch

            g = find_guest(s.arch)
        except Exception as e:  # a broken pipeline must not break the header
            return f"default guest (unavailable: {e})"
        arch = "" if s.arch == host_arch() else f" --arch {s.arch}"
        if g is None:
            return (
                f"default {s.arch} guest (not built yet: built on first use, "
                f"or now with `python -m pytest_ignition.guest build{arch}`)"
            )
        return f"default guest {g.kernel}"

    def _progress(self, message: str) -> None:
        line = f"pytest-ignition: {message}"
        capman = self.config.pluginmanager.getplugin("capturemanager")
        tr = self.config.pluginmanager.getplugin("terminalreporter")
        if tr is not None and capman is not None and _worker_id(self.config) == "main":
            with capman.global_and_fixture_disabled():
                tr.write_line(line)
        else:
            print(line, file=sys.__stderr__, flush=True)

    def default_guest(self, arch: str | None = None) -> Any:
        """The bundled guest image for ``arch`` (default: the session's), built (under the
        pipeline's file lock) on first use."""
        arch = arch or self.settings.arch
        with self.lock:
            if arch in self._guests:
                return self._guests[arch]
            from pytest_ignition.guest import GuestBuildError, build_guest, find_guest

            guest = find_guest(arch)
            if guest is None:
                self._progress(
                    f"building the default {arch} guest "
                    "(kernel + initramfs; minutes the first time)"
                )
                failure = None
                try:
                    guest = build_guest(progress=self._progress, arch=arch)
                except GuestBuildError as e:
                    failure = f"the default guest could not be built: {e}"
                if failure is not None:
                    self.skip_or_fail(failure)
                self._progress("default guest ready")
            self._guests[arch] = guest
            return guest

    def vm_config(self, overrides: cfgmod.Overrides) -> tuple[VMConfig, str]:
        """The VMConfig and reset mode for the session settings plus ``overrides``."""
        s = cfgmod.apply_overrides(self.settings, overrides)
        engine = self.engine()  # no engine: skip (or fail) before building a guest for nothing
        if engine.name == "ignition" and s.arch != cfgmod.host_arch():
            self.skip_or_fail(
                f"the bundled VMM runs {cfgmod.host_arch()} guests only, not arch={s.arch}: "
                "use --ignition-engine=qemu (or auto) for it"
            )
        problem = cfgmod.image_problem(s)
        if problem is not None:
            raise pytest.UsageError(f"pytest-ignition: {problem}")
        if s.kernel is not None:
            kernel, initrd = s.kernel, s.initrd
        else:
            g = self.default_guest(s.arch)
            kernel, initrd = g.kernel, g.initrd
        image = self.image(s) if s.image is not None else None
        return cfgmod.vm_config(s, kernel, initrd, image), s.reset

    def image(self, s: cfgmod.Settings) -> Any:
        """The built (or cached) image for ``s.image``; a build failure skips or fails."""
        key = (s.image, cfgmod.image_packages(s), s.arch)
        with self.lock:
            if key in self._images:
                return self._images[key]
            from pytest_ignition.guest import GuestBuildError
            from pytest_ignition.guest.image import ensure_image

            failure = self._image_failures.get(key)
            if failure is None:
                try:
                    img = ensure_image(
                        s.image, packages=key[1], arch=s.arch, progress=self._progress
                    )
                except GuestBuildError as e:
                    failure = f"pytest-ignition: image {s.image!r}: {e}"
                    self._image_failures[key] = failure
            if failure is not None:
                # The user's image spec is at fault (or a tool is missing): an error, not a skip.
                pytest.fail(failure, pytrace=False)
            self._images[key] = img
            return img

    def vm_limits(self) -> dict[str, Any]:
        """The session's per-command limits as :class:`~pytest_ignition.vm.VM` keywords."""
        src = self.settings.sources
        return {
            "max_output": self.settings.max_output,
            "max_output_source": src.get("max_output", "default"),
            "command_timeout": self.settings.command_timeout,
            "command_timeout_source": src.get("command_timeout", "default"),
            "max_transfer": self.settings.max_transfer,
            "max_transfer_source": src.get("max_transfer", "default"),
        }

    def apply_test_limits(self, vm: VM, overrides: cfgmod.Overrides, where: str) -> None:
        """A test's own ``command_timeout`` (marker/factory key), else the session's, on ``vm``
        (a VM rolled back in place serves several tests: always set afresh)."""
        o = overrides.as_dict()
        if "command_timeout" in o:
            vm.command_timeout = o["command_timeout"]
            vm.command_timeout_source = f"command_timeout={o['command_timeout']!r} of {where}"
        else:
            vm.command_timeout = self.settings.command_timeout
            vm.command_timeout_source = self.settings.sources.get("command_timeout", "default")

    def lock_timeout(self, vmcfg: VMConfig) -> float:
        """How long to wait for another process making this snapshot (-1: for ever, when the
        prepare hooks have no timeout): its boot, prepare hooks, snapshot, and slack."""
        if self.settings.prepare_timeout is None:
            return -1
        return vmcfg.boot_timeout + self.settings.prepare_timeout + 600 + 600

    # ------------------------------------------------------------------ directories

    def set_root(self, basetemp: Path) -> None:
        with self.lock:
            if self.root is None:
                from pytest_ignition import distributed

                if distributed.is_remote(self.config):
                    # Another host: its basetemp is this process's own; the host's workers
                    # share a run directory there instead.
                    base = distributed.run_dir(self.config)
                else:
                    # Local xdist workers have basetemp/<parent>/popen-gwN: the parent is shared.
                    base = basetemp.parent if _worker_id(self.config) != "main" else basetemp
                self.root = base / SNAPSHOT_SUBDIR
                self.root.mkdir(parents=True, exist_ok=True)

    def tmp(self) -> Path:
        with self.lock:
            if self._tmp is None:
                from pytest_ignition.engines import _process

                # The first VM use of a session reclaims what SIGKILLed/crashed runs left.
                kept = _kept_paths()
                if kept is not None:
                    _process.sweep_dead_runs(protect=kept)
                # Short path: machine workdirs hold Unix sockets (108-byte path limit).
                self._tmp = _process.owned_tempdir("ignition-")
            return self._tmp

    def workdir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp()))

    # ------------------------------------------------------------------ snapshots

    def snapshot_for(self, vmcfg: VMConfig) -> Snapshot:
        """The prepared snapshot of ``vmcfg``: made once per config across xdist workers."""
        key = vmcfg.key()
        with self.lock:
            if key in self.snapshots:
                return self.snapshots[key]
            if key in self.failures:
                pytest.fail(self.failures[key], pytrace=False)
            engine = self.engine()
            assert self.root is not None, "set_root() first"
            marker = self.root / FALLBACK_MARKER
            if engine.name == "ignition" and marker.exists():  # another worker fell back
                with contextlib.suppress(OSError):
                    if self.fall_back(engine, marker.read_text(errors="replace")):
                        engine = self.engine()
            directory, failed, lockpath, rk = self._snapshot_paths(engine, vmcfg)
            ready = directory / "READY"
            lock = FileLock(str(lockpath), timeout=self.lock_timeout(vmcfg))
            try:
                lock.acquire()  # timeout=lock_timeout(): endless only when prepare_timeout=0
            except FileLockTimeout:
                msg = (
                    f"pytest-ignition: waited {self.lock_timeout(vmcfg):g} s for another pytest "
                    f"process (an xdist worker) to make the snapshot of this configuration "
                    f"({self._describe(vmcfg)}; lock {lock.lock_file}); it took longer than its "
                    "boot timeout + prepare_timeout + the snapshot allow. Raise "
                    "--ignition-prepare-timeout (0 = none) or look at that process"
                )
                self.failures[key] = msg
                pytest.fail(msg, pytrace=False)
            with contextlib.ExitStack() as held:
                held.callback(lock.release)
                if failed.exists():
                    msg = failed.read_text(errors="replace")
                    self.failures[key] = msg
                    pytest.fail(msg, pytrace=False)
                boot_seconds = None
                fell_back = False
                if not ready.exists():
                    if directory.exists():
                        shutil.rmtree(directory)  # a half-made snapshot of an interrupted run
                    directory.mkdir(parents=True)
                    failure = None
                    try:
                        boot_seconds = self._make_snapshot(engine, vmcfg, directory)
                    except _SnapshotFailed as e:
                        failure = str(e)
                        fell_back = self.fall_back(engine, e.fallback)
                    if fell_back:
                        failure = None  # retried below with QEMU, once the lock is released
                    elif failure is not None:
                        failed.write_text(failure)
                        self.failures[key] = failure
                        pytest.fail(failure, pytrace=False)
                    if not fell_back:
                        if rk is not None:
                            from pytest_ignition import reuse

                            reuse.write_inputs(rk)
                        ready.write_text(json.dumps({"key": key, "engine": engine.name}))
            if fell_back:
                return self.snapshot_for(vmcfg)  # again, with QEMU
            snap = Snapshot(key, vmcfg, directory, engine, boot_seconds)
            self.snapshots[key] = snap
            return snap

    def _snapshot_paths(self, engine: Engine, vmcfg: VMConfig) -> tuple[Path, Path, Path, Any]:
        """(directory, failure marker, lock file, reuse key or None) of ``vmcfg``'s snapshot:
        this run's (shared by its xdist workers), or with --ignition-reuse the cache's."""
        assert self.root is not None
        key = vmcfg.key()
        if not self.settings.reuse:
            d = self.root / key[:24]
            return d, d / "FAILED", self.root / f"{key[:24]}.lock", None

        rk, state, why = self.reuse_info(engine, vmcfg)
        with self.lock:
            self.reuse_unreported.append(f"{rk.key[:12]} {state} ({why}): {self._describe(vmcfg)}")
        if vmcfg.key() not in self.reuse_shown:
            self._progress(f"snapshot {rk.key[:12]} ({self._describe(vmcfg)}): {state} ({why})")
        rk.lock_path.parent.mkdir(parents=True, exist_ok=True)
        # A failed prepare is this run's news, not the cache's: its marker stays in the run dir.
        return rk.directory, self.root / f"{key[:24]}.FAILED", rk.lock_path, rk

    def reuse_info(self, engine: Engine, vmcfg: VMConfig) -> tuple[Any, str, str]:
        """(reuse key, "reused" | "new", why) of ``vmcfg``'s cached snapshot; once per config."""
        from pytest_ignition import reuse

        key = vmcfg.key()
        with self.lock:
            if key not in self.reuse_states:
                rk = reuse.compute(self.config, engine, vmcfg)
                self.reuse_states[key] = (rk, *reuse.explain(rk))
            return self.reuse_states[key]

    def _describe(self, vmcfg: VMConfig) -> str:
        args = f", kernel args {vmcfg.kernel_args!r}" if vmcfg.kernel_args else ""
        image = f", image {vmcfg.image}, init={vmcfg.init}" if vmcfg.image is not None else ""
        return (
            f"{vmcfg.kernel.name} ({vmcfg.kernel}), {vmcfg.memory_mib} MiB, "
            f"{vmcfg.cpus} CPU(s){image}{args}"
        )

    def _wait_system_up(self, vm: Any, vmcfg: VMConfig, t0: float) -> None:
        """init=systemd: the snapshot is taken once the system is up (running or degraded)."""
        left = max(5.0, vmcfg.boot_timeout - (time.monotonic() - t0))
        self._progress("waiting for systemd to finish starting the system")
        try:
            res = vm.run(["systemctl", "is-system-running", "--wait"], timeout=left)
        except Exception as e:
            raise _SnapshotFailed(
                f"pytest-ignition: init=systemd: the system did not come up within "
                f"{vmcfg.boot_timeout:g} s (the boot timeout, --ignition-timeout): {e}\n"
                f"--- console tail ---\n{_tail(vm)}"
            ) from None
        state = res.stdout.strip()
        if state not in ("running", "degraded"):
            failed = vm.run(["systemctl", "--failed", "--no-legend"], timeout=30).stdout
            raise _SnapshotFailed(
                f"pytest-ignition: init=systemd: the system is {state or 'unknown'!r} after boot; "
                f"failed units:\n{failed}\n--- console tail ---\n{_tail(vm)}"
            )
        if state == "degraded":
            failed = vm.run(["systemctl", "--failed", "--no-legend", "--plain"], timeout=30).stdout
            names = " ".join(line.split()[0] for line in failed.splitlines() if line.split())
            self._progress(f"systemd is up (degraded: failed units {names or '?'})")

    def _run_prepare_hooks(self, vm: VM, vmcfg: VMConfig) -> None:
        """``pytest_ignition_prepare(vm)`` with the ``prepare_timeout`` watchdog: past it the VM
        is killed, so every guest call of the hooks fails at once, and the snapshot fails with
        an error naming the setting (host-only code in a hook is not interrupted)."""
        limit = self.settings.prepare_timeout
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            kill = getattr(vm.machine, "_kill", None) or vm.machine.close
            with contextlib.suppress(Exception):
                kill()

        timer = threading.Timer(limit, expire) if limit is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        error: str | None = None
        try:
            own = self.preparers.get(vmcfg.key())
            if own is not None:  # a built-in guest (the browser) prepares itself
                own(vm)
            else:
                self.config.hook.pytest_ignition_prepare(vm=vm)
        except Exception as e:
            error = _user_traceback(e)
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            source = self.settings.sources.get("prepare_timeout", "default")
            raise _SnapshotFailed(
                f"pytest-ignition: pytest_ignition_prepare ran past prepare_timeout ({limit:g} s, "
                f"from {source}) on the booted guest ({self._describe(vmcfg)}); the VM was killed "
                "and every test of this configuration fails. Raise it with "
                "--ignition-prepare-timeout, IGNITION_PREPARE_TIMEOUT or the ini key "
                "ignition_prepare_timeout (0 = none)"
                + (f"\n{error}" if error else "")
                + f"\n--- console tail ---\n{_tail(vm)}"
            )
        if error is not None:
            raise _SnapshotFailed(
                f"pytest-ignition: pytest_ignition_prepare failed on the booted guest "
                f"({self._describe(vmcfg)}):\n{error}\n--- console tail ---\n{_tail(vm)}"
            )

    def _make_snapshot(self, engine: Engine, vmcfg: VMConfig, directory: Path) -> float:
        from pytest_ignition.budget import BudgetError

        # The booting guest's memory counts against the host budget until it is closed.
        try:
            reservation = self.reserve(engine, vmcfg, "boot")
        except BudgetError as e:
            raise _SnapshotFailed(f"pytest-ignition: {e}") from None
        try:
            return self._boot_and_snapshot(engine, vmcfg, directory)
        finally:
            reservation.release()

    def _boot_and_snapshot(self, engine: Engine, vmcfg: VMConfig, directory: Path) -> float:
        from pytest_ignition.engines.base import BootError, EngineError
        from pytest_ignition.vm import VM

        workdir = self.workdir("boot-")
        t0 = time.monotonic()
        from pytest_ignition.engines.select import vmm_fault

        failed: _SnapshotFailed | None = None
        try:
            machine = engine.boot(vmcfg, workdir)
        except BootError as e:
            failed = _SnapshotFailed(
                f"pytest-ignition: the guest did not boot ({engine.describe()}; "
                f"{self._describe(vmcfg)}; timeout {vmcfg.boot_timeout:g} s): {e}"
            )
            failed.fallback = vmm_fault(getattr(e, "vmm_exit", None), e.console_tail, e.message)
        except EngineError as e:
            failed = _SnapshotFailed(
                f"pytest-ignition: {engine.name} could not start the guest "
                f"({self._describe(vmcfg)}): {e}"
            )
            failed.fallback = f"the bundled VMM could not start the guest: {e}"
        if failed is not None:
            shutil.rmtree(workdir, ignore_errors=True)
            if engine.name != "ignition":
                failed.fallback = None
            raise failed
        vm = VM(engine, machine, vmcfg, **self.vm_limits())
        try:
            if vmcfg.init == "systemd":
                self._wait_system_up(vm, vmcfg, t0)
            boot_seconds = time.monotonic() - t0
            self._run_prepare_hooks(vm, vmcfg)
            try:
                engine.snapshot(machine, directory, keep_agent=False)  # closed just below
            except EngineError as e:
                raise _SnapshotFailed(f"pytest-ignition: snapshot failed: {e}") from None
        finally:
            vm.close()
            shutil.rmtree(workdir, ignore_errors=True)
        self.boots.append((vmcfg.key(), boot_seconds))
        with (self.root / "boots.log").open("a") as f:  # type: ignore[operator]
            f.write(
                json.dumps(
                    {
                        "key": vmcfg.key(),
                        "worker": _worker_id(self.config),
                        "pid": os.getpid(),
                        "boot_seconds": round(boot_seconds, 3),
                    }
                )
                + "\n"
            )
        return boot_seconds

    # ------------------------------------------------------------------ VMs

    def budget(self) -> Any:
        """This host's VM memory budget (:class:`pytest_ignition.budget.HostBudget`)."""
        with self.lock:
            if self._budget is None:
                from pytest_ignition.budget import HostBudget

                self._budget = HostBudget.for_settings(
                    self.settings.memory_budget,
                    self.settings.sources.get("memory_budget", "default"),
                    progress=self._progress,
                )
            return self._budget

    def reserve(self, engine: Engine, vmcfg: VMConfig, kind: str, *, wait: bool = True) -> Any:
        """Reserve host memory for one VM of ``vmcfg`` (waits for room unless ``wait=False``)."""
        from pytest_ignition.budget import vm_mib

        what = f"{kind} of a {vmcfg.memory_mib} MiB guest ({_worker_id(self.config)})"
        return self.budget().reserve(
            vm_mib(vmcfg.memory_mib, engine.name), what, wait=wait, on_wait=self.drop_spares
        )

    def drop_spares(self) -> None:
        """Close prefetched VMs no test holds yet, to give their memory to a waiting VM."""
        with self.lock:
            pools = list(self.pools.values())
        for p in pools:
            with p.lock:
                fut = p.pending
                if fut is None or not (fut.done() or fut.cancel()):
                    continue  # one being restored right now is left alone (never waited on)
                p.pending = None
            if fut.cancelled() or fut.exception() is not None:
                continue
            self.close_vm(fut.result()[0], background=False)

    def restore_vm(self, snap: Snapshot, reset: str, wait: bool = True) -> tuple[VM, float]:
        """A new VM restored from ``snap`` and its time to agent-ready.

        Host memory for it is reserved first (:meth:`reserve`); ``wait=False`` fails at once
        when there is no room.
        """
        from pytest_ignition.budget import BudgetError
        from pytest_ignition.engines.base import BootError, EngineError
        from pytest_ignition.vm import VM

        if self.closed:
            raise RuntimeError("pytest-ignition session is closed")
        try:
            reservation = self.reserve(snap.engine, snap.config, "restore", wait=wait)
        except BudgetError as e:
            raise RestoreFailed(f"pytest-ignition: {e}") from None
        from pytest_ignition.engines import _process

        workdir = self.workdir("vm-")
        t0 = time.monotonic()
        made: list[Any] = []  # the machine, as soon as it exists: close() may kill it early
        with self.lock:
            self._inflight.append(made)
        try:
            with _process.collecting(made):
                machine = snap.engine.restore(
                    snap.config, snap.directory, workdir, rollback=reset == "rollback"
                )
        except (BootError, EngineError) as e:
            shutil.rmtree(workdir, ignore_errors=True)
            reservation.release()
            raise RestoreFailed(
                f"pytest-ignition: restoring the snapshot failed ({snap.engine.describe()}; "
                f"{self._describe(snap.config)}): {e}"
            ) from None
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            reservation.release()
            raise
        finally:
            with self.lock:
                self._inflight.remove(made)
        seconds = getattr(machine, "ready_seconds", None)
        if not isinstance(seconds, (int, float)):
            seconds = time.monotonic() - t0
        mode = reset if (reset != "rollback" or snap.engine.supports_rollback) else "restore"
        vm = VM(
            snap.engine,
            machine,
            snap.config,
            snapshot_dir=snap.directory,
            reset_mode=mode,
            **self.vm_limits(),
        )
        vm._ignition_workdir = workdir  # type: ignore[attr-defined]
        vm._ignition_reservation = reservation  # type: ignore[attr-defined]
        with self.lock:
            if self.closed:
                vm.close()
                reservation.release()
                raise RuntimeError("pytest-ignition session is closed")
            self.live.add(vm)
        return vm, float(seconds)

    def pool(self, snap: Snapshot, reset: str) -> Pool:
        with self.lock:
            k = (snap.key, reset)
            if k not in self.pools:
                self.pools[k] = Pool(self, snap, reset)
            return self.pools[k]

    def close_vm(self, vm: Any, background: bool = True) -> None:
        reservation = getattr(vm, "_ignition_reservation", None)
        if reservation is not None:
            reservation.retire()  # no longer this process's to wait on: it is going

        def close() -> None:
            try:
                vm.close()
            except Exception as e:  # closing must never fail a test
                print(f"pytest-ignition: closing a VM failed: {e!r}", file=sys.__stderr__)
            finally:
                if reservation is not None:
                    reservation.release()
                wd = getattr(vm, "_ignition_workdir", None)
                if wd is not None:
                    shutil.rmtree(wd, ignore_errors=True)
                with self.lock:
                    self.live.discard(vm)

        if background and not self.closed:
            try:
                self.closer.submit(close)
                return
            except RuntimeError:  # executor already shut down
                pass
        close()

    def keep_if_failed(self, request: pytest.FixtureRequest, vm: VM) -> bool:
        """With --ignition-keep-failed, keep the VM of a failed test running (never rolled back
        or closed); True if it was kept."""
        if not self.settings.keep_failed or not request.node.stash.get(FAILED_KEY, False):
            return False
        from pytest_ignition import keep

        wd = getattr(vm, "_ignition_workdir", None)
        try:
            kept = keep.keep_vm(
                vm,
                request.node.nodeid,
                self.settings.keep_failed_for,
                wd,
                rootdir=str(request.config.rootpath),
            )
        except keep.KeepError as e:
            self._progress(f"{request.node.nodeid}: its VM is not kept: {e}")
            return False
        reservation = getattr(vm, "_ignition_reservation", None)
        if reservation is not None:  # its memory is no longer this session's to count
            reservation.release()
        with self.lock:
            self.live.discard(vm)
            if wd is not None:
                self.kept_dirs.append(Path(wd))
        info = {"id": kept.id, "test": kept.test, "expires": kept.expires, "engine": kept.engine}
        request.node.user_properties.append((KEPT_PROPERTY, json.dumps(info)))
        return True

    def release(self, vm: VM, pool: Pool | None) -> None:
        """A test is done with ``vm``: roll it back for the next test, or close it. A VM found
        broken (``vm.broken``: it died, or stopped answering) is always closed."""
        if getattr(vm, "broken", None) is None and not _machine_dead(vm):
            if pool is not None and pool.rolls_back and pool.give_back(vm):
                return
        self.close_vm(vm)

    def close(self) -> None:
        """Stop prefetching, close every VM, remove temporary directories. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            pools = list(self.pools.values())
            live = list(self.live)
        # Ctrl-C during a background restore: kill the VM being restored (and every other one)
        # now, so that the restore thread fails at once instead of waiting for its guest. A
        # restore that had not made its machine yet makes it later: until the restore threads
        # are gone, kill every machine that appears (CI saw a Ctrl-C land right after a
        # background restore started wait out its boot timeout).
        killed: set[int] = set()

        def kill_inflight() -> None:
            with self.lock:
                fresh = [m for made in self._inflight for m in made if id(m) not in killed]
            for m in fresh:
                killed.add(id(m))
                with contextlib.suppress(Exception):
                    m.close()

        kill_inflight()
        stop = threading.Event()

        def reap() -> None:
            while not stop.wait(0.05):
                kill_inflight()

        reaper = threading.Thread(target=reap, name="ignition-close-reaper", daemon=True)
        reaper.start()
        try:
            for vm in live:
                self.close_vm(vm, background=False)
            for p in pools:
                p.close()
            self.restorer.shutdown(wait=True, cancel_futures=True)
        finally:
            stop.set()
            reaper.join(timeout=5)
        for p in pools:  # a restore that finished during shutdown
            p.close()
        self.closer.shutdown(wait=True)
        with self.lock:
            leftovers = list(self.live)
        for vm in leftovers:
            self.close_vm(vm, background=False)
        if self._tmp is not None and self.kept_dirs:
            # Kept VMs' work dirs hold their sockets: their keepers remove them at the end.
            for child in self._tmp.iterdir():
                if child not in self.kept_dirs and child.name != _process_owner_file():
                    shutil.rmtree(child, ignore_errors=True)
        elif self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


class _SnapshotFailed(Exception):
    # Why the bundled VMM (not the guest) failed the boot: `auto` then falls back to QEMU.
    fallback: str | None = None


class RestoreFailed(Exception):
    """Restoring a VM from its snapshot failed."""


def _process_owner_file() -> str:
    from pytest_ignition.engines._process import OWNER_FILE

    return OWNER_FILE


def _kept_paths() -> tuple[str, ...] | None:
    """The dirs of VMs kept past their run (--ignition-keep-failed), which the sweeper spares;
    None when the registry cannot be read (then nothing is swept)."""
    try:
        from pytest_ignition import keep

        paths: list[str] = []
        for k in keep.list_kept():
            entry = json.loads(k.path.read_text())
            paths += [str(p) for p in entry.get("cleanup", [])]
            if k.workdir:
                paths.append(k.workdir)
        return tuple(paths)
    except Exception:
        return None


def _user_traceback(exc: BaseException) -> str:
    """The traceback of an exception raised in a user's hook, without pluggy's/our frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "pluggy" not in f.filename and f.filename != __file__
    ]
    text = "".join(traceback.format_list(frames[-10:]))
    return "Traceback (hook frames):\n" + text + "".join(traceback.format_exception_only(exc))


def _tail(vm: Any) -> str:
    try:
        return str(vm.console_tail())
    except Exception as e:
        return f"(console tail unavailable: {e!r})"


def _machine_dead(vm: Any) -> bool:
    """True when the VM's process has exited (a test may have powered it off unnoticed)."""
    try:
        return not vm.machine.is_alive()
    except Exception:
        return False


def get_session(config: pytest.Config) -> IgnitionSession:
    return config.stash[SESSION_KEY]


VM_FIXTURES = frozenset(
    {"ignition_vm", "ignition_vm_factory", "ignition_snapshot", "_ignition_session"}
)


def uses_vm(item: pytest.Item, fixturenames: Any = None) -> bool:
    """Whether ``item`` needs a VM: a VM fixture in its closure, or the ``ignition`` marker."""
    names = getattr(item, "fixturenames", ()) if fixturenames is None else fixturenames
    return not VM_FIXTURES.isdisjoint(names) or item.get_closest_marker(MARKER) is not None


def marker_overrides(item: pytest.Item) -> cfgmod.Overrides:
    """The validated ``@pytest.mark.ignition(...)`` settings of ``item`` (closest wins per key)."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers(MARKER))):
        if mark.args:
            raise pytest.UsageError(
                f"pytest-ignition: {item.nodeid}: @pytest.mark.ignition takes keyword "
                f"arguments only (e.g. memory='1G', cpus=2), got {mark.args!r}"
            )
        merged.update(mark.kwargs)
    return cfgmod.parse_overrides(merged, where=f"{item.nodeid}: @pytest.mark.ignition")


def _track(request: pytest.FixtureRequest, label: str, vm: Any) -> None:
    item = request.node
    vms = item.stash.setdefault(ITEM_VMS_KEY, [])
    vms.append((label, vm))


def _record_restore(request: pytest.FixtureRequest, seconds: float) -> None:
    # Timings travel in user_properties so that they reach the xdist controller's summary.
    props = request.node.user_properties
    props.append((RESTORE_PROPERTY, round(seconds, 6)))
    session = get_session(request.config)
    with session.lock:
        new_boots = session.boots[session._boots_reported :]
        session._boots_reported = len(session.boots)
    for _, boot_seconds in new_boots:
        props.append((BOOT_PROPERTY, round(boot_seconds, 3)))
    if session.fallback is not None and not session._fallback_reported:
        session._fallback_reported = True  # once per process: the xdist controller shows it
        props.append((FALLBACK_PROPERTY, session.fallback))
    with session.lock:
        reuse_lines, session.reuse_unreported = session.reuse_unreported, []
    for line in reuse_lines:
        props.append((REUSE_PROPERTY, line))


def _map_restore_error(fn: Callable[[], Any]) -> Any:
    failure = None
    try:
        return fn()
    except RestoreFailed as e:
        failure = str(e)
    pytest.fail(failure, pytrace=False)  # outside the except: no "during handling" chain


@pytest.fixture(scope="session")
def _ignition_session(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> IgnitionSession:
    session = get_session(request.config)
    if session.settings_error is not None:  # requested without being collected (getfixturevalue)
        pytest.fail(session.settings_error, pytrace=False)
    session.set_root(tmp_path_factory.getbasetemp())
    return session


@pytest.fixture(scope="session")
def ignition_snapshot(_ignition_session: IgnitionSession) -> Snapshot:
    """The session's guest (default configuration), booted once, prepared and snapshotted."""
    vmcfg, _ = _ignition_session.vm_config(cfgmod.Overrides())
    return _ignition_session.snapshot_for(vmcfg)


@pytest.fixture
def ignition_vm(request: pytest.FixtureRequest, _ignition_session: IgnitionSession) -> Iterator[VM]:
    """A VM restored from the session snapshot for this test's configuration; closed afterwards."""
    session = _ignition_session
    overrides = marker_overrides(request.node)
    vmcfg, reset = session.vm_config(overrides)
    snap = session.snapshot_for(vmcfg)
    pool = session.pool(snap, reset)
    with session.lock:
        session.remaining[overrides] -= 1
        more = session.prefetch and session.remaining[overrides] > 0
    vm, seconds = _map_restore_error(lambda: pool.acquire(prefetch=more))
    session.apply_test_limits(vm, overrides, "the ignition marker")
    _record_restore(request, seconds)
    _track(request, "ignition_vm", vm)
    try:
        yield vm
    finally:
        if not session.keep_if_failed(request, vm):
            session.release(vm, pool)


class VMFactory:
    """``factory(**config) -> VM``: VMs of other configurations; all closed at teardown."""

    def __init__(self, session: IgnitionSession, request: pytest.FixtureRequest) -> None:
        self._session = session
        self._request = request
        self._vms: list[Any] = []

    def __call__(self, **config: Any) -> VM:
        from pytest_ignition import network as netmod

        # network=<Network> joins an ignition_network segment (a network=segment snapshot)
        net, hostname = netmod.split_factory_kwargs(config)
        overrides = cfgmod.parse_overrides(config, where="ignition_vm_factory(...)")
        if net is not None:
            values = {**overrides.as_dict(), "network": "segment"}
            overrides = cfgmod.Overrides(tuple(sorted(values.items())))
        vmcfg, reset = self._session.vm_config(overrides)
        snap = self._session.snapshot_for(vmcfg)
        pool = self._session.pool(snap, reset)
        vm, seconds = _map_restore_error(lambda: pool.acquire(prefetch=False))
        self._session.apply_test_limits(vm, overrides, "ignition_vm_factory(...)")
        self._vms.append(vm)
        _record_restore(self._request, seconds)
        _track(self._request, f"ignition_vm_factory #{len(self._vms)}", vm)
        if net is not None:
            net.add(vm, hostname or f"vm{len(net.members) + 1}")
        elif hostname is not None:
            netmod.set_hostname(vm, hostname)
        return vm

    def close(self) -> None:
        for vm in self._vms:
            if not self._session.keep_if_failed(self._request, vm):
                self._session.close_vm(vm)
        self._vms.clear()


@pytest.fixture
def ignition_vm_factory(
    request: pytest.FixtureRequest, _ignition_session: IgnitionSession
) -> Iterator[Callable[..., VM]]:
    """Make VMs with other settings (``kernel``, ``memory``, ``cpus``, ``kernel_args``, ...)."""
    factory = VMFactory(_ignition_session, request)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def ignition_network() -> Iterator[Any]:
    """``ignition_network() -> Network``: a private L2 segment for VMs made with
    ``ignition_vm_factory(network=net, hostname="a")``; closed at teardown."""
    from pytest_ignition.network import NetworkFactory

    nets = NetworkFactory()
    try:
        yield nets
    finally:
        nets.close()
