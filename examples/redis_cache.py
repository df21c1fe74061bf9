"""A Redis layer between process memory and the system of record.

Run it from a checkout with a Redis on localhost::

    pip install -e ".[redis]" && python examples/redis_cache.py [redis://127.0.0.1:6379/0]

or against a Redis Cluster (any node's address)::

    python examples/redis_cache.py redis://127.0.0.1:7000 --cluster

The system of record here is a plain dictionary store (in a real application
it is a :class:`~stockpyle.SqlAlchemyStore`).  The script writes through the
chain, reads through Redis, shows a back-fill and a tombstone, and deletes
what it wrote; it uses a namespace of its own, so it never reads or touches
other entries.  Every result is checked; it exits with status 0 when all
checks pass.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any, ClassVar

from stockpyle import BaseDictionaryStore, ChainedStore, ProcessMemoryStore, RedisStore


class Customer:
    """Found by id or by e-mail address."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["id", "email"]

    def __init__(self, id: int, email: str, name: str) -> None:
        self.id = id
        self.email = email
        self.name = name

    def __repr__(self) -> str:
        return f"Customer({self.id}, {self.email!r})"


def main(url: str, cluster: bool) -> None:
    redis_layer = RedisStore(
        url,
        cluster=cluster,
        namespace=f"example-{uuid.uuid4().hex[:8]}",  # a fresh namespace: this run's entries only
        secret=os.environ.get("CACHE_SECRET", "change me: sign entries in a shared Redis"),
        socket_timeout=0.5,
    )
    redis_layer.configure(classes=[Customer], lifetime=300)  # five minutes in Redis
    memory = ProcessMemoryStore()
    memory.configure(classes=[Customer], lifetime=5)  # five seconds in this process
    database = BaseDictionaryStore({})
    chain = ChainedStore([memory, redis_layer, database])

    # writes go to the system of record first, then to every cache
    customers = [Customer(n, f"c{n}@example.com", f"Customer {n}") for n in range(1, 6)]
    chain.batch_put(customers)
    assert redis_layer.get(Customer, {"email": "c3@example.com"}).name == "Customer 3"  # type: ignore[union-attr]

    # another process (an empty process memory) reads through Redis
    elsewhere = ChainedStore([ProcessMemoryStore(), redis_layer, database])
    found = elsewhere.batch_get(Customer, [{"id": 2}, {"email": "c4@example.com"}, {"id": 99}])
    assert [c.id if c else None for c in found] == [2, 4, None]
    print("read through Redis:", found)

    # an object only the system of record has is back-filled into Redis (add-only: SET NX)
    late = Customer(6, "c6@example.com", "Customer 6")
    database.put(late)
    assert elsewhere.get(Customer, {"id": 6}).name == "Customer 6"  # type: ignore[union-attr]
    assert redis_layer.get(Customer, {"email": "c6@example.com"}) is not None
    print("back-filled into Redis:", late)

    # a reader that read the record before a delete cannot put it back: the delete left tombstones
    stale_copy = database.get(Customer, {"id": 1})
    chain.delete(customers[0])
    assert redis_layer.add(stale_copy) is False
    assert elsewhere.get(Customer, {"email": "c1@example.com"}) is None
    print("the tombstone refused a late back-fill of", stale_copy)

    # a changed alternate key: the old e-mail stops answering in Redis and the record
    # (another process's own memory layer keeps its copy until its 5-second lifetime ends)
    moved = Customer(2, "new-address@example.com", "Customer 2")
    chain.put(moved)
    assert redis_layer.get(Customer, {"email": "c2@example.com"}) is None
    fresh = ChainedStore([ProcessMemoryStore(), redis_layer, database])
    assert fresh.get(Customer, {"email": "c2@example.com"}) is None
    assert fresh.get(Customer, {"email": "new-address@example.com"}).id == 2  # type: ignore[union-attr]

    for layer in elsewhere.stats():  # what each layer did for the reading process
        print(f"{type(layer.store).__name__:20} hits={layer.hits} misses={layer.misses} backfills={layer.backfills}")
    chain.batch_delete([*customers[1:], moved, late])
    chain.release()
    elsewhere.release()
    print("ok")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--cluster"]
    main(arguments[0] if arguments else "redis://127.0.0.1:6379/0", cluster="--cluster" in sys.argv[1:])
