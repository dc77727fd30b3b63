"""The LstmServe servicer: a translator. It decodes, makes one engine call, encodes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from lstm_serve.core.engine import Engine, Sampling
from lstm_serve.server import convert
from lstm_serve.server.interceptors import PRINCIPAL
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class LstmServeServicer(pb_grpc.LstmServeServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, max_inflight_per_stream: int) -> None:
        self.engine = engine
        self.window = max_inflight_per_stream

    async def _step(
        self, req: pb.StepRequest, principal: str, deadline: float | None
    ) -> pb.StepResponse:
        mv, outputs = await self.engine.step(
            req.model.name, req.model.version, convert.step_inputs(req), principal, deadline
        )
        return convert.step_response(mv, outputs, req.request_id, req.top_k)

    async def Predict(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        return await self._step(request, PRINCIPAL.get(), _deadline(context))

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        # Up to `window` messages of one stream are worked on at once; each starts in arrival
        # order (the engine queues sessions synchronously), and answers go out in that order.
        principal = PRINCIPAL.get()
        window = asyncio.Semaphore(self.window)
        pending: asyncio.Queue[asyncio.Future[pb.StepResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await window.acquire()  # released once its answer is sent
                    step = self._step(req, principal, _deadline(context))
                    pending.put_nowait(asyncio.ensure_future(step))
            finally:
                pending.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                try:
                    yield await task
                finally:
                    window.release()
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def Forecast(self, request: pb.ForecastRequest, context: Context) -> pb.ForecastResponse:
        prefix = (
            convert.session_steps(request.prefix)
            if request.HasField("prefix") and (request.prefix.x or len(request.prefix.tokens))
            else None
        )
        sampling = Sampling(request.temperature, request.top_k, request.seed)
        mv, result = await self.engine.forecast(
            request.model.name, request.model.version, request.session_id, request.horizon,
            prefix, sampling, request.commit, PRINCIPAL.get(),
        )  # fmt: skip
        return convert.forecast_response(mv, result)

    async def GetSession(self, request: pb.SessionRef, context: Context) -> pb.SessionInfo:
        mv, status = self.engine.get_session(
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


def _deadline(context: Context) -> float | None:
    """The client's deadline on the engine's clock (time.monotonic), if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
