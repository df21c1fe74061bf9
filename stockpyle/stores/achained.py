"""The chain for asyncio: :class:`AsyncChainedStore`.

It is :class:`~stockpyle.stores.chained.ChainPolicy` -- the very plans
:class:`~stockpyle.ChainedStore` runs: back-fill, circuit breakers and replay,
effects, the invalidation bus, statistics -- driven by an executor that
``await`` s each :class:`~stockpyle.stores.chained.Call` a plan yields.  There
is no second copy of the chain's logic.

* In-process layers (:class:`~stockpyle.ProcessMemoryStore`,
  :class:`~stockpyle.ThreadLocalStore`) are called directly, never awaited;
  a hit in the top layer completes without suspending the caller.
* Networked layers are asyncio stores (:class:`~stockpyle.stores.base.AsyncBaseStore`:
  ``AsyncMemcacheStore``, ``AsyncRedisStore``, ``AsyncSqlAlchemyStore`` ...); a
  synchronous store given as a layer is run in a worker thread
  (:func:`asyncio.to_thread`), and so is a synchronous invalidation bus.
* Concurrent misses of one key wait for one read of the lower layers -- per
  event loop (a future per key), like the synchronous chain per process.
* Missed invalidations are retried by a task of the event loop the chain is
  used in, every ``retry_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from time import monotonic as _monotonic
from time import perf_counter
from typing import Any, TypeVar

from ..exceptions import ConfigurationError, StoreError, UnknownKeyError
from ..keys import canonical_value, lookup_key
from ..stampede import DEFAULT_STAMPEDE, LeaseTimeoutError, Stampede
from ..stats import SAMPLE_EVERY
from .base import KeyDict
from .chained import BUS, CREATE, NO_BUS, SLEEP, ChainPolicy, Plan, check_layers, log

__all__ = ["AsyncChainedStore"]

T = TypeVar("T")
_CHAIN_POLICY: Any = object()


async def _done(value: Any) -> Any:
    """What :meth:`AsyncChainedStore._top` returns for a top-layer hit: a coroutine that finishes at once.

    (``get`` itself is a coroutine function whose index hit has no
    ``await`` in it: one coroutine per hit rather than a plain call plus
    this coroutine, about 30% of the async hit's extra cost, measured.)
    """
    return value


def _no_publish(found: Any) -> None:
    """The ``publish`` of a load that leads no flight."""


def _is_async_layer(layer: Any) -> bool:
    """Whether ``layer``'s operations are coroutines (checked on its type)."""
    return inspect.iscoroutinefunction(getattr(type(layer), "get", None))


class AsyncChainedStore(ChainPolicy):
    """Layers of stores used as a write-through cache, fastest first, for asyncio.

    The semantics are :class:`~stockpyle.ChainedStore`'s, operation for
    operation, and so are the arguments; every operation is awaited::

        chain = AsyncChainedStore([ProcessMemoryStore(), AsyncRedisStore(url), AsyncSqlAlchemyStore(engine=e)])
        await chain.put(obj)
        found = await chain.get(Foo, {"key": "k"})

    :raises ConfigurationError: as ChainedStore's.
    """

    supports_expiry = True
    supports_class_invalidation = True
    in_process = False
    is_cache = False

    def __init__(
        self,
        stores: Sequence[Any] | None = None,
        *,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
        max_pending_invalidations: int = 10_000,
        retry_interval: float = 0.5,
        bus: Any = NO_BUS,
        stampede: Stampede | None = DEFAULT_STAMPEDE,
    ) -> None:
        if stampede is not None and not isinstance(stampede, Stampede):
            raise ConfigurationError(f"stampede= takes a stockpyle.Stampede or None; got {stampede!r}")
        layers = check_layers(stores if stores is not None else [], "AsyncChainedStore")
        self.stampede = stampede
        self.polymorphic = False
        self._setup_policy(layers, failure_threshold, cooldown, max_pending_invalidations, retry_interval, bus=bus)
        self._check_stampede(stampede, configure=True)
        # networked layers that are synchronous stores: run in worker threads
        self._threaded = [not self._in_process[i] and not _is_async_layer(layer) for i, layer in enumerate(layers)]
        self._bus_is_async = self.bus is not None and inspect.iscoroutinefunction(type(self.bus).publish)
        self._setup_hit_path(layers)
        # per event loop: the futures of reads in flight, and the repair task
        self._flights: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Future[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._repairing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<AsyncChainedStore {list(self.stores)!r}>"

    def describe(self) -> str:
        return " -> ".join(type(layer).__name__ for layer in self.stores)

    # -- the executor -------------------------------------------------------

    async def _run(self, plan: Plan[T]) -> T:
        """Run a plan: each :class:`Call` it yields is awaited (or run in a thread), its outcome sent back."""
        stores = self.stores
        threaded = self._threaded
        try:
            call = plan.send(None)
            while True:
                try:
                    if call.index == BUS:
                        method = getattr(self.bus, call.method)
                        if self._bus_is_async:
                            result = await method(*call.args)
                        else:
                            result = await asyncio.to_thread(method, *call.args)
                    elif call.index == SLEEP:
                        await asyncio.sleep(call.args[0])
                        result = None
                    elif call.index == CREATE:
                        result = call.args[0]()
                        if inspect.isawaitable(result):
                            result = await result
                    elif threaded[call.index]:
                        result = await asyncio.to_thread(getattr(stores[call.index], call.method), *call.args)
                    else:
                        result = await getattr(stores[call.index], call.method)(*call.args)
                except BaseException as exc:  # noqa: BLE001 - the plan decides what a failure means
                    call = plan.throw(exc)
                else:
                    call = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    # -- reads --------------------------------------------------------------

    async def get(self, klass: type[T], keydict: KeyDict, stampede: Any = _CHAIN_POLICY) -> T | None:
        """``await chain.get(klass, keydict)``: the object, from the fastest layer that has it.

        A hit in the top (in-process) layer is answered without any ``await``
        inside, so awaiting it does not suspend the caller.
        """
        self._countdown -= 1
        if self._countdown <= 0:  # one call in SAMPLE_EVERY is timed, layer by layer
            self._countdown = SAMPLE_EVERY
            self._cycles += 1
            return await self._timed_get(klass, keydict, stampede)
        index = self._fast_index
        if index is not None and type(keydict) is dict and len(keydict) == 1:
            (name,) = keydict
            value = keydict[name]
            if type(value) is str or type(value) is int:
                rec = index.get((klass, name, value))
                if rec is not None:
                    bus = self.bus
                    if bus is None:
                        if rec.expires is None or rec.expires > _monotonic():
                            return rec.obj  # type: ignore[return-value]  # counted by the countdown (see ChainPolicy)
                    else:
                        now = _monotonic()  # the bus's deadline, on every hit (see ChainedStore.get)
                        if now < bus.trusted_until and (rec.expires is None or rec.expires > now):
                            return rec.obj  # type: ignore[return-value]
                        if now >= bus.trusted_until:
                            self._others += 1
                            return await self._miss(0, klass, keydict, stampede)
                if not self._single:
                    self._others += 1
                    canonical_value(value)
                    self._first_stats.misses += 1
                    return await self._miss(1, klass, keydict, stampede)
        self._others += 1
        return await self._top(klass, keydict, stampede)  # type: ignore[no-any-return]

    def _top(self, klass: type[T], keydict: KeyDict, stampede: Any, timed: bool = False) -> Any:
        """:meth:`get` without the index probe: the top layer is asked directly, outside the flight.

        ``timed`` samples every layer's latency (see ``ChainedStore._get``).
        """
        if not self._first_in_process or not self._trust() or self._first_breaker.open_until:
            return self._miss(0, klass, keydict, stampede, timed)
        began = perf_counter() if timed else 0.0
        try:
            obj = self.stores[0].get(klass, keydict)
        except UnknownKeyError:
            if self._single:
                raise
            return self._miss(1, klass, keydict, stampede, timed)
        except StoreError as exc:
            self._failed(0, "get", exc)
            return self._miss(1, klass, keydict, stampede, timed)
        if timed:
            self._first_stats.latency.add(perf_counter() - began)
        if obj is not None:
            self._l1_hits += 1
            return _done(obj)
        self._first_stats.misses += 1
        if self._single:
            return _done(None)
        return self._miss(1, klass, keydict, stampede, timed)

    async def _timed_get(self, klass: type[T], keydict: KeyDict, stampede: Any) -> T | None:
        # the sampled call: a top-layer hit stays outside the flight and the plans, as in ChainedStore._get
        began = perf_counter()
        try:
            return await self._top(klass, keydict, stampede, timed=True)  # type: ignore[no-any-return]
        finally:
            self._totals.timer("get").add(perf_counter() - began)

    def _loop_flights(self) -> dict[Hashable, asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        flights = self._flights.get(loop)
        if flights is None:
            flights = self._flights[loop] = {}
        return flights

    async def _single_flight(
        self,
        key: Hashable,
        load: Callable[..., Any],
        wait: float,
        on_timeout: Callable[[], Any],
        *,
        publishing: bool = False,
    ) -> Any:
        """``await load()`` once for all concurrent callers of ``key`` in this event loop.

        With ``publishing``, the leader's ``load`` is given a function that
        answers the waiting followers at once with a value (the leader goes on
        loading; later callers start a new flight), as
        :meth:`stockpyle.stampede.SingleFlight.publish`.
        """
        flights = self._loop_flights()
        flight = flights.get(key)
        if flight is None:
            flight = flights[key] = asyncio.get_running_loop().create_future()
            leader = flight

            def publish(found: Any) -> None:
                if not leader.done():
                    leader.set_result(found)
                if flights.get(key) is leader:
                    del flights[key]

            try:
                result = await (load(publish) if publishing else load())
            except BaseException as exc:
                if not flight.done():
                    flight.set_exception(exc)
                    flight.exception()  # retrieved: followers load for themselves
                raise
            else:
                if not flight.done():
                    flight.set_result(result)
                return result
            finally:
                if flights.get(key) is flight:
                    del flights[key]
        try:
            result = await asyncio.wait_for(asyncio.shield(flight), wait)
        except asyncio.TimeoutError:
            return await on_timeout()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and not flight.cancelled():
                raise
            # the leader failed (or was cancelled): try for ourselves
            return await (load(_no_publish) if publishing else load())
        return result

    async def _miss(self, start: int, klass: type[T], keydict: KeyDict, stampede: Any, timed: bool = False) -> T | None:
        policy: Stampede | None = self.stampede if stampede is _CHAIN_POLICY else stampede
        if policy is None:
            return await self._run(self._plan_get(start, klass, keydict, timed))
        if policy is not self.stampede:
            self._check_policy(policy)
        try:
            key: Any = lookup_key(klass, keydict)
        except UnknownKeyError:
            key = (klass, tuple(sorted(keydict.items())))
        try:
            hash(key)
        except TypeError:
            return await self._run(self._plan_get(start, klass, keydict, timed, policy=policy))

        def load(publish: Callable[[Any], None]) -> Any:
            return self._run(self._plan_get(start, klass, keydict, timed, policy=policy, publish=publish))

        async def waited_too_long() -> T | None:
            if policy.on_timeout == "miss":
                return None
            if policy.on_timeout == "raise":
                raise LeaseTimeoutError(
                    f"waited {policy.wait}s for another reader's load of {klass.__qualname__} {dict(keydict)!r}"
                )
            return await self._run(self._plan_get(start, klass, keydict, False, fill=False))

        return await self._single_flight(  # type: ignore[no-any-return]
            key, load, self._follower_wait(policy), waited_too_long, publishing=True
        )

    async def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        return await self._timed("batch_get", self._plan_batch_get(klass, list(keydicts)))

    async def get_or_create(
        self, klass: type[T], keydict: KeyDict, creator: Callable[[], Any], *, stampede: Any = _CHAIN_POLICY
    ) -> T | None:
        """:meth:`ChainedStore.get_or_create`; ``creator`` may be a coroutine function."""
        policy: Stampede | None = self.stampede if stampede is _CHAIN_POLICY else stampede
        if not self._last_is_cache:
            return await self._create_through(klass, keydict, creator, stampede, policy)

        def load() -> Any:
            # every layer is a cache: the creator is the system of record of this read
            return self._run(self._plan_get(0, klass, keydict, False, policy=policy, creator=creator))

        if policy is None:
            return await load()  # type: ignore[no-any-return]
        return await self._single_flight(  # type: ignore[no-any-return]
            ("create", lookup_key(klass, keydict)), load, self._follower_wait(policy), load
        )

    async def _create_through(
        self, klass: type[T], keydict: KeyDict, creator: Callable[[], Any], stampede: Any, policy: Stampede | None
    ) -> T | None:
        found = await self.get(klass, keydict, stampede=stampede)
        if found is not None:
            return found

        async def create() -> T | None:
            again = await self.get(klass, keydict, stampede=None)  # another caller may have created it meanwhile
            if again is not None:
                return again
            made = creator()
            if inspect.isawaitable(made):
                made = await made
            if made is None:
                return None
            self._check_created(klass, keydict, made)
            await self.put(made)
            return made  # type: ignore[no-any-return]

        if policy is None:
            return await create()
        return await self._single_flight(  # type: ignore[no-any-return]
            ("create", lookup_key(klass, keydict)), create, self._follower_wait(policy), create
        )

    # -- writes -------------------------------------------------------------

    async def _timed(self, operation: str, plan: Plan[T]) -> T:
        began = perf_counter()
        try:
            return await self._run(plan)
        finally:
            self._totals.timer(operation).add(perf_counter() - began)

    async def put(self, obj: object) -> None:
        await self._timed("put", self._plan_write("put", obj, [obj]))
        self._totals.puts += 1

    async def batch_put(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            await self._timed("batch_put", self._plan_write("batch_put", items, items))
            self._totals.puts += len(items)

    async def delete(self, obj: object) -> None:
        await self._timed("delete", self._plan_write("delete", obj, [obj]))
        self._totals.deletes += 1

    async def batch_delete(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            await self._timed("batch_delete", self._plan_write("batch_delete", items, items))
            self._totals.deletes += len(items)

    async def invalidate_class(self, klass: type) -> None:
        """:meth:`ChainedStore.invalidate_class`."""
        await self._run(self._plan_invalidate_class(klass))

    # -- repair ---------------------------------------------------------------

    def _schedule_repair(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop (a bus thread): the next operation in the loop schedules it
        task = self._repairing.get(loop)
        if task is None or task.done():
            self._repairing[loop] = loop.create_task(self._repair_loop(), name="stockpyle-repair")

    async def _repair_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                still = await self._run(self._plan_repair())
            except Exception:  # noqa: BLE001 - a bug must not end the retries silently
                log.exception("stockpyle: repairing %r failed", self)
                still = True
            if not still:
                return

    async def repair(self) -> bool:
        """:meth:`ChainedStore.repair`."""
        return await self._run(self._plan_repair())

    # -- the rest -------------------------------------------------------------

    def configure(self, classes: Iterable[type], lifetime: Any) -> None:
        """Configure the lifetime in every layer that supports it."""
        classes = list(classes) if not isinstance(classes, type) else [classes]
        for layer in self.stores:
            if getattr(type(layer), "supports_expiry", True) and callable(getattr(type(layer), "configure", None)):
                layer.configure(classes=classes, lifetime=lifetime)

    async def release(self) -> None:
        """Release every layer (all are attempted; the first error is re-raised), as ChainedStore.release."""
        if self.bus is not None:
            self._trusted = False
            self._fast_index = None
            self.bus.unsubscribe(self)
        for task in list(self._repairing.values()):
            task.cancel()
        if self._pending_count():  # a last attempt, as ChainedStore.release
            try:
                await self.repair()
            except Exception as exc:  # noqa: BLE001 - the release goes on; what is left is reported
                log.debug("stockpyle: the last repair of %r failed: %s", self, exc)
            self._report_unrepaired()
        first_error: BaseException | None = None
        for layer in self.stores:
            try:
                released = layer.release()
                if inspect.isawaitable(released):
                    await released
            except Exception as exc:  # noqa: BLE001 - release the others first
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    async def __aenter__(self) -> AsyncChainedStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
