"""Typed Python client for lstm-serve (docs/client.md): sync (Client) and asyncio (AsyncClient)
with the same calls, resumable session streams that number their steps and survive disconnects
without losing or repeating one, and typed errors (LstmServeError and one subclass per status).

    from lstm_serve.client import Client
    with Client("localhost:50051") as client:
        out = client.predict("forecaster", "sensor-7", [[12.1, 8.9], [11.6, 8.8]])
        print(out.y)          # one prediction per step

Each call is built and decoded once, by _ClientBase (which request, which stub method, how the
answer reads); Client and AsyncClient only do the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_serve.client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LstmServeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_class,
    from_rpc_error,
)
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

__all__ = [
    "RETRYABLE",
    "ROUTE_HEADER",
    "ArrayLike",
    "AsyncClient",
    "AsyncSessionStream",
    "Cancelled",
    "Client",
    "Connection",
    "DeadlineExceeded",
    "FailedPrecondition",
    "ForecastOutput",
    "FrameResult",
    "Internal",
    "InvalidArgument",
    "LstmServeError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SessionState",
    "SessionStream",
    "StepResult",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_class",
    "forecast_request",
    "frame_request",
    "frame_result",
    "from_rpc_error",
    "route_of",
    "routed",
    "session_steps",
    "step_request",
    "step_results",
]

F32 = np.dtype("<f4")
# Statuses after which a session stream reconnects and resends what was not answered.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}  # fmt: skip
ArrayLike = Sequence[float] | Sequence[Sequence[float]] | np.ndarray
# Call metadata a proxy routes on (Envoy's ring hash): one session's calls reach one replica.
ROUTE_HEADER = "x-lstm-serve-route"
T = TypeVar("T")


def routed(metadata: tuple[tuple[str, str], ...], route: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata with the routing key a proxy hashes on (none when route is empty)."""
    return metadata if not route else (*metadata, (ROUTE_HEADER, route))


def route_of(request: pb.StepRequest, gateway_id: str) -> str:
    """The routing key of a request: its session, or the gateway's id for many sessions."""
    if not request.HasField("frame") and len(request.sessions) == 1:
        return request.sessions[0].session_id
    return gateway_id


@dataclass(frozen=True)
class StepResult:
    """One session's answer to a step request."""

    session_id: str
    seq: int  # the seq of the request's first step
    next_seq: int  # the seq the session expects next
    y: np.ndarray  # [steps, output_dim]; empty when top_k was asked for
    top_k: list[list[tuple[int, float]]]  # token models with top_k > 0: (token, prob) per step
    replayed: bool  # a retry answered from the replay cache, not applied again
    version: str = ""  # the model version that ran it (the session's own)


@dataclass(frozen=True)
class ForecastOutput:
    """A roll-out: y[k] is the prediction for step next_seq + k (see docs/protocol.md)."""

    y: np.ndarray  # real models: [horizon, output_dim]
    tokens: list[int]  # token models
    next_seq: int  # the session's next_seq after the call (moved only with commit)


@dataclass(frozen=True)
class SessionState:
    """What the server holds of a session (exists is False for an unknown one)."""

    session_id: str
    exists: bool
    next_seq: int
    idle_seconds: float


def session_steps(
    session_id: str,
    x: ArrayLike | None = None,
    tokens: Sequence[int] | None = None,
    seq: int | None = None,
    reset: bool = False,
) -> pb.SessionSteps:
    """One session's steps: x (steps x features, raw units) for real models, tokens for token models."""
    msg = pb.SessionSteps(session_id=session_id, reset=reset)
    if seq is not None:
        msg.seq = seq
    if x is not None:
        msg.x = np.asarray(x, F32).tobytes()
    if tokens is not None:
        msg.tokens.extend(int(t) for t in tokens)
    return msg


def step_request(
    model: str, sessions: Sequence[pb.SessionSteps], version: str = "", request_id: str = "",
    top_k: int = 0,
) -> pb.StepRequest:  # fmt: skip
    """A step request of one or more sessions' steps (see session_steps)."""
    return pb.StepRequest(
        model=pb.ModelRef(name=model, version=version), sessions=list(sessions),
        request_id=request_id, top_k=top_k,
    )  # fmt: skip


def step_results(resp: pb.StepResponse, output_dim: int | None = None) -> list[StepResult]:
    """The per-session answers of a StepResponse, y as [steps, output_dim] float32 arrays."""
    out = []
    for s in resp.sessions:
        y = np.frombuffer(s.y, F32)
        y = y.reshape(s.steps, -1) if s.steps and y.size else y.reshape(s.steps, 0)
        top = [list(zip(t.tokens, t.probs, strict=True)) for t in s.top_k]
        version = s.version or resp.model.version
        out.append(StepResult(s.session_id, s.seq, s.next_seq, y, top, s.replayed, version))
    return out


@dataclass(frozen=True)
class FrameResult:
    """The answer to a columnar frame, as arrays in the frame's session order."""

    session_ids: list[str]
    seq: np.ndarray  # uint64 [sessions]: seq of each session's first step
    next_seq: np.ndarray  # uint64 [sessions]
    replayed: np.ndarray  # bool [sessions]
    y: np.ndarray  # float32 [sessions, steps, output_dim]; empty when top_k was asked for
    top_k_tokens: np.ndarray  # int32 [sessions, steps, k] (token models with top_k > 0)
    top_k_probs: np.ndarray  # float32 [sessions, steps, k]
    versions: list[str]  # per session: the model version that ran it (the session's own)


def frame_request(
    model: str,
    session_ids: Sequence[str],
    x: np.ndarray,
    seqs: Sequence[int] | np.ndarray | None = None,
    resets: Sequence[bool] | np.ndarray | None = None,
    *,
    version: str = "",
    top_k: int = 0,
    request_id: str = "",
) -> pb.StepRequest:
    """A gateway frame in the columnar form: x is [sessions, steps, input_dim] (real models) or
    [sessions, steps] token ids; seqs (-1: append) and resets have one value per session."""
    x = np.asarray(x)
    fr = pb.Frame(session_ids=list(session_ids), steps=x.shape[1] if x.ndim >= 2 else 0)
    if np.issubdtype(x.dtype, np.integer):
        fr.tokens.extend(x.ravel().tolist())
    else:
        fr.x = np.ascontiguousarray(x, F32).tobytes()
    if seqs is not None:
        fr.seqs.extend(np.asarray(seqs, np.int64).tolist())
    if resets is not None:
        fr.resets.extend(np.asarray(resets, bool).tolist())
    return pb.StepRequest(
        model=pb.ModelRef(name=model, version=version), frame=fr, top_k=top_k,
        request_id=request_id,
    )  # fmt: skip


def frame_result(req: pb.StepRequest, resp: pb.StepResponse) -> FrameResult:
    """The answer to a frame request, as arrays in the request's session order."""
    fo = resp.frame
    n, t = len(req.frame.session_ids), fo.steps
    y = np.frombuffer(fo.y, F32)
    k = len(fo.top_k_tokens) // max(n * t, 1)
    return FrameResult(
        list(req.frame.session_ids),
        np.asarray(fo.seqs, np.uint64),
        np.asarray(fo.next_seqs, np.uint64),
        np.asarray(fo.replayed, bool),
        y.reshape(n, t, -1) if y.size else y.reshape(n, t, 0),
        np.asarray(fo.top_k_tokens, np.int32).reshape(n, t, k),
        np.asarray(fo.top_k_probs, np.float32).reshape(n, t, k),
        list(fo.versions) if fo.versions else [resp.model.version] * n,
    )


def forecast_request(
    model: str, session_id: str, horizon: int, *, version: str = "", temperature: float = 0.0,
    top_k: int = 0, seed: int = 0, commit: bool = False, prefix: pb.SessionSteps | None = None,
) -> pb.ForecastRequest:  # fmt: skip
    """A Forecast request: roll session_id forward horizon steps (see Client.forecast)."""
    req = pb.ForecastRequest(
        model=pb.ModelRef(name=model, version=version), session_id=session_id,
        horizon=horizon, temperature=temperature, top_k=top_k, seed=seed, commit=commit,
    )  # fmt: skip
    if prefix is not None:
        req.prefix.CopyFrom(prefix)
    return req


def _forecast_output(r: pb.ForecastResponse) -> ForecastOutput:
    y = np.frombuffer(r.y, F32).reshape(r.steps, -1) if r.y else np.empty((r.steps, 0), F32)
    return ForecastOutput(y, list(r.tokens), r.next_seq)


def _session_ref(model: str, session_id: str, version: str) -> pb.SessionRef:
    return pb.SessionRef(model=pb.ModelRef(name=model, version=version), session_id=session_id)


def _session_state(info: pb.SessionInfo) -> SessionState:
    return SessionState(info.session_id, info.exists, info.next_seq, info.idle_seconds)


def _first_result(resp: pb.StepResponse) -> StepResult:
    return step_results(resp)[0]


def _models(resp: pb.ListModelsResponse) -> list[pb.ModelInfo]:
    return list(resp.models)


def _model(info: pb.ModelInfo) -> pb.ModelInfo:
    return info


def _serving_status(resp: health_pb2.HealthCheckResponse) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def _credentials(
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None
) -> grpc.ChannelCredentials | None:
    if root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _pem(value: bytes | None, secret: bool = False) -> str:
    if value is None:
        return "None"
    return "'<redacted>'" if secret else f"'<{len(value)} bytes>'"


@dataclass(repr=False)
class Connection:
    """How to reach a server: its target, optional TLS material and a bearer token.

    target: "host:port". root_certificates: the PEM CA bundle that signed the server's
    certificate (TLS; None with a certificate_chain means the system's roots).
    certificate_chain and private_key: the client's PEM certificate and key (mutual TLS).
    token: sent as "authorization: Bearer <token>" with every call. max_message_bytes: the
    largest message sent or received; the server refuses, before applying anything, a request
    whose answer would be larger. With neither root_certificates nor certificate_chain the
    channel is plaintext. repr() never shows the token or the private key.
    """

    target: str
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024

    def __repr__(self) -> str:
        return (
            f"Connection(target={self.target!r}, "
            f"root_certificates={_pem(self.root_certificates)}, "
            f"private_key={_pem(self.private_key, secret=True)}, "
            f"certificate_chain={_pem(self.certificate_chain)}, "
            f"token={'None' if self.token is None else repr('<redacted>')}, "
            f"max_message_bytes={self.max_message_bytes})"
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call carries: the bearer token and the receive limit."""
        # The receive limit travels with every call: the server refuses, before applying
        # anything, a request whose answer this client could not receive.
        limit = (("lstm-serve-max-response-bytes", str(self.max_message_bytes)),)
        return (("authorization", f"Bearer {self.token}"), *limit) if self.token else limit

    def routed(self, route: str | None) -> tuple[tuple[str, str], ...]:
        """The metadata of a call, with its routing key."""
        return routed(self.metadata, route)

    @property
    def options(self) -> list[tuple[str, Any]]:
        """The channel options: message limits and a quick reconnect after a server restart."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # After a server restart, be back within a fraction of a second, not gRPC's 1-120 s.
            # (min_reconnect_backoff stays at its default: it is also the connect timeout.)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for a plaintext channel."""
        return _credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One unary call, built once for both clients: the stub method, the request, the call's
    options and how its answer decodes. The clients only send it."""

    method: str  # the stub's method name (Predict, GetSession, ... or the health service's Check)
    request: Any
    kw: dict[str, Any]  # timeout and metadata
    decode: Callable[[Any], T]
    health: bool = False  # a call of grpc.health.v1.Health, not of LstmServe


class _ClientBase:
    """What Client and AsyncClient share: the connection, and every call's request and decoding."""

    channel: Any
    stub: Any
    health_stub: Any

    def __init__(
        self, target: str | Connection, timeout: float | None = 30.0, gateway_id: str = ""
    ) -> None:
        self.conn = target if isinstance(target, Connection) else Connection(target)
        self.timeout = timeout
        # Routes this client's frames (of many sessions) to one replica.
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def _stubs(self, channel: Any) -> None:
        self.channel = channel
        self.stub = pb_grpc.LstmServeStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)

    def _kw(self, timeout: float | None, route: str | None = None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self.conn.routed(route)}

    def _step_call(self, request: pb.StepRequest, timeout: float | None) -> _Call[list[StepResult]]:
        kw = self._kw(timeout, route_of(request, self.gateway_id))
        return _Call("Predict", request, kw, step_results)

    def _frame_call(
        self, model: str, session_ids: Sequence[str], x: np.ndarray,
        seqs: Sequence[int] | np.ndarray | None, resets: Sequence[bool] | np.ndarray | None,
        version: str, top_k: int, timeout: float | None,
    ) -> _Call[FrameResult]:  # fmt: skip
        req = frame_request(model, session_ids, x, seqs, resets, version=version, top_k=top_k)
        kw = self._kw(timeout, self.gateway_id)
        return _Call("Predict", req, kw, functools.partial(frame_result, req))

    def _predict_call(
        self, model: str, session_id: str, x: ArrayLike | None, tokens: Sequence[int] | None,
        seq: int | None, reset: bool, version: str, top_k: int, timeout: float | None,
    ) -> _Call[StepResult]:  # fmt: skip
        steps = session_steps(session_id, x, tokens, seq, reset)
        req = step_request(model, [steps], version, top_k=top_k)
        return _Call("Predict", req, self._kw(timeout, session_id), _first_result)

    def _forecast_call(
        self, model: str, session_id: str, horizon: int, version: str, temperature: float,
        top_k: int, seed: int, commit: bool, prefix: pb.SessionSteps | None,
        timeout: float | None,
    ) -> _Call[ForecastOutput]:  # fmt: skip
        req = forecast_request(
            model, session_id, horizon, version=version, temperature=temperature, top_k=top_k,
            seed=seed, commit=commit, prefix=prefix,
        )  # fmt: skip
        return _Call("Forecast", req, self._kw(timeout, session_id), _forecast_output)

    def _session_call(
        self, method: str, model: str, session_id: str, version: str, timeout: float | None
    ) -> _Call[SessionState]:
        ref = _session_ref(model, session_id, version)
        return _Call(method, ref, self._kw(timeout, session_id), _session_state)

    def _list_models_call(self, timeout: float | None) -> _Call[list[pb.ModelInfo]]:
        return _Call("ListModels", pb.ListModelsRequest(), self._kw(timeout), _models)

    def _get_model_call(
        self, model: str, version: str, timeout: float | None
    ) -> _Call[pb.ModelInfo]:
        req = pb.ModelRef(name=model, version=version)
        return _Call("GetModel", req, self._kw(timeout), _model)

    def _health_call(self, service: str, timeout: float | None) -> _Call[str]:
        # The health service is open (no token), and answers no outputs: no metadata.
        req = health_pb2.HealthCheckRequest(service=service)
        kw = {"timeout": timeout or self.timeout}
        return _Call("Check", req, kw, _serving_status, health=True)

    def _method(self, call: _Call[Any]) -> Any:
        return getattr(self.health_stub if call.health else self.stub, call.method)


class Client(_ClientBase):
    """Blocking client. Every call takes an optional timeout (seconds; the client's default
    otherwise) and raises an LstmServeError subclass when it fails."""

    def __init__(
        self, target: str | Connection, timeout: float | None = 30.0, gateway_id: str = ""
    ) -> None:
        """target: "host:port" or a Connection (TLS, token); timeout: the default per call;
        gateway_id: the routing key of frames (random when empty)."""
        super().__init__(target, timeout, gateway_id)

    def _open(self) -> None:
        creds = self.conn.credentials()
        self._stubs(
            grpc.secure_channel(self.conn.target, creds, self.conn.options)
            if creds
            else grpc.insecure_channel(self.conn.target, self.conn.options)
        )

    def _unary(self, call: _Call[T]) -> T:
        try:
            resp = self._method(call)(call.request, **call.kw)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return call.decode(resp)

    def reconnect(self) -> None:
        """Close the channel and open a new one to the same target."""
        self.channel.close()
        self._open()

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, request: pb.StepRequest, timeout: float | None = None) -> list[StepResult]:
        """Send one request (one session or a gateway frame of many)."""
        return self._unary(self._step_call(request, timeout))

    def step_frame(
        self, model: str, session_ids: Sequence[str], x: np.ndarray,
        seqs: Sequence[int] | np.ndarray | None = None,
        resets: Sequence[bool] | np.ndarray | None = None, *, version: str = "",
        top_k: int = 0, timeout: float | None = None,
    ) -> FrameResult:  # fmt: skip
        """Many sessions' steps in one columnar message (see frame_request), run as one batch."""
        return self._unary(
            self._frame_call(model, session_ids, x, seqs, resets, version, top_k, timeout)
        )

    def predict(
        self, model: str, session_id: str, x: ArrayLike | None = None, *,
        tokens: Sequence[int] | None = None, seq: int | None = None, reset: bool = False,
        version: str = "", top_k: int = 0, timeout: float | None = None,
    ) -> StepResult:  # fmt: skip
        """One session's steps: x [steps, input_dim] in raw units (real models) or token ids
        (token models). seq (optional) makes delivery exactly-once; reset starts from zero
        state; top_k > 0 (token models) answers the k most likely tokens per step."""
        return self._unary(
            self._predict_call(model, session_id, x, tokens, seq, reset, version, top_k, timeout)
        )

    def forecast(
        self, model: str, session_id: str, horizon: int, *, version: str = "",
        temperature: float = 0.0, top_k: int = 0, seed: int = 0, commit: bool = False,
        prefix: pb.SessionSteps | None = None, timeout: float | None = None,
    ) -> ForecastOutput:  # fmt: skip
        """Roll the session forward horizon steps, feeding each prediction back as the next
        input (token models: greedy, or sampled with temperature, top_k and seed). The session
        is unchanged unless commit; prefix (session_steps) is applied first."""
        call = self._forecast_call(
            model, session_id, horizon, version, temperature, top_k, seed, commit, prefix, timeout
        )
        return self._unary(call)

    def get_session(
        self, model: str, session_id: str, version: str = "", *, timeout: float | None = None
    ) -> SessionState:
        """The session's next_seq and idle time (exists=False for an unknown session)."""
        return self._unary(self._session_call("GetSession", model, session_id, version, timeout))

    def reset_session(
        self, model: str, session_id: str, version: str = "", *, timeout: float | None = None
    ) -> SessionState:
        """Zero the session's state; its steps count from seq 0 again (NotFound if unknown)."""
        return self._unary(self._session_call("ResetSession", model, session_id, version, timeout))

    def end_session(
        self, model: str, session_id: str, version: str = "", *, timeout: float | None = None
    ) -> SessionState:
        """Drop the session and its state (NotFound if unknown)."""
        return self._unary(self._session_call("EndSession", model, session_id, version, timeout))

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """The loaded models, each with its manifest."""
        return self._unary(self._list_models_call(timeout))

    def get_model(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> pb.ModelInfo:
        """One model's manifest (the newest version when version is empty)."""
        return self._unary(self._get_model_call(model, version, timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The gRPC health status ("SERVING", "NOT_SERVING", ...) of the server (service ""),
        of "lstm_serve.v1.LstmServe", or of a model by name."""
        return self._unary(self._health_call(service, timeout))

    def session(self, model: str, session_id: str, version: str = "", **kw: Any) -> SessionStream:
        """A resumable stream of one session's steps (see SessionStream for kw)."""
        return SessionStream(self, model, session_id, version, **kw)


def _stream_error(exc: BaseException | None) -> BaseException:
    """What a session stream raises when it gives up: a typed error for a gRPC status or for a
    stream that ended without an answer; any other exception as it is."""
    if exc is None or isinstance(exc, StopIteration):
        return Unavailable(grpc.StatusCode.UNAVAILABLE, "the stream ended without an answer")
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc)
    return exc


class SessionStream:
    """One session over a bidirectional stream, steps numbered by the stream itself.

    After a disconnect it reconnects and resends every unanswered request with its seq: the
    server answers the ones it had applied from its replay cache and applies the rest, so no
    step is lost or applied twice. A status that is not worth a retry (or the last retry's)
    is raised as an LstmServeError subclass.
    """

    def __init__(
        self, client: Client, model: str, session_id: str, version: str = "",
        start_seq: int | None = None, max_retries: int = 8, backoff_s: float = 0.05,
    ) -> None:  # fmt: skip
        """start_seq: the seq of the first step (the session's next_seq, asked, when None);
        max_retries and backoff_s (doubling): how hard send() retries a broken stream."""
        self.client = client
        self.model, self.version, self.session_id = model, version, session_id
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.next_seq = (
            start_seq if start_seq is not None
            else client.get_session(model, session_id, version).next_seq
        )  # fmt: skip
        self.reconnects = 0
        self._requests: queue.SimpleQueue[pb.StepRequest | None] | None = None
        self._responses: Iterator[pb.StepResponse] | None = None

    def _open(self) -> None:
        q: queue.SimpleQueue[pb.StepRequest | None] = queue.SimpleQueue()
        self._requests = q
        self._responses = self.client.stub.Stream(
            iter(q.get, None), metadata=routed(self.client.conn.metadata, self.session_id)
        )

    def close(self) -> None:
        """End the stream (the session lives on; end_session drops it)."""
        if self._requests is not None:
            self._requests.put(None)
            self._requests = None
            self._responses = None

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self, x: ArrayLike | None = None, tokens: Sequence[int] | None = None, top_k: int = 0
    ) -> StepResult:
        """Send the next steps; returns their outputs (retrying through disconnects)."""
        steps = session_steps(self.session_id, x, tokens, seq=self.next_seq)
        req = step_request(self.model, [steps], self.version, top_k=top_k)
        for attempt in range(self.max_retries + 1):
            try:
                if self._responses is None:
                    self._open()
                assert self._requests is not None and self._responses is not None
                self._requests.put(req)
                result = step_results(next(self._responses))[0]
                self.next_seq = result.next_seq
                return result
            except (grpc.RpcError, StopIteration) as exc:
                code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
                self.close()
                if code not in RETRYABLE or attempt == self.max_retries:
                    raise _stream_error(exc) from None
                self.reconnects += 1
                # A new call on the same channel: the channel reconnects by itself, and the
                # client's other streams on it are left alone.
                threading.Event().wait(self.backoff_s * (2**attempt))
        raise AssertionError("unreachable")


class AsyncClient(_ClientBase):
    """asyncio client with the same calls as Client (each a coroutine), built and decoded by
    the same code. Every call takes an optional timeout (seconds) and raises an LstmServeError
    subclass when it fails."""

    def __init__(
        self, target: str | Connection, timeout: float | None = 30.0, gateway_id: str = ""
    ) -> None:
        """As Client's. The channel is made at once; it connects on the first call."""
        super().__init__(target, timeout, gateway_id)

    def _open(self) -> None:
        creds = self.conn.credentials()
        self._stubs(
            grpc.aio.secure_channel(self.conn.target, creds, self.conn.options)
            if creds
            else grpc.aio.insecure_channel(self.conn.target, self.conn.options)
        )

    async def _unary(self, call: _Call[T]) -> T:
        try:
            resp = await self._method(call)(call.request, **call.kw)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return call.decode(resp)

    async def reconnect(self) -> None:
        """Close the channel and open a new one to the same target."""
        await self.channel.close(None)
        self._open()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def step(self, request: pb.StepRequest, timeout: float | None = None) -> list[StepResult]:
        """Send one request (one session or a gateway frame of many)."""
        return await self._unary(self._step_call(request, timeout))

    async def step_frame(
        self, model: str, session_ids: Sequence[str], x: np.ndarray,
        seqs: Sequence[int] | np.ndarray | None = None,
        resets: Sequence[bool] | np.ndarray | None = None, *, version: str = "",
        top_k: int = 0, timeout: float | None = None,
    ) -> FrameResult:  # fmt: skip
        """Many sessions' steps in one columnar message (see frame_request), run as one batch."""
        return await self._unary(
            self._frame_call(model, session_ids, x, seqs, resets, version, top_k, timeout)
        )

    async def predict(
        self, model: str, session_id: str, x: ArrayLike | None = None, *,
        tokens: Sequence[int] | None = None, seq: int | None = None, reset: bool = False,
        version: str = "", top_k: int = 0, timeout: float | None = None,
    ) -> StepResult:  # fmt: skip
        """One session's steps (see Client.predict)."""
        return await self._unary(
            self._predict_call(model, session_id, x, tokens, seq, reset, version, top_k, timeout)
        )

    async def forecast(
        self, model: str, session_id: str, horizon: int, *, version: str = "",
        temperature: float = 0.0, top_k: int = 0, seed: int = 0, commit: bool = False,
        prefix: pb.SessionSteps | None = None, timeout: float | None = None,
    ) -> ForecastOutput:  # fmt: skip
        """Roll the session forward horizon steps (see Client.forecast)."""
        call = self._forecast_call(
            model, session_id, horizon, version, temperature, top_k, seed, commit, prefix, timeout
        )
        return await self._unary(call)

    async def get_session(
        self, model: str, session_id: str, version: str = "", *, timeout: float | None = None
    ) -> SessionState:
        """The session's next_seq and idle time (exists=False for an unknown session)."""
        return await self._unary(
            self._session_call("GetSession", model, session_id, version, timeout)
        )

    async def reset_session(
        self, model: str, session_id: str, version: str = "", *, timeout: float | None = None
    ) -> SessionState:
        """Zero the session's state; its steps count from seq 0 again (NotFound if unknown)."""
        return await self._unary(
            self._session_call("ResetSession", model, session_id, version, timeout)
        )

    async def end_session(
        self, model: str, session_id: str, version: str = "", *, timeout: float | None = None
    ) -> SessionState:
        """Drop the session and its state (NotFound if unknown)."""
        return await self._unary(
            self._session_call("EndSession", model, session_id, version, timeout)
        )

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """The loaded models, each with its manifest."""
        return await self._unary(self._list_models_call(timeout))

    async def get_model(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> pb.ModelInfo:
        """One model's manifest (the newest version when version is empty)."""
        return await self._unary(self._get_model_call(model, version, timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The gRPC health status of the server, the service or a model (see Client.health)."""
        return await self._unary(self._health_call(service, timeout))

    def session(
        self, model: str, session_id: str, version: str = "", **kw: Any
    ) -> AsyncSessionStream:
        """A resumable, pipelining stream of one session's steps (see AsyncSessionStream)."""
        return AsyncSessionStream(self, model, session_id, version, **kw)


class AsyncSessionStream:
    """asyncio SessionStream; send() may be called concurrently: requests are pipelined in order.

    Every unanswered request is kept. When the call breaks (a dropped connection, a closed
    channel, a draining server) a new call is opened and they are resent in seq order, under
    the same lock that orders sends, so nothing overtakes them.
    """

    def __init__(
        self, client: AsyncClient, model: str, session_id: str, version: str = "",
        start_seq: int | None = None, max_retries: int = 8, backoff_s: float = 0.05,
    ) -> None:  # fmt: skip
        """As SessionStream's; the first send() asks the session's next_seq when start_seq is
        None."""
        self.client = client
        self.model, self.version, self.session_id = model, version, session_id
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.next_seq = start_seq
        self.reconnects = 0
        self._call: Any = None
        self._call_channel: Any = None
        self._closing = False
        self._lock = asyncio.Lock()
        # Sent but unanswered: (request, future for its result), oldest first.
        self._unacked: deque[tuple[pb.StepRequest, asyncio.Future[StepResult]]] = deque()
        self._readers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AsyncSessionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for the answers still due, then end the call."""
        if self._unacked:
            await asyncio.gather(*(f for _, f in list(self._unacked)), return_exceptions=True)
        self._closing = True
        async with self._lock:
            call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(Exception):
                await call.done_writing()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def _open_locked(self) -> None:
        """A new call, with every unanswered request resent in order. The caller holds _lock."""
        channel = getattr(self.client, "channel", None)
        if channel is not None and channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN:
            await self.client.reconnect()  # our channel was closed under us
        call = self.client.stub.Stream(metadata=routed(self.client.conn.metadata, self.session_id))
        self._call, self._call_channel = call, getattr(self.client, "channel", None)
        reader = asyncio.create_task(self._read(call))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        for req, _ in list(self._unacked):
            await call.write(req)

    async def _read(self, call: Any) -> None:
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
        error: BaseException | None = None
        try:
            async for resp in call.__aiter__():
                if call is not self._call or not self._unacked:
                    return  # a newer call took over
                _, fut = self._unacked.popleft()
                if not fut.done():
                    fut.set_result(step_results(resp)[0])
            if not self._unacked or self._closing:
                return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled, not the call
            code = grpc.StatusCode.CANCELLED  # the channel was closed under the call
        except grpc.RpcError as exc:
            code, error = exc.code(), exc
        except Exception as exc:  # e.g. a write on a closed channel
            error = exc
        await self._recover(call, code, error)

    async def _recover(self, call: Any, code: grpc.StatusCode, error: BaseException | None) -> None:
        async with self._lock:
            if call is not self._call:
                return  # already recovered
            self._call = None
            if code in RETRYABLE and not self._closing:
                for attempt in range(self.max_retries):
                    self.reconnects += 1
                    await asyncio.sleep(self.backoff_s * (2**attempt))
                    try:
                        await self._open_locked()
                        return
                    except Exception as exc:
                        self._call, error = None, exc
            failure = _stream_error(error)
            while self._unacked:
                _, fut = self._unacked.popleft()
                if not fut.done():
                    fut.set_exception(failure)

    async def send(
        self, x: ArrayLike | None = None, tokens: Sequence[int] | None = None, top_k: int = 0
    ) -> StepResult:
        """Send the next steps; returns their outputs (resent through disconnects)."""
        async with self._lock:  # numbering and writing happen in call order
            if self.next_seq is None:
                state = await self.client.get_session(self.model, self.session_id, self.version)
                self.next_seq = state.next_seq
            steps = session_steps(self.session_id, x, tokens, seq=self.next_seq)
            req = step_request(self.model, [steps], self.version, top_k=top_k)
            fut: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
            self._unacked.append((req, fut))
            self.next_seq += _steps(x, tokens)
            call = self._call
            try:
                if call is None:
                    await self._open_locked()
                else:
                    await call.write(req)
            except Exception:
                # A broken call's reader recovers (resending this request too). When no call
                # could even be made there is no reader: recover from here.
                if self._call is None:
                    task = asyncio.ensure_future(
                        self._recover(None, grpc.StatusCode.UNAVAILABLE, None)
                    )
                    self._readers.add(task)
                    task.add_done_callback(self._readers.discard)
        return await fut

    async def stream(self, xs: AsyncIterator[ArrayLike]) -> AsyncIterator[StepResult]:
        """Send each x of xs in turn and yield its result."""
        async for x in xs:
            yield await self.send(x)


def _steps(x: ArrayLike | None, tokens: Sequence[int] | None) -> int:
    """Steps in one send: x is [steps, features] (a 1-D x is one step), tokens one per step."""
    if tokens is not None:
        return len(tokens)
    a = np.asarray(x, F32)
    return 1 if a.ndim < 2 else int(a.shape[0])
