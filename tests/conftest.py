"""Shared fixtures.  Service fixtures live in tests/support/ plugin modules."""

from __future__ import annotations

pytest_plugins = [
    "support.memcached",
    "support.databases",
    "support.redis",
]
