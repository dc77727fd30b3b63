"""Every Prometheus metric lstm-serve exports, defined once, on an injected registry."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server

from lstm_serve import __version__
from lstm_serve.core.probes import Incrementer, ManyObserver, Probes

# Seconds: 50 us .. 10 s, dense where a step on a CPU lands.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ManyHistogram:
    """A Histogram child that also takes many observations in one call, as a tick has one per
    request: one increment per bucket hit instead of a Python loop over the buckets for each
    (observe costs about 2 us, a tenth of a streamed request's scheduling). It adds to the
    child's own bucket and sum values, so the exposition is prometheus-client's;
    tests/unit/test_metrics.py checks it against observe()."""

    __slots__ = ("_bounds", "_buckets", "_sum", "observe")

    def __init__(self, child: Histogram) -> None:
        self.observe = child.observe
        self._buckets = child._buckets  # one value per bucket, not cumulative; +Inf last
        self._sum = child._sum
        self._bounds = np.asarray(child._upper_bounds[:-1], np.float64)

    def observe_many(self, amounts: np.ndarray) -> None:
        if len(amounts) == 1:
            self.observe(float(amounts[0]))
            return
        # observe() counts an amount in the first bucket whose bound is >= it.
        hits = np.bincount(np.searchsorted(self._bounds, amounts), minlength=len(self._buckets))
        for i in np.flatnonzero(hits).tolist():
            self._buckets[i].inc(int(hits[i]))
        self._sum.inc(float(amounts.sum()))


def build_labels() -> dict[str, str]:
    """lstm_serve_build_info's labels: what this process runs."""
    import onnxruntime  # the server has it loaded already; imported here for the others

    return {
        "version": __version__,
        "python": platform.python_version(),
        "onnxruntime": str(onnxruntime.__version__),
    }


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    build_info: Gauge
    step_latency: Histogram
    queue_seconds: Histogram
    inference_seconds: Histogram
    batch_size: Histogram
    steps: Counter
    sessions: Gauge
    sessions_capacity: Gauge
    sessions_evicted: Counter
    worker_failures: Counter
    requests: Counter
    store_seconds: Histogram
    store_loaded: Counter
    store_fenced: Counter
    store_errors: Counter
    grpc_started: Counter
    grpc_handled: Counter
    grpc_handling: Histogram
    grpc_msg_received: Counter
    grpc_msg_sent: Counter
    _children: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False)

    def count_request(self, label: str, method: str, code: str) -> None:
        self._request(label, method, code).inc()

    def _request(self, label: str, method: str, code: str) -> Incrementer:
        # labels() costs a lock and a tuple per call: keep the children, one per series.
        key = (label, method, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(label, method, code)
        return child  # type: ignore[no-any-return]

    def _many(self, histogram: Histogram, label: str) -> ManyObserver:
        key = (histogram, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = ManyHistogram(histogram.labels(label))
        return child  # type: ignore[no-any-return]

    def probes(self, label: str) -> Probes:
        """The children of one model's series, for its scheduler."""
        return Probes(
            step_latency=self._many(self.step_latency, label),
            queue_seconds=self._many(self.queue_seconds, label),
            inference_seconds=self.inference_seconds.labels(label),
            batch_size=self.batch_size.labels(label),
            steps=self.steps.labels(label),
            sessions=self.sessions.labels(label),
            capacity=self.sessions_capacity.labels(label),
            evicted_lru=self.sessions_evicted.labels(label, "lru"),
            evicted_ttl=self.sessions_evicted.labels(label, "ttl"),
            worker_failures=self.worker_failures.labels(label),
            requests=lambda method, code: self._request(label, method, code),
            store_claim_seconds=self.store_seconds.labels(label, "claim"),
            store_write_seconds=self.store_seconds.labels(label, "write"),
            store_loaded=self.store_loaded.labels(label),
            store_fenced=self.store_fenced.labels(label),
            store_errors=self.store_errors.labels(label),
        )

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, ... for the dashboard.
        ProcessCollector(registry=r)
        grpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        # Always 1: which versions run where, and a series whose absence means that no
        # lstm-serve is scraped (the alerts match on it rather than on a job name).
        labels = build_labels()
        build_info = Gauge(
            "lstm_serve_build_info",
            "Always 1; the labels say which lstm-serve, Python and ONNX Runtime this process runs.",
            list(labels),
            registry=r,
        )
        build_info.labels(**labels).set(1)
        return cls(
            registry=r,
            build_info=build_info,
            step_latency=Histogram(
                "lstm_serve_step_latency_seconds",
                "Time from a request's arrival at the engine to its outputs, per session request.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            queue_seconds=Histogram(
                "lstm_serve_queue_seconds",
                "Time a request waited in the scheduler's queue before its tick took it.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            inference_seconds=Histogram(
                "lstm_serve_inference_seconds",
                "Time of one batched ONNX Runtime call, gather and scatter of state included.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            batch_size=Histogram(
                "lstm_serve_batch_size",
                "Sessions in one batched inference call.",
                ["model"],
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            steps=Counter(
                "lstm_serve_steps_total",
                "Sequence steps run (one per session per time step).",
                ["model"],
                registry=r,
            ),
            sessions=Gauge(
                "lstm_serve_sessions",
                "Live sessions holding state.",
                ["model"],
                registry=r,
            ),
            sessions_capacity=Gauge(
                "lstm_serve_sessions_capacity",
                "The session cap (max_sessions): at it, new sessions are refused or the LRU evicted.",
                ["model"],
                registry=r,
            ),
            sessions_evicted=Counter(
                "lstm_serve_sessions_evicted_total",
                "Sessions removed by the server: reason ttl (idle expiry) or lru (session cap).",
                ["model", "reason"],
                registry=r,
            ),
            worker_failures=Counter(
                "lstm_serve_worker_failures_total",
                "Inference workers that died or stalled: the model answers UNAVAILABLE and its "
                "health is NOT_SERVING until the process restarts.",
                ["model"],
                registry=r,
            ),
            requests=Counter(
                "lstm_serve_requests_total",
                "Engine requests by method and final gRPC status code.",
                ["model", "method", "code"],
                registry=r,
            ),
            # The shared session store of a cluster (LSTM_SERVE_STATE_STORE=redis://...).
            store_seconds=Histogram(
                "lstm_serve_store_seconds",
                "Round trip of one call to the shared session store: op claim (load sessions) or write (one batch of changed sessions).",
                ["model", "op"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            store_loaded=Counter(
                "lstm_serve_store_sessions_loaded_total",
                "Sessions loaded from the shared store by this replica (it did not hold them).",
                ["model"],
                registry=r,
            ),
            store_fenced=Counter(
                "lstm_serve_store_fenced_writes_total",
                "Session writes refused because another replica claimed the session since (the local copy is dropped).",
                ["model"],
                registry=r,
            ),
            store_errors=Counter(
                "lstm_serve_store_errors_total",
                "Calls to the shared session store that failed (unreachable, timed out or refused).",
                ["model"],
                registry=r,
            ),
            # The names and labels of the ecosystem's gRPC server metrics (go-grpc-prometheus).
            grpc_started=Counter(
                "grpc_server_started_total",
                "RPCs started on the server.",
                grpc_labels,
                registry=r,
            ),
            grpc_handled=Counter(
                "grpc_server_handled_total",
                "RPCs completed on the server, regardless of success.",
                [*grpc_labels, "grpc_code"],
                registry=r,
            ),
            grpc_handling=Histogram(
                "grpc_server_handling_seconds",
                "Response latency of RPCs handled by the server (whole stream for streams).",
                grpc_labels,
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            grpc_msg_received=Counter(
                "grpc_server_msg_received_total",
                "Stream messages received by the server.",
                grpc_labels,
                registry=r,
            ),
            grpc_msg_sent=Counter(
                "grpc_server_msg_sent_total",
                "Stream messages sent by the server.",
                grpc_labels,
                registry=r,
            ),
        )


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[object, int]:
    """Serve the registry over HTTP on its own port; returns (server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, int(server.server_port)
