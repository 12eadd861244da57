"""Helpers for this project's own tests: skipping, or failing under IGNITION_REQUIRE=1."""

from __future__ import annotations

import os

import pytest


def required() -> bool:
    """True when a missing engine/kernel/KVM must fail the run instead of skipping."""
    return os.environ.get("IGNITION_REQUIRE", "").strip().lower() in ("1", "true", "yes", "on")


def require(condition: object, reason: str) -> None:
    """Skip the calling test when ``condition`` is false; fail it under IGNITION_REQUIRE=1."""
    if condition:
        return
    if required():
        pytest.fail(f"IGNITION_REQUIRE=1 but: {reason}", pytrace=False)
    pytest.skip(reason)
