"""Debian's Chromium for the browser tests (never `playwright install`): where it is, how to start it, and
the skip (or, under `make test`, the failure) when it is missing."""

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_marks() -> list:
    """A test module's pytestmark: skip it without Chromium, unless make test requires the browser."""
    if CHROMIUM.exists():
        return []
    if os.environ.get("KM_REQUIRE_BROWSER"):
        raise RuntimeError("KM_REQUIRE_BROWSER is set but /usr/bin/chromium is missing")
    return [pytest.mark.skip(reason="Debian's chromium is not installed (make test installs it as root)")]
