"""tokensaver's own threads for the pipeline's sync work, called from async doors (the async SDK
middleware, the proxy).

Never the event loop's default executor: a transform may wait in ``ctx.call_model`` for a
coroutine that itself needs that executor (name resolution, netrc). Request-phase work (``begin``,
a plugin-tool exchange's next call) and response-phase work (``finish``, plugin tool answers) run in
separate pools, so a call that finishes is never queued behind identical calls waiting for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .context import MODEL_CALL_TIMEOUT, for_requester, requester

__all__ = ["as_requester", "call_on_loop", "request_phase", "response_phase"]

T = TypeVar("T")

REQUEST_THREADS = 32  # begin(): transforms and lookups, which may wait (model calls, single-flight)
RESPONSE_THREADS = 8  # finish() and plugin tool answers: never wait on another call
_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, size: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(size, f"tokensaver-{name}")
        return pool


async def _in_pool(
    pool: concurrent.futures.ThreadPoolExecutor,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    abandoned: Callable[[T], object] | None,
) -> T:
    # the work runs for the calling task: memoize tells its calls apart by task, not by thread
    context = for_requester(asyncio.current_task())
    future = pool.submit(context.run, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if abandoned is not None:  # the caller went away: whatever the work made is cleaned up once done

            def done(f: concurrent.futures.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    abandoned(f.result())

            future.add_done_callback(done)
        raise


async def request_phase(
    fn: Callable[..., T], *args: Any, abandoned: Callable[[T], object] | None = None, **kwargs: Any
) -> T:
    """Run request-phase pipeline work (``begin``, a plugin-tool exchange's next call) in our threads.

    Not the loop's default executor: a transform waiting in ``ctx.call_model`` must not hold a thread
    that the model call's own coroutine needs. ``abandoned(result)`` runs if the caller is cancelled
    before the work is done (e.g. records the call it began).
    """
    return await _in_pool(_pool("request", REQUEST_THREADS), fn, args, kwargs, abandoned)


async def response_phase(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run response-phase pipeline work (``finish``, plugin tool answers) in threads of its own.

    Separate from the request phase: a call that finishes is never queued behind identical calls
    that wait for it (memoize's single-flight), however many there are.
    """
    return await _in_pool(_pool("response", RESPONSE_THREADS), fn, args, kwargs, None)


def as_requester(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(...)`` here, for whoever is calling (this thread or task), also in the hooks' worker threads."""
    return for_requester(requester()).run(fn, *args, **kwargs)


def call_on_loop(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float = MODEL_CALL_TIMEOUT
) -> T:
    """Run ``coro`` on ``loop`` from a worker thread and wait for it, ``timeout`` seconds at most.

    :raises TimeoutError: no result in time (the coroutine is cancelled).
    :raises RuntimeError: called on ``loop``'s own thread, where waiting would stall the loop for good.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a plugin's model call cannot wait on the event loop it runs on")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no answer within {timeout:g}s") from None
