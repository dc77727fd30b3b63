"""Settings for an Engine built in a test without the gRPC server (core/engine.EngineSettings)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.jobs import StepResult
from lstm_serve.core.probes import no_probes
from lstm_serve.core.repository import load_repository
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
    state_on_device: bool = True
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


def run_engine(body: Callable[[Engine], Awaitable[Any]], repo: Path, **settings: Any) -> None:
    """Start an Engine (no gRPC) on repo with these Settings fields changed, run body with it,
    then drain and close it."""

    async def main() -> None:
        engine = Engine(Settings(**settings), load_repository(repo), lambda label: no_probes())
        await engine.start()
        try:
            await body(engine)
        finally:
            await engine.drain(10)
            await engine.close()

    asyncio.run(main())


async def step_tiny(
    engine: Engine, sid: str, x: np.ndarray, version: str = "", seq: int | None = None,
    reset: bool = False,
) -> StepResult:  # fmt: skip
    """One request of one session on the tiny model."""
    return await engine.submit_step("tiny", version, F.single(sid, x, seq, reset))
