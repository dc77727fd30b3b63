"""Every Prometheus metric lstm-serve exports, defined once, on an injected registry."""

from __future__ import annotations

import contextlib
import platform
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics import MetricWrapperBase

from lstm_serve import __version__
from lstm_serve.core.probes import Incrementer, ManyObserver, Probes

# Seconds: 50 us .. 10 s, dense where a step on a CPU lands.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# lstm_serve_model_versions' states: serving takes new sessions; draining was unloaded (or is
# loaded only for the sessions a snapshot holds) and keeps its sessions until they are gone.
VERSION_STATES = ("serving", "draining")


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
    model_versions: Gauge
    load_failures: Counter
    _children: dict[tuple[Any, ...], Any] = field(default_factory=dict, compare=False)
    # model label -> time.time() of its last Step request (ModelStatistics' last_inference)
    last_step: dict[str, float] = field(default_factory=dict, compare=False)
    # model label ("name:version") -> (metric, label values) of every child made for it, so
    # that a freed version's series can be removed: exactly those, whatever probes() grows.
    _series: dict[str, list[tuple[MetricWrapperBase, tuple[str, ...]]]] = field(
        default_factory=dict, compare=False
    )
    # Model names (not versions) with series in model_versions and load_failures; and the
    # labels of the versions loaded at the last set_versions().
    _models: set[str] = field(default_factory=set, compare=False)
    _loaded: set[str] = field(default_factory=set, compare=False)

    def count_request(self, label: str, method: str, code: str) -> None:
        self._request(label, method, code).inc()

    def _request(self, label: str, method: str, code: str) -> Incrementer:
        if method == "Step":  # every Step request is counted through here, once per tick
            self.last_step[label] = time.time()
        # labels() costs a lock and a tuple per call: keep the children, one per series.
        key = (label, method, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child(self.requests, label, method, code)
        return child  # type: ignore[no-any-return]

    def _many(self, histogram: Histogram, label: str) -> ManyObserver:
        key = (histogram, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = ManyHistogram(self._child(histogram, label))
        return child  # type: ignore[no-any-return]

    def _child(self, metric: MetricWrapperBase, label: str, *rest: str) -> Any:
        """metric's child for a model label (its first label value), remembered under it."""
        self._series.setdefault(label, []).append((metric, (label, *rest)))
        return metric.labels(label, *rest)

    def probes(self, label: str) -> Probes:
        """The children of one model's series, for its scheduler."""
        c = self._child
        return Probes(
            step_latency=self._many(self.step_latency, label),
            queue_seconds=self._many(self.queue_seconds, label),
            inference_seconds=c(self.inference_seconds, label),
            batch_size=c(self.batch_size, label),
            steps=c(self.steps, label),
            sessions=c(self.sessions, label),
            capacity=c(self.sessions_capacity, label),
            evicted_lru=c(self.sessions_evicted, label, "lru"),
            evicted_ttl=c(self.sessions_evicted, label, "ttl"),
            worker_failures=c(self.worker_failures, label),
            requests=lambda method, code: self._request(label, method, code),
            store_claim_seconds=c(self.store_seconds, label, "claim"),
            store_write_seconds=c(self.store_seconds, label, "write"),
            store_loaded=c(self.store_loaded, label),
            store_fenced=c(self.store_fenced, label),
            store_errors=c(self.store_errors, label),
        )

    # -- model versions: loaded, unloaded and freed while serving ------------------------------

    def track_models(self, names: Iterable[str]) -> None:
        """Give these model names their series at 0: a load failure counter that exists before
        its first failure is what lets increase() (the alert) see that failure. Names must be
        the repository's model directories, never a client's text: each is a series for good."""
        for name in names:
            if name in self._models:
                continue
            self._models.add(name)
            self.load_failures.labels(name)
            for state in VERSION_STATES:
                self.model_versions.labels(name, state).set(0)

    def count_load_failure(self, name: str) -> None:
        """One version of model name refused at load (its checks or its warm-up run failed), or
        its serving.toml refused."""
        self.track_models((name,))
        self.load_failures.labels(name).inc()

    def set_versions(self, versions: Iterable[tuple[str, str, bool]]) -> None:
        """The loaded versions as (model name, label "name:version", serving new sessions?).
        Every tracked model's serving and draining counts are set, 0 for a model none of whose
        versions is left; the series of versions no longer loaded (freed) are removed."""
        counts: Tally[tuple[str, str]] = Tally()
        loaded: set[str] = set()
        for name, label, serving in versions:
            counts[(name, VERSION_STATES[0] if serving else VERSION_STATES[1])] += 1
            loaded.add(label)
        self.track_models(sorted({name for name, _ in counts}))
        for name in self._models:
            for state in VERSION_STATES:
                self.model_versions.labels(name, state).set(counts[(name, state)])
        for label in sorted(self._loaded - loaded):
            self.forget_version(label)
        self._loaded.clear()
        self._loaded.update(loaded)

    def forget_version(self, label: str) -> None:
        """Remove every series of a freed version (label "name:version"), so that dashboards
        show no version that is gone, frozen at its last values. Its last counts since the
        previous scrape are lost with them. A version loaded again starts new series (from 0,
        as after a restart: rate() and increase() take that as a counter reset)."""
        for metric, values in self._series.pop(label, []):
            # A child made twice (probes() called again for the label) is listed twice: the
            # second remove finds it gone.
            with contextlib.suppress(KeyError):
                metric.remove(*values)
        # The cached children would otherwise be reused, detached from the registry.
        # list(): one atomic copy of the keys, whatever another thread adds meanwhile.
        for key in [k for k in list(self._children) if label in (k[0], k[-1])]:
            self._children.pop(key, None)
        self.last_step.pop(label, None)

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
            # Per model name, not version: the series stay while versions come and go.
            model_versions=Gauge(
                "lstm_serve_model_versions",
                "Loaded versions of a model by state: serving (takes new sessions) or draining "
                "(unloaded; its sessions go on until they are gone, then it is freed).",
                ["model", "state"],
                registry=r,
            ),
            load_failures=Counter(
                "lstm_serve_model_load_failures_total",
                "Model versions refused at load (their checks or warm-up run failed), and "
                "serving.toml files refused: at start, by poll or on a load request.",
                ["model"],
                registry=r,
            ),
        )


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[object, int]:
    """Serve the registry over HTTP on its own port; returns (server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, int(server.server_port)
