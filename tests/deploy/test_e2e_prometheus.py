"""End to end: a real lstm-serve under client traffic, scraped by a real Prometheus that loads
the repository's scrape job and rules. Every dashboard query, every template variable and every
recording rule must return data; the rules must evaluate cleanly; an alert must fire on real data.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import LiveServer
from tests.deploy.promql import (
    PROMETHEUS_CONFIG,
    RULES_DIR,
    dashboard_variables,
    load_dashboard,
    panel_queries,
    recording_rules,
    require_tool,
    substitute,
    variable_queries,
)

SCRAPE_INTERVAL = "1s"
DATA_DEADLINE_S = 45.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_config(metrics_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, with its lstm-serve job pointed at the test server."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "lstm-serve"]
    assert len(jobs) == 1, "deploy/prometheus/prometheus.yml must have one job named lstm-serve"
    job = jobs[0]
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]  # compose's DNS names do not resolve here
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    job["scrape_interval"] = SCRAPE_INTERVAL
    job["scrape_timeout"] = SCRAPE_INTERVAL
    config["scrape_configs"] = [job]
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["global"]["scrape_timeout"] = SCRAPE_INTERVAL
    config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    config.pop("alerting", None)
    return config


@dataclass
class Prometheus:
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@pytest.fixture(scope="module")
def prometheus(
    live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = require_tool("prometheus", "apt-get install prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(live_server.metrics_port)))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{prom.log_tail()}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready after 30s:\n{prom.log_tail()}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _describe(result: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['metric']}={r['value'][1]}" for r in result[:3]) or "no series"


def _has_data(result: list[dict[str, Any]]) -> bool:
    """At least one series with a finite value (a quantile of no traffic is NaN)."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def wait_for_all(prom: Prometheus, queries: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Evaluate every query until each returns data; fail naming the ones that never did."""
    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        results = {name: prom.query(expr) for name, expr in queries.items()}
        missing = {n: r for n, r in results.items() if not _has_data(r)}
        if not missing:
            return results
        if time.monotonic() > deadline:
            lines = [f"  {n}: {queries[n]}\n    -> {_describe(r)}" for n, r in missing.items()]
            pytest.fail(
                f"{len(missing)} of {len(queries)} queries returned no data within "
                f"{DATA_DEADLINE_S}s:\n"
                + "\n".join(lines)
                + f"\nprometheus log:\n{prom.log_tail()}"
            )
        time.sleep(1.0)


def test_the_server_is_scraped_through_the_repo_job(prometheus: Prometheus) -> None:
    results = wait_for_all(prometheus, {"up": 'up{job="lstm-serve"} == 1'})
    assert len(results["up"]) == 1
    targets = prometheus.api("/api/v1/targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets


def test_every_dashboard_query_returns_data(
    prometheus: Prometheus, live_server: LiveServer
) -> None:
    dashboard = load_dashboard()
    variables = dashboard_variables(dashboard)
    queries = {
        f"panel {q.panel!r} {q.ref}": substitute(q.expr, variables)
        for q in panel_queries(dashboard)
    }
    assert len(queries) >= 20, "the dashboard lost its panels"
    # A template variable offers the values of a label: it must offer at least one.
    for name, (selector, label) in variable_queries(dashboard).items():
        queries[f"variable ${name}"] = f"count by ({label}) ({substitute(selector, variables)})"
    for expr in queries.values():
        assert "$" not in expr, f"unsubstituted variable in {expr}"
    results = wait_for_all(prometheus, queries)
    # The model variable lists the served models by their "<name>:<version>" label.
    offered = {r["metric"]["model"] for r in results["variable $model"]}
    served = {f"{m.name}:{m.version}" for m in live_server.traffic.models}
    assert served <= offered, (served, offered)
    assert not live_server.traffic.unexpected, live_server.traffic.unexpected[:5]


def test_every_recording_rule_returns_data(prometheus: Prometheus) -> None:
    rules = recording_rules()
    assert len(rules) >= 10
    queries = {f"expr of {r['record']}": r["expr"] for r in rules}
    # ... and Prometheus's own evaluation of the rule files records every one of them.
    queries.update({f"recorded {r['record']}": r["record"] for r in rules})
    wait_for_all(prometheus, queries)
    groups = prometheus.api("/api/v1/rules")["groups"]
    loaded = {Path(g["file"]).name for g in groups}
    assert loaded == {p.name for p in RULES_DIR.glob("*.yml")}, loaded
    broken = [
        f"{g['name']}/{r['name']}: {r.get('lastError')}"
        for g in groups
        for r in g["rules"]
        if r.get("health") != "ok"
    ]
    assert not broken, broken


def test_alerts_evaluate_on_real_data(prometheus: Prometheus) -> None:
    """The traffic crosses the session cap: the eviction alert (no `for`) must fire; the target
    is up and exports lstm_serve_build_info, so neither the target-down nor the no-target alert
    may even be pending; every version loaded, so the load failure counters (there from the
    start, at 0) fire nothing."""
    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        alerts = prometheus.api("/api/v1/alerts")["alerts"]
        states = {(a["labels"]["alertname"], a["state"]) for a in alerts}
        if ("LstmServeSessionsEvicted", "firing") in states:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"LstmServeSessionsEvicted never fired; alerts: {sorted(states)}")
        time.sleep(1.0)
    quiet = {"LstmServeTargetDown", "LstmServeAbsent", "LstmServeModelLoadFailed"}
    assert not [a for a in alerts if a["labels"]["alertname"] in quiet], alerts


def test_health_command_of_the_image_healthcheck(live_server: LiveServer) -> None:
    """The Dockerfile's HEALTHCHECK runs `lstm-serve health`; the image has no torch or onnx."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
        "from lstm_serve.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )

    def health(target: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", code, "health", "--target", target, "--timeout", "3"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    up = health(live_server.server.target)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "SERVING" in up.stdout
    down = health(f"127.0.0.1:{free_port()}")
    assert down.returncode == 1, down.stdout + down.stderr


def test_the_traffic_was_served(live_server: LiveServer) -> None:
    """The load behind the checks above: good requests answered, bad ones refused as designed."""
    t = live_server.traffic
    t.wait_rounds(t.rounds + 2)
    assert not t.unexpected, t.unexpected[:5]
    assert t.ok["Stream"] > 0 and t.ok["Predict"] > 0, t.ok
    assert t.refused["NOT_FOUND"] > 0 and t.refused["INVALID_ARGUMENT"] > 0, t.refused
