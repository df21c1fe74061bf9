"""A process that takes leases for tests/test_leases.py: JSON commands on stdin, one JSON line each.

Run as ``python tests/support/lease_worker.py KIND ADDRESS`` where KIND is
``memcache`` (ADDRESS ``host:port``), ``redis`` or ``redis-cluster`` (ADDRESS
a URL).  Commands:

``{"op": "herd", "key": K, "ttl": T, "threads": N, "at": UNIX_TIME}``
    N threads call ``lease_get(K, T)`` at once, at ``UNIX_TIME`` (every
    process is given the same moment); answers the statuses seen.
``{"op": "take", "key": K, "ttl": T}``
    one ``lease_get``; answers its status (the test then kills the process).
``{"op": "quit"}``
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

# the script's own directory holds redis.py and memcached.py (fixtures), which would
# shadow the client libraries: run from the checkout's root instead
sys.path[0] = str(Path(__file__).resolve().parent.parent.parent)


def make_driver(kind: str, address: str) -> Any:
    if kind == "memcache":
        from stockpyle.stores.drivers.pymemcache import PymemcacheDriver, build_client, normalize_servers

        client = build_client(normalize_servers([address]), connect_timeout=2, timeout=5, max_pool_size=None)
        return PymemcacheDriver(client, servers=[address])
    from stockpyle.stores.drivers.redis import RedisDriver
    from stockpyle.stores.drivers.redis import build_client as redis_client

    cluster = kind == "redis-cluster"
    return RedisDriver(connect=lambda: redis_client(address, cluster=cluster, socket_timeout=5, connect_timeout=2),
                       cluster=cluster)  # fmt: skip


def herd(driver: Any, key: str, ttl: int, threads: int, at: float) -> list[str]:
    statuses: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(threads)

    def one() -> None:
        ready.wait()
        while time.time() < at:
            pass
        status = driver.lease_get(key, ttl).status.value
        with lock:
            statuses.append(status)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses


def main() -> None:
    driver = make_driver(sys.argv[1], sys.argv[2])
    # connect before the first herd: the race is between lease reads, not connects
    driver.get("warm-up")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        if command["op"] == "herd":
            out: Any = herd(driver, command["key"], command["ttl"], command["threads"], command["at"])
        elif command["op"] == "take":
            out = driver.lease_get(command["key"], command["ttl"]).status.value
        else:
            out = {"error": f"unknown op {command['op']!r}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
