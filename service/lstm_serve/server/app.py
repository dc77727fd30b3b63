"""The gRPC server: aio server, health, reflection, interceptors, metrics port, graceful stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from lstm_serve.core.engine import Engine
from lstm_serve.core.repository import (
    LoadError,
    is_model_name,
    is_version,
    load_repository,
    model_dirs,
)
from lstm_serve.core.versions import ModelControl
from lstm_serve.server import kserve_http, reflection
from lstm_serve.server.interceptors import (
    Authenticator,
    AuthInterceptor,
    Interceptor,
    StatusInterceptor,
    load_tokens,
)
from lstm_serve.server.kserve import InferenceServicer
from lstm_serve.server.metrics import Metrics, serve_metrics
from lstm_serve.server.model_control import ModelControlCalls
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc
from lstm_serve.server.servicer import LstmServeServicer
from lstm_serve.server.settings import Settings
from lstm_serve.server.statistics import Statistics

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
        self.http_port = 0
        self._health_server: grpc.aio.Server | None = None
        # The Open Inference Protocol's HTTP/REST form (http_port >= 0): bound with the other
        # ports, started after the models load.
        self._http: kserve_http.HttpServer | None = None
        # Bound but not yet started (start() releases them when it fails).
        self._unstarted: grpc.aio.Server | None = None
        self._unstarted_health: grpc.aio.Server | None = None
        self._engine_started = False
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._poller: asyncio.Future[None] | None = None
        self._model_names: set[str] = set()

    async def start(self) -> None:
        """Bind every port, then load the models and serve. A port that is taken fails before
        the models load, with a StartupError naming it, and leaves nothing running."""
        try:
            await self._start()
        except BaseException:
            await self._release()
            raise

    async def _start(self) -> None:
        s = self.settings
        repo = load_repository(s.model_repository)
        for err in repo.errors:
            logger.error("model repository: %s", err)
        if not repo.models:
            raise RuntimeError(f"no loadable model in {s.model_repository}")
        # Every model directory's series exist from the start, at 0 (see track_models).
        self.metrics.track_models(
            d.name for d in model_dirs(s.model_repository) if is_model_name(d.name)
        )
        for name in refused_versions(s.model_repository, repo.errors):
            self.metrics.count_load_failure(name)
        self.engine = Engine(s, repo, self.metrics.probes, self.metrics.count_request)
        self.engine.on_model_failed = self._model_failed
        # Set before start: the engine reports the versions whose warm-up run fails there.
        self.engine.on_load_failed = self._load_failed
        interceptors: list[Interceptor] = [StatusInterceptor(self.metrics)]
        tokens = load_tokens(s.auth_tokens_file, s.auth_tokens)
        if tokens or s.tls_client_ca is not None:
            interceptors.append(AuthInterceptor(tokens, mtls=s.tls_client_ca is not None))
        if tokens and s.tls_cert is None:
            logger.warning(
                "auth tokens are set but TLS is not: bearer tokens cross the network in clear "
                "text; set --tls-cert and --tls-key (LSTM_SERVE_TLS_CERT, LSTM_SERVE_TLS_KEY), "
                "or keep the port on a network where TLS ends in front of it"
            )
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *connection_options(s),
        ]
        server = self._unstarted = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_LstmServeServicer_to_server(
            self._lstm_servicer
            or LstmServeServicer(self.engine, s.max_inflight_per_stream, s.max_message_bytes),
            server,
        )
        # The Open Inference Protocol on the same port, onto the same engine.
        control = ModelControlCalls(
            self.engine, s.model_control, s.unload_drain_s,
            auth=bool(tokens) or s.tls_client_ca is not None,
            admins=frozenset(n.strip() for n in s.admin_clients.split(",") if n.strip()),
        )  # fmt: skip
        inference = InferenceServicer(
            self.engine, s.max_inflight_per_stream, s.max_message_bytes, control,
            Statistics(self.engine, self.metrics),
        )  # fmt: skip
        ipb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
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
        creds = None
        if s.tls_cert is not None and s.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                root_certificates=s.tls_client_ca.read_bytes() if s.tls_client_ca else None,
                require_client_auth=s.tls_client_ca is not None,
            )
        # Every port is bound before the models load (seconds to minutes): a taken port fails
        # at once. Serving starts after they load.
        self.port = _bind(server, s.host, s.port, "gRPC", "port", creds)
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = _serve_metrics(
                self.metrics, s.metrics_host, s.metrics_port
            )
        if s.http_port >= 0:
            # Its HTTP/REST form: the gRPC host, TLS and tokens, a port of its own.
            auth = (
                Authenticator(tokens, mtls=s.tls_client_ca is not None)
                if tokens or s.tls_client_ca is not None
                else None
            )
            ssl_ctx = (
                kserve_http.ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca)
                if s.tls_cert is not None and s.tls_key is not None
                else None
            )
            self._http = kserve_http.HttpServer(
                kserve_http.HttpFront(inference, auth),
                _bind_http(s.host, s.http_port),
                ssl_ctx,
                s.max_message_bytes,
            )
            self.http_port = self._http.port
        health_server = None
        if s.health_port >= 0:
            # A server of its own: the same health statuses, and nothing else, in plaintext.
            health_server = self._unstarted_health = grpc.aio.server(
                options=[("grpc.so_reuseport", 0)]
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_port = _bind(
                health_server, s.health_host, s.health_port, "health checks", "health_port"
            )
        await self.engine.start()
        self._engine_started = True
        await server.start()
        self.server, self._unstarted = server, None
        if health_server is not None:
            # Started after the models loaded: the health servicer answers SERVING for ""
            # from its creation.
            await health_server.start()
            self._health_server, self._unstarted_health = health_server, None
        if self._http is not None:
            await self._http.start(shutdown_timeout=min(s.grace_period_s, 1.0))
        for name in ("", SERVICE_NAME, INFERENCE_SERVICE_NAME, *repo.models):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._model_names = set(repo.models)
        self._count_versions()
        self.engine.on_versions_changed = self._versions_changed
        if s.model_control is ModelControl.poll:
            self._poller = asyncio.ensure_future(self._poll_models())
        store = self.engine.store_health
        if store is not None:
            store.on_change = self._store_refused
            if store.refused is not None:
                self._store_refused(store.refused)
        metrics_at = (
            f"{s.metrics_host}:{self.metrics_port}"
            if self._metrics_http
            else "off (metrics_port -1)"
        )
        http_at = f"{s.host}:{self.http_port}" if self._http else "off (http_port -1)"
        logger.info(
            "lstm-serve listening on %s:%d (%s), HTTP/REST %s, metrics %s, models: %s",
            s.host, self.port, "TLS" if s.tls_cert else "plaintext", http_at, metrics_at,
            ", ".join(lm.label for lm in self.engine.models.values()),
        )  # fmt: skip

    async def _release(self) -> None:
        """Undo a start that failed. Servers left to the garbage collector would try to shut
        down on a closed event loop ("Event loop is closed") and bury the real error."""
        for server in (self._unstarted, self._unstarted_health, self.server, self._health_server):
            if server is not None:
                await server.stop(None)
        self._unstarted = self._unstarted_health = self.server = self._health_server = None
        if self._http is not None:
            await self._http.stop()  # closes its socket, started or only bound
            self._http = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        # Only a started engine is closed: closing writes a snapshot, and one written by an
        # engine that never loaded its sessions would replace the sessions on disk.
        if self.engine is not None and self._engine_started:
            await self.engine.close()

    def _model_failed(self, name: str, reason: str) -> None:
        # A model that cannot answer makes the server unfit for traffic: orchestrators restart
        # it on the server's health ("") and load balancers eject it.
        async def mark() -> None:
            for service in (name, SERVICE_NAME, INFERENCE_SERVICE_NAME, ""):
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

        self._background.add(task := asyncio.ensure_future(mark()))
        task.add_done_callback(self._background.discard)

    def _load_failed(self, name: str, reason: str) -> None:
        # The engine names only model directories of the repository (a load request for any
        # other name is refused before); checked here too, as each name is a series for good.
        if is_model_name(name) and (self.settings.model_repository / name).is_dir():
            self.metrics.count_load_failure(name)

    def _versions_changed(self) -> None:
        self._count_versions()
        self._mark_health()

    def _count_versions(self) -> None:
        """lstm_serve_model_versions as the engine stands; a freed version's series go."""
        assert self.engine is not None
        self.metrics.set_versions(
            (lm.mv.manifest.name, lm.label, lm.retired_at is None)
            for lm in self.engine.models.values()
        )

    def _store_refused(self, reason: str | None) -> None:
        # A shared store that refuses this replica (its password, its TLS settings) is this
        # replica's fault, unlike the store's outage: out of the load balancer until the store
        # accepts it again (reason None), when health follows the models' state again.
        self._mark_health()

    def _mark_health(self) -> None:
        """Health as the engine stands: the server's, and each model name's (SERVING while it
        has a version that takes new sessions; names whose last version went: NOT_SERVING)."""
        engine = self.engine
        assert engine is not None

        async def mark() -> None:
            up, down = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            for service in ("", SERVICE_NAME, INFERENCE_SERVICE_NAME):
                await self.health.set(service, up if engine.ready else down)
            self._model_names.update(engine.repository.models)
            for name in sorted(self._model_names):
                await self.health.set(name, up if engine.model_ready(name) else down)

        self._background.add(task := asyncio.ensure_future(mark()))
        task.add_done_callback(self._background.discard)

    async def _poll_models(self) -> None:
        """model_control poll: versions follow the repository directory."""
        assert self.engine is not None
        s = self.settings
        while True:
            await asyncio.sleep(s.model_poll_s)
            try:
                loaded, unloaded = await self.engine.poll(s.unload_drain_s)
                if loaded or unloaded:
                    logger.info("models polled: loaded %s, unloading %s", loaded, unloaded)
            except Exception:
                logger.exception("polling the model repository failed")

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new work, drain, snapshot, close. Safe to call again,
        concurrently too (a second SIGTERM): later callers wait for the first stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.grace_period_s if grace is None else grace
        logger.info("stopping: draining for up to %.1fs", grace)
        if self._http is not None:
            self._http.front.draining = True  # /v2/health/ready fails from now on
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:  # no version loads or unloads while stopping
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.engine is not None:
            self.engine.stop_accepting()
            await self.engine.drain(grace)
        if self.server is not None:
            await self.server.stop(min(grace, 1.0))
        if self._http is not None:  # stop listening, answer what is in flight, close
            await self._http.stop()
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


def refused_versions(root: Path, errors: list[LoadError]) -> list[str]:
    """The model name of each version that load_repository refused, once per version however
    many errors it had: the first two path components under root. Errors not about a version
    of a model directory (the root itself) are left out."""
    versions: set[tuple[str, str]] = set()
    for err in errors:
        try:
            parts = err.path.relative_to(root).parts
        except ValueError:
            continue
        if len(parts) >= 2 and is_model_name(parts[0]) and is_version(parts[1]):
            versions.add((parts[0], parts[1]))
    return [name for name, _ in sorted(versions)]


class StartupError(RuntimeError):
    """The server cannot start as configured (a port is taken); the message says what to change."""


def _bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    what: str,
    setting: str,
    creds: grpc.ServerCredentials | None = None,
) -> int:
    address = f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(address, creds)
            if creds is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:  # grpcio raises "Failed to bind to address ..."; older ones return 0
        bound = 0
    if bound == 0:
        raise StartupError(
            f"cannot listen on {address} for {what} ({_why_not(host, port)}): choose another "
            f"port with {_flag_and_env(setting)} (0 picks a free one), or another address "
            f"with {_flag_and_env(setting.replace('port', 'host'))}"
        )
    return bound


def _why_not(host: str, port: int) -> str:
    """Why host:port cannot be bound, in the OS's words: gRPC's own error does not say."""
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as probe:
                # As gRPC binds: a port left in TIME_WAIT is not "in use".
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
    except OSError as exc:
        return str(exc.strerror or exc)
    return "gRPC could not bind it"


def _bind_http(host: str, port: int) -> socket.socket:
    try:
        return kserve_http.bind(host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {host}:{port} for HTTP/REST ({exc.strerror or exc}): choose "
            f"another port with {_flag_and_env('http_port')} (0 picks a free one, -1 turns it "
            f"off), or another address with {_flag_and_env('host')}"
        ) from exc


def _serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[object, int]:
    try:
        return serve_metrics(metrics, host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): choose another "
            f"port with {_flag_and_env('metrics_port')} (0 picks a free one, -1 turns metrics "
            "off)"
        ) from exc


def _flag_and_env(setting: str) -> str:
    return f"--{setting.replace('_', '-')} or LSTM_SERVE_{setting.upper()}"


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
            field = Settings.model_fields.get(name)
            if field is None:
                logger.error("invalid setting %s: %s", name, err["msg"])
            else:  # say how it is set and what it means, beside what is wrong
                logger.error(
                    "invalid setting %s (%s): %s; %s",
                    name, _flag_and_env(name), err["msg"], field.description,
                )  # fmt: skip
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        asyncio.run(serve(settings))
    except (RuntimeError, ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    return 0
