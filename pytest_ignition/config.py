"""Resolving the plugin's settings: ``--ignition-*`` options, ini keys and ``IGNITION_*`` variables.

This module owns the option table (names, help, defaults), the precedence rule
(command line > environment variable > ini key > default), the parsing and validation of
each value, and the translation of settings plus per-test overrides (the ``ignition``
marker, ``ignition_vm_factory(**config)``) into an :class:`~pytest_ignition.engines.base.VMConfig`.

Every bad value becomes a :class:`pytest.UsageError` naming where the value came from,
what is wrong, and what to write instead; users never see a traceback for a typo.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from pytest_ignition.engines.select import ENGINE_NAMES as ENGINES

RESET_MODES = ("restore", "rollback")
MIN_MEMORY_MIB = 32
MAX_CPUS = 64
DEFAULT_MAX_OUTPUT = 64 << 20  # bytes; the same as the "max_output" option's default "64M"


@dataclass(frozen=True)
class Option:
    """One setting: its CLI flag, ini key, environment variable, default and help."""

    name: str  # e.g. "kernel"; flag --ignition-kernel, ini ignition_kernel, env IGNITION_KERNEL
    help: str
    default: str | None
    metavar: str = "VALUE"
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--ignition-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "ignition_" + self.name

    @property
    def ini(self) -> str:
        return "ignition_" + self.name

    @property
    def env(self) -> str:
        return "IGNITION_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "kernel",
        "guest kernel image (bzImage); default: the bundled guest, built and cached on first use",
        None,
        "PATH",
    ),
    Option(
        "initrd",
        "guest initramfs (cpio, may be compressed); default: the bundled guest's",
        None,
        "PATH",
    ),
    Option(
        "rootfs",
        "ext4 image attached copy-on-write as the guest's disk (the image is never written)",
        None,
        "PATH",
    ),
    Option("kernel_args", "extra guest kernel command line arguments", "", "ARGS"),
    Option("memory", "guest memory: 512M, 1G, or a plain number of MiB", "512M", "SIZE"),
    Option("cpus", "number of guest vCPUs", "1", "N"),
    Option(
        "engine",
        "VM engine: auto picks the bundled VMM where it runs at native speed, else QEMU",
        "auto",
        "NAME",
        ENGINES,
    ),
    Option(
        "reset",
        "how a test gets a fresh guest: restore a new VM from the snapshot, or roll one back in place",
        "restore",
        "MODE",
        RESET_MODES,
    ),
    Option(
        "timeout",
        "seconds a guest may take to boot or restore before it is an error",
        "120",
        "SECONDS",
    ),
    Option(
        "max_output",
        "most output (stdout + stderr, in bytes) vm.run keeps per command before it kills the "
        "command and raises CommandOutputTooLarge: 64M, 1G, a plain number of bytes, 0 = no limit",
        "64M",
        "SIZE",
    ),
)

OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}

PRECEDENCE_HELP = "precedence: command line > IGNITION_* environment variable > ini key > default"


@dataclass(frozen=True)
class Settings:
    """The resolved session-wide settings (before per-test overrides)."""

    kernel: Path | None = None
    initrd: Path | None = None
    rootfs: Path | None = None
    kernel_args: str = ""
    memory_mib: int = 512
    cpus: int = 1
    engine: str = "auto"
    reset: str = "restore"
    timeout: float = 120.0
    max_output: int = DEFAULT_MAX_OUTPUT  # bytes per command, stdout and stderr together; 0 = none
    require: bool = False
    # Where each value came from ("--ignition-memory", "IGNITION_MEMORY", "ini ignition_memory",
    # "default"): used in error messages and the report header.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def parse_memory(text: str) -> int:
    """Parse a memory size into MiB: ``512M``, ``1G``, ``1.5G``, ``2048`` (MiB), ``524288K``.

    Raises ValueError with a human explanation on anything else.
    """
    s = str(text).strip()
    m = re.fullmatch(r"(?i)(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", s)
    if not m:
        raise ValueError(f"{text!r} is not a memory size")
    number, unit = float(m.group(1)), m.group(2).lower()
    factor = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[unit]
    mib = number * factor
    if mib != int(mib):
        raise ValueError(f"{text!r} is not a whole number of MiB")
    mib = int(mib)
    if mib < MIN_MEMORY_MIB:
        raise ValueError(f"{text!r} is less than the minimum of {MIN_MEMORY_MIB} MiB")
    return mib


def parse_size(text: str | int) -> int:
    """Parse an output size into bytes: ``64M``, ``1G``, ``1.5M``, ``512K``, ``4096`` (bytes).

    ``0`` means no limit. Units are powers of 1024 (``M``, ``MiB`` and ``MB`` alike). Raises
    ValueError with a human explanation on anything else.
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    s = str(text).strip()
    m = re.fullmatch(r"(?i)(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", s)
    if not m:
        raise ValueError(f"{text!r} is not a size")
    unit = (m.group(2) or "").lower()
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    size = Fraction(m.group(1)) * factor  # exact: no float rounding, no overflow
    if size.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def parse_cpus(text: str | int) -> int:
    try:
        n = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= MAX_CPUS:
        raise ValueError(f"{n} is outside 1..{MAX_CPUS}")
    return n


def parse_timeout(text: str | float) -> float:
    try:
        t = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"{text!r} must be a positive number of seconds")
    return t


def parse_path(text: str, *, what: str) -> Path:
    p = Path(os.path.expanduser(str(text).strip()))
    if not str(text).strip():
        raise ValueError("is empty")
    if not p.exists():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} is not a regular file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what} {str(p)!r} is not readable")
    return p.resolve()


def parse_choice(text: str, choices: tuple[str, ...]) -> str:
    v = str(text).strip().lower()
    if v not in choices:
        raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
    return v


_FIX = {
    "kernel": "give the path of a bzImage, or drop the option to use the bundled guest",
    "initrd": "give the path of an initramfs, or drop the option to use the bundled guest's",
    "rootfs": "give the path of an ext4 image (e.g. built with `mke2fs -d DIR img.ext4 256M`)",
    "memory": "write e.g. 512M, 1G, or a plain number of MiB",
    "cpus": f"write a whole number from 1 to {MAX_CPUS}",
    "engine": "write auto, ignition or qemu",
    "reset": "write restore or rollback",
    "timeout": "write a positive number of seconds, e.g. 120",
    "kernel_args": "write the arguments as one string",
    "max_output": "write e.g. 64M, 1G, a plain number of bytes, or 0 for no limit",
}


def usage_error(name: str, source: str, problem: str) -> pytest.UsageError:
    """A UsageError naming the setting, where its value came from, the problem and the fix."""
    return pytest.UsageError(
        f"pytest-ignition: {source}: {problem}; {_FIX.get(name, 'check the value')}. ({PRECEDENCE_HELP})"
    )


def _parse(name: str, raw: str) -> Any:
    if name in ("kernel", "initrd", "rootfs"):
        return parse_path(raw, what=name if name != "rootfs" else "rootfs image")
    if name == "memory":
        return parse_memory(raw)
    if name == "cpus":
        return parse_cpus(raw)
    if name == "timeout":
        return parse_timeout(raw)
    if name == "max_output":
        return parse_size(raw)
    if name in ("engine", "reset"):
        return parse_choice(raw, OPTIONS_BY_NAME[name].choices or ())
    return str(raw).strip()


def resolve_raw(
    cli: Callable[[str], Any],
    ini: Callable[[str], Any],
    environ: Mapping[str, str],
) -> dict[str, tuple[str | None, str]]:
    """Pick each option's raw text by precedence; returns name -> (raw value, source label).

    ``cli(dest)`` returns the command-line value or None when the flag was not given;
    ``ini(key)`` returns the ini value or "" / None when unset.
    """
    out: dict[str, tuple[str | None, str]] = {}
    for opt in OPTIONS:
        v = cli(opt.dest)
        if v is not None:
            out[opt.name] = (str(v), opt.flag)
            continue
        v = environ.get(opt.env)
        if v is not None and v != "":
            out[opt.name] = (v, f"environment variable {opt.env}")
            continue
        v = ini(opt.ini)
        if v is not None and str(v).strip() != "":
            out[opt.name] = (str(v), f"ini key {opt.ini}")
            continue
        out[opt.name] = (opt.default, "default")
    return out


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def resolve(
    cli: Callable[[str], Any],
    ini: Callable[[str], Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve and validate all settings; raises :class:`pytest.UsageError` on a bad value."""
    env = os.environ if environ is None else environ
    raw = resolve_raw(cli, ini, env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (text, source) in raw.items():
        sources[name] = source
        if text is None:
            values[name] = None
            continue
        try:
            values[name] = _parse(name, text)
        except ValueError as e:
            label = source if source != "default" else f"default {name}"
            raise usage_error(name, f"{label} = {text!r}", str(e)) from None
    if values["initrd"] is not None and values["kernel"] is None:
        raise usage_error(
            "kernel",
            f"{sources['initrd']} given without a kernel",
            "an initrd only makes sense with the kernel it was built for",
        )
    return Settings(
        kernel=values["kernel"],
        initrd=values["initrd"],
        rootfs=values["rootfs"],
        kernel_args=values["kernel_args"] or "",
        memory_mib=values["memory"],
        cpus=values["cpus"],
        engine=values["engine"],
        reset=values["reset"],
        timeout=values["timeout"],
        max_output=values["max_output"],
        require=_truthy(env.get("IGNITION_REQUIRE")),
        sources=sources,
    )


def from_pytest_config(config: pytest.Config) -> Settings:
    """Resolve the settings of a pytest session."""

    def cli(dest: str) -> Any:
        return config.getoption(dest, default=None)

    def ini(key: str) -> Any:
        try:
            return config.getini(key)
        except ValueError:
            return None

    return resolve(cli, ini)


# Keys accepted by the marker and the factory, and how each is parsed.
OVERRIDE_KEYS = ("kernel", "initrd", "rootfs", "kernel_args", "memory", "cpus", "reset", "timeout")


@dataclass(frozen=True)
class Overrides:
    """Per-test changes to the session settings (marker or factory keywords), validated."""

    values: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


def parse_overrides(kwargs: Mapping[str, Any], *, where: str) -> Overrides:
    """Validate marker/factory keywords; raises :class:`pytest.UsageError` naming ``where``."""
    parsed: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in OVERRIDE_KEYS:
            raise pytest.UsageError(
                f"pytest-ignition: {where}: unknown setting {key!r}; "
                f"the settings are {', '.join(OVERRIDE_KEYS)}"
            )
        try:
            if key == "memory":
                parsed[key] = parse_memory(value) if isinstance(value, str) else _int_memory(value)
            elif key in ("kernel", "initrd", "rootfs"):
                parsed[key] = None if value is None else parse_path(str(value), what=key)
            elif key == "cpus":
                parsed[key] = parse_cpus(value)
            elif key == "timeout":
                parsed[key] = parse_timeout(value)
            elif key == "reset":
                parsed[key] = parse_choice(value, RESET_MODES)
            else:
                if isinstance(value, (list, tuple)):
                    value = " ".join(str(v) for v in value)
                parsed[key] = str(value)
        except ValueError as e:
            raise pytest.UsageError(
                f"pytest-ignition: {where}: {key}={value!r}: {e}; {_FIX.get(key, 'check the value')}"
            ) from None
    return Overrides(tuple(sorted(parsed.items())))


def _int_memory(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a memory size")
    return parse_memory(str(value))


def apply_overrides(settings: Settings, overrides: Overrides) -> Settings:
    """Settings with per-test overrides applied. ``kernel_args`` is appended to the session's."""
    o = overrides.as_dict()
    changes: dict[str, Any] = {}
    for key in ("kernel", "initrd", "rootfs", "cpus", "reset", "timeout"):
        if key in o:
            changes[key] = o[key]
    if "memory" in o:
        changes["memory_mib"] = o["memory"]
    if "kernel" in o and "initrd" not in o:
        # Another kernel without its initrd would boot the wrong modules/agent: require both
        # or fall back to none.
        changes["initrd"] = None
    if o.get("kernel_args"):
        changes["kernel_args"] = " ".join(x for x in (settings.kernel_args, o["kernel_args"]) if x)
    return replace(settings, **changes)


def vm_config(settings: Settings, kernel: Path, initrd: Path | None) -> Any:
    """The engine's VMConfig for ``settings``, with the kernel/initrd actually used."""
    from pytest_ignition.engines.base import VMConfig

    return VMConfig(
        kernel=Path(kernel),
        initrd=Path(initrd) if initrd is not None else None,
        rootfs=settings.rootfs,
        kernel_args=settings.kernel_args,
        memory_mib=settings.memory_mib,
        cpus=settings.cpus,
        boot_timeout=settings.timeout,
    )
