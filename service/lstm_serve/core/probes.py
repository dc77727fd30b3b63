"""What the core reports, as the few methods it calls: the server backs them with Prometheus
children (server/metrics.py), the core's own tests with plain counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class ManyObserver(Observer, Protocol):
    """An observer that also takes a tick's observations at once (the per-request ones)."""

    def observe_many(self, amounts: np.ndarray) -> None: ...


class Incrementer(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Setter(Protocol):
    def set(self, value: float) -> None: ...


@dataclass(frozen=True)
class Probes:
    step_latency: ManyObserver
    queue_seconds: ManyObserver
    inference_seconds: Observer
    batch_size: Observer
    steps: Incrementer
    sessions: Setter
    capacity: Setter
    evicted_lru: Incrementer
    evicted_ttl: Incrementer
    worker_failures: Incrementer
    # (method, status code name) -> the counter of such requests
    requests: Callable[[str, str], Incrementer]
    # the shared session store (core/sync.py), when one is used
    store_claim_seconds: Observer = field(default_factory=lambda: _Nothing())
    store_write_seconds: Observer = field(default_factory=lambda: _Nothing())
    store_loaded: Incrementer = field(default_factory=lambda: _Nothing())
    store_fenced: Incrementer = field(default_factory=lambda: _Nothing())
    store_errors: Incrementer = field(default_factory=lambda: _Nothing())


class _Nothing:
    def observe(self, amount: float) -> None:
        pass

    def observe_many(self, amounts: np.ndarray) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


def no_probes() -> Probes:
    n = _Nothing()
    return Probes(n, n, n, n, n, n, n, n, n, n, lambda method, code: n)
