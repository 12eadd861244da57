"""``python -m pytest_ignition``: one-off VMs and the kept VMs of failed tests.

Owns the command line::

    python -m pytest_ignition run [settings] -- CMD [ARG...]   # a fresh VM runs CMD, exits with its code
    python -m pytest_ignition shell [settings]                 # a fresh VM with an interactive root shell
    python -m pytest_ignition attach ID                        # a root shell in a kept VM
    python -m pytest_ignition list                             # the kept VMs
    python -m pytest_ignition kill ID... | --all               # end kept VMs

Settings are the plugin's (:data:`pytest_ignition.config.OPTIONS`), parsed the same way: each as
``--ignition-NAME`` or ``--NAME`` (``--memory 1G``, ``--ignition-engine qemu``), then the
``IGNITION_*`` environment variables, then the defaults (no ini file is read). VMs are booted
through the plugin's own session machinery (:class:`pytest_ignition.fixtures.IgnitionSession`:
engine choice, the default guest built on first use, the VM config).

Exit codes (``run``; ``shell`` and ``attach`` return the shell's): the command's own status
(128 + N when signal N killed it); :data:`EXIT_TIMEOUT` (124) when ``--command-timeout`` passed;
:data:`EXIT_INFRA` (125) when pytest-ignition itself failed: no usable engine, the guest did not
boot, or the guest died or stopped answering mid-command (a panic), with the console tail on
stderr; :data:`EXIT_USAGE` (2) for a bad command line or setting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from pytest_ignition import config as cfgmod

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INFRA = 125
TAIL_CHARS = 3000

__all__ = ["EXIT_INFRA", "EXIT_TIMEOUT", "EXIT_USAGE", "main"]


class InfraError(Exception):
    """pytest-ignition could not provide or keep the VM; the message says why (and what to do)."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


def _err(msg: str) -> None:
    print(f"pytest-ignition: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


def _add_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"VM settings (the plugin's; {cfgmod.PRECEDENCE_HELP}, no ini file)")
    for opt in cfgmod.OPTIONS:
        default = f" [default: {opt.default}]" if opt.default else ""
        g.add_argument(
            opt.flag,
            "--" + opt.name.replace("_", "-"),
            dest=opt.dest,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help}{default}; env {opt.env}",
        )


def settings_from(ns: argparse.Namespace, environ: Any = None) -> cfgmod.Settings:
    """Resolve the settings given on the command line (raises pytest.UsageError on a bad one)."""
    return cfgmod.resolve(lambda dest: getattr(ns, dest, None), lambda key: None, environ)


# --------------------------------------------------------------------------- booting


class _CliConfig(SimpleNamespace):
    """What IgnitionSession needs from a pytest config, outside pytest: no plugins, no hooks."""

    def __init__(self) -> None:
        super().__init__(pluginmanager=SimpleNamespace(getplugin=lambda name: None))


@contextlib.contextmanager
def fresh_vm(settings: cfgmod.Settings) -> Iterator[Any]:
    """A freshly booted VM of ``settings`` (no snapshot, no prepare hook); closed afterwards.

    Raises :class:`InfraError` when there is no engine, no guest, or the guest does not boot.
    """
    import pytest

    from pytest_ignition.engines.base import BootError, EngineError
    from pytest_ignition.fixtures import IgnitionSession
    from pytest_ignition.vm import VM

    session = IgnitionSession(_CliConfig(), settings)  # type: ignore[arg-type]
    vm = None
    try:
        failure: str | None = None
        tail = ""
        try:
            vmcfg, _ = session.vm_config(cfgmod.Overrides())
            engine = session.engine()
            workdir = session.workdir("vm-")
            t0 = time.monotonic()
            machine = engine.boot(vmcfg, workdir)
            vm = VM(engine, machine, vmcfg, **session.vm_limits())
            vm._ignition_boot_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        except (pytest.skip.Exception, pytest.fail.Exception) as e:
            failure = str(getattr(e, "msg", e)).removeprefix("IGNITION_REQUIRE=1 but: ")
        except BootError as e:
            failure, tail = f"the guest did not boot: {e.message}", e.console_tail
        except (EngineError, FileNotFoundError) as e:
            failure = f"the VM could not be started: {e}"
        if failure is not None:
            raise InfraError(failure, tail)
        yield vm
    finally:
        if vm is not None:
            vm.close()
        session.close()


def _died(vm: Any, what: str) -> InfraError:
    """The guest stopped answering: wait a moment for the VM process to exit (a panicking guest
    resets, and the engine exits), then report with the console tail."""
    deadline = time.monotonic() + 3
    while vm.machine.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    state = "the VM exited" if not vm.machine.is_alive() else "the VM still runs"
    return InfraError(f"{what} ({state}; the guest may have panicked)", vm.console_tail(TAIL_CHARS))


# --------------------------------------------------------------------------- commands


def cmd_run(ns: argparse.Namespace) -> int:
    from pytest_ignition.agent import AgentError, AgentTimeout

    argv = list(ns.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _err("run needs a command: python -m pytest_ignition run [settings] -- CMD [ARG...]")
        return EXIT_USAGE
    settings = settings_from(ns)
    # A default command timeout suits tests, not a command typed by hand: only an explicit one.
    explicit = settings.sources.get("command_timeout", "default") != "default"
    timeout = settings.command_timeout if explicit else None
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def on_output(is_out: bool, data: bytes) -> None:
        stream = out if is_out else err
        stream.write(data)
        stream.flush()

    with fresh_vm(settings) as vm:
        try:
            res = vm.machine.agent.exec(argv, timeout=timeout, max_output=0, on_output=on_output)
        except AgentTimeout as e:
            if timeout is None:
                raise _died(vm, f"the guest agent stopped answering: {e}") from None
            _err(f"the command ran past --command-timeout {timeout:g} s and was killed")
            return EXIT_TIMEOUT
        except AgentError as e:
            raise _died(vm, f"the guest went away while the command ran: {e}") from None
    if res.exit_code is not None:
        return res.exit_code
    return 128 + (res.signal or 0)


def _interactive(agent: Any, what: str, vm: Any = None) -> int:
    from pytest_ignition.agent import AgentError
    from pytest_ignition.terminal import interact

    try:
        return interact(agent)
    except AgentError as e:
        if vm is not None:
            raise _died(vm, f"the {what} ended without an exit status: {e}") from None
        raise InfraError(f"the {what} ended without an exit status: {e}") from None


def cmd_shell(ns: argparse.Namespace) -> int:
    settings = settings_from(ns)
    with fresh_vm(settings) as vm:
        secs = getattr(vm, "_ignition_boot_seconds", 0.0)
        _err(f"{vm.engine.describe()}: booted in {secs:.1f} s; `exit` ends the shell and the VM")
        return _interactive(vm.machine.agent, "shell", vm)


def cmd_attach(ns: argparse.Namespace) -> int:
    from pytest_ignition import keep

    try:
        kept = keep.find(ns.id)
        client = keep.connect_agent(kept)
    except keep.KeepError as e:
        raise InfraError(str(e)) from None
    left = max(0.0, kept.expires - time.time())
    _err(
        f"attached to kept VM {kept.id} ({kept.engine}) of {kept.test}; it ends on its own in "
        f"{_duration(left)} or with `python -m pytest_ignition kill {kept.id}`"
    )
    try:
        return _interactive(client, "shell")
    finally:
        client.close()


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def cmd_list(ns: argparse.Namespace) -> int:
    from pytest_ignition import keep

    kept = keep.list_kept()
    if not kept:
        print("no kept VMs")
        return 0
    print(f"{'ID':<8} {'ENGINE':<9} {'PID':>7} {'ENDS IN':>8}  TEST")
    for k in kept:
        left = _duration(max(0.0, k.expires - time.time()))
        print(f"{k.id:<8} {k.engine:<9} {k.keeper_pid:>7} {left:>8}  {k.test}")
    return 0


def cmd_kill(ns: argparse.Namespace) -> int:
    from pytest_ignition import keep

    if ns.all == bool(ns.ids):
        _err("kill takes kept VM ids or --all (see `python -m pytest_ignition list`)")
        return EXIT_USAGE
    try:
        targets = keep.list_kept() if ns.all else [keep.find(i) for i in ns.ids]
    except keep.KeepError as e:
        _err(str(e))
        return 1
    for k in targets:
        keep.kill(k)
        print(f"killed {k.id} ({k.test})")
    if ns.all and not targets:
        print("no kept VMs")
    return 0


# --------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pytest_ignition",
        description="One-off VMs of the plugin's configuration, and the kept VMs of failed tests.",
        epilog=f"exit codes: the command's / shell's own; {EXIT_TIMEOUT} command timeout; "
        f"{EXIT_INFRA} pytest-ignition failed (no engine, boot failed, guest died); "
        f"{EXIT_USAGE} bad usage",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run CMD in a fresh VM; exit with its exit code")
    _add_settings(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...] (an argv)")
    shell = sub.add_parser("shell", help="an interactive root shell in a fresh VM")
    _add_settings(shell)
    attach = sub.add_parser("attach", help="an interactive root shell in a kept VM")
    attach.add_argument("id")
    sub.add_parser("list", help="the kept VMs (of failed tests, --ignition-keep-failed)")
    kill = sub.add_parser("kill", help="end kept VMs")
    kill.add_argument("ids", nargs="*", metavar="ID")
    kill.add_argument("--all", action="store_true", help="every kept VM")
    return p


def _terminate(signo: int, frame: Any) -> None:
    raise SystemExit(128 + signo)  # unwinds: the VM is closed, the terminal restored


def main(argv: Sequence[str] | None = None) -> int:
    import pytest

    ns = parser().parse_args(argv)
    if threading_main():
        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGHUP, _terminate)
    actions = {
        "run": cmd_run,
        "shell": cmd_shell,
        "attach": cmd_attach,
        "list": cmd_list,
        "kill": cmd_kill,
    }
    try:
        return actions[ns.action](ns)
    except pytest.UsageError as e:
        _err(str(e).removeprefix("pytest-ignition: "))
        return EXIT_USAGE
    except InfraError as e:
        _err(str(e))
        if e.console_tail:
            sys.stderr.write("--- console tail ---\n" + e.console_tail.rstrip("\n") + "\n")
        return EXIT_INFRA
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # `run ... | head`: the reader went away; so do we, quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
