"""Kernel config fragments: parse, merge onto a base .config, verify the result.

Owns the (small) subset of Kconfig syntax that `.config` files and our fragments use:
``CONFIG_X=value`` and ``# CONFIG_X is not set``. No kernel build happens here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class FragmentError(ValueError):
    """A fragment line is neither a setting, a comment nor blank."""


def parse(text: str, *, strict: bool = False) -> dict[str, str | None]:
    """Map ``CONFIG_X`` -> value (``"y"``, ``"8"``, ``'"str"'``) or None for "is not set".

    Later lines win, as in Kconfig. With ``strict`` (fragments), any other non-comment
    line raises FragmentError so a typo cannot silently vanish.
    """
    out: dict[str, str | None] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _SET.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = None
            continue
        if line.startswith("#"):
            continue
        if strict:
            raise FragmentError(f"line {lineno}: not a Kconfig setting: {raw!r}")
    return out


def merge(base: str, fragment: str) -> str:
    """Return ``base`` with every symbol the fragment sets replaced by the fragment's value.

    Equivalent to ``merge_config.sh -m``: the result still needs ``make olddefconfig`` to
    resolve dependencies and defaults.
    """
    wanted = parse(fragment, strict=True)
    kept: list[str] = []
    for raw in base.splitlines():
        line = raw.strip()
        m = _SET.match(line) or _UNSET.match(line)
        if m and m.group(1) in wanted:
            continue
        kept.append(raw)
    kept.append("# --- merged fragment ---")
    for name, value in wanted.items():
        kept.append(f"# {name} is not set" if value is None else f"{name}={value}")
    return "\n".join(kept) + "\n"


@dataclass(frozen=True)
class Mismatch:
    """One fragment setting that did not survive into the final .config."""

    name: str
    wanted: str | None
    got: str | None

    def __str__(self) -> str:
        want = "is not set" if self.wanted is None else f"={self.wanted}"
        got = "not set" if self.got is None else f"={self.got}"
        return f"{self.name} wanted {want}, got {got}"


def verify(fragment: str, final: str) -> list[Mismatch]:
    """List the fragment's settings that the final .config does not honour.

    ``=y`` (or any value) must appear verbatim; ``is not set`` must not be enabled
    (absent, ``n`` or "is not set" all count). A dropped ``=y`` almost always means a
    dependency is missing from the fragment.
    """
    wanted = parse(fragment, strict=True)
    have = parse(final)
    bad: list[Mismatch] = []
    for name, value in wanted.items():
        got = have.get(name)
        if value is None:
            if got not in (None, "n"):
                bad.append(Mismatch(name, None, got))
        elif got != value:
            bad.append(Mismatch(name, value, got))
    return bad
