"""The LstmServe servicer: a translator. It decodes into a frame, makes one engine call, encodes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import InvalidArgument, ServiceError
from lstm_serve.core.jobs import StepResult
from lstm_serve.core.repository import Kind, Manifest
from lstm_serve.core.rollout import Sampling
from lstm_serve.server import convert
from lstm_serve.server.interceptors import PRINCIPAL
from lstm_serve.server.limits import answer_limit, check_answer
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc
from lstm_serve.server.streams import Context, deadline_of, pipeline


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
        # The version that ran (it may be other than the default, or unloaded by now).
        ran = result.version or (result.versions or [""])[0]
        lm = self.engine.models.get((req.model.name, ran))
        mv = lm.mv if lm is not None else self.engine.get_model(req.model.name, req.model.version)
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
