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
INIT_MODES = ("agent", "systemd")
NETWORK_MODES = ("none", "user")
ARCHES = ("x86_64", "aarch64")
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
    Option(
        "image",
        "the guest's root filesystem: debian:SUITE (built with mmdebstrap), oci-archive:PATH "
        "(a docker save / OCI archive), or the path of an ext4 image (never written); "
        "default: none (the busybox initramfs is the root)",
        None,
        "SPEC",
    ),
    Option(
        "packages",
        "extra Debian packages for a debian: image, comma or space separated",
        "",
        "PKGS",
    ),
    Option(
        "init",
        "PID 1 with an image: agent (the bundled init; no services) or systemd (the image's own init)",
        "agent",
        "MODE",
        INIT_MODES,
    ),
    Option(
        "network",
        "guest network: none (loopback only) or user (virtio-net with outbound NAT, DHCP and DNS "
        "from passt; the host's loopback is host.ignition.internal)",
        "none",
        "MODE",
        NETWORK_MODES,
    ),
    Option(
        "command_timeout",
        "seconds a vm.run command may take when it passes no timeout=, then CommandTimeout; 0 = none",
        "600",
        "SECONDS",
    ),
    Option(
        "prepare_timeout",
        "seconds the pytest_ignition_prepare hooks may take before the snapshot is an error; 0 = none",
        "900",
        "SECONDS",
    ),
    Option(
        "max_transfer",
        "largest file read_file/copy_from bring to the host (per file, and per copy_from tree), "
        "e.g. 256M, 1G, a plain number of bytes, 0 = no limit",
        "256M",
        "SIZE",
    ),
    Option(
        "keep_failed",
        "keep the VM of a failed test running to attach to it (python -m pytest_ignition attach ID); "
        "off when CI is set unless given explicitly",
        "0",
        "BOOL",
    ),
    Option(
        "keep_failed_for",
        "seconds a kept VM lives before it ends on its own",
        "3600",
        "SECONDS",
    ),
    Option(
        "reuse",
        "keep prepared snapshots in the cache between runs, keyed by everything that made them",
        "0",
        "BOOL",
    ),
    Option(
        "arch",
        "guest architecture: x86_64 or aarch64; default: the host's",
        None,
        "ARCH",
        ARCHES,
    ),
    Option(
        "memory_budget",
        "guest memory all VMs on this host may use at once (all xdist workers together); a worker "
        "waits for room past it: 16G, or a percentage of the host's memory such as 75%",
        "75%",
        "SIZE",
    ),
    Option(
        "browser_memory",
        "guest memory of the ignition_browser guest (Chromium wants ~2 GiB)",
        "2G",
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
    image: str | None = None  # an image spec, see parse_image
    packages: tuple[str, ...] = ()
    init: str = "agent"
    network: str = "none"
    command_timeout: float | None = 600.0  # None = no default timeout
    prepare_timeout: float | None = 900.0
    max_transfer: int = 256 << 20  # bytes; 0 = no limit
    keep_failed: bool = False
    keep_failed_for: float = 3600.0
    reuse: bool = False
    arch: str = field(default_factory=lambda: host_arch())
    memory_budget: str = "75%"  # bytes as text ("16G") or a percentage of host memory
    browser_memory_mib: int = 2048
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


def host_arch() -> str:
    """The host's architecture in the names the ``arch`` setting uses."""
    machine = os.uname().machine
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def parse_bool(text: str | bool | int) -> bool:
    if isinstance(text, bool):
        return text
    v = str(text).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a yes/no value")


def parse_optional_timeout(text: str | float) -> float | None:
    """Seconds, where ``0`` means no timeout (None)."""
    try:
        t = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if t == 0:
        return None
    if not t > 0 or t != t or t == float("inf"):
        raise ValueError(f"{text!r} must be a positive number of seconds, or 0 for none")
    return t


def parse_packages(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"python3, curl"`` or ``["python3", "curl"]`` -> sorted unique Debian package names."""
    items = text if isinstance(text, (list, tuple)) else re.split(r"[,\s]+", str(text))
    out = set()
    for item in items:
        name = str(item).strip()
        if not name:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?", name):
            raise ValueError(f"{name!r} is not a Debian package name")
        out.add(name)
    return tuple(sorted(out))


def parse_image(text: str) -> str:
    """Check an image spec's shape: ``debian:SUITE``, ``oci-archive:PATH`` or an ext4 path.

    Returns the spec with a path made absolute. Whether the suite exists or the archive is
    sound is found out by the image builder (a build error naming the input).
    """
    s = str(text).strip()
    if not s:
        raise ValueError("is empty")
    if s.startswith("debian:"):
        suite = s[len("debian:") :]
        if not re.fullmatch(r"[a-z][a-z0-9-]*", suite):
            raise ValueError(f"{suite!r} is not a Debian suite name (e.g. bookworm)")
        return s
    if s.startswith("oci-archive:"):
        path = Path(os.path.expanduser(s[len("oci-archive:") :]))
        if not path.is_file():
            raise ValueError(f"OCI archive {str(path)!r} does not exist or is not a file")
        return "oci-archive:" + str(path.resolve())
    if ":" in s.split("/")[0] and not Path(s).exists():
        raise ValueError(
            f"{s!r}: unknown image kind (use debian:SUITE, oci-archive:PATH or a path)"
        )
    p = Path(os.path.expanduser(s))
    if not p.is_file():
        raise ValueError(f"image {str(p)!r} does not exist or is not a file")
    with open(p, "rb") as f:
        f.seek(0x438)
        if f.read(2) != b"\x53\xef":
            raise ValueError(f"image {str(p)!r} is not an ext2/3/4 filesystem (no ext superblock)")
    return str(p.resolve())


def parse_budget(text: str) -> str:
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
    if m:
        if not 0 < float(m.group(1)) <= 100:
            raise ValueError(f"{text!r} must be a percentage in (0, 100]")
        return s
    if parse_size(s) <= 0:
        raise ValueError(f"{text!r} must be a positive size")
    return s


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
    "image": "write debian:SUITE (e.g. debian:bookworm), oci-archive:PATH, or the path of an ext4 image",
    "packages": "write Debian package names separated by commas or spaces, e.g. python3,curl",
    "init": "write agent or systemd",
    "network": "write none or user",
    "command_timeout": "write a positive number of seconds, e.g. 600, or 0 for no timeout",
    "prepare_timeout": "write a positive number of seconds, e.g. 900, or 0 for no timeout",
    "max_transfer": "write e.g. 256M, 1G, a plain number of bytes, or 0 for no limit",
    "keep_failed": "write 1 or 0",
    "keep_failed_for": "write a positive number of seconds, e.g. 3600",
    "reuse": "write 1 or 0",
    "arch": "write x86_64 or aarch64",
    "memory_budget": "write a size such as 16G or a percentage of host memory such as 75%",
    "browser_memory": "write e.g. 2G, or a plain number of MiB",
}


def usage_error(name: str, source: str, problem: str) -> pytest.UsageError:
    """A UsageError naming the setting, where its value came from, the problem and the fix."""
    return pytest.UsageError(
        f"pytest-ignition: {source}: {problem}; {_FIX.get(name, 'check the value')}. ({PRECEDENCE_HELP})"
    )


def _choice(name: str) -> Callable[[str], str]:
    return lambda raw: parse_choice(raw, OPTIONS_BY_NAME[name].choices or ())


# How each setting's text becomes its value (settings not listed are stripped strings).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "kernel": lambda raw: parse_path(raw, what="kernel"),
    "initrd": lambda raw: parse_path(raw, what="initrd"),
    "rootfs": lambda raw: parse_path(raw, what="rootfs image"),
    "memory": parse_memory,
    "browser_memory": parse_memory,
    "image": parse_image,
    "packages": parse_packages,
    "command_timeout": parse_optional_timeout,
    "prepare_timeout": parse_optional_timeout,
    "keep_failed_for": parse_timeout,
    "timeout": parse_timeout,
    "max_transfer": parse_size,
    "max_output": parse_size,
    "keep_failed": parse_bool,
    "reuse": parse_bool,
    "memory_budget": parse_budget,
    "cpus": parse_cpus,
    **{n: _choice(n) for n in ("engine", "reset", "init", "network", "arch")},
}


def _parse(name: str, raw: str) -> Any:
    parser = _PARSERS.get(name)
    return parser(raw) if parser is not None else str(raw).strip()


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


def _sourced(err: pytest.UsageError, source: str) -> pytest.UsageError:
    err.setting_source = source  # type: ignore[attr-defined]
    return err


def error_from_cli(err: pytest.UsageError) -> bool:
    """Whether a :func:`resolve` error is about a ``--ignition-*`` flag (typed for this run)."""
    return str(getattr(err, "setting_source", "")).startswith("--")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def env_switch(name: str, default: bool = True) -> bool:
    """An environment on/off switch that is on by default: ``0``, ``no``, ``false`` or ``off``
    (any case) turn it off (``IGNITION_PREFETCH``, ``IGNITION_VMM_FORKSERVER``)."""
    v = os.environ.get(name)
    if v is None:
        return default
    return v.strip().lower() not in ("0", "no", "false", "off")


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
            raise _sourced(usage_error(name, f"{label} = {text!r}", str(e)), source) from None
    if values["initrd"] is not None and values["kernel"] is None:
        err = usage_error(
            "kernel",
            f"{sources['initrd']} given without a kernel",
            "an initrd only makes sense with the kernel it was built for",
        )
        raise _sourced(err, sources["initrd"])
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
        image=values["image"],
        packages=values["packages"],
        init=values["init"],
        network=values["network"],
        command_timeout=values["command_timeout"],
        prepare_timeout=values["prepare_timeout"],
        max_transfer=values["max_transfer"],
        # Keeping failed VMs is off under CI unless asked for explicitly (not by default).
        keep_failed=values["keep_failed"]
        and not (sources["keep_failed"] == "default" and _truthy(env.get("CI"))),
        keep_failed_for=values["keep_failed_for"],
        reuse=values["reuse"],
        arch=values["arch"] or host_arch(),
        memory_budget=values["memory_budget"],
        browser_memory_mib=values["browser_memory"],
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
OVERRIDE_KEYS = (
    "kernel",
    "initrd",
    "rootfs",
    "kernel_args",
    "memory",
    "cpus",
    "reset",
    "timeout",
    "image",
    "packages",
    "init",
    "network",
    "command_timeout",
    "arch",
)


@dataclass(frozen=True)
class Overrides:
    """Per-test changes to the session settings (marker or factory keywords), validated."""

    values: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


# Override keys whose None means "not this setting" (the default guest, no image, no timeout).
_NULLABLE_OVERRIDES = ("kernel", "initrd", "rootfs", "image", "command_timeout")


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
            if value is None and key in _NULLABLE_OVERRIDES:
                parsed[key] = None
            elif key == "memory" and not isinstance(value, str):
                parsed[key] = _int_memory(value)
            elif key in ("kernel", "initrd", "rootfs"):
                parsed[key] = parse_path(str(value), what=key)
            elif key in _PARSERS:  # the same parsing as the --ignition-* options
                parsed[key] = _PARSERS[key](value)
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
    # Every override key names a Settings field, but memory (memory_mib) and kernel_args
    # (appended, below).
    for key in (k for k in OVERRIDE_KEYS if k not in ("memory", "kernel_args")):
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


def image_problem(settings: Settings) -> str | None:
    """Why the image-related settings do not fit together, or None."""
    src = settings.sources
    if settings.image is None:
        if settings.init != "agent":
            return (
                f"init={settings.init} ({src.get('init', 'marker')}) needs an image: "
                "set image (e.g. --ignition-image=debian:bookworm)"
            )
        if settings.packages:
            return (
                f"packages ({src.get('packages', 'marker')}) need a debian: image: "
                "set image=debian:SUITE"
            )
    elif settings.packages and not settings.image.startswith("debian:"):
        return (
            f"packages ({src.get('packages', 'marker')}) only apply to a debian: image, "
            f"not {settings.image!r}"
        )
    return None


def image_packages(settings: Settings) -> tuple[str, ...]:
    """The packages a ``debian:`` image is built with: the setting's, plus what init needs
    (only for ``debian:``: an OCI archive or an ext4 file must bring its own systemd, and
    ensure_image refuses packages for them)."""
    debian = (settings.image or "").startswith("debian:")
    extra = ("systemd-sysv",) if settings.init == "systemd" and debian else ()
    return tuple(sorted(set(settings.packages) | set(extra)))


def vm_config(
    settings: Settings, kernel: Path, initrd: Path | None, image: Any | None = None
) -> Any:
    """The engine's VMConfig for ``settings``, with the kernel/initrd (and the built
    :class:`~pytest_ignition.guest.image.Image`) actually used."""
    from pytest_ignition.engines.base import VMConfig

    return VMConfig(
        kernel=Path(kernel),
        initrd=Path(initrd) if initrd is not None else None,
        rootfs=settings.rootfs,
        kernel_args=settings.kernel_args,
        memory_mib=settings.memory_mib,
        cpus=settings.cpus,
        boot_timeout=settings.timeout,
        image=image.path if image is not None else None,
        init=settings.init,
        network=settings.network,
        arch=settings.arch,
        guest_env=tuple(image.env) if image is not None else (),
        guest_cwd=image.workdir if image is not None else None,
    )
