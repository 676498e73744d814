"""Wait for a condition, not for a fixed time: poll it until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = 30.0,
               interval: float = 0.02) -> T:
    """condition()'s first truthy value; an AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)
    return value


async def async_wait_until(condition: Callable[[], Awaitable[T]], what: str,
                           timeout: float = 30.0, interval: float = 0.02) -> T:
    """wait_until for a coroutine function, sleeping without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(interval)
    return value
