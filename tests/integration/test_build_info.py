"""lstm_serve_build_info, scraped from a real server: one series, value 1, naming the versions the
process runs. The alerts match on it (deploy/prometheus/rules), so its name and value matter."""

from __future__ import annotations

import platform
import urllib.request

import onnxruntime
from prometheus_client.parser import text_string_to_metric_families

import lstm_serve
from tests.helpers.server import ServerThread


def test_build_info_names_the_running_versions(server: ServerThread) -> None:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "lstm_serve_build_info"
    ]
    assert family.type == "gauge"
    (sample,) = family.samples
    assert sample.name == "lstm_serve_build_info"
    assert sample.value == 1
    assert sample.labels == {
        "version": lstm_serve.__version__,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
    }
    assert "unknown" not in sample.labels["version"], "the package is installed (editable)"
