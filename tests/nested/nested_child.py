"""A child pytest run of e2e tests on the bundled VMM, for the nested tier's plugin tests.

The child inherits the environment (IGNITION_REQUIRE etc.). A pass needs the child to exit 0 with
tests passed and none skipped or failed, and its report to name the bundled VMM, so that a child
that quietly fell back to another engine or skipped its VM tests fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_ignition._testing import require, run_child_pytest

ROOT = Path(__file__).resolve().parents[2]


def run_on_bundled_vmm(
    args: list[str], timeout: float, *, deselect_ok: bool = False, header: bool = True
) -> str:
    """Run ``pytest ARGS --ignition-engine=ignition`` in the repo root; returns its output.

    ``header=False`` for a child whose own tests start no VM (they run inner pytest sessions
    and check the engine those use themselves), so it prints no ignition report header."""
    from pytest_ignition.engines.ignition import available
    from pytest_ignition.guest import find_guest

    ok, why = available()
    require(ok, why)
    require(find_guest() is not None, "guest not built (python -m pytest_ignition.guest build)")
    # Default verbosity, not -q: -q hides the report header this checks.
    argv = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "--color=no"]
    argv += ["-rfEs", "--ignition-engine=ignition"]
    return run_child_pytest(argv, timeout, cwd=ROOT, deselect_ok=deselect_ok, engine_header=header)
