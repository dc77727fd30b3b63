"""Server interceptors: status mapping + gRPC server metrics, and authentication.

Both wrap the RPC's behaviour rather than the call details, because they need the servicer
context (the final status, the peer's certificate).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from lstm_serve.core.errors import InvalidArgument, ServiceError, Unauthenticated
from lstm_serve.server.metrics import Metrics

logger = logging.getLogger(__name__)

# The authenticated client of the current RPC ("" when authentication is off).
PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("principal", default="")

Context = grpc.aio.ServicerContext[Any, Any]
Unary = Callable[[Any, Context], Awaitable[Any]]
StreamOut = Callable[[Any, Context], AsyncIterator[Any]]

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the runtime classes are not generic
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


class _Undecodable:
    """Stands in for a request whose bytes do not parse, so the RPC can refuse it cleanly."""


UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError and friends: grpc would answer UNKNOWN with the class name
            return UNDECODABLE

    return deserialize


UNDECODABLE_MESSAGE = "the request is not a valid protobuf message for this method"


def _counted(deserializer: Callable[[bytes], Any] | None, received: Any) -> Callable[[bytes], Any]:
    """For request streams: counts each message as it is decoded, and refuses one that does
    not parse with INVALID_ARGUMENT. A stream's reads run in its handler, so the error reaches
    the handler (and the status mapping) at the read, and no wrapper around the request
    iterator is needed: one async generator fewer per message."""

    def deserialize(data: bytes) -> Any:
        received.inc()
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception:  # DecodeError and friends
            raise InvalidArgument(UNDECODABLE_MESSAGE) from None

    return deserialize


def _check_decoded(request: Any) -> Any:
    if request is UNDECODABLE:
        raise InvalidArgument(UNDECODABLE_MESSAGE)
    return request


def _rewrap(
    handler: Handler,
    wrap: Callable[[Any], Any],
    deserializer: Callable[[bytes], Any] | None,
) -> Handler:
    """A copy of handler whose behaviour is wrap(behaviour), decoding with deserializer."""
    kinds = [
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    ]
    for behaviour, make in kinds:
        if behaviour is not None:
            return make(  # type: ignore[no-any-return]
                wrap(behaviour),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class StatusInterceptor(Interceptor):
    """Maps errors to statuses (no tracebacks reach clients) and records grpc_server_* metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        m = self.m
        req_stream, resp_stream = bool(handler.request_streaming), bool(handler.response_streaming)
        kind = {(False, False): "unary", (True, False): "client_stream",
                (False, True): "server_stream", (True, True): "bidi_stream"}[(req_stream, resp_stream)]  # fmt: skip
        labels = (kind, service, method)
        started = m.grpc_started.labels(*labels)
        received = m.grpc_msg_received.labels(*labels)
        sent = m.grpc_msg_sent.labels(*labels)
        handling = m.grpc_handling.labels(*labels)

        def finish(code: grpc.StatusCode, t0: float) -> None:
            m.grpc_handled.labels(*labels, code.name).inc()
            handling.observe(time.perf_counter() - t0)

        def wrap(behaviour: Any) -> Any:
            if resp_stream and inspect.isasyncgenfunction(behaviour):

                async def stream_behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                    started.inc()
                    t0 = time.perf_counter()
                    code = grpc.StatusCode.OK
                    try:
                        if not req_stream:
                            received.inc()
                            _check_decoded(request)
                        async for resp in behaviour(request, context):
                            sent.inc()
                            yield resp
                    except BaseException as exc:
                        code = _code_of(exc, context)
                        await _map_error(exc, context, details.method)
                    finally:
                        finish(code, t0)

                return stream_behaviour
            # Unary, or a streaming handler that writes with context.write (e.g. Health.Watch).

            async def unary_behaviour(request: Any, context: Context) -> Any:
                started.inc()
                t0 = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    if not req_stream:
                        received.inc()
                        _check_decoded(request)
                    resp = await behaviour(request, context)
                    if not resp_stream:
                        sent.inc()
                    return resp
                except BaseException as exc:
                    code = _code_of(exc, context)
                    await _map_error(exc, context, details.method)
                    raise
                finally:
                    finish(code, t0)

            return unary_behaviour

        des = handler.request_deserializer
        return _rewrap(handler, wrap, _counted(des, received) if req_stream else _tolerant(des))


async def _map_error(exc: BaseException, context: Context, method: str) -> NoReturn:
    """Abort the RPC with the status exc stands for; always raises."""
    if isinstance(exc, ServiceError):
        await context.abort(grpc.StatusCode[exc.code], exc.message)
    if isinstance(exc, NotImplementedError):  # what generated base servicers raise
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    if isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError)) or not isinstance(
        exc, Exception
    ):
        raise exc
    logger.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("unreachable: abort() raises")


def _code_of(exc: BaseException, context: Context) -> grpc.StatusCode:
    if isinstance(exc, ServiceError):
        return grpc.StatusCode[exc.code]
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def load_tokens(tokens_file: Path | None, tokens: str) -> dict[str, str]:
    """token -> client name, from 'client token' lines and 'client:token,...' pairs."""
    table: dict[str, str] = {}
    if tokens_file is not None:
        for n, line in enumerate(tokens_file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{tokens_file}:{n}: expected 'client-name token'")
            table[parts[1]] = parts[0]
    for pair in filter(None, (p.strip() for p in tokens.split(","))):
        name, sep, token = pair.partition(":")
        if not sep or not name or not token:
            raise ValueError("auth_tokens: expected 'client-name:token' pairs")
        table[token] = name
    return table


class Authenticator:
    """The check every protocol's front end shares: bearer tokens and/or client certificates
    name the principal that namespaces sessions ("" when authentication is off)."""

    def __init__(self, tokens: dict[str, str], mtls: bool) -> None:
        self.tokens = tokens
        self.mtls = mtls

    def principal(self, authorization: str | None, common_name: Callable[[], str | None]) -> str:
        """authorization: the request's `Authorization` value; common_name: the client
        certificate's CN (asked only with mTLS and no tokens)."""
        if self.tokens:
            scheme, _, token = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated(
                    "missing bearer token (gRPC metadata or HTTP header "
                    "'authorization: Bearer <token>')"
                )
            for known, name in self.tokens.items():
                if hmac.compare_digest(known.encode(), token.strip().encode()):
                    return name
            raise Unauthenticated("invalid token")
        if self.mtls:
            cn = common_name()
            if cn:
                return "cn:" + cn
            raise Unauthenticated("client certificate has no common name")
        return ""


class AuthInterceptor(Interceptor):
    """Bearer tokens and/or client certificates name the principal that namespaces sessions."""

    def __init__(self, tokens: dict[str, str], mtls: bool) -> None:
        self.auth = Authenticator(tokens, mtls)

    def _principal(self, context: Context, metadata: dict[str, str]) -> str:
        def common_name() -> str | None:
            names = list(context.auth_context().get("x509_common_name") or [])
            return bytes(names[0]).decode() if names else None

        return self.auth.principal(metadata.get("authorization"), common_name)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}

        def wrap(behaviour: Any) -> Any:
            if handler.response_streaming and inspect.isasyncgenfunction(behaviour):

                async def stream_behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                    PRINCIPAL.set(self._principal(context, metadata))
                    async for resp in behaviour(request, context):
                        yield resp

                return stream_behaviour

            async def unary_behaviour(request: Any, context: Context) -> Any:
                PRINCIPAL.set(self._principal(context, metadata))
                return await behaviour(request, context)

            return unary_behaviour

        return _rewrap(handler, wrap, handler.request_deserializer)
