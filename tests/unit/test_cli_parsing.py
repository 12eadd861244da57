"""``python -m pytest_ignition``: settings parsing, usage errors and exit codes without a VM.

(Booting, ``run``'s exit codes, panics, ``shell`` and kept VMs are in tests/e2e/test_cli.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pytest_ignition import cli
from pytest_ignition import config as cfgmod


def _settings(*args: str, **env: str) -> cfgmod.Settings:
    ns = cli.parser().parse_args(["shell", *args])
    return cli.settings_from(ns, environ=env)


def test_every_plugin_setting_is_accepted_with_and_without_the_prefix() -> None:
    p = cli.parser()
    for opt in cfgmod.OPTIONS:
        short = "--" + opt.name.replace("_", "-")
        for flag in (opt.flag, short):
            ns = p.parse_args(["shell", flag, "x"])
            assert getattr(ns, opt.dest) == "x", flag


def test_settings_parse_like_the_plugins() -> None:
    s = _settings("--memory", "1G", "--ignition-cpus", "2", "--command-timeout", "0")
    assert (s.memory_mib, s.cpus, s.command_timeout) == (1024, 2, None)
    assert s.sources["memory"] == "--ignition-memory"
    # the environment applies below the command line, as in pytest
    s = _settings("--cpus", "3", IGNITION_CPUS="4", IGNITION_MEMORY="768M")
    assert (s.cpus, s.memory_mib) == (3, 768)
    with pytest.raises(pytest.UsageError, match="is not a memory size"):
        _settings("--memory", "lots")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_ignition", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_usage_errors_exit_2_with_the_fix() -> None:
    r = _run("run", "--memory", "1X", "--", "true")
    assert r.returncode == cli.EXIT_USAGE, r
    assert "is not a memory size; write e.g. 512M" in r.stderr
    r = _run("run")
    assert r.returncode == cli.EXIT_USAGE and "run needs a command" in r.stderr
    r = _run("kill")
    assert r.returncode == cli.EXIT_USAGE and "--all" in r.stderr


def test_no_engine_is_the_infrastructure_exit_code() -> None:
    r = _run("run", "--engine", "qemu", "--", "true", PATH="/nonexistent")
    assert r.returncode == cli.EXIT_INFRA == 125, r
    assert "qemu-system-x86_64 was not found on PATH" in r.stderr
    assert "apt-get install qemu-system-x86" in r.stderr


def test_attach_to_an_unknown_id_says_how_to_list(tmp_path: object) -> None:
    r = _run("attach", "abcdef", IGNITION_CACHE_DIR=str(tmp_path))
    assert r.returncode == cli.EXIT_INFRA, r
    assert "no kept VM 'abcdef'" in r.stderr and "pytest_ignition list" in r.stderr
    r = _run("attach", "../etc", IGNITION_CACHE_DIR=str(tmp_path))
    assert r.returncode == cli.EXIT_INFRA and "is not a kept VM id" in r.stderr
    r = _run("list", IGNITION_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "no kept VMs"
