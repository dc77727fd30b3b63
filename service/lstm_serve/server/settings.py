"""Settings: the one source of configuration (environment variables LSTM_SERVE_*, or serve flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lstm_serve.core.runtime import Device
from lstm_serve.core.store import CapPolicy
from lstm_serve.core.sync import AnswerMode
from lstm_serve.core.versions import ModelControl

DEFAULT_MODELS = Path(__file__).resolve().parents[3] / "models"


class Settings(BaseSettings):
    """lstm-serve settings. Every field is an environment variable LSTM_SERVE_<NAME> and a flag."""

    model_config = SettingsConfigDict(env_prefix="LSTM_SERVE_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_host: str = Field(
        "127.0.0.1", description="Address of the Prometheus metrics HTTP server."
    )
    metrics_port: int = Field(
        9400,
        ge=-1,
        le=65535,
        description="Prometheus metrics HTTP port (0 picks a free one, -1 disables).",
    )
    health_host: str = Field(
        "127.0.0.1", description="Address of the plaintext health-only gRPC port."
    )
    health_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="A plaintext port serving only grpc.health.v1 (0 picks a free one, -1 disables): for probes that cannot speak the main port's TLS or mTLS, such as the image's HEALTHCHECK and Kubernetes gRPC probes.",
    )
    http_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="Port of the Open Inference Protocol's HTTP/REST form (KServe v2 REST, as Triton's HTTP endpoint), on the gRPC host with the same TLS and tokens, over the same sessions (0 picks a free one, -1 disables).",
    )
    model_repository: Path = Field(
        DEFAULT_MODELS, description="Directory of models/<name>/<version>/."
    )
    model_control: ModelControl = Field(
        ModelControl.none,
        description="How versions change while serving: none (those found at start), poll (the repository is read every model_poll_s: new versions load, removed ones unload) or explicit (load and unload requests: the Open Inference Protocol's repository calls, `lstm-serve models load|unload`).",
    )
    model_poll_s: float = Field(
        10.0, gt=0, description="With model_control poll: seconds between looks at the repository."
    )
    unload_drain_s: float = Field(
        300.0,
        ge=0,
        description="After a version is unloaded, how long its sessions may go on (new sessions go to the default version at once); later steps on it are refused, naming it.",
    )
    admin_clients: str = Field(
        "",
        description="Comma-separated client names (from the auth tokens) allowed to load and unload models; with tokens set, no one else may. Without tokens anyone reaching the port may.",
    )
    device: Device = Field(
        Device.auto, description="auto (CUDA when usable, else CPU), cpu or cuda."
    )
    intra_op_threads: int = Field(
        1,
        ge=0,
        description="ONNX Runtime intra-op threads per model (0: one per core). One leaves the other cores to gRPC.",
    )
    max_batch_size: int = Field(
        1024,
        ge=1,
        description="Most sessions run in one scheduler tick and one inference call: several gateway frames share a call.",
    )
    inline_max_steps: int = Field(
        128,
        ge=0,
        description="Batches of up to this many session-steps run ONNX Runtime on the event loop (no thread hop; the loop waits for it); larger ones in a thread (0: always a thread). Chosen with scripts/inline_threshold.py.",
    )
    cuda_cpu_max_steps: int = Field(
        128,
        ge=0,
        description="On CUDA, batches of up to this many session-steps run on a CPU session instead: for them the GPU's copies and launches cost more than the CPU's arithmetic (one-step latency stays the CPU's). 0: every batch on the GPU. Ignored on the CPU.",
    )
    state_on_device: bool = Field(
        True,
        description="On CUDA, keep every session's h and c in GPU memory (CuPy, the gpu extra): a tick gathers and scatters them by slot on the device and binds them to ONNX Runtime, so only inputs, outputs and slot indices cross the bus. Without CuPy, or false, state stays on the host. Ignored on the CPU.",
    )
    max_batches_in_flight: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches handed to the inference thread at once: with 2 the event loop prepares the next batch (of other sessions) while one runs; 1 runs them strictly one after another.",
    )
    inference_stall_s: float = Field(
        120.0,
        gt=0,
        description="An inference call running longer than this counts as a dead worker: its model answers UNAVAILABLE and turns NOT_SERVING.",
    )
    max_queue: int = Field(
        4096,
        ge=1,
        description="Most sessions waiting per model (a frame counts each of its sessions; the batches handed to the inference thread, max_batches_in_flight of max_batch_size rows at most, are not waiting); requests beyond it are refused (RESOURCE_EXHAUSTED), except one alone in an empty queue.",
    )
    max_steps_per_request: int = Field(
        4096, ge=1, description="Most steps one session may send in one request."
    )
    max_sessions_per_request: int = Field(
        1024, ge=1, description="Most sessions in one request (gateway frame)."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, in bytes."
    )
    keepalive_time_s: float = Field(
        60.0,
        gt=0,
        description="The server pings a connection after this long without activity, to find dead peers.",
    )
    keepalive_timeout_s: float = Field(
        20.0,
        gt=0,
        description="A connection whose peer does not answer a ping within this is closed (also half-open ones holding a half-sent message).",
    )
    max_connection_idle_s: float = Field(
        300.0,
        gt=0,
        description="A connection with no open call for this long is closed (GOAWAY; clients reconnect on their next call).",
    )
    max_connection_age_s: float = Field(
        3600.0,
        gt=0,
        description="Connections are asked to reconnect after this long, so load spreads over new replicas.",
    )
    max_connection_age_grace_s: float = Field(
        300.0,
        ge=0,
        description="Calls still open when a connection reaches its age get this long to finish.",
    )
    handshake_timeout_s: float = Field(
        20.0,
        gt=0,
        description="A new connection that has not finished its TLS/HTTP2 handshake within this is closed.",
    )
    max_concurrent_streams: int = Field(
        256, ge=1, description="Most calls open at once on one connection (HTTP/2 streams)."
    )
    max_inflight_per_stream: int = Field(
        32, ge=1, description="Requests of one stream being worked on at once (pipelining window)."
    )
    max_sessions: int = Field(
        100_000, ge=1, description="Most live sessions per model version (the state arena's size)."
    )
    cap_policy: CapPolicy = Field(
        CapPolicy.refuse,
        description="At the session cap: refuse new sessions (RESOURCE_EXHAUSTED) or evict the least recently used.",
    )
    session_ttl_s: float = Field(
        3600.0, gt=0, description="Idle sessions are expired after this many seconds."
    )
    reap_interval_s: float = Field(5.0, gt=0, description="How often idle sessions are looked for.")
    replay_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Memory for recent responses, so retried requests are answered again, not reapplied.",
    )
    max_forecast_horizon: int = Field(4096, ge=1, description="Longest Forecast horizon.")
    snapshot_dir: Path | None = Field(
        None, description="Where sessions are snapshotted and restored from (unset: no snapshots)."
    )
    snapshot_interval_s: float = Field(
        30.0, ge=0, description="Seconds between periodic snapshots (0: only at graceful stop)."
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight requests get to finish."
    )
    tls_cert: Path | None = Field(
        None, description="PEM server certificate (enables TLS with tls_key)."
    )
    tls_key: Path | None = Field(None, description="PEM server private key.")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS).",
    )
    auth_tokens_file: Path | None = Field(
        None,
        description="File of 'client-name token' lines; when set, requests need a bearer token.",
    )
    auth_tokens: str = Field(
        "", description="Comma-separated 'client-name:token' pairs, added to auth_tokens_file's."
    )
    state_store: str = Field(
        "memory",
        pattern=r"^(memory|rediss?://.+)$",
        description="Where session state lives: memory (this process) or a redis:// URL shared by replicas.",
    )
    state_answer: AnswerMode = Field(
        AnswerMode.acked,
        description="With a shared store: answer a step after the store acknowledged it (acked: nothing answered is lost) or at once (early: a crash loses the steps not yet written).",
    )
    state_store_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of one call to the shared session store."
    )
    state_replies: int = Field(
        32,
        ge=1,
        description="With a shared store: replies kept per session there, so that retries of that many pipelined requests are answered again on any replica.",
    )
    log_level: str = Field("INFO", description="Python logging level.")

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self
