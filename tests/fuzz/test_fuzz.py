"""The fuzz targets as ordinary tests: seconds each in CI (``make fuzz`` runs them long).

With atheris installed each target runs coverage-guided for FUZZ_SECONDS (default 3) in a child
process, from the seed corpus; without it, hypothesis feeds it random inputs. Either way a crash
(any exception the parser does not document) fails the test with the input that caused it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import targets  # noqa: E402

SECONDS = int(os.environ.get("FUZZ_SECONDS", "3"))
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seeds(name: str) -> None:
    seeds = sorted((HERE / "seeds" / name).iterdir())
    assert seeds, f"no seeds for {name}"
    for seed in seeds:
        targets.TARGETS[name](seed.read_bytes())


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install atheris)")
@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_atheris(name: str, tmp_path: Path) -> None:
    env = dict(os.environ, FUZZ_CORPUS=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), name, str(SECONDS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, f"{name}: a crash (input under {tmp_path / name}):\n{tail}"
    assert "Done " in proc.stderr, tail


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512))
def test_hypothesis(name: str, data: bytes) -> None:
    targets.TARGETS[name](data)
