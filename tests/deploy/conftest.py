"""Fixtures of the deploy tests: a real lstm-serve with client traffic, shared by the tests that
need real metrics (the dashboard's metric names, the end-to-end Prometheus test)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.core.repository import Kind, Manifest, load_repository
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc
from tests.helpers.server import ServerThread

# Small on purpose: the traffic below crosses the session cap (LRU evictions) and leaves
# sessions idle past the TTL (TTL evictions), so every eviction series exists.
MAX_SESSIONS = 8
SESSION_TTL_S = 1.0


@dataclass
class Traffic:
    """Client load on a live server: streams, unary calls, new sessions and bad requests."""

    target: str
    models: list[Manifest]
    stop: threading.Event = field(default_factory=threading.Event)
    ok: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # expected: the bad requests
    unexpected: list[str] = field(default_factory=list)  # good requests that failed
    rounds: int = 0
    _thread: threading.Thread | None = None

    def _steps(
        self, m: Manifest, session: str, n: int, rng: np.random.Generator
    ) -> pb.SessionSteps:
        if m.kind is Kind.token:
            return pb.SessionSteps(
                session_id=session, tokens=rng.integers(0, m.vocab_size, n).tolist()
            )
        x = rng.normal(size=(n, m.input_dim)).astype(np.float32)
        return pb.SessionSteps(session_id=session, x=x.tobytes())

    def _bad(self, stub: pb_grpc.LstmServeStub, m: Manifest) -> None:
        """Requests that must be refused with a clear status, so the error series exist."""
        ref = pb.ModelRef(name=m.name)
        bad = [
            ("NOT_FOUND", pb.StepRequest(model=pb.ModelRef(name="no-such-model"),
                                         sessions=[pb.SessionSteps(session_id="b", x=b"\0" * 4)])),
            ("INVALID_ARGUMENT", pb.StepRequest(model=ref, sessions=[
                pb.SessionSteps(session_id="b", tokens=[m.vocab_size + 7])
                if m.kind is Kind.token
                else pb.SessionSteps(
                    session_id="b", x=np.full(m.input_dim, np.nan, np.float32).tobytes()
                )
            ])),
        ]  # fmt: skip
        for want, req in bad:
            try:
                stub.Predict(req, timeout=10)
                self.unexpected.append(f"bad request answered OK, expected {want}")
            except grpc.RpcError as exc:
                self.refused[exc.code().name] += 1
                if exc.code().name != want:
                    self.unexpected.append(f"bad request: {exc.code().name}, expected {want}")

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                for m in self.models:
                    ref = pb.ModelRef(name=m.name)
                    try:
                        # A bidirectional stream: 10 messages, 2 sessions x 3 steps each.
                        reqs = [
                            pb.StepRequest(model=ref, sessions=[
                                self._steps(m, f"stream-{m.name}-{s}", 3, rng) for s in range(2)
                            ])
                            for _ in range(10)
                        ]  # fmt: skip
                        for resp in stub.Stream(iter(reqs), timeout=30):
                            assert len(resp.sessions) == 2
                        self.ok["Stream"] += 1
                        # Unary calls on one session; every 25 rounds (about 2s) a burst
                        # of more new sessions than the cap holds: LRU evictions, then the
                        # burst's survivors idle past the TTL.
                        sessions = (
                            [f"burst-{self.rounds}-{i}" for i in range(2 * MAX_SESSIONS)]
                            if self.rounds % 25 == 0
                            else [f"predict-{m.name}"]
                        )
                        for sid in sessions:
                            stub.Predict(
                                pb.StepRequest(model=ref, sessions=[self._steps(m, sid, 2, rng)]),
                                timeout=10,
                            )
                            self.ok["Predict"] += 1
                        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                        self._bad(stub, m)
                    except grpc.RpcError as exc:
                        self.unexpected.append(f"{m.name}: {exc.code().name}: {exc.details()}")
                    except Exception as exc:  # recorded, so that a test can say what went wrong
                        self.unexpected.append(f"{m.name}: {exc!r}")
                self.rounds += 1
                self.stop.wait(0.04)

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name="deploy-traffic", daemon=True)
        self._thread.start()
        return self

    def wait_rounds(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.rounds < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"traffic made {self.rounds} rounds in {timeout}s: {self}")
            if self._thread is not None and not self._thread.is_alive():
                raise AssertionError("the traffic thread died")
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(30)


@dataclass
class LiveServer:
    server: ServerThread
    traffic: Traffic
    repository: Path

    @property
    def metrics_port(self) -> int:
        return int(self.server.server.metrics_port)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.server.metrics_url, timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode())


def _model_repository(request: pytest.FixtureRequest, shipped: Path) -> Path:
    """The shipped models/ when it holds a loadable model, else the tiny test repository."""
    if shipped.is_dir() and load_repository(shipped).models:
        return shipped
    path: Path = request.getfixturevalue("tiny_repo")
    return path


# Package scope: the server and its load stop when tests/deploy is done, before other tests run.
# The server keeps its sessions in a real Redis, as a cluster replica does, so that every panel
# (the session store's too) has data.
@pytest.fixture(scope="package")
def live_server(
    request: pytest.FixtureRequest,
    shipped_models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    repo = _model_repository(request, shipped_models_dir)
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    request.addfinalizer(redis.stop)
    server = ServerThread(
        model_repository=repo,
        state_store=redis.url,
        # A loaded CI machine can stall one Redis call for a while: the dashboard checks are
        # about data reaching Prometheus, not about store latency.
        state_store_timeout_s=10.0,
        max_sessions=MAX_SESSIONS,
        cap_policy="evict_lru",
        session_ttl_s=SESSION_TTL_S,
        reap_interval_s=0.2,
        snapshot_dir=None,
    ).start()
    try:
        models = [mv.manifest for mv in load_repository(repo).all()]
        assert models, f"no model in {repo}"
        traffic = Traffic(server.target, models).start()
        try:
            traffic.wait_rounds(3)
            yield LiveServer(server, traffic, repo)
        finally:
            traffic.close()
    finally:
        server.stop()
