"""What every protocol's streaming translator shares: the stream pipeline, the call's
deadline on the engine's clock, and the servicer context type."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from lstm_serve.core.errors import ServiceError

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
P = TypeVar("P")


def deadline_of(context: Context) -> float | None:
    """The client's deadline on the engine's clock (time.monotonic), if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def pipeline(
    requests: AsyncIterator[Req],
    submit: Callable[[Req], P],
    answer: Callable[[Req, P | ServiceError], Awaitable[Resp]],
    future_of: Callable[[P], asyncio.Future[Any]],
    window: int,
) -> AsyncGenerator[Resp, None]:
    """A stream's answers, in the order its requests were read, with up to `window` of them
    read and not yet answered. One reader task per stream: it submits each request as it
    arrives (`submit` queues it synchronously, so requests queue in the order read; a
    ServiceError it raises goes to `answer` in the request's place). `future_of` is what a
    submitted request resolves: it is cancelled for what is left when the stream ends early.

    The answering side sleeps until its next answer is ready, not until its request is read
    (the reader chains the wake-up to that request's future): one task wake-up per message
    fewer than waking it to wait again (counted in the hot-path-4 profiles, docs/bench/)."""
    loop = asyncio.get_running_loop()
    items: deque[tuple[Req, P | ServiceError] | None] = deque()
    outstanding = 0  # read and not yet answered
    waiting: asyncio.Future[None] | None = None  # the answering side, when items is empty
    room: asyncio.Future[None] | None = None  # the reader, when the window is full

    def wake(_: object = None) -> None:
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def read() -> None:
        nonlocal outstanding, room
        try:
            async for req in requests:
                while outstanding >= window:
                    room = loop.create_future()
                    await room
                outstanding += 1
                p: P | ServiceError
                try:
                    p = submit(req)
                except ServiceError as exc:
                    p = exc
                items.append((req, p))
                if waiting is not None and len(items) == 1:
                    fut = None if isinstance(p, ServiceError) else future_of(p)
                    if fut is None or fut.done():
                        wake()
                    else:
                        fut.add_done_callback(wake)
        finally:
            items.append(None)
            wake()

    reader = asyncio.create_task(read())
    try:
        while True:
            if not items:
                waiting = loop.create_future()
                await waiting  # woken by the reader (see wake) or a spurious, harmless callback
                waiting = None
                continue
            item = items.popleft()
            if item is None:
                break
            try:
                yield await answer(*item)
            finally:
                outstanding -= 1
                if room is not None and not room.done():
                    room.set_result(None)
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
        for left in items:
            if left is not None and not isinstance(left[1], ServiceError):
                future_of(left[1]).cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
