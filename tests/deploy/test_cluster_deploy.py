"""The cluster's deployment files, checked offline: Envoy's config (validated by the envoy
binary itself), the compose profile `cluster`, and the Kubernetes manifests (validated against
the Kubernetes schemas), all consistent with the client's routing header and the settings."""

from __future__ import annotations

import subprocess
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from lstm_serve.client import ROUTE_HEADER
from lstm_serve.server.settings import Settings
from tests.deploy.promql import COMPOSE_FILE, DEPLOY
from tests.helpers.envoy import ENVOY_CONFIG, envoy_binary

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.31.0"
GRPC_PORT = Settings.model_fields["port"].default
REPLICAS = "lstm-serve-replica"  # the compose service and the headless Service: Envoy's DNS name


def envoy_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text())
    return data


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            docs[doc["kind"], doc["metadata"]["name"]] = doc
    return docs


def test_envoy_accepts_its_config() -> None:
    r = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_CONFIG)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_envoy_routes_on_the_clients_key_to_health_checked_replicas() -> None:
    cfg = envoy_config()["static_resources"]
    (listener,) = cfg["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": ROUTE_HEADER}}]
    assert route["route"]["timeout"] == "0s"  # a stream lives as long as its session
    (cluster,) = cfg["clusters"]
    assert cluster["lb_policy"] in ("RING_HASH", "MAGLEV")
    assert cluster["type"] == "STRICT_DNS"  # one host per replica address
    assert "grpc_health_check" in cluster["health_checks"][0]
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addr = ep["endpoint"]["address"]["socket_address"]
    assert (addr["address"], addr["port_value"]) == (REPLICAS, GRPC_PORT)
    assert listener["address"]["socket_address"]["port_value"] == GRPC_PORT


def test_compose_cluster_profile() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    replica, envoy, redis = services[REPLICAS], services["envoy"], services["redis"]
    for svc in (replica, envoy, redis):
        assert svc["profiles"] == ["cluster"]
    assert "ports" not in replica  # so `--scale lstm-serve-replica=N` never clashes
    env = replica["environment"]
    for key in env:
        assert key.removeprefix("LSTM_SERVE_").lower() in Settings.model_fields, key
    url = urlparse(env["LSTM_SERVE_STATE_STORE"])
    assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379
    assert "./envoy:/etc/envoy:ro" in envoy["volumes"]
    assert envoy["command"][-1] == "/etc/envoy/" + ENVOY_CONFIG.name
    assert {int(p.rsplit(":", 1)[1]) for p in envoy["ports"]} >= {GRPC_PORT}
    assert redis["command"][redis["command"].index("--appendfsync") + 1] == "always"


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_k8s_manifests_are_valid(path: str) -> None:
    for doc in yaml.safe_load_all((K8S / path).read_text()):
        if doc["kind"] == "Kustomization":
            assert {r for r in doc["resources"]} == {
                p.name for p in K8S.glob("*.yaml") if p.name != path
            }
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_pieces_fit_together() -> None:
    docs = manifests()
    config_map = docs["ConfigMap", "envoy"]
    assert config_map["data"]["envoy.yaml"] == ENVOY_CONFIG.read_text()
    headless = docs["Service", REPLICAS]
    assert headless["spec"]["clusterIP"] == "None"
    deployment = docs["Deployment", "lstm-serve"]
    pod = deployment["spec"]["template"]
    assert headless["spec"]["selector"] == pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": GRPC_PORT, "metrics": Settings.model_fields["metrics_port"].default
    }  # fmt: skip
    env = {e["name"]: e["value"] for e in container["env"]}
    for key in env:
        assert key.removeprefix("LSTM_SERVE_").lower() in Settings.model_fields, key
    url = urlparse(env["LSTM_SERVE_STATE_STORE"])
    redis_service = docs["Service", url.hostname or ""]
    assert redis_service["spec"]["ports"][0]["port"] == url.port
    assert container["readinessProbe"]["grpc"]["port"] == GRPC_PORT
    assert (
        pod["spec"]["terminationGracePeriodSeconds"]
        > Settings.model_fields["grace_period_s"].default
    )
    envoy = docs["Deployment", "envoy"]["spec"]["template"]["spec"]
    assert envoy["volumes"][0]["configMap"]["name"] == "envoy"
