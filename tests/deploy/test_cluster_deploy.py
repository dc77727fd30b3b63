"""The cluster's deployment files, checked offline: Envoy's config (validated by the envoy
binary itself), the compose profile `cluster`, and the Kubernetes manifests (validated against
the Kubernetes schemas), all consistent with the client's routing header and the settings; the
Redis of each requires a password (a real redis-server run with its arguments) that the
replicas' store URL carries."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import redis
import yaml

from lstm_serve.bench.procs.envoy import ENVOY_CONFIG, RENDERED_CLUSTER_KEYS, config, envoy_binary
from lstm_serve.bench.procs.process import free_port, stop_process
from lstm_serve.client import ROUTE_HEADER
from lstm_serve.server.settings import Settings
from tests.deploy.promql import COMPOSE_FILE, DEPLOY, ROOT
from tests.deploy.test_compose import compose_command

K8S = DEPLOY / "k8s"
PASSWORD_VAR = "${REDIS_PASSWORD:-change-me}"  # compose: the operator's, or the placeholder
K8S_VERSION = "1.31.0"
GRPC_PORT = Settings.model_fields["port"].default
REPLICAS = "lstm-serve-replica"  # the compose service and the headless Service: Envoy's DNS name


def envoy_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text())
    return data


def manifest_files() -> list[Path]:
    """Every manifest under deploy/k8s (deploy/k8s/monitoring included), kustomizations too."""
    return sorted(K8S.rglob("*.yaml"))


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for f in manifest_files():
        if f.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            key = doc["kind"], doc["metadata"]["name"]
            assert key not in docs, f"{f}: a second {key}"
            docs[key] = doc
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
    # The same interpolation in both places: Redis requires what the replicas send.
    command = redis["command"]
    assert url.password == command[command.index("--requirepass") + 1] == PASSWORD_VAR
    assert "./envoy:/etc/envoy:ro" in envoy["volumes"]
    assert envoy["command"][-1] == "/etc/envoy/" + ENVOY_CONFIG.name
    assert {int(p.rsplit(":", 1)[1]) for p in envoy["ports"]} >= {GRPC_PORT}
    assert redis["command"][redis["command"].index("--appendfsync") + 1] == "always"


# Custom resources: kubernetes-validate has no schema for them; tests/deploy/test_k8s.py checks
# them against their CRD's.
CUSTOM_GROUPS = ("monitoring.coreos.com/",)


@pytest.mark.parametrize("path", [str(p.relative_to(K8S)) for p in manifest_files()])
def test_k8s_manifests_are_valid(path: str) -> None:
    file = K8S / path
    for doc in yaml.safe_load_all(file.read_text()):
        if doc["kind"] == "Kustomization":
            # Each kustomization lists every manifest of its directory.
            assert {r for r in doc["resources"]} == {
                p.name for p in file.parent.glob("*.yaml") if p.name != file.name
            }
            continue
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_pieces_fit_together() -> None:
    docs = manifests()
    # Envoy's ConfigMap is ENVOY_CONFIG with two changes (test_k8s.py).
    assert "envoy.yaml" in docs["ConfigMap", "envoy"]["data"]
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
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
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


def test_envoy_health_checks_a_replica_without_traffic_as_often_as_with() -> None:
    """Envoy's default no_traffic_interval is 60s, and applies until the cluster has carried
    traffic: a replica that crashed in Envoy's first minute stayed in the ring ~60s."""
    (cluster,) = envoy_config()["static_resources"]["clusters"]
    (hc,) = cluster["health_checks"]
    interval = seconds(hc["interval"])
    for key in ("no_traffic_interval", "no_traffic_healthy_interval"):
        assert seconds(hc.get(key, hc.get("no_traffic_interval", "60s"))) <= interval, key
    assert seconds(hc["timeout"]) <= interval
    # Left out on purpose (the config says why): it would eject healthy replicas too.
    assert "outlier_detection" not in cluster


def test_the_cluster_tests_run_envoy_as_shipped(tmp_path: Path) -> None:
    """tests/helpers/envoy.py renders the shipped file: only addresses, ports and where the
    endpoints come from differ, so the tests run its health checks and retries."""
    shipped = envoy_config()
    rendered = config(1, 2, tmp_path)
    for cfg in (shipped, rendered):
        del cfg["admin"]["address"]
        (listener,) = cfg["static_resources"]["listeners"]
        del listener["address"]
        (cluster,) = cfg["static_resources"]["clusters"]
        for key in (*RENDERED_CLUSTER_KEYS, "eds_cluster_config"):
            cluster.pop(key, None)
    assert rendered == shipped


def seconds(duration: str) -> float:
    assert re.fullmatch(r"\d+(\.\d+)?s", duration), duration
    return float(duration[:-1])


@contextlib.contextmanager
def redis_server_with(args: list[str], tmp: Path) -> Iterator[int]:
    """A real redis-server with a deployment's arguments, on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    # Later arguments win: only where it listens and writes changes.
    proc = subprocess.Popen(
        [binary, *args, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis(port=port, socket_timeout=2).ping()
                break
            except redis.exceptions.AuthenticationError:
                break  # up, and asking for a password
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, f"redis-server {args} exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield port
    finally:
        stop_process(proc)


def assert_password_required(args: list[str], store_url: str, tmp: Path) -> None:
    url = urlparse(store_url)
    assert url.password, store_url
    with redis_server_with(args, tmp) as port:
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        local = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
        assert redis.Redis.from_url(local, socket_timeout=2).ping()


@pytest.mark.parametrize("password", [None, "s3cr3tABC"], ids=["default", "set"])
def test_compose_redis_requires_the_password_the_replicas_carry(
    password: str | None, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    if password:
        env["REDIS_PASSWORD"] = password
    cmd = [*compose_command(), "-f", str(COMPOSE_FILE), "--profile", "cluster", "config"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    services = yaml.safe_load(r.stdout)["services"]
    store_url = services[REPLICAS]["environment"]["LSTM_SERVE_STATE_STORE"]
    command = services["redis"]["command"]
    assert command[0] == "redis-server"
    assert urlparse(store_url).password == (password or "change-me")
    assert_password_required(command[1:], store_url, tmp_path)


def k8s_env(
    container: dict[str, Any], docs: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, str]:
    """A container's environment as the kubelet makes it: secrets read, $(VAR) expanded."""
    env: dict[str, str] = {}
    for e in container["env"]:
        if "value" in e:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            value = docs["Secret", ref["name"]]["stringData"][ref["key"]]
        env[e["name"]] = value
    return env


def test_k8s_redis_requires_the_password_the_replicas_carry(tmp_path: Path) -> None:
    docs = manifests()
    (redis_container,) = docs["StatefulSet", "redis"]["spec"]["template"]["spec"]["containers"]
    (replica,) = docs["Deployment", "lstm-serve"]["spec"]["template"]["spec"]["containers"]
    redis_env = k8s_env(redis_container, docs)
    args = [
        re.sub(r"\$\((\w+)\)", lambda m: redis_env[m.group(1)], a) for a in redis_container["args"]
    ]
    assert "--requirepass" in args
    # The probe's redis-cli authenticates from REDISCLI_AUTH and checks for PONG (it exits 0
    # on NOAUTH too).
    assert redis_env["REDISCLI_AUTH"] == args[args.index("--requirepass") + 1]
    assert "PONG" in " ".join(redis_container["readinessProbe"]["exec"]["command"])
    store_url = k8s_env(replica, docs)["LSTM_SERVE_STATE_STORE"]
    assert urlparse(store_url).password == args[args.index("--requirepass") + 1]
    assert_password_required(args, store_url, tmp_path)
