"""The pytest plugin (entry point ``pytest11: ignition``): options, ini keys, marker, hooks.

Owns the wiring into pytest: registering the ``--ignition-*`` options and their ini keys,
the ``ignition`` marker and the ``pytest_ignition_prepare`` hookspec; creating and closing
the per-session state (:class:`pytest_ignition.fixtures.IgnitionSession`); the engine and
settings lines shown after collection (only when a collected test uses a VM); the console
tail and command history attached to failing tests; the per-test restore-time summary.
Setting precedence: command line > ``IGNITION_*`` environment variable > ini key > default
(see :mod:`pytest_ignition.config`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Generator
from typing import Any

import pytest

from pytest_ignition import browser
from pytest_ignition import config as cfgmod
from pytest_ignition import fixtures as fx
from pytest_ignition.browser import (  # noqa: F401  (fixtures are found on this module)
    ignition_browser,
    ignition_browser_factory,
)
from pytest_ignition.fixtures import (  # noqa: F401  (fixtures are found on this module)
    _ignition_session,
    ignition_network,
    ignition_snapshot,
    ignition_vm,
    ignition_vm_factory,
)

# pytest-xdist across hosts (remote workers' run directories, host names in reports).
pytest_plugins = ["pytest_ignition.distributed"]

HISTORY_LIMIT = 50
TAIL_CHARS = 4000


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_ignition import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


_YES_NO = ("1", "0", "true", "false", "yes", "no", "on", "off")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: Any, args: list[str]
) -> None:
    """Yes/no settings also work as bare flags (``--ignition-keep-failed tests/``): one not
    followed by a yes/no word is rewritten to ``FLAG=1`` before the command line is parsed
    (argparse's optional values would take the next path as the value)."""
    flags = {o.flag for o in cfgmod.OPTIONS if o.metavar == "BOOL"}
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in flags and (i + 1 == len(args) or args[i + 1].strip().lower() not in _YES_NO):
            args[i] = f"{arg}=1"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ignition", f"pytest-ignition ({cfgmod.PRECEDENCE_HELP})")
    for opt in cfgmod.OPTIONS:
        default = f" [default: {opt.default}]" if opt.default else ""
        group.addoption(
            opt.flag,
            dest=opt.dest,
            default=None,  # None = not given, so env and ini can apply
            metavar=opt.metavar,
            help=f"{opt.help}{default}; env {opt.env}, ini {opt.ini}",
            # yes/no settings also work as bare flags (see pytest_load_initial_conftests)
            **({"nargs": "?", "const": "1"} if opt.metavar == "BOOL" else {}),
        )
        parser.addini(opt.ini, f"{opt.help} (same as {opt.flag})", type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ignition(memory=None, cpus=None, kernel_args=None, reset=None, kernel=None, initrd=None, "
        "rootfs=None, timeout=None): guest settings for this test's ignition_vm (another "
        "configuration gets its own snapshot; kernel_args are appended to the session's)",
    )
    # A bad --ignition-* flag was typed for this run: stop now. A bad IGNITION_* variable or
    # ignition_* ini key only matters to a run that uses a VM: collection (or the first VM
    # fixture) reports it, so suites without VM tests in the same venv are not broken by it.
    settings: cfgmod.Settings | None = None
    error = None
    try:
        settings = cfgmod.from_pytest_config(config)
    except pytest.UsageError as e:
        # A path valid on one host need not be on another: with remote xdist workers, each
        # worker's VM tests report its own (naming the host), and the controller none.
        from pytest_ignition import distributed  # (registered through pytest_plugins)

        remote = distributed.defers_setting_errors(config)
        if cfgmod.error_from_cli(e) and not remote:
            raise
        error = distributed.where(config) + str(e)
    config.stash[fx.SESSION_KEY] = fx.IgnitionSession(config, settings, settings_error=error)
    from pytest_ignition import terminal

    terminal.capture_suspender = terminal.pytest_capture_suspender(config)  # for vm.shell()
    if settings is not None and settings.keep_failed:
        from pytest_ignition.engines import _process

        _process.enable_keeper()  # VM processes that can outlive pytest when their test fails
    collector = _RestoreTimes()
    config.stash[RESTORE_TIMES_KEY] = collector
    config.pluginmanager.register(collector, "ignition-restore-times")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(fx.SESSION_KEY, None)
    if session is not None:
        session.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(fx.SESSION_KEY, None)
    if state is not None:
        state.close()


def _size(n: int) -> str:
    if n == 0:
        return "unlimited"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    # After collection, not in the header: only a run with VM tests pays for probing the
    # engine (`qemu-system-x86_64 --version`). Shown at the header's verbosity.
    state = config.stash.get(fx.SESSION_KEY, None)
    if state is None or not state.vm_items or config.get_verbosity() < 0:
        return []
    if state.settings_error is not None:  # a remote worker: its VM tests report it
        return [f"ignition: {state.settings_error}"]
    s = state.settings
    engine, reason = state.engine_info()
    if engine is None:
        what = "skipped" if not s.require else "errors (IGNITION_REQUIRE=1)"
        return [f"ignition: {reason}; VM tests will be {what}"]
    # QEMU runs a guest of another architecture than the host's under TCG
    accel_for = getattr(engine, "accelerator_for", None)
    accel = accel_for(s.arch) if accel_for is not None else engine.accelerator
    lines = [
        f"ignition: engine {engine.describe()}, accelerator {accel}: {reason}",
        f"ignition: kernel {state.describe_kernel()}",
        f"ignition: {s.arch}, {s.memory_mib} MiB, {s.cpus} CPU(s), reset {s.reset}, "
        f"timeout {s.timeout:g} s"
        + f", max output {_size(s.max_output)}"
        + (f", kernel args {s.kernel_args!r}" if s.kernel_args else "")
        + (f", rootfs {s.rootfs}" if s.rootfs else ""),
    ]
    if s.reset == "rollback" and not engine.supports_rollback:
        lines.append(
            f"ignition: {engine.name} cannot roll back in place; restoring per test instead"
        )
    lines.append("ignition: " + keep_failed_line(s))
    lines.append("ignition: " + reuse_line(state, engine))
    lines.append("ignition: " + budget_line(s))
    return lines


def budget_line(s: cfgmod.Settings) -> str:
    from pytest_ignition.budget import header_line

    return header_line(s.memory_budget, s.sources.get("memory_budget", "default"))


def reuse_line(state: fx.IgnitionSession, engine: Any) -> str:
    """The header's reuse line: off, or whether the default configuration's snapshot is reused
    from the cache or made new, and why (other configurations say so when first used)."""
    s = state.settings
    if not s.reuse:
        source = s.sources.get("reuse", "default")
        if source != "default":
            return f"reuse off ({source})"
        return "reuse off (default; --ignition-reuse keeps prepared snapshots between runs)"
    where = f"reuse on ({s.sources.get('reuse', 'default')})"
    from pytest_ignition.guest import find_guest

    if s.image is not None or (s.kernel is None and find_guest() is None):
        return f"{where}: the default configuration's snapshot is decided on first use"
    try:
        vmcfg, _ = state.vm_config(cfgmod.Overrides())
        rk, verdict, why = state.reuse_info(engine, vmcfg)
    except (Exception, pytest.skip.Exception, pytest.fail.Exception) as e:
        return f"{where}: cannot tell yet ({e})"
    state.reuse_shown.add(vmcfg.key())
    return f"{where}: snapshot {rk.key[:12]} of the default configuration: {verdict} ({why})"


def keep_failed_line(s: cfgmod.Settings, environ: Any = None) -> str:
    """The header's keep-failed line: on or off, and why."""
    env = os.environ if environ is None else environ
    source = s.sources.get("keep_failed", "default")
    if s.keep_failed:
        return (
            f"keep-failed on ({source}): a failed test's VM is kept for {s.keep_failed_for:g} s "
            "(`python -m pytest_ignition list`)"
        )
    if source == "default" and env.get("CI", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    ):
        return "keep-failed off: CI is set (--ignition-keep-failed turns it on anyway)"
    if source == "default":
        return "keep-failed off (default; --ignition-keep-failed keeps a failed test's VM)"
    return f"keep-failed off ({source})"


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    state = config.stash.get(fx.SESSION_KEY, None)
    if state is None:
        return
    for item in items:
        # Validate markers now: a typo stops the run with a usage error, not N test errors.
        overrides = fx.marker_overrides(item)
        names = getattr(item, "fixturenames", ())
        if "ignition_vm" in names:
            state.remaining[overrides] += 1
        if fx.uses_vm(item, names):
            state.vm_items += 1
    if state.vm_items and state.settings_error is not None:
        from pytest_ignition.distributed import is_remote

        if is_remote(config):
            return  # a UsageError would end this host's worker; its VM tests fail instead
        raise pytest.UsageError(state.settings_error)


def _format_history(vm: Any) -> str:
    try:
        history = list(vm.history)
    except Exception as e:
        return f"(history unavailable: {e!r})"
    if not history:
        return "(no commands)"
    lines = []
    skipped = max(0, len(history) - HISTORY_LIMIT)
    if skipped:
        lines.append(f"... {skipped} earlier commands")
    for entry in history[-HISTORY_LIMIT:]:
        lines.append(_format_entry(entry))
    return "\n".join(lines)


def _format_entry(entry: Any) -> str:
    cmd, code, seconds = entry  # vm.HistoryEntry; code is None when it timed out / was cut off
    status = f"exit {code}" if code is not None else "no exit code (timed out or interrupted)"
    return f"$ {str(cmd)[:500]}\n    -> {status}, {seconds:.3f} s"


def _vm_status(vm: Any) -> str:
    """Why a test's VM broke (None-ish when it is fine): its diagnosis, or a fresh one when
    its process has exited without a request noticing."""
    try:
        broken = getattr(vm, "broken", None)
        if broken is None and not fx._machine_dead(vm):
            return ""
        if broken is None:
            from pytest_ignition.vm import diagnose

            broken = diagnose(vm.machine, wait=0)
            vm.broken = broken
        return f"{broken}\n(this VM is discarded: the next test gets a fresh one)"
    except Exception as e:
        return f"(VM status unavailable: {e!r})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        item.stash[fx.FAILED_KEY] = True  # read by the VM fixtures' teardown (keep-failed)
        for label, vm in item.stash.get(fx.ITEM_VMS_KEY, []):
            status = _vm_status(vm)
            if status:
                report.sections.append((f"ignition {label}: VM status", status))
            report.sections.append((f"ignition {label}: commands", _format_history(vm)))
            report.sections.append(
                (f"ignition {label}: console tail", fx._tail(vm)[-TAIL_CHARS:] or "(empty)")
            )
        if report.when == "call" and item.stash.get(browser.BROWSERS_KEY, None):
            shots = item.config._tmp_path_factory.getbasetemp() / "ignition-browser"  # type: ignore[attr-defined]
            report.sections.extend(browser.failure_sections(item, shots))
    return report


class _RestoreTimes:
    """Collects per-test restore times from reports (they travel in ``user_properties``, so
    they reach the xdist controller too)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.boots: list[float] = []
        self.kept: list[dict[str, Any]] = []  # VMs kept by --ignition-keep-failed
        self.reuse: list[str] = []  # reused/new per snapshot, --ignition-reuse
        self.fallbacks: set[str] = set()  # why `auto` left the bundled VMM (any worker)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # The teardown report carries every property the test gathered (factory VMs are
        # made during the call); counting only it counts each one once.
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == fx.REUSE_PROPERTY and isinstance(value, str):
                if value not in self.reuse:  # each xdist worker reports the snapshots it used
                    self.reuse.append(value)
                continue
            if name == fx.KEPT_PROPERTY and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    self.kept.append(json.loads(value))
                continue
            if name == fx.FALLBACK_PROPERTY and isinstance(value, str):
                self.fallbacks.add(value)
                continue
            if not isinstance(value, (int, float)):
                continue
            if name == fx.RESTORE_PROPERTY:
                self.seconds.append(float(value))
            elif name == fx.BOOT_PROPERTY:
                self.boots.append(float(value))


RESTORE_TIMES_KEY = pytest.StashKey[_RestoreTimes]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    collector = config.stash.get(RESTORE_TIMES_KEY, None)
    if collector is not None and collector.kept:
        terminalreporter.write_sep("-", "pytest-ignition: kept VMs of failed tests")
        for k in collector.kept:
            left = max(0, int(float(k.get("expires", 0)) - time.time()))
            terminalreporter.write_line(
                f"{k.get('id')}  {k.get('test')}  (ends in {left} s)  "
                f"enter: python -m pytest_ignition attach {k.get('id')}"
            )
        terminalreporter.write_line(
            "end them: python -m pytest_ignition kill ID (or --all); list: python -m pytest_ignition list"
        )
    state = config.stash.get(fx.SESSION_KEY, None)
    fallbacks = set(collector.fallbacks) if collector is not None else set()
    if state is not None and state.fallback is not None:
        fallbacks.add(state.fallback)
    if fallbacks:
        terminalreporter.write_sep("-", "pytest-ignition: engine fallback")
        for reason in sorted(fallbacks):
            terminalreporter.write_line(f"auto fell back from the bundled VMM to QEMU: {reason}")
        terminalreporter.write_line(
            "(--ignition-engine=ignition never falls back: use it to see the VMM's own error)"
        )
    if collector is not None and collector.reuse:
        terminalreporter.write_sep("-", "pytest-ignition: snapshots (--ignition-reuse)")
        for line in collector.reuse:
            terminalreporter.write_line(f"snapshot {line}")
    times = list(collector.seconds) if collector is not None else []
    if not times:
        return
    engine = None
    if state is not None:
        engine, _ = state.engine_info()
    ms = sorted(t * 1000 for t in times)
    where = f" ({engine.describe()})" if engine is not None else ""
    if fallbacks and engine is not None and engine.name == "ignition":
        where = " (qemu, after the fallback)"  # xdist controller: its workers fell back
    terminalreporter.write_sep("-", "pytest-ignition")
    terminalreporter.write_line(
        f"{len(ms)} VM(s) restored{where}: per-test restore to agent-ready "
        f"median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms"
    )
    if collector is not None and collector.boots:
        boots = ", ".join(f"{b:.1f} s" for b in collector.boots)
        terminalreporter.write_line(
            # boot_seconds ends at agent-ready, before the prepare hook and the snapshot
            f"{len(collector.boots)} snapshot(s) booted and prepared: boot to agent-ready {boots}"
        )
