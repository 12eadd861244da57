"""Yes/no settings as bare flags (``--ignition-keep-failed``, ``--ignition-reuse``) anywhere on
the command line, with an explicit value, and the header's keep-failed line; no VM needed."""

from __future__ import annotations

import pytest

from pytest_ignition import config as cfgmod
from pytest_ignition.plugin import keep_failed_line

pytest_plugins = ["pytester"]

PROBE = """
from pytest_ignition.fixtures import SESSION_KEY

def test_probe(request):
    s = request.config.stash[SESSION_KEY].settings
    print(f"PROBE keep_failed={s.keep_failed} reuse={s.reuse}")
"""


@pytest.mark.parametrize(
    ("args", "keep", "reuse"),
    [
        (["--ignition-keep-failed", "test_probe.py"], True, False),
        (["test_probe.py", "--ignition-keep-failed", "--ignition-reuse"], True, True),
        (["--ignition-reuse", "0", "--ignition-keep-failed=1", "test_probe.py"], True, False),
        (["--ignition-keep-failed=0", "test_probe.py"], False, False),
    ],
)
def test_bare_and_valued_flags(
    pytester: pytest.Pytester, args: list[str], keep: bool, reuse: bool
) -> None:
    pytester.makepyfile(test_probe=PROBE)
    result = pytester.runpytest_subprocess("-s", "-p", "no:xdist", *args)
    result.assert_outcomes(passed=1)  # the path after a bare flag is still collected
    result.stdout.fnmatch_lines([f"*PROBE keep_failed={keep} reuse={reuse}*"])


def _settings(env: dict[str, str], cli: dict[str, str] | None = None) -> cfgmod.Settings:
    return cfgmod.resolve(lambda d: (cli or {}).get(d), lambda k: None, env)


def test_keep_failed_header_says_why() -> None:
    ci = {"CI": "true"}
    assert keep_failed_line(_settings(ci), ci).startswith("keep-failed off: CI is set")
    assert "off (default" in keep_failed_line(_settings({}), {})
    on = _settings({"CI": "true"}, {"ignition_keep_failed": "1", "ignition_keep_failed_for": "60"})
    assert on.keep_failed
    assert keep_failed_line(on).startswith("keep-failed on (--ignition-keep-failed)")
    assert "kept for 60 s" in keep_failed_line(on)
    env_on = _settings({"CI": "1", "IGNITION_KEEP_FAILED": "yes"})
    assert env_on.keep_failed and "IGNITION_KEEP_FAILED" in keep_failed_line(env_on)
