"""The gRPC server: aio server, health, reflection, interceptors, metrics port, graceful stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from lstm_serve.core.engine import Engine
from lstm_serve.core.repository import load_repository
from lstm_serve.server import reflection
from lstm_serve.server.interceptors import (
    AuthInterceptor,
    Interceptor,
    StatusInterceptor,
    load_tokens,
)
from lstm_serve.server.kserve import InferenceServicer
from lstm_serve.server.metrics import Metrics, serve_metrics
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc
from lstm_serve.server.servicer import LstmServeServicer
from lstm_serve.server.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmServe"].full_name
INFERENCE_SERVICE_NAME = ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def connection_options(s: Settings) -> list[tuple[str, int]]:
    """HTTP/2 connection limits: dead, idle and half-open connections are closed, none lives
    forever, and one connection cannot open unbounded streams."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    return [
        ("grpc.keepalive_time_ms", ms(s.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(s.keepalive_timeout_s)),
        # Any ping the peer leaves unanswered this long closes the connection, and pings go
        # out even on a connection with nothing to send (a peer stuck mid-message).
        ("grpc.http2.ping_timeout_ms", ms(s.keepalive_timeout_s)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_idle_ms", ms(s.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(s.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(s.max_connection_age_grace_s)),
        ("grpc.server_handshake_timeout_ms", ms(s.handshake_timeout_s)),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        # Let clients keep their own keepalive pings (every 10 s or slower) without GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class LstmServer:
    """One lstm-serve process: start(), then stop() (graceful) or wait()."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        lstm_servicer: pb_grpc.LstmServeServicer | None = None,
    ) -> None:
        self.settings = settings
        # lstm_serve.v1 is answered by LstmServeServicer unless one is given (the benchmark's
        # lstm-serve-echo gives its echo, to measure the server without the engine).
        self._lstm_servicer = lstm_servicer
        self.metrics = Metrics.create(registry)
        self.engine: Engine | None = None
        self.server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        s = self.settings
        repo = load_repository(s.model_repository)
        for err in repo.errors:
            logger.error("model repository: %s", err)
        if not repo.models:
            raise RuntimeError(f"no loadable model in {s.model_repository}")
        self.engine = Engine(s, repo, self.metrics.probes, self.metrics.count_request)
        self.engine.on_model_failed = self._model_failed
        await self.engine.start()
        interceptors: list[Interceptor] = [StatusInterceptor(self.metrics)]
        tokens = load_tokens(s.auth_tokens_file, s.auth_tokens)
        if tokens or s.tls_client_ca is not None:
            interceptors.append(AuthInterceptor(tokens, mtls=s.tls_client_ca is not None))
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *connection_options(s),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_LstmServeServicer_to_server(
            self._lstm_servicer
            or LstmServeServicer(self.engine, s.max_inflight_per_stream, s.max_message_bytes),
            server,
        )
        # The Open Inference Protocol on the same port, onto the same engine.
        ipb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.engine, s.max_inflight_per_stream, s.max_message_bytes), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable(
            (
                SERVICE_NAME,
                INFERENCE_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{s.host}:{s.port}"
        if s.tls_cert is not None and s.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                root_certificates=s.tls_client_ca.read_bytes() if s.tls_client_ca else None,
                require_client_auth=s.tls_client_ca is not None,
            )
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await server.start()
        self.server = server
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(
                self.metrics, s.metrics_host, s.metrics_port
            )
        if s.health_port >= 0:
            await self._start_health_port(s.health_host, s.health_port)
        for name in ("", SERVICE_NAME, INFERENCE_SERVICE_NAME, *repo.models):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "lstm-serve listening on %s:%d (%s), metrics on %s:%d, models: %s",
            s.host, self.port, "TLS" if s.tls_cert else "plaintext", s.metrics_host,
            self.metrics_port, ", ".join(lm.label for lm in self.engine.models.values()),
        )  # fmt: skip

    async def _start_health_port(self, host: str, port: int) -> None:
        # A server of its own: the same health statuses, and nothing else, in plaintext.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = server.add_insecure_port(f"{host}:{port}")
        if self.health_port == 0:
            raise RuntimeError(f"could not bind the health port {host}:{port}")
        await server.start()
        self._health_server = server

    def _model_failed(self, name: str, reason: str) -> None:
        # A model that cannot answer makes the server unfit for traffic: orchestrators restart
        # it on the server's health ("") and load balancers eject it.
        async def mark() -> None:
            for service in (name, SERVICE_NAME, INFERENCE_SERVICE_NAME, ""):
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

        self._background.add(task := asyncio.ensure_future(mark()))
        task.add_done_callback(self._background.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new work, drain, snapshot, close. Safe to call again,
        concurrently too (a second SIGTERM): later callers wait for the first stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.grace_period_s if grace is None else grace
        logger.info("stopping: draining for up to %.1fs", grace)
        await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            self.engine.stop_accepting()
            await self.engine.drain(grace)
        if self.server is not None:
            await self.server.stop(min(grace, 1.0))
        if self.engine is not None:
            await self.engine.close()
        if self._health_server is not None:  # last: probes see NOT_SERVING until the end
            await self._health_server.stop(0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        logger.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> None:
    server = LstmServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(loop.create_task(server.stop())))
    await server.wait()


# -- command line: every Settings field is also a flag ----------------------------------------


def _flag_type(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and args:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str
    return annotation if annotation in (int, float, str, Path) else str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_flag_type(field.annotation),
            # SUPPRESS: an absent flag leaves the namespace alone (and the top-level
            # --log-level in place), so env and defaults apply.
            default=argparse.SUPPRESS,
            help=f"{field.description} (env LSTM_SERVE_{name.upper()}; default {field.default})",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            logger.error("invalid setting %s: %s", name, err["msg"])
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        asyncio.run(serve(settings))
    except (RuntimeError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    return 0
