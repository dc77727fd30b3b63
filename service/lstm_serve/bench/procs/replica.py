"""lstm-serve replicas as real processes (so one can be killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_serve.bench.procs.process import free_port


class Replica:
    """`lstm-serve serve` on a free loopback port with the given state store; settings are
    passed as LSTM_SERVE_* environment variables (`state_answer="early"` ->
    LSTM_SERVE_STATE_ANSWER=early)."""

    def __init__(self, repo: Path, redis_url: str, log: Path, **settings: str) -> None:
        self.port = free_port()
        env = {**os.environ, "LSTM_SERVE_STATE_STORE": redis_url, "LSTM_SERVE_LOG_LEVEL": "WARNING"}
        env.update({f"LSTM_SERVE_{k.upper()}": v for k, v in settings.items()})
        args = [sys.executable, "-m", "lstm_serve.cli.main", "serve", "--port", str(self.port),
                "--metrics-port", "-1", "--model-repository", str(repo)]  # fmt: skip
        self.log = log.open("wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 60) -> Replica:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"replica on {self.port} exited with {self.proc.returncode}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica on {self.port} not serving")
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM: drain and stop; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)
