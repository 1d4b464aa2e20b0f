"""Drive one (non-thread-safe) engine from a background thread; bridge it to asyncio.

The engine is not thread-safe, so exactly one thread — the step loop — ever touches it.
Everything else (adding requests, aborting, reading or writing KV blocks, stats) is a
command put on a queue that the loop drains between steps; results come back as asyncio
futures resolved with ``loop.call_soon_threadsafe``. The replica's event loop therefore
never blocks on a model forward pass.

Per step, the loop also hands the engine's remote-prefill plans (decode role) and KV event
batches to callbacks that run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from cluster.wire import Abort, AddRequest, EngineCommand

logger = logging.getLogger(__name__)

T = TypeVar("T")

_STOP = object()


class EngineDeadError(RuntimeError):
    """The step loop died (or was shut down); the replica cannot serve."""


class RequestStream:
    """The outputs of one request, as an async iterator that ends after the finished output."""

    def __init__(self, request_id: str, owner: EngineLoop) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._finished = False

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if getattr(item, "finished", False):
                    self._finished = True
                    return
        finally:
            self._owner._streams.pop(self.request_id, None)
            if not self._finished:
                # The consumer went away (client disconnect, cancel): free the engine's blocks.
                self._owner.abort_nowait(self.request_id)


class EngineLoop:
    """Owns an engine on a dedicated thread; every engine call goes through ``call``."""

    def __init__(
        self,
        engine_factory: Callable[[], Any],
        *,
        name: str = "engine-loop",
        idle_tick_s: float = 0.25,
        on_plans: Callable[[list[Any]], None] | None = None,
        on_events: Callable[[Any], None] | None = None,
        stats_period_s: float | None = 0.5,
    ) -> None:
        self._factory = engine_factory
        self._name = name
        self._idle_tick_s = idle_tick_s
        self._on_plans = on_plans
        self._on_events = on_events
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready_event = threading.Event()
        self._dead: BaseException | None = None
        self.engine: Any = None  # read only from the loop thread (or after shutdown)
        self._stats_period_s = stats_period_s
        # A recent ``engine.stats()`` taken by the loop thread: routers read load without
        # queueing behind a step (one attribute store, so readers see a whole object).
        self.last_stats: Any = None

    # ------------------------------------------------------------ lifecycle

    def start_blocking(self, timeout_s: float | None = None) -> None:
        """Build the engine on the loop thread and wait for it (use in replica constructors).

        Blocking is right there: Serve reports the replica as starting until it returns.
        """
        if self._thread is not None:
            raise RuntimeError("EngineLoop already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready_event.wait(timeout_s):
            raise RuntimeError(f"engine did not load within {timeout_s}s")
        if self._dead is not None:
            raise self._dead

    async def start(self) -> None:
        """Async ``start_blocking``: the model loads without blocking this event loop."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.start_blocking)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the loop thread (pending requests see ``EngineDeadError``)."""
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    # ------------------------------------------------------------ API (event-loop side)

    async def submit(self, command: EngineCommand) -> Any:
        """Run one typed command (``cluster.wire``) on the loop thread between steps; its result."""
        return await self.call(command.apply)

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(engine)`` on the loop thread between steps and return its result.

        The generic form of :meth:`submit`, for tests and tools; the request path uses
        typed commands."""
        self._check_alive()
        # The replica's event loop: outputs, plans and events are delivered onto it.
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, fut))
        return await fut

    async def add_request(self, command: AddRequest) -> RequestStream:
        """Queue a request; its stream yields ``RequestOutput``s. ValueError from the engine propagates."""
        stream = RequestStream(command.request_id, self)
        self._streams[command.request_id] = stream
        try:
            await self.submit(command)
        except BaseException:
            self._streams.pop(command.request_id, None)
            raise
        return stream

    def abort_nowait(self, request_id: str) -> None:
        """Abort without waiting (safe from finalizers); unknown ids are ignored."""
        if self.alive:
            self._commands.put((Abort(request_id).apply, None))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop is dead: {self._dead!r}")
        if self._thread is None:
            raise EngineDeadError("engine loop not started")

    # ------------------------------------------------------------ the loop thread

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:  # nothing was ever asked of us: nobody to tell
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # event loop closed during shutdown
            pass

    @staticmethod
    def _resolve(fut: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
        if fut.done():  # the awaiting coroutine was cancelled
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
            self._dead = e
            return
        finally:
            self._ready_event.set()
        try:
            self._loop_body()
        except BaseException as e:  # noqa: BLE001 - a broken invariant: fail every waiter loudly
            logger.exception("engine loop crashed")
            self._dead = e
        finally:
            if self._dead is None:
                self._dead = EngineDeadError("engine loop shut down")
            self._fail_all(self._dead)

    def _loop_body(self) -> None:
        eng = self.engine
        next_stats = 0.0
        while True:
            busy = eng.has_unfinished_requests()
            # Block only when idle; the tick keeps lease expiry running on an idle replica.
            cmd = None
            if not busy:
                try:
                    cmd = self._commands.get(timeout=self._idle_tick_s)
                except queue.Empty:
                    pass
            if cmd is not None and self._exec(cmd):
                return
            while True:  # drain whatever else is queued
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if self._exec(cmd):
                    return
            outputs = eng.step()
            if outputs:
                self._post(self._dispatch, outputs)
            if self._on_plans is not None:
                plans = eng.kv_transfer.take_plans()
                if plans:
                    self._post(self._on_plans, plans)
            # Always drained: the engine buffers events until taken, even if nobody listens.
            batch = eng.take_events()
            if batch is not None and self._on_events is not None:
                self._post(self._on_events, batch)
            if self._stats_period_s is not None and (now := time.monotonic()) >= next_stats:
                self.last_stats = eng.stats()
                next_stats = now + self._stats_period_s

    def _exec(self, cmd: Any) -> bool:
        """Run one command; True means stop."""
        if cmd is _STOP:
            return True
        fn, fut = cmd
        try:
            result = fn(self.engine)
        except Exception as e:  # noqa: BLE001 - the caller's error, delivered to the caller
            if fut is not None:
                self._post(self._resolve, fut, None, e)
            else:
                logger.warning("engine command failed: %r", e)
            return False
        if fut is not None:
            self._post(self._resolve, fut, result, None)
        return False

    def _dispatch(self, outputs: list[Any]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream._put(out)

    def _fail_all(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop died: {exc!r}")

        def fail() -> None:
            for stream in list(self._streams.values()):
                stream._put(err)

        self._post(fail)
        while True:  # commands still queued would otherwise hang their awaiters
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd is not _STOP and cmd[1] is not None:
                self._post(self._resolve, cmd[1], None, err)
