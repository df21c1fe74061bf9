"""Faults of each bus against real servers: frozen servers, killed connections, lost messages.

Each test checks the two halves of the guarantee: while the bus cannot prove
it heard everything, ``trusted_until`` stops advancing (the chain then
bypasses its in-process layers); once lost messages are possible or proven,
the listeners are flushed (``gaps`` counts the proven or possible losses).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest
from support.buses import RecordingListener, digests_for, wait_trusted, wait_until

from stockpyle.bus import class_digest


def untrusted_during(bus: Any, seconds: float) -> bool:
    """Whether the bus stays untrusted for ``seconds`` once its trust ran out (checked every 10 ms)."""
    if not wait_until(lambda: bus.trusted_until <= time.monotonic(), bus.max_staleness + 2.0):
        return False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if bus.trusted_until > time.monotonic():
            return False
        time.sleep(0.01)
    return True


# -- Redis --------------------------------------------------------------------


@pytest.fixture
def private_redis(redis_server_factory: Any) -> Any:
    return redis_server_factory.start()


def redis_pair(url: str, **options: Any) -> tuple[Any, Any, RecordingListener]:
    from stockpyle.bus import RedisStreamBus

    stream = f"t{uuid.uuid4().hex[:12]}:bus"
    writer = RedisStreamBus(url, stream=stream, **options)
    reader = RedisStreamBus(url, stream=stream, **options)
    listener = RecordingListener()
    reader.subscribe(listener)
    assert wait_trusted(reader)
    return writer, reader, listener


@pytest.mark.redis
@pytest.mark.slow
def test_redis_frozen_server_stops_trust_and_resumes(private_redis: Any) -> None:
    writer, reader, listener = redis_pair(private_redis.url)
    try:
        private_redis.pause()
        try:
            frozen_at = time.monotonic()
            assert untrusted_during(reader, 1.0)
            # trust ended no later than max_staleness after the freeze (plus one probe interval)
            assert reader.trusted_until <= frozen_at + reader.max_staleness + reader.probe_interval + 0.05
        finally:
            private_redis.resume()
        assert wait_trusted(reader, 5.0)
        digests = digests_for("after-freeze", 3)
        writer.publish(digests)
        assert listener.wait_digests(digests)
    finally:
        writer.release()
        reader.release()


def kill_listener_connections(client: Any, name: str) -> int:
    killed = 0
    for entry in client.client_list():
        if entry.get("name") == name:
            client.client_kill_filter(_id=entry["id"])
            killed += 1
    return killed


@pytest.mark.redis
@pytest.mark.slow
def test_redis_client_kill_of_the_listener_reconnects_and_flushes(private_redis: Any) -> None:
    writer, reader, listener = redis_pair(private_redis.url)
    admin = writer.client
    try:
        before = reader.stats()
        assert kill_listener_connections(admin, reader.client_name) == 2
        # messages published while the listener is away are not trusted to arrive: a gap, a flush
        assert wait_until(lambda: reader.stats().gaps > before.gaps, 5.0)
        stats = reader.stats()
        assert stats.flushes >= before.flushes + 1
        assert wait_trusted(reader)
        digests = digests_for("after-kill", 3)
        writer.publish(digests)
        assert listener.wait_digests(digests)
        assert len(listener.flushes) == stats.flushes
    finally:
        writer.release()
        reader.release()


@pytest.mark.redis
def test_redis_stream_trimmed_past_a_reader_is_a_gap(redis_client: Any, redis_url: str) -> None:
    writer, reader, listener = redis_pair(redis_url)
    try:
        first = digests_for("first", 1)
        listener.block()  # the reader's thread stops inside the delivery of the first message
        writer.publish(first)
        assert listener.entered.wait(5)
        for n in range(20):
            writer.publish(digests_for(f"lost{n}", 1))
        redis_client.xtrim(writer.stream, maxlen=1, approximate=False)  # only the last entry survives
        flushes = len(listener.flushes)
        listener.unblock()
        last = digests_for("lost19", 1)
        assert listener.wait_digests(first)
        assert wait_until(lambda: reader.stats().gaps == 1)
        assert len(listener.flushes) == flushes + 1
        # the surviving entry is what the reader resumed from; it was covered by the flush
        assert last[0] not in listener.digests
        after = digests_for("after-trim", 1)
        writer.publish(after)
        assert listener.wait_digests(after)
        assert reader.stats().gaps == 1
        _position, _epoch, seq = reader.position()
        assert seq == 22
    finally:
        writer.release()
        reader.release()
        redis_client.delete(writer.stream)


@pytest.mark.redis
def test_redis_stream_recreated_is_a_new_epoch(redis_client: Any, redis_url: str) -> None:
    writer, reader, listener = redis_pair(redis_url)
    try:
        digests = digests_for("epoch1", 1)
        writer.publish(digests)
        assert listener.wait_digests(digests)
        _pos, epoch, _seq = reader.position()
        redis_client.delete(writer.stream)
        again = digests_for("epoch2", 1)
        writer.publish(again)
        assert wait_until(lambda: reader.stats().gaps == 1)
        _pos, new_epoch, seq = reader.position()
        assert new_epoch != epoch and seq == 1
        later = digests_for("epoch2-later", 1)
        writer.publish(later)
        assert listener.wait_digests(later)
        assert reader.stats().gaps == 1
    finally:
        writer.release()
        reader.release()
        redis_client.delete(writer.stream)


@pytest.mark.redis
def test_redis_stream_started_again_at_our_entry_id_is_a_gap(redis_client: Any, redis_url: str) -> None:
    """Deleted and started again within the same millisecond, the new stream's first entry has our entry's id.

    A blocked XREAD after that id never returns it: only the probe can tell.
    """
    writer, reader, listener = redis_pair(redis_url)
    try:
        digests = digests_for("before", 1)
        writer.publish(digests)
        assert listener.wait_digests(digests)
        position, epoch, _seq = reader.position()
        flushes = len(listener.flushes)
        redis_client.delete(writer.stream)
        lost = digests_for("lost", 1)
        fields = {"e": "0" * 16, "s": 1, "p": "another-writer", "o": "", "t": repr(time.time()), "d": lost[0]}
        redis_client.xadd(writer.stream, fields, id=position)  # what XADD * gives in that millisecond
        assert wait_until(lambda: reader.stats().gaps == 1, timeout=2.0)
        assert listener.wait_flushes(flushes + 1)
        assert reader.position() == (position, "0" * 16, 1) and epoch != "0" * 16
        later = digests_for("later", 1)
        writer.publish(later)  # the stream goes on from the new entry: delivered, no further gap
        assert listener.wait_digests(later)
        assert reader.stats().gaps == 1
    finally:
        writer.release()
        reader.release()
        redis_client.delete(writer.stream)


@pytest.mark.redis
def test_redis_entries_that_are_no_invalidations_flush(redis_client: Any, redis_url: str) -> None:
    writer, reader, listener = redis_pair(redis_url)
    try:
        flushes = len(listener.flushes)
        redis_client.xadd(writer.stream, {"hello": "world"})
        assert listener.wait_flushes(flushes + 1)
        digests = digests_for("after-foreign", 1)
        writer.publish(digests)
        assert listener.wait_digests(digests)
    finally:
        writer.release()
        reader.release()
        redis_client.delete(writer.stream)


@pytest.mark.redis
def test_redis_maxlen_bounds_the_stream(redis_client: Any, redis_url: str) -> None:
    writer, reader, _listener = redis_pair(redis_url, maxlen=100)
    try:
        for n in range(400):
            writer.publish(digests_for(f"n{n}", 1))
        assert 100 <= redis_client.xlen(writer.stream) < 400
    finally:
        writer.release()
        reader.release()
        redis_client.delete(writer.stream)


# -- PostgreSQL ----------------------------------------------------------------


def pg_pair(url: str, **options: Any) -> tuple[Any, Any, RecordingListener]:
    from stockpyle.bus import PostgresNotifyBus

    channel = f"stockpyle_t{uuid.uuid4().hex[:12]}"
    writer = PostgresNotifyBus(url, channel=channel, **options)
    reader = PostgresNotifyBus(url, channel=channel, **options)
    listener = RecordingListener()
    reader.subscribe(listener)
    assert wait_trusted(reader)
    return writer, reader, listener


def listener_backend_pid(admin: Any, bus: Any) -> int:
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (bus.application_name,)
    ).fetchone()
    assert row is not None, "the listener's connection is not in pg_stat_activity"
    return int(row[0])


@pytest.fixture
def pg_admin(postgres_url: str) -> Any:
    import psycopg

    conn = psycopg.connect(postgres_url.replace("+psycopg", ""), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_terminated_listener_reconnects_with_a_gap(postgres_url: str, pg_admin: Any) -> None:
    writer, reader, listener = pg_pair(postgres_url)
    try:
        before = reader.stats()
        pid = listener_backend_pid(pg_admin, reader)
        pg_admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_until(lambda: reader.stats().gaps == before.gaps + 1, 5.0)
        assert reader.stats().flushes == before.flushes + 1
        assert wait_trusted(reader)
        assert listener_backend_pid(pg_admin, reader) != pid
        digests = digests_for("after-terminate", 2)
        writer.publish(digests)
        assert listener.wait_digests(digests)
    finally:
        writer.release()
        reader.release()


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_frozen_backend_stops_trust(postgres_url: str, pg_admin: Any) -> None:
    """SIGSTOP of the server process that serves the listener: its heartbeats stop coming back."""
    writer, reader, listener = pg_pair(postgres_url, timeout=5.0)
    pid = listener_backend_pid(pg_admin, reader)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            assert untrusted_during(reader, 1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_trusted(reader, 5.0)
        digests = digests_for("after-freeze", 1)
        writer.publish(digests)
        assert listener.wait_digests(digests)
    finally:
        writer.release()
        reader.release()


@pytest.mark.postgres
def test_postgres_publish_in_is_delivered_exactly_when_the_transaction_commits(
    postgres_url: str, pg_admin: Any
) -> None:
    import psycopg

    writer, reader, listener = pg_pair(postgres_url)
    try:
        committed, rolled_back = digests_for("commit", 2), digests_for("rollback", 2)
        with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
            writer.publish_in(conn, committed)
            time.sleep(0.3)
            assert not set(committed) & set(listener.digests)  # not before the commit
            conn.commit()
            assert listener.wait_digests(committed)
            writer.publish_in(conn, rolled_back)
            conn.rollback()
        time.sleep(0.3)
        assert not set(rolled_back) & set(listener.digests)
        assert writer.stats().published == 2
    finally:
        writer.release()
        reader.release()


@pytest.mark.postgres
def test_postgres_publish_in_an_sqlalchemy_session(postgres_url: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    engine = sa.create_engine(postgres_url)
    writer, reader, listener = pg_pair(postgres_url)
    try:
        from stockpyle.bus import PostgresNotifyBus

        engine_bus = PostgresNotifyBus(engine=engine, channel=writer.channel)
        digests = digests_for("session", 300)  # more than one notification
        with Session(engine) as session:
            session.execute(sa.text("SELECT 1"))
            engine_bus.publish_in(session, digests)
            time.sleep(0.2)
            assert not listener.digests
            session.commit()
        assert listener.wait_digests(digests)
        more = digests_for("engine-publish", 1)
        engine_bus.publish(more)
        assert listener.wait_digests(more)
        engine_bus.release()
        with pytest.raises(TypeError):
            engine_bus.publish_in(object(), digests)
    finally:
        writer.release()
        reader.release()
        engine.dispose()


class TriggerItem:
    __stockpyle_keys__ = ("id",)


@pytest.mark.postgres
def test_postgres_trigger_feeds_writes_made_outside_stockpyle(postgres_url: str, pg_admin: Any) -> None:
    import psycopg

    writer, reader, listener = pg_pair(postgres_url)
    table = f"sp_bus_trigger_{uuid.uuid4().hex[:10]}"
    function = f"stockpyle_bus_notify_{uuid.uuid4().hex[:8]}"
    try:
        pg_admin.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, name text)")
        pg_admin.execute(writer.trigger_sql(table, [TriggerItem], function=function))
        wanted = class_digest(TriggerItem)
        # an UPDATE by another program: delivered at its commit
        with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            time.sleep(0.2)
            assert wanted not in listener.digests
        assert listener.wait_digests([wanted])
        assert listener.origins[-1] == f"sql:{table}"
        count = listener.digests.count(wanted)
        # rolled back: nothing
        with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
            conn.execute(f"UPDATE {table} SET name = 'b'")
            conn.rollback()
        # a writer that publishes its own key digests silences the trigger
        with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
            writer.quiet_triggers(conn)
            conn.execute(f"DELETE FROM {table}")
            writer.publish_in(conn, digests_for("own", 1))
        assert listener.wait_digests(digests_for("own", 1))
        time.sleep(0.2)
        assert listener.digests.count(wanted) == count
        # TRUNCATE too
        pg_admin.execute(f"TRUNCATE {table}")
        assert wait_until(lambda: listener.digests.count(wanted) == count + 1)
    finally:
        pg_admin.execute(f"DROP TABLE IF EXISTS {table}")
        pg_admin.execute(f"DROP FUNCTION IF EXISTS {function}()")
        writer.release()
        reader.release()


@pytest.mark.postgres
def test_postgres_foreign_notification_flushes(postgres_url: str, pg_admin: Any) -> None:
    writer, reader, listener = pg_pair(postgres_url)
    try:
        flushes = len(listener.flushes)
        pg_admin.execute(f"NOTIFY {writer.channel}")
        assert listener.wait_flushes(flushes + 1)
        assert reader.stats().gaps == 0
    finally:
        writer.release()
        reader.release()


def test_postgres_trigger_sql_names_every_mapped_subclass() -> None:
    pytest.importorskip("psycopg")
    from support.databases import SqlAutomobile, SqlCar, SqlTruck

    from stockpyle.bus import PostgresNotifyBus

    sql = PostgresNotifyBus("postgresql://nowhere/db", channel="chan").trigger_sql("shop.cars", [SqlAutomobile])
    for klass in (SqlAutomobile, SqlCar, SqlTruck):
        assert class_digest(klass) in sql
    assert '"shop"."cars"' in sql and "'chan'" in sql


# -- memcached ------------------------------------------------------------------


@pytest.fixture
def private_memcached(memcached_factory: Any) -> Any:
    return memcached_factory.one()


def mc_pair(address: str, **options: Any) -> tuple[Any, Any, RecordingListener]:
    from stockpyle.bus import MemcacheEpochBus

    namespace = f"t{uuid.uuid4().hex[:12]}"
    writer = MemcacheEpochBus(address, namespace=namespace, **options)
    reader = MemcacheEpochBus(address, namespace=namespace, **options)
    listener = RecordingListener()
    reader.subscribe(listener)
    assert wait_trusted(reader)
    return writer, reader, listener


@pytest.mark.memcache
@pytest.mark.slow
def test_memcache_frozen_server_stops_trust_and_resumes(private_memcached: Any) -> None:
    writer, reader, listener = mc_pair(private_memcached.address)
    try:
        private_memcached.pause()
        try:
            frozen_at = time.monotonic()
            assert untrusted_during(reader, 1.0)
            assert reader.trusted_until <= frozen_at + reader.max_staleness + 0.05
        finally:
            private_memcached.resume()
        assert wait_trusted(reader, 5.0)
        digests = digests_for("after-freeze", 2)
        writer.publish(digests)
        assert listener.wait_digests(digests)
        assert reader.stats().gaps == 0  # the ring kept everything: nothing was lost
    finally:
        writer.release()
        reader.release()


@pytest.mark.memcache
def test_memcache_overwritten_ring_slots_are_a_gap(memcached_server: Any) -> None:
    writer, reader, listener = mc_pair(memcached_server.address, ring=4)
    try:
        first = digests_for("first", 1)
        listener.block()
        writer.publish(first)
        assert listener.entered.wait(5)
        for n in range(10):  # the reader stands still: its slots are overwritten
            writer.publish(digests_for(f"lost{n}", 1))
        flushes = len(listener.flushes)
        listener.unblock()
        assert wait_until(lambda: reader.stats().gaps == 1)
        assert len(listener.flushes) == flushes + 1
        assert not set(digests_for("lost0", 1)) & set(listener.digests)
        after = digests_for("after", 1)
        writer.publish(after)
        assert listener.wait_digests(after)
        assert reader.stats().gaps == 1
    finally:
        writer.release()
        reader.release()


@pytest.mark.memcache
def test_memcache_evicted_slot_is_a_gap_after_max_staleness(memcached_server: Any) -> None:
    writer, reader, listener = mc_pair(memcached_server.address)
    try:
        first = digests_for("first", 1)
        listener.block()
        writer.publish(first)
        assert listener.entered.wait(5)
        writer.publish(digests_for("evicted", 1))
        seq = writer.driver.incr(writer.counter_key, 0)
        writer.driver.delete_many([writer.slot_key(seq)])  # as an eviction would
        writer.publish(digests_for("kept", 1))
        listener.unblock()
        assert wait_until(lambda: reader.stats().gaps == 1, 3.0)
        assert not set(digests_for("evicted", 1)) & set(listener.digests)
        after = digests_for("after", 1)
        writer.publish(after)
        assert listener.wait_digests(after)
    finally:
        writer.release()
        reader.release()


@pytest.mark.memcache
def test_memcache_restarted_server_is_a_new_epoch(private_memcached: Any) -> None:
    writer, reader, listener = mc_pair(private_memcached.address)
    try:
        writer.publish(digests_for("before", 1))
        assert listener.wait_digests(digests_for("before", 1))
        private_memcached.restart()  # the counter and the ring are gone
        assert wait_until(lambda: reader.stats().gaps >= 1, 5.0)
        assert wait_trusted(reader)
        after = digests_for("after-restart", 1)
        published_at = time.time()
        assert wait_until(lambda: _publishes(writer, after), 5.0)
        # delivered, or -- when a first attempt took a sequence number and failed to fill its
        # slot -- covered by the flush of the gap that missing slot is
        assert wait_until(lambda: after[0] in listener.digests or listener.flushes[-1] > published_at, 3.0)
    finally:
        writer.release()
        reader.release()


def _publishes(bus: Any, digests: list[str]) -> bool:
    try:
        bus.publish(digests)
    except Exception:  # noqa: BLE001 - the pool may still hold a connection to the old process
        return False
    return True


@pytest.mark.memcache
def test_memcache_max_staleness_is_interval_plus_timeout(memcached_server: Any) -> None:
    from stockpyle.bus import MemcacheEpochBus
    from stockpyle.stores import MemcacheStore

    assert MemcacheEpochBus(memcached_server.address).max_staleness == pytest.approx(0.2)
    assert MemcacheEpochBus(memcached_server.address, interval=0.05, timeout=0.2).max_staleness == pytest.approx(0.25)
    store = MemcacheStore(servers=[memcached_server.address])
    bus = MemcacheEpochBus(store=store, interval=0.1)
    try:
        assert bus.driver.servers == store.servers and bus.driver is not store.driver
        listener = RecordingListener()
        bus.subscribe(listener)
        assert wait_trusted(bus)
    finally:
        bus.release()
        store.release()
