"""Run blocking transport calls (joins, sends, receives) off the event loop.

They get their own thread pool, apart from asyncio's default one, so many transfers in
flight never starve other ``to_thread`` users (the ingress tokenizes there).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_POOL: ThreadPoolExecutor | None = None


def transport_executor() -> ThreadPoolExecutor:
    """The process-wide thread pool for blocking transport calls."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kv-transport")
    return _POOL


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the transport executor."""
    return await asyncio.get_running_loop().run_in_executor(transport_executor(), fn, *args)
