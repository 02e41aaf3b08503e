"""Debian's Chromium for the browser tests (never `playwright install`): where it is, how to start it, and
the skip (or, under `make test`, the failure) when it is missing."""

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch_env() -> dict:
    """Chromium's environment: under the suite's --check-leftovers, its "Crash Reports" folder (which it makes in
    ~/.config/chromium whatever its profile) goes to the run's temp dir (tests/conftest.py)."""
    env = dict(os.environ)
    if os.environ.get("KM_TEST_CONFIG_HOME"):
        env["XDG_CONFIG_HOME"] = os.environ["KM_TEST_CONFIG_HOME"]
    return env


def chromium_marks() -> list:
    """A test module's pytestmark: skip it without Chromium, unless make test requires the browser."""
    if CHROMIUM.exists():
        return []
    if os.environ.get("KM_REQUIRE_BROWSER"):
        raise RuntimeError("KM_REQUIRE_BROWSER is set but /usr/bin/chromium is missing")
    return [pytest.mark.skip(reason="Debian's chromium is not installed (make test installs it as root)")]
