"""Forecast roll-outs: a session rolled forward, each prediction fed back as the next input.

A roll-out holds its session for its whole life and adds one row to each scheduler tick, so a
horizon of H costs H ticks shared with everyone else's steps, and no thread round trips.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lstm_serve.core.errors import InvalidArgument, NotFound, SeqGap
from lstm_serve.core.frame import APPEND, Frame
from lstm_serve.core.store import SessionStore


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class ForecastResult:
    session_id: str
    y: np.ndarray  # real models: [horizon, output_dim]; token models: [horizon, vocab] probs
    tokens: np.ndarray  # token models: [horizon] ids; real models: empty
    next_seq: int


@dataclass(eq=False, slots=True)
class Rollout:
    key: str
    session_id: str
    horizon: int
    commit: bool
    sampling: Sampling
    token: bool
    prefix: Frame | None
    future: asyncio.Future[ForecastResult]
    deadline: float | None
    t0: float
    method: str = "Forecast"
    keys: list[str] = field(default_factory=list)
    rows: int = 1
    steps: int = 1
    # State while rolling, set by start(): [layers, hidden] where the store's state lives.
    h: Any = field(default_factory=lambda: np.empty(0, np.float32))
    c: Any = field(default_factory=lambda: np.empty(0, np.float32))
    last_y: np.ndarray | None = None
    next_seq: int = 0
    reset: bool = False
    k: int = 0
    preds: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    prefix_x: np.ndarray | None = None  # the prefix, run first
    pending_x: np.ndarray | None = None  # the input of the current tick
    rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self.keys = [self.key]
        if self.prefix is not None:
            self.steps = int(self.prefix.blocks[0].x.shape[1])

    def start(self, store: SessionStore) -> np.ndarray | None:
        """Read the session's state; returns the first input to run (None: nothing to run)."""
        slot = store.slot(self.key)
        self.reset = self.prefix is not None and bool(self.prefix.reset[0])
        if slot is None and self.prefix is None:
            raise NotFound(f"session {self.session_id!r} not found; send a prefix to start it")
        if slot is None or self.reset:
            h, c = store.zero_state(1)
            self.h, self.c, self.next_seq, self.last_y = h[:, 0], c[:, 0], 0, None
        else:
            h, c = store.gather_one(slot)  # where the state lives
            self.h, self.c = h[:, 0], c[:, 0]
            self.next_seq = int(store.next_seq[slot])
            self.last_y = None if self.next_seq == 0 else store.last_y[slot].copy()
        if self.prefix is not None:
            seq = int(self.prefix.seq[0])
            if seq != APPEND and seq != self.next_seq:
                raise SeqGap(self.session_id, self.next_seq, seq)
            self.prefix_x = self.prefix.blocks[0].x
        elif self.last_y is None:
            raise InvalidArgument(f"session {self.session_id!r} has no steps yet; send a prefix")
        out_dim = store.last_y.shape[1]
        self.preds = np.empty((self.horizon, out_dim), np.float32)
        self.tokens = np.empty(self.horizon if self.token else 0, np.int64)
        self.rng = np.random.default_rng(self.sampling.seed if self.sampling.seed else None)
        return self.feed()

    def feed(self) -> np.ndarray | None:
        """The next input ([1, steps, ...]), or None when the roll-out is complete."""
        if self.prefix_x is not None:
            x, self.prefix_x = self.prefix_x, None
            return x
        if self.k >= self.horizon:
            return None
        assert self.last_y is not None and self.rng is not None
        k = self.k
        self.preds[k] = self.last_y
        if self.token:
            self.tokens[k] = choose_token(self.last_y, self.sampling, self.rng)
            x = self.tokens[k : k + 1].reshape(1, 1)
        else:
            x = self.last_y.reshape(1, 1, -1)
        self.k += 1
        if self.k == self.horizon and not self.commit:
            return None  # the last prediction needs no further step
        return x

    def advance(self, y: np.ndarray, h: Any, c: Any) -> None:
        """Take one run's outputs: y [steps, out], h and c [layers, hidden]."""
        self.h, self.c, self.last_y = h, c, y[-1].copy()
        self.pending_x = None
        self.next_seq += y.shape[0]

    def result(self, store_next_seq: int) -> ForecastResult:
        next_seq = self.next_seq if self.commit else store_next_seq
        return ForecastResult(self.session_id, self.preds, self.tokens, next_seq)


def choose_token(probs: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature == 0:
        return int(np.argmax(probs))
    logits = np.log(np.clip(probs.astype(np.float64), 1e-30, None)) / sampling.temperature
    if 0 < sampling.top_k < logits.size:
        cut = np.partition(logits, -sampling.top_k)[-sampling.top_k]
        logits = np.where(logits >= cut, logits, -np.inf)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))
