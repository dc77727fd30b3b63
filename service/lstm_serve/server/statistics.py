"""Per-version inference statistics, the Open Inference Protocol's statistics extension
(Triton's `ModelStatistics`), read from the Prometheus metrics this server exports.

One job: a loaded version's figures, from the same metric series a scrape of the metrics port
gives for `model="name:version"`, so that the two never disagree (nothing is counted twice, in
two places that could drift). Both translators call `Statistics.of`: kserve.py (gRPC) and
kserve_http.py (HTTP/REST); docs/protocol.md ("Statistics") says what each field counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from lstm_serve.core.engine import Engine
from lstm_serve.core.errors import InvalidArgument, NotFound
from lstm_serve.core.scheduler import STEP
from lstm_serve.core.versions import LoadedModel
from lstm_serve.server.metrics import Metrics

OK = "OK"
NS_PER_S = 1e9


@dataclass(frozen=True, slots=True)
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative time in nanoseconds."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class InferStats:
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One version's figures. The field names are Triton's, so dataclasses.asdict() is both
    the JSON of the HTTP/REST form and the keyword arguments of the gRPC message."""

    name: str
    version: str
    last_inference: int  # ms since the epoch; 0 when no request was seen
    inference_count: int
    execution_count: int
    inference_stats: InferStats


@dataclass(slots=True)
class _Series:
    """What the metric series of one model label hold (base units, as exported)."""

    ok: float = 0.0  # lstm_serve_requests_total{method="Step", code="OK"}
    failed: float = 0.0  # ... the other codes, summed
    latency_s: float = 0.0  # lstm_serve_step_latency_seconds_sum
    queue_count: float = 0.0  # lstm_serve_queue_seconds_count
    queue_s: float = 0.0  # lstm_serve_queue_seconds_sum
    infer_count: float = 0.0  # lstm_serve_inference_seconds_count
    infer_s: float = 0.0  # lstm_serve_inference_seconds_sum
    steps: float = 0.0  # lstm_serve_steps_total


def _ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


def _duration(count: float, seconds: float) -> Duration:
    return Duration(int(count), _ns(seconds))


def _samples(metric: Collector, labels: set[str]) -> Iterator[tuple[str, dict[str, str], float]]:
    """The samples of one metric (collect(): what the exposition writes) whose model label is
    one of labels."""
    families: Iterable[Metric] = metric.collect()
    for family in families:
        for s in family.samples:
            if s.labels.get("model") in labels:
                yield s.name, s.labels, s.value


@dataclass
class Statistics:
    """Figures per loaded version of engine's models, from metrics' series."""

    engine: Engine
    metrics: Metrics

    def of(self, name: str = "", version: str = "") -> list[ModelStats]:
        """Every loaded version (name ""), every loaded version of name (version ""), or one;
        NotFound for an unknown model or version. Versions being unloaded are loaded (their
        sessions still run) and are listed."""
        lms = self._select(name, version)
        series = self._read({lm.label for lm in lms})
        return [self._figures(lm, series.get(lm.label, _Series())) for lm in lms]

    def _select(self, name: str, version: str) -> list[LoadedModel]:
        # The texts are those of the inference calls' unknown model (kserve_convert).
        if not name:
            if version:
                raise InvalidArgument("a version needs a model name")
            chosen = list(self.engine.models.values())
        elif version:
            lm = self.engine.models.get((name, version))
            if lm is None:
                raise NotFound(
                    f"Request for unknown model: '{name[:64]}' version {version[:64]} is not found"
                )
            chosen = [lm]
        else:
            chosen = [lm for (n, _), lm in self.engine.models.items() if n == name]
            if not chosen:
                raise NotFound(f"Request for unknown model: '{name[:64]}' is not found")
        # Versions are decimal digits: by length, then text, is numeric order.
        return sorted(chosen, key=lambda lm: (lm.mv.manifest.name, len(lm.version), lm.version))

    def _read(self, labels: set[str]) -> dict[str, _Series]:
        """One collect() per metric, for the labels asked for."""
        m = self.metrics
        out = {label: _Series() for label in labels}
        for name, lab, v in _samples(m.requests, labels):
            # (its _created samples are timestamps)
            if not name.endswith("_total") or lab.get("method") != STEP:
                continue
            s = out[lab["model"]]
            if lab.get("code") == OK:
                s.ok += v
            else:
                s.failed += v
        for name, lab, v in _samples(m.step_latency, labels):
            if name.endswith("_sum"):
                out[lab["model"]].latency_s = v
        for name, lab, v in _samples(m.queue_seconds, labels):
            s = out[lab["model"]]
            if name.endswith("_sum"):
                s.queue_s = v
            elif name.endswith("_count"):
                s.queue_count = v
        for name, lab, v in _samples(m.inference_seconds, labels):
            s = out[lab["model"]]
            if name.endswith("_sum"):
                s.infer_s = v
            elif name.endswith("_count"):
                s.infer_count = v
        for name, lab, v in _samples(m.steps, labels):
            if name.endswith("_total"):
                out[lab["model"]].steps = v
        return out

    def _figures(self, lm: LoadedModel, s: _Series) -> ModelStats:
        # compute_input and compute_output are inside compute_infer (one timed call gathers
        # h and c, runs ONNX Runtime and scatters): no separate figures, so zeros.
        return ModelStats(
            name=lm.mv.manifest.name,
            version=lm.version,
            last_inference=round(self.metrics.last_step.get(lm.label, 0.0) * 1000),
            inference_count=int(s.steps),
            execution_count=int(s.infer_count),
            inference_stats=InferStats(
                success=_duration(s.ok, s.latency_s),
                fail=Duration(int(s.failed), 0),
                queue=_duration(s.queue_count, s.queue_s),
                compute_input=Duration(),
                compute_infer=_duration(s.infer_count, s.infer_s),
                compute_output=Duration(),
            ),
        )
