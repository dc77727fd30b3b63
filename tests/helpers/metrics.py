"""Reading a real server's metrics port in tests: a scrape as (name, labels, value) samples."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import ServerThread

Samples = list[tuple[str, dict[str, str], float]]


def scrape(srv: ServerThread) -> Samples:
    with urllib.request.urlopen(srv.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include `labels` (0 when there are none)."""
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether cond holds within timeout seconds (metrics some work updates after answering)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
