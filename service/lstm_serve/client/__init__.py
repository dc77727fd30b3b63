"""Typed Python client for lstm-serve: sync (Client) and asyncio (AsyncClient), and resumable
session streams that number their steps and survive disconnects without losing or repeating one.

    from lstm_serve.client import Client
    with Client("localhost:50051") as client:
        out = client.predict("forecaster", "sensor-7", [[12.1, 8.9], [11.6, 8.8]])
        print(out.y)          # one prediction per step
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

F32 = np.dtype("<f4")
# Statuses after which a session stream reconnects and resends what was not answered.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}  # fmt: skip
ArrayLike = Sequence[float] | Sequence[Sequence[float]] | np.ndarray
# Call metadata a proxy routes on (Envoy's ring hash): one session's calls reach one replica.
ROUTE_HEADER = "x-lstm-serve-route"


def routed(metadata: tuple[tuple[str, str], ...], route: str | None) -> tuple[tuple[str, str], ...]:
    return metadata if not route else (*metadata, (ROUTE_HEADER, route))


def route_of(request: pb.StepRequest, gateway_id: str) -> str:
    """The routing key of a request: its session, or the gateway's id for many sessions."""
    if not request.HasField("frame") and len(request.sessions) == 1:
        return request.sessions[0].session_id
    return gateway_id


@dataclass(frozen=True)
class StepResult:
    session_id: str
    seq: int
    next_seq: int
    y: np.ndarray  # [steps, output_dim]; empty when top_k was asked for
    top_k: list[list[tuple[int, float]]]  # token models with top_k > 0: (token, prob) per step
    replayed: bool


@dataclass(frozen=True)
class ForecastOutput:
    y: np.ndarray  # real models: [horizon, output_dim]
    tokens: list[int]  # token models
    next_seq: int


@dataclass(frozen=True)
class SessionState:
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
    return pb.StepRequest(
        model=pb.ModelRef(name=model, version=version), sessions=list(sessions),
        request_id=request_id, top_k=top_k,
    )  # fmt: skip


def step_results(resp: pb.StepResponse, output_dim: int | None = None) -> list[StepResult]:
    out = []
    for s in resp.sessions:
        y = np.frombuffer(s.y, F32)
        y = y.reshape(s.steps, -1) if s.steps and y.size else y.reshape(s.steps, 0)
        top = [list(zip(t.tokens, t.probs, strict=True)) for t in s.top_k]
        out.append(StepResult(s.session_id, s.seq, s.next_seq, y, top, s.replayed))
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
    )


def _credentials(
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None
) -> grpc.ChannelCredentials | None:
    if root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


@dataclass
class Connection:
    """How to reach a server: target, optional TLS material and bearer token."""

    target: str
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        # The receive limit travels with every call: the server refuses, before applying
        # anything, a request whose answer this client could not receive.
        limit = (("lstm-serve-max-response-bytes", str(self.max_message_bytes)),)
        return (("authorization", f"Bearer {self.token}"), *limit) if self.token else limit

    def routed(self, route: str | None) -> tuple[tuple[str, str], ...]:
        """The metadata of a call, with its routing key."""
        return routed(self.metadata, route)

    @property
    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # After a server restart, be back within a fraction of a second, not gRPC's 1-120 s.
            # (min_reconnect_backoff stays at its default: it is also the connect timeout.)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        return _credentials(self.root_certificates, self.private_key, self.certificate_chain)


class Client:
    """Blocking client. Every call takes an optional timeout (seconds)."""

    def __init__(
        self, target: str | Connection, timeout: float | None = 30.0, gateway_id: str = ""
    ) -> None:
        self.conn = target if isinstance(target, Connection) else Connection(target)
        self.timeout = timeout
        # Routes this client's frames (of many sessions) to one replica.
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self._open()

    def _open(self) -> None:
        creds = self.conn.credentials()
        self.channel = (
            grpc.secure_channel(self.conn.target, creds, self.conn.options)
            if creds
            else grpc.insecure_channel(self.conn.target, self.conn.options)
        )
        self.stub = pb_grpc.LstmServeStub(self.channel)

    def reconnect(self) -> None:
        self.channel.close()
        self._open()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kw(self, timeout: float | None, route: str | None = None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self.conn.routed(route)}

    def step(self, request: pb.StepRequest, timeout: float | None = None) -> list[StepResult]:
        """Send one request (one session or a gateway frame of many)."""
        kw = self._kw(timeout, route_of(request, self.gateway_id))
        return step_results(self.stub.Predict(request, **kw))

    def step_frame(
        self, model: str, session_ids: Sequence[str], x: np.ndarray,
        seqs: Sequence[int] | np.ndarray | None = None,
        resets: Sequence[bool] | np.ndarray | None = None, *, version: str = "",
        top_k: int = 0, timeout: float | None = None,
    ) -> FrameResult:  # fmt: skip
        """Many sessions' steps in one columnar message (see frame_request), run as one batch."""
        req = frame_request(model, session_ids, x, seqs, resets, version=version, top_k=top_k)
        return frame_result(req, self.stub.Predict(req, **self._kw(timeout, self.gateway_id)))

    def predict(
        self, model: str, session_id: str, x: ArrayLike | None = None, *,
        tokens: Sequence[int] | None = None, seq: int | None = None, reset: bool = False,
        version: str = "", top_k: int = 0, timeout: float | None = None,
    ) -> StepResult:  # fmt: skip
        req = step_request(
            model, [session_steps(session_id, x, tokens, seq, reset)], version, top_k=top_k
        )
        return self.step(req, timeout)[0]

    def forecast(
        self, model: str, session_id: str, horizon: int, *, version: str = "",
        temperature: float = 0.0, top_k: int = 0, seed: int = 0, commit: bool = False,
        prefix: pb.SessionSteps | None = None, timeout: float | None = None,
    ) -> ForecastOutput:  # fmt: skip
        req = pb.ForecastRequest(
            model=pb.ModelRef(name=model, version=version), session_id=session_id,
            horizon=horizon, temperature=temperature, top_k=top_k, seed=seed, commit=commit,
        )  # fmt: skip
        if prefix is not None:
            req.prefix.CopyFrom(prefix)
        r = self.stub.Forecast(req, **self._kw(timeout, session_id))
        y = np.frombuffer(r.y, F32).reshape(r.steps, -1) if r.y else np.empty((r.steps, 0), F32)
        return ForecastOutput(y, list(r.tokens), r.next_seq)

    def _ref(self, model: str, session_id: str, version: str) -> pb.SessionRef:
        return pb.SessionRef(model=pb.ModelRef(name=model, version=version), session_id=session_id)

    @staticmethod
    def _state(info: pb.SessionInfo) -> SessionState:
        return SessionState(info.session_id, info.exists, info.next_seq, info.idle_seconds)

    def get_session(self, model: str, session_id: str, version: str = "") -> SessionState:
        return self._state(
            self.stub.GetSession(
                self._ref(model, session_id, version), **self._kw(None, session_id)
            )
        )

    def reset_session(self, model: str, session_id: str, version: str = "") -> SessionState:
        return self._state(
            self.stub.ResetSession(
                self._ref(model, session_id, version), **self._kw(None, session_id)
            )
        )

    def end_session(self, model: str, session_id: str, version: str = "") -> SessionState:
        return self._state(
            self.stub.EndSession(
                self._ref(model, session_id, version), **self._kw(None, session_id)
            )
        )

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), **self._kw(None)).models)

    def get_model(self, model: str, version: str = "") -> pb.ModelInfo:
        info: pb.ModelInfo = self.stub.GetModel(
            pb.ModelRef(name=model, version=version), **self._kw(None)
        )
        return info

    def health(self, service: str = "", timeout: float | None = None) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def session(self, model: str, session_id: str, version: str = "", **kw: Any) -> SessionStream:
        return SessionStream(self, model, session_id, version, **kw)


class SessionStream:
    """One session over a bidirectional stream, steps numbered by the stream itself.

    After a disconnect it reconnects and resends every unanswered request with its seq: the
    server answers the ones it had applied from its replay cache and applies the rest, so no
    step is lost or applied twice.
    """

    def __init__(
        self, client: Client, model: str, session_id: str, version: str = "",
        start_seq: int | None = None, max_retries: int = 8, backoff_s: float = 0.05,
    ) -> None:  # fmt: skip
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
                    raise
                self.reconnects += 1
                # A new call on the same channel: the channel reconnects by itself, and the
                # client's other streams on it are left alone.
                threading.Event().wait(self.backoff_s * (2**attempt))
        raise AssertionError("unreachable")


class AsyncClient:
    """asyncio client, same calls as Client."""

    def __init__(
        self, target: str | Connection, timeout: float | None = 30.0, gateway_id: str = ""
    ) -> None:
        self.conn = target if isinstance(target, Connection) else Connection(target)
        self.timeout = timeout
        # Routes this client's frames (of many sessions) to one replica.
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self._open()

    def _open(self) -> None:
        creds = self.conn.credentials()
        self.channel = (
            grpc.aio.secure_channel(self.conn.target, creds, self.conn.options)
            if creds
            else grpc.aio.insecure_channel(self.conn.target, self.conn.options)
        )
        self.stub = pb_grpc.LstmServeStub(self.channel)

    async def reconnect(self) -> None:
        await self.channel.close(None)
        self._open()

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _kw(self, timeout: float | None, route: str | None = None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self.conn.routed(route)}

    async def step(self, request: pb.StepRequest, timeout: float | None = None) -> list[StepResult]:
        kw = self._kw(timeout, route_of(request, self.gateway_id))
        return step_results(await self.stub.Predict(request, **kw))

    async def step_frame(
        self, model: str, session_ids: Sequence[str], x: np.ndarray,
        seqs: Sequence[int] | np.ndarray | None = None,
        resets: Sequence[bool] | np.ndarray | None = None, *, version: str = "",
        top_k: int = 0, timeout: float | None = None,
    ) -> FrameResult:  # fmt: skip
        """Many sessions' steps in one columnar message (see frame_request), run as one batch."""
        req = frame_request(model, session_ids, x, seqs, resets, version=version, top_k=top_k)
        kw = self._kw(timeout, self.gateway_id)
        return frame_result(req, await self.stub.Predict(req, **kw))

    async def predict(
        self, model: str, session_id: str, x: ArrayLike | None = None, *,
        tokens: Sequence[int] | None = None, seq: int | None = None, reset: bool = False,
        version: str = "", top_k: int = 0, timeout: float | None = None,
    ) -> StepResult:  # fmt: skip
        req = step_request(
            model, [session_steps(session_id, x, tokens, seq, reset)], version, top_k=top_k
        )
        return (await self.step(req, timeout))[0]

    async def get_session(self, model: str, session_id: str, version: str = "") -> SessionState:
        ref = pb.SessionRef(model=pb.ModelRef(name=model, version=version), session_id=session_id)
        info = await self.stub.GetSession(ref, **self._kw(None, session_id))
        return SessionState(info.session_id, info.exists, info.next_seq, info.idle_seconds)

    async def end_session(self, model: str, session_id: str, version: str = "") -> SessionState:
        ref = pb.SessionRef(model=pb.ModelRef(name=model, version=version), session_id=session_id)
        info = await self.stub.EndSession(ref, **self._kw(None, session_id))
        return SessionState(info.session_id, info.exists, info.next_seq, info.idle_seconds)

    def session(
        self, model: str, session_id: str, version: str = "", **kw: Any
    ) -> AsyncSessionStream:
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
            failure = error if error is not None else ConnectionError("stream ended")
            while self._unacked:
                _, fut = self._unacked.popleft()
                if not fut.done():
                    fut.set_exception(failure)

    async def send(
        self, x: ArrayLike | None = None, tokens: Sequence[int] | None = None, top_k: int = 0
    ) -> StepResult:
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
        async for x in xs:
            yield await self.send(x)


def _steps(x: ArrayLike | None, tokens: Sequence[int] | None) -> int:
    """Steps in one send: x is [steps, features] (a 1-D x is one step), tokens one per step."""
    if tokens is not None:
        return len(tokens)
    a = np.asarray(x, F32)
    return 1 if a.ndim < 2 else int(a.shape[0])
