"""The Open Inference Protocol servicer (`inference.GRPCInferenceService`, KServe v2 with Triton's
sequence extension): a translator onto the same engine as lstm_serve.v1. It decodes into a
frame, makes one engine call, encodes. The repository calls go to server/model_control.py,
ModelStatistics to server/statistics.py. RPCs not listed here answer UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import PackageNotFoundError, version

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import FailedPrecondition, InvalidArgument, ServiceError
from lstm_serve.core.jobs import StepResult
from lstm_serve.core.repository import Manifest, ModelVersion
from lstm_serve.server import kserve_convert as K
from lstm_serve.server.interceptors import PRINCIPAL
from lstm_serve.server.limits import answer_limit, check_answer
from lstm_serve.server.model_control import ModelControlCalls
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from lstm_serve.server.statistics import ModelStats, Statistics
from lstm_serve.server.streams import Context, deadline_of, pipeline

logger = logging.getLogger(__name__)

# What this server implements of Triton's extensions (reported by ServerMetadata).
EXTENSIONS = [
    "classification", "sequence", "model_configuration", "model_repository", "statistics",
]  # fmt: skip

Pending = tuple[ModelVersion, K.Decoded, "asyncio.Future[StepResult]"]
# How a failure is told to the client: (error, model name, version) -> the error it gets.
Translate = Callable[[ServiceError, str, str], ServiceError]


def _version_parameter(parameters: Mapping[str, ipb.ModelRepositoryParameter]) -> str:
    """lstm-serve's extension: a `version` parameter (string or int64) loads or unloads one
    version; without it, every version of the model."""
    p = parameters.get("version")
    if p is None:
        return ""
    kind = p.WhichOneof("parameter_choice")
    if kind == "string_param":
        return str(p.string_param)
    if kind == "int64_param":
        return str(p.int64_param)
    raise InvalidArgument("the version parameter must be a string or an int64")


def _version() -> str:
    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "0"


class InferenceServicer(ipb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        engine: Engine,
        max_inflight_per_stream: int,
        max_message_bytes: int,
        control: ModelControlCalls | None = None,
        statistics: Statistics | None = None,
    ) -> None:
        self.engine = engine
        self.window = max_inflight_per_stream
        self.max_message_bytes = max_message_bytes
        self.control = control
        self.statistics = statistics  # None: the server keeps no metrics

    # -- health and metadata ---------------------------------------------------------------------

    async def ServerLive(
        self, request: ipb.ServerLiveRequest, context: Context
    ) -> ipb.ServerLiveResponse:
        return ipb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: ipb.ServerReadyRequest, context: Context
    ) -> ipb.ServerReadyResponse:
        return ipb.ServerReadyResponse(ready=self.engine.ready)

    async def ModelReady(
        self, request: ipb.ModelReadyRequest, context: Context
    ) -> ipb.ModelReadyResponse:
        return ipb.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: ipb.ServerMetadataRequest, context: Context
    ) -> ipb.ServerMetadataResponse:
        return ipb.ServerMetadataResponse(
            name="lstm-serve", version=_version(), extensions=EXTENSIONS
        )

    def _model(self, name: str, version: str) -> ModelVersion:
        try:
            return self.engine.get_model(name, version)
        except ServiceError as exc:
            raise K.triton_error(exc, name, version) from None

    async def ModelMetadata(
        self, request: ipb.ModelMetadataRequest, context: Context
    ) -> ipb.ModelMetadataResponse:
        mv = self._model(request.name, request.version)
        versions = [
            v.manifest.version for v in self.engine.list_models() if v.manifest.name == request.name
        ]
        return K.model_metadata(mv, versions)

    async def ModelConfig(
        self, request: ipb.ModelConfigRequest, context: Context
    ) -> ipb.ModelConfigResponse:
        mv = self._model(request.name, request.version)
        s = self.engine.settings
        return ipb.ModelConfigResponse(
            config=K.model_config(mv, s.max_sessions_per_request, s.session_ttl_s)
        )

    # -- statistics (read-only, not an admin call) -------------------------------------------

    def stats(self, name: str, version: str) -> list[ModelStats]:
        """The figures ModelStatistics and the HTTP/REST form's stats encode."""
        if self.statistics is None:
            raise FailedPrecondition("statistics are not kept here: the engine reports no metrics")
        return self.statistics.of(name, version)

    async def ModelStatistics(
        self, request: ipb.ModelStatisticsRequest, context: Context
    ) -> ipb.ModelStatisticsResponse:
        return K.model_statistics(self.stats(request.name, request.version))

    # -- the model repository (admin calls) ----------------------------------------------------

    def _control(self) -> ModelControlCalls:
        if self.control is None:
            raise FailedPrecondition("the model repository calls are not served here")
        return self.control

    async def RepositoryIndex(
        self, request: ipb.RepositoryIndexRequest, context: Context
    ) -> ipb.RepositoryIndexResponse:
        entries = self._control().index(request.ready)
        return ipb.RepositoryIndexResponse(
            models=[
                ipb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def RepositoryModelLoad(
        self, request: ipb.RepositoryModelLoadRequest, context: Context
    ) -> ipb.RepositoryModelLoadResponse:
        version = _version_parameter(request.parameters)
        await self._control().load(PRINCIPAL.get(), request.model_name, version)
        return ipb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: ipb.RepositoryModelUnloadRequest, context: Context
    ) -> ipb.RepositoryModelUnloadResponse:
        version = _version_parameter(request.parameters)
        self._control().unload(PRINCIPAL.get(), request.model_name, version)
        return ipb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------------

    def _limit(self, context: Context) -> int:
        return answer_limit(context.invocation_metadata(), self.max_message_bytes)

    def _submit(
        self,
        req: ipb.ModelInferRequest,
        principal: str,
        deadline: float | None,
        limit: int,
        translate: Translate = K.triton_error,
    ) -> Pending:
        """Decode and queue one request (synchronously: requests queue in the order read)."""
        decoded: list[K.Decoded] = []

        def decode(m: Manifest) -> F.Frame:
            frame, d = K.decode(req, m)
            check_answer(K.answer_bytes(frame, m, d), limit, "send fewer steps per request")
            decoded.append(d)
            return frame

        name, ver = req.model_name, req.model_version
        try:
            fut = self.engine.submit_step(name, ver, decode, principal, deadline)
            return self.engine.get_model(name, ver), decoded[0], fut
        except ServiceError as exc:
            raise translate(exc, name, ver) from None

    async def _answer(
        self, req: ipb.ModelInferRequest, p: Pending, translate: Translate = K.triton_error
    ) -> ipb.ModelInferResponse:
        mv, d, fut = p
        try:
            result = await fut
        except ServiceError as exc:
            raise translate(exc, req.model_name, req.model_version) from None
        return K.encode(mv, req, d, result)

    async def infer(
        self,
        request: ipb.ModelInferRequest,
        principal: str,
        deadline: float | None,
        limit: int,
        translate: Translate = K.triton_error,
    ) -> ipb.ModelInferResponse:
        """One request, decoded, run and encoded: ModelInfer, and the HTTP/REST form's infer."""
        p = self._submit(request, principal, deadline, limit, translate)
        return await self._answer(request, p, translate)

    async def ModelInfer(
        self, request: ipb.ModelInferRequest, context: Context
    ) -> ipb.ModelInferResponse:
        limit = self._limit(context)
        return await self.infer(request, PRINCIPAL.get(), deadline_of(context), limit)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[ipb.ModelInferRequest], context: Context
    ) -> AsyncIterator[ipb.ModelStreamInferResponse]:
        # As lstm_serve.v1.Stream, except that a failed request is answered with error_message
        # (as Triton does) and the stream goes on.
        principal = PRINCIPAL.get()
        deadline = deadline_of(context)
        limit = self._limit(context)

        def submit(req: ipb.ModelInferRequest) -> Pending:
            return self._submit(req, principal, deadline, limit)

        async def answer(
            req: ipb.ModelInferRequest, p: Pending | ServiceError
        ) -> ipb.ModelStreamInferResponse:
            try:
                if isinstance(p, ServiceError):
                    raise p
                return ipb.ModelStreamInferResponse(infer_response=await self._answer(req, p))
            except ServiceError as exc:
                return ipb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=ipb.ModelInferResponse(
                        model_name=req.model_name, model_version=req.model_version, id=req.id
                    ),
                )

        def future_of(p: Pending) -> asyncio.Future[StepResult]:
            return p[2]

        answers = pipeline(request_iterator, submit, answer, future_of, self.window)
        async with contextlib.aclosing(answers):  # a client gone: its reader stops now
            async for resp in answers:
                yield resp
