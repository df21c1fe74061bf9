"""Whether a missing service skips or fails a test.

Without a server, its tests skip with the reason.  With ``CI=true`` or
``STOCKPYLE_REQUIRE_SERVICES=1`` in the environment a missing server is a
failure instead: CI promised the services, so their absence is a bug.
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def services_required() -> bool:
    """True when a missing service must fail the test run instead of skipping."""
    flags = (os.environ.get("CI", ""), os.environ.get("STOCKPYLE_REQUIRE_SERVICES", ""))
    return any(flag.strip().lower() in ("1", "true", "yes") for flag in flags)


def unavailable(reason: str) -> NoReturn:
    """Skip the current test with ``reason``, or fail it when services are required."""
    if services_required():
        pytest.fail(f"required service unavailable (CI=true / STOCKPYLE_REQUIRE_SERVICES=1): {reason}", pytrace=False)
    pytest.skip(reason)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
