"""Settings for an Engine built in a test without the gRPC server (core/engine.EngineSettings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lstm_serve.core.runtime import Device
from lstm_serve.core.store import CapPolicy
from lstm_serve.core.sync import AnswerMode


@dataclass
class Settings:
    """What the engine reads (core.engine.EngineSettings), for an in-process replica."""

    device: Device = Device.cpu
    intra_op_threads: int = 1
    max_batch_size: int = 64
    max_queue: int = 256
    inline_max_steps: int = 128
    cuda_cpu_max_steps: int = 0
    inference_stall_s: float = 60.0
    max_batches_in_flight: int = 2
    max_steps_per_request: int = 1024
    max_sessions_per_request: int = 64
    max_sessions: int = 64
    cap_policy: CapPolicy = CapPolicy.refuse
    session_ttl_s: float = 3600.0
    unload_drain_s: float = 300.0
    reap_interval_s: float = 3600.0
    replay_cache_bytes: int = 1 << 20
    max_forecast_horizon: int = 64
    snapshot_dir: Path | None = None
    snapshot_interval_s: float = 0.0
    state_store: str = "memory"  # the engine's own; the shared store is attached below
    state_answer: AnswerMode = AnswerMode.acked
    state_store_timeout_s: float = 2.0
    state_replies: int = 8
