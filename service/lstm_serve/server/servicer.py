"""The LstmServe servicer: a translator. It decodes into a frame, makes one engine call, encodes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import InvalidArgument, ServiceError
from lstm_serve.core.repository import Kind, Manifest
from lstm_serve.core.rollout import Sampling
from lstm_serve.core.scheduler import StepResult
from lstm_serve.server import convert
from lstm_serve.server.interceptors import PRINCIPAL
from lstm_serve.server.limits import answer_limit, check_answer
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
P = TypeVar("P")


class LstmServeServicer(pb_grpc.LstmServeServicer):  # type: ignore[misc]
    def __init__(
        self, engine: Engine, max_inflight_per_stream: int, max_message_bytes: int
    ) -> None:
        self.engine = engine
        self.window = max_inflight_per_stream
        self.max_message_bytes = max_message_bytes

    def _limit(self, context: Context) -> int:
        return answer_limit(context.invocation_metadata(), self.max_message_bytes)

    def _submit(
        self, req: pb.StepRequest, principal: str, deadline: float | None, limit: int
    ) -> asyncio.Future[StepResult]:
        def decode(m: Manifest) -> F.Frame:
            check_top_k(m, req.top_k)
            frame = convert.frame_of(req, m)
            check_answer(
                convert.answer_bytes(frame, m, req.top_k), limit,
                "send fewer sessions or steps per request, or ask for top_k",
            )  # fmt: skip
            return frame

        return self.engine.submit_step(
            req.model.name, req.model.version, decode, principal, deadline
        )

    def _encode(self, req: pb.StepRequest, result: StepResult) -> pb.StepResponse:
        mv = self.engine.get_model(req.model.name, req.model.version)
        return convert.step_response(mv, result, req.request_id, req.top_k, req.HasField("frame"))

    async def Predict(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        fut = self._submit(request, PRINCIPAL.get(), deadline_of(context), self._limit(context))
        return self._encode(request, await fut)

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        principal = PRINCIPAL.get()
        limit = self._limit(context)
        deadline = deadline_of(context)

        def submit(req: pb.StepRequest) -> asyncio.Future[StepResult]:
            return self._submit(req, principal, deadline, limit)

        async def answer(
            req: pb.StepRequest, fut: asyncio.Future[StepResult] | ServiceError
        ) -> pb.StepResponse:
            if isinstance(fut, ServiceError):
                raise fut  # ends the stream with its status
            return self._encode(req, await fut)

        answers = pipeline(request_iterator, submit, answer, _itself, self.window)
        async with contextlib.aclosing(answers):  # a client gone: its reader stops now
            async for resp in answers:
                yield resp

    async def Forecast(self, request: pb.ForecastRequest, context: Context) -> pb.ForecastResponse:
        decode: Callable[[Manifest], F.Frame] | None = None
        if request.HasField("prefix") and (request.prefix.x or len(request.prefix.tokens)):
            prefix = pb.StepRequest(sessions=[request.prefix])

            def decode(m: Manifest) -> F.Frame:
                return convert.frame_of(prefix, m)

        sampling = Sampling(request.temperature, request.top_k, request.seed)
        limit = self._limit(context)

        def fits(m: Manifest) -> None:
            check_answer(
                convert.forecast_bytes(m, request.session_id, request.horizon), limit,
                "ask for a shorter horizon",
            )  # fmt: skip

        mv, result = await self.engine.forecast(
            request.model.name, request.model.version, request.session_id, request.horizon,
            decode, sampling, request.commit, PRINCIPAL.get(), deadline_of(context), fits,
        )  # fmt: skip
        return convert.forecast_response(mv, result)

    async def GetSession(self, request: pb.SessionRef, context: Context) -> pb.SessionInfo:
        mv, status = await self.engine.get_session(
            request.model.name, request.model.version, request.session_id, PRINCIPAL.get()
        )
        return convert.session_info(mv, status)

    async def ResetSession(self, request: pb.SessionRef, context: Context) -> pb.SessionInfo:
        mv, status = await self.engine.reset_session(
            request.model.name, request.model.version, request.session_id, PRINCIPAL.get()
        )
        return convert.session_info(mv, status)

    async def EndSession(self, request: pb.SessionRef, context: Context) -> pb.SessionInfo:
        mv, status = await self.engine.end_session(
            request.model.name, request.model.version, request.session_id, PRINCIPAL.get()
        )
        return convert.session_info(mv, status)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_info(mv) for mv in self.engine.list_models()]
        )

    async def GetModel(self, request: pb.ModelRef, context: Context) -> pb.ModelInfo:
        return convert.model_info(self.engine.get_model(request.name, request.version))


def check_top_k(m: Manifest, k: int) -> None:
    """top_k picks tokens: it means nothing for a real-valued model, and more than the
    vocabulary cannot be given."""
    if not k:
        return
    if m.kind is not Kind.token:
        raise InvalidArgument(
            f"model {m.name!r} is real-valued: top_k applies to token models only"
        )
    if k > m.output_dim:
        raise InvalidArgument(
            f"top_k {k} is more than model {m.name!r}'s vocabulary of {m.output_dim} tokens"
        )


def _itself(fut: asyncio.Future[StepResult]) -> asyncio.Future[StepResult]:
    return fut


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
    fewer than waking it to wait again, which the profiles in docs/benchmarks.md count."""
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
