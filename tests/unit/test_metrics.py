"""ManyHistogram: a tick's observations in one call expose exactly what one observe() each would.
And the series of a freed model version: removed, and made again when it loads again."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from lstm_serve.server.metrics import LATENCY_BUCKETS, Metrics


def _exposed(registry: CollectorRegistry, name: str) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(
        line for line in text.splitlines() if line.startswith(name) and "_created" not in line
    )


def test_observe_many_exposes_what_observe_does() -> None:
    rng = np.random.default_rng(7)
    # Amounts in every bucket, on the bounds themselves (a bound is inclusive), and past the last.
    amounts = np.concatenate(
        [rng.uniform(0, 12, 500), np.array(LATENCY_BUCKETS), np.array([0.0, 1e-9, 11.0])]
    )
    one, many = Metrics.create(), Metrics.create()
    for a in amounts.tolist():
        one.probes("m").step_latency.observe(a)
    probe = many.probes("m").step_latency
    probe.observe_many(amounts[:7])
    probe.observe_many(amounts[7:8])  # a tick of one request takes the scalar path
    probe.observe_many(amounts[8:])
    want = _exposed(one.registry, "lstm_serve_step_latency_seconds")
    got = _exposed(many.registry, "lstm_serve_step_latency_seconds")
    assert any(line.endswith(f" {float(len(amounts))}") for line in want)  # the count
    # The sums are equal up to float addition order.
    sums = [line for line in want if "_sum" in line], [line for line in got if "_sum" in line]
    assert np.isclose(float(sums[0][0].split()[-1]), float(sums[1][0].split()[-1]))
    strip = [line for line in want if "_sum" not in line]
    assert strip == [line for line in got if "_sum" not in line]


def _models(registry: CollectorRegistry) -> set[str]:
    return {
        s.labels["model"] for fam in registry.collect() for s in fam.samples if "model" in s.labels
    }


def test_a_freed_versions_series_are_removed_and_made_again() -> None:
    """set_versions() removes every child probes() and count_request() made for a version
    that is no longer loaded; the version's next probes() are live children again."""
    m = Metrics.create()
    m.track_models(["m"])
    p = m.probes("m:1")
    p.step_latency.observe_many(np.array([0.001, 0.002]))
    p.requests("Step", "OK").inc()
    m.count_request("m:1", "Step", "NOT_FOUND")
    m.probes("m:2")
    m.set_versions([("m", "m:1", False), ("m", "m:2", True)])
    assert {"m:1", "m:2"} <= _models(m.registry)
    m.set_versions([("m", "m:2", True)])
    assert "m:1" not in _models(m.registry)
    versions = {
        s.labels["state"]: s.value
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "lstm_serve_model_versions"
    }
    assert versions == {"serving": 1, "draining": 0}
    # Loaded again: the children are new ones, exported (not detached cached ones).
    m.probes("m:1").requests("Step", "OK").inc()
    m.set_versions([("m", "m:1", True), ("m", "m:2", True)])
    name = 'lstm_serve_requests_total{code="OK",method="Step",model="m:1"}'
    assert _exposed(m.registry, name) == [f"{name} 1.0"]
