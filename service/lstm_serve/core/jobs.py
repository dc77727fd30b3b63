"""What the scheduler queues and answers: jobs, their results, and the limits of a tick.

Plain data, no behaviour: batch.py builds a tick from jobs, commit.py turns its outputs into
results, and the scheduler alone resolves the jobs' futures.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lstm_serve.core.frame import Frame
from lstm_serve.core.rollout import Rollout
from lstm_serve.core.store import CapPolicy

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # y, hn, cn


class Runner(Protocol):
    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Outputs: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_batch: int = 1024  # most rows in one inference call
    max_queue: int = 4096  # most sessions waiting
    inline_max_steps: int = 128  # batches of up to this many session-steps run on the loop
    cap_policy: CapPolicy = CapPolicy.refuse
    stall_s: float = 120.0  # an inference call longer than this is a dead worker
    # Batches in the executor at once: with 2 the loop prepares the next batch (of other
    # sessions) while one runs; 1 runs them strictly one after another.
    max_batches_in_flight: int = 2


@dataclass(slots=True)
class StepResult:
    ids: list[str]
    seq: np.ndarray  # int64 [n]: seq of each session's first step
    next_seq: np.ndarray  # int64 [n]
    replayed: np.ndarray  # bool [n]
    y: np.ndarray | list[np.ndarray]  # per session [steps, output_dim]; an ndarray when uniform
    # The model version that ran the request; "" when its sessions ran on several versions,
    # then versions names each session's.
    version: str = ""
    versions: list[str] | None = None


@dataclass(slots=True)
class SessionStatus:
    session_id: str
    exists: bool
    next_seq: int
    idle_seconds: float


@dataclass(eq=False, slots=True)
class StepJob:
    frame: Frame
    keys: list[str]
    future: asyncio.Future[StepResult]
    deadline: float | None
    t0: float
    rows: int
    steps: int  # session-steps
    method: str = "Step"


@dataclass(eq=False, slots=True)
class OpJob:
    """ResetSession or EndSession: applied in its turn, without inference."""

    kind: str  # "reset" | "end"
    session_id: str
    keys: list[str]
    future: asyncio.Future[SessionStatus]
    deadline: float | None
    t0: float
    method: str
    rows: int = 0
    steps: int = 0


Job = StepJob | OpJob | Rollout
