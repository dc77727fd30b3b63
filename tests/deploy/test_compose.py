"""deploy/docker-compose.yml: valid for docker-compose (with and without the gpu profile), and
consistent with the Dockerfile, the settings and the Prometheus scrape config."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lstm_serve.server.settings import Settings
from tests.deploy.promql import COMPOSE_FILE, DEPLOY, PROMETHEUS_CONFIG, ROOT, require_tool


def compose_command() -> list[str]:
    if shutil.which("docker-compose") is None and shutil.which("docker") is not None:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return [require_tool("docker-compose", "apt-get install docker-compose")]


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*compose_command(), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize(
    "profile",
    [[], ["--profile", "gpu"], ["--profile", "cluster"]],
    ids=["default", "gpu", "cluster"],
)
def test_compose_config_validates(profile: list[str]) -> None:
    r = compose(*profile, "config", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    rendered = compose(*profile, "config")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    assert {"lstm-serve", "prometheus", "grafana"} <= set(services)
    assert all("profiles" not in services[s] for s in ("lstm-serve", "prometheus", "grafana"))
    if "cluster" in profile or "envoy" in services:
        assert {"envoy", "redis", "lstm-serve-replica"} <= set(services)
    # docker-compose v1 renders every service and applies profiles at `up`; v2 renders only
    # the active ones. Either way the GPU server belongs to the gpu profile alone.
    if "gpu" in profile or "lstm-serve-gpu" in services:
        gpu = services["lstm-serve-gpu"]
        assert gpu["profiles"] == ["gpu"]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert gpu["build"]["target"] == "cuda"
    assert services["lstm-serve"]["build"]["target"] == "cpu"
    assert Path(services["lstm-serve"]["build"]["context"]).resolve() == ROOT


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def test_services() -> None:
    services = _compose()["services"]
    cpu, gpu = services["lstm-serve"], services["lstm-serve-gpu"]
    assert cpu["build"]["context"] == ".." and cpu["build"]["target"] == "cpu"
    assert (DEPLOY / cpu["build"]["context"] / cpu["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    assert "profiles" not in cpu
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["LSTM_SERVE_DEVICE"] == "cuda"
    for svc in (cpu, gpu):
        assert any(v.endswith(":/snapshots") for v in svc["volumes"])
        targets = {int(p.rsplit(":", 1)[1]) for p in svc["ports"]}
        assert targets == {
            Settings.model_fields["port"].default,
            Settings.model_fields["metrics_port"].default,
        }
        for key in svc.get("environment", {}):
            assert key.removeprefix("LSTM_SERVE_").lower() in Settings.model_fields, key
    prom = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    declared = set(_compose()["volumes"])
    assert {n for n in named if not n.startswith(".")} == declared


def test_prometheus_scrapes_every_server_service_on_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "lstm-serve"]
    (sd,) = job["dns_sd_configs"]
    servers = {
        n for n, s in _compose()["services"].items() if s.get("image", "").startswith("lstm-serve")
    }
    assert set(sd["names"]) == servers == {"lstm-serve", "lstm-serve-gpu", "lstm-serve-replica"}
    assert sd["port"] == Settings.model_fields["metrics_port"].default
