"""MemcacheStore against raw pymemcache and dogpile.cache, measured in one run on one server.

Run: ``python benchmarks/bench_memcache.py [--repeat N]``.  Starts its own
memcached on a free loopback port (needs the ``memcached`` binary) and stops it
at the end.  Reports the median time per call over several timeit-style
repeats, and ratios against the peers.  Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pymemcache.client.base import Client, PooledClient

from stockpyle import MemcacheStore


class Item:
    """A typical small cached object with two alternate keys."""

    __stockpyle_keys__ = ["key", ("zap", "bar")]  # noqa: RUF012

    def __init__(self, key: str, zap: int, bar: int, payload: Any = None) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar
        self.payload = payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_memcached() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("memcached")
    if binary is None:
        sys.exit("memcached binary not found; apt-get install memcached")
    port = free_port()
    cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-u", "root"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("memcached did not start")


def measure(contenders: dict[str, Callable[[], Any]], repeat: int, target: float = 0.1) -> dict[str, float]:
    """Median seconds per call of each contender.

    Each contender's loop count is calibrated to about ``target`` seconds; then
    the contenders are timed round-robin ``repeat`` times, so load from other
    processes on the machine affects them alike instead of whichever ran last.
    """
    timers = {name: timeit.Timer(fn) for name, fn in contenders.items()}
    numbers = {}
    for name, timer in timers.items():
        number, seconds = timer.autorange()
        numbers[name] = max(1, int(number * target / max(seconds, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]) / numbers[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed repeats per measurement (median reported)")
    parser.add_argument("--size", type=int, default=100, help="batch size")
    args = parser.parse_args()

    proc, address = start_memcached()
    try:
        run(address, args.repeat, args.size)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def run(address: str, repeat: int, size: int) -> None:
    from dogpile.cache import make_region

    objs = [Item(f"key-{i}", i, -i, {"name": f"object {i}", "values": list(range(10))}) for i in range(size)]
    keydicts = [{"key": o.key} for o in objs]

    store = MemcacheStore([address], namespace="bench")
    store.batch_put(objs)

    pooled = PooledClient(address, no_delay=True, default_noreply=False)
    plain = Client(address, no_delay=True, default_noreply=False)
    raw_keys = [f"raw:{o.key}" for o in objs]
    pooled.set_many(
        {k: pickle.dumps(o, pickle.HIGHEST_PROTOCOL) for k, o in zip(raw_keys, objs, strict=True)}, noreply=False
    )

    region = make_region().configure(
        "dogpile.cache.pymemcache",
        arguments={"url": [address], "memcached_expire_time": 0, "no_delay": True},
    )
    dogpile_keys = [f"dp:{o.key}" for o in objs]
    region.set_multi(dict(zip(dogpile_keys, objs, strict=True)))

    # sanity: every contender reads real objects
    assert store.get(Item, keydicts[0]).key == "key-0"  # type: ignore[union-attr]
    assert all(o is not None for o in store.batch_get(Item, keydicts))
    assert len(pooled.get_many(raw_keys)) == size
    assert region.get(dogpile_keys[0]).key == "key-0"

    signed = MemcacheStore([address], namespace="bench-signed", secret=b"benchmark secret")
    signed.batch_put(objs)
    k0, rk0 = keydicts[0], raw_keys[0]
    results = measure(
        {
            "MemcacheStore.get": lambda: store.get(Item, k0),
            "raw PooledClient.get + pickle.loads": lambda: pickle.loads(pooled.get(rk0)),
            "raw Client.get + pickle.loads": lambda: pickle.loads(plain.get(rk0)),
            "dogpile region.get": lambda: region.get(dogpile_keys[0]),
            f"MemcacheStore.batch_get({size})": lambda: store.batch_get(Item, keydicts),
            f"raw PooledClient.get_many({size}) + unpickle": lambda: [
                pickle.loads(v) for v in pooled.get_many(raw_keys).values()
            ],
            f"raw Client.get_many({size}) + unpickle": lambda: [
                pickle.loads(v) for v in plain.get_many(raw_keys).values()
            ],
            f"dogpile region.get_multi({size})": lambda: region.get_multi(dogpile_keys),
            "MemcacheStore.put (2 keys)": lambda: store.put(objs[1]),
            "MemcacheStore.get (signed)": lambda: signed.get(Item, k0),
            f"MemcacheStore.batch_get({size}) (signed)": lambda: signed.batch_get(Item, keydicts),
        },
        repeat,
    )

    print(f"memcached at {address}; medians of {repeat} repeats; Python {sys.version.split()[0]}")
    width = max(len(name) for name in results)
    for name, seconds in results.items():
        print(f"  {name:<{width}}  {seconds * 1e6:10.1f} us")
    get_ratio = results["MemcacheStore.get"] / results["raw PooledClient.get + pickle.loads"]
    get_ratio_plain = results["MemcacheStore.get"] / results["raw Client.get + pickle.loads"]
    batch = results[f"MemcacheStore.batch_get({size})"]
    batch_ratio = batch / results[f"raw PooledClient.get_many({size}) + unpickle"]
    batch_ratio_plain = batch / results[f"raw Client.get_many({size}) + unpickle"]
    dogpile_speedup = results[f"dogpile region.get_multi({size})"] / batch
    print("ratios (target):")
    print(f"  get / raw pooled get                 {get_ratio:5.2f}x  (<= 1.2)")
    print(f"  get / raw single-connection get      {get_ratio_plain:5.2f}x")
    print(f"  batch_get / raw pooled get_many      {batch_ratio:5.2f}x  (<= 1.2)")
    print(f"  batch_get / raw single-conn get_many {batch_ratio_plain:5.2f}x")
    print(f"  dogpile get_multi / batch_get        {dogpile_speedup:5.2f}x faster  (>= 3)")
    store.release()
    signed.release()
    pooled.close()
    plain.close()


if __name__ == "__main__":
    main()
