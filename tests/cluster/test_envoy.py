"""Replica processes behind a real Envoy run from the shipped config (ring hash on the routing
key, gRPC health checks), sessions in a real redis-server: a replica killed with SIGKILL
mid-stream, and the replica set scaled 3 -> 4 -> 2 while streaming. Every session ends equal to
one pass. A replica killed in Envoy's first minute leaves the ring within seconds, and what a
stream cut by the crash looks like to a gRPC client behind Envoy."""

from __future__ import annotations

import asyncio
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from lstm_serve.bench.procs.envoy import ENVOY_CONFIG, Envoy
from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.bench.procs.replica import Replica
from lstm_serve.client import ROUTE_HEADER, AsyncClient, Client, routed, session_steps, step_request
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.cluster.test_store import ATOL, stored
from tests.helpers.server import xs
from tests.oracle.one_pass import OnePass

SESSIONS = 200
STEPS = 24
CHUNK = 2


class Cluster:
    def __init__(self, repo: Path, redis: RedisServer, tmp: Path, **settings: str) -> None:
        self.repo, self.redis, self.tmp = repo, redis, tmp
        self.settings = settings
        self.replicas: list[Replica] = []
        self.envoy = Envoy(tmp / "envoy")

    def add(self) -> Replica:
        log = self.tmp / f"replica-{len(self.replicas)}.log"
        r = Replica(self.repo, self.redis.url, log, **self.settings)
        self.replicas.append(r)
        return r

    def start(self, n: int) -> Cluster:
        for r in [self.add() for _ in range(n)]:
            r.wait_serving()
        self.envoy.start([r.port for r in self.replicas])
        return self

    def stop(self) -> None:
        self.envoy.stop()
        for r in self.replicas:
            if r.proc.poll() is None:
                r.kill()


def _running(
    repo: Path, redis: RedisServer, tmp_path: Path, n: int, **settings: str
) -> Iterator[Cluster]:
    c = Cluster(repo, redis, tmp_path, **settings).start(n)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(tiny_repo: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    yield from _running(tiny_repo, redis_server, tmp_path, 3)


PIPELINE = 3  # requests of one stream in flight at once


@pytest.fixture
def early_cluster(tiny_repo: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    yield from _running(tiny_repo, redis_server, tmp_path, 3, state_answer="early")


async def stream_all(
    target: str, data: dict[str, np.ndarray], progress: threading.Event, pause: float
) -> tuple[dict[str, np.ndarray], int]:
    """Every session streams its steps through one client, PIPELINE requests in flight;
    returns each session's outputs and how often streams reconnected."""
    sent = [0]
    reconnects = [0]
    total = len(data) * (STEPS // CHUNK)

    async def one(client: AsyncClient, sid: str, x: np.ndarray) -> np.ndarray:
        ys = []
        async with client.session("tiny", sid, start_seq=0, max_retries=10) as s:
            for i in range(0, STEPS, CHUNK * PIPELINE):
                sends = [
                    s.send(x[j : j + CHUNK])
                    for j in range(i, min(i + CHUNK * PIPELINE, STEPS), CHUNK)
                ]
                ys += [r.y for r in await asyncio.gather(*sends)]
                sent[0] += len(sends)
                if sent[0] >= total // 3:
                    progress.set()
                await asyncio.sleep(pause)
        reconnects[0] += s.reconnects
        return np.concatenate(ys)

    async with AsyncClient(target, timeout=30) as client:
        outs = await asyncio.gather(*(one(client, sid, x) for sid, x in data.items()))
    return dict(zip(data, outs, strict=True)), reconnects[0]


def check(
    data: dict[str, np.ndarray], ys: dict[str, np.ndarray], redis: RedisServer, oracle: OnePass
) -> None:
    for sid, x in data.items():
        y, hn, cn = oracle.run(x)
        np.testing.assert_allclose(ys[sid], y, atol=ATOL, err_msg=sid)
        h, c, n = stored(redis, sid)
        assert n == STEPS, sid
        np.testing.assert_allclose(h, hn, atol=ATOL, err_msg=sid)
        np.testing.assert_allclose(c, cn, atol=ATOL, err_msg=sid)


def run_in_thread(fn: object) -> tuple[threading.Thread, dict[str, object]]:
    box: dict[str, object] = {}

    def go() -> None:
        try:
            box["result"] = fn()  # type: ignore[operator]
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def test_kill_9_of_a_replica_mid_stream_loses_no_session(
    cluster: Cluster, redis_server: RedisServer, oracle: OnePass
) -> None:
    data = {f"s{i:03d}": xs(1000 + i, STEPS) for i in range(SESSIONS)}
    progress = threading.Event()
    t, box = run_in_thread(
        lambda: asyncio.run(stream_all(cluster.envoy.target, data, progress, 0.02))
    )
    assert progress.wait(60)
    cluster.replicas[1].kill()
    t.join(120)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    ys, reconnects = box["result"]  # type: ignore[misc]
    assert reconnects > 0, "no stream was cut: the kill came too late"
    check(data, ys, redis_server, oracle)


def test_scale_3_to_4_to_2_while_streaming(
    cluster: Cluster, redis_server: RedisServer, oracle: OnePass
) -> None:
    data = {f"z{i:03d}": xs(3000 + i, STEPS) for i in range(SESSIONS // 2)}
    new = cluster.add().wait_serving()  # started ahead: scaling is then a matter of seconds
    progress = threading.Event()
    t, box = run_in_thread(
        lambda: asyncio.run(stream_all(cluster.envoy.target, data, progress, 0.6))
    )
    assert progress.wait(60)
    cluster.envoy.set_endpoints([r.port for r in cluster.replicas])
    cluster.envoy.wait_healthy(4)
    # Down to two: out of the ring first, then drained (SIGTERM).
    keep = [cluster.replicas[0], new]
    cluster.envoy.set_endpoints([r.port for r in keep])
    cluster.envoy.wait_healthy(2)
    for r in cluster.replicas[1:3]:
        assert r.terminate() == 0
    t.join(120)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    ys, reconnects = box["result"]  # type: ignore[misc]
    assert reconnects > 0, "no stream moved"
    check(data, ys, redis_server, oracle)


async def next_seq_of(client: AsyncClient, sid: str) -> int:
    """GetSession through the proxy, retried while it still routes to the killed replica."""
    for _ in range(100):
        try:
            return (await client.get_session("tiny", sid)).next_seq
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError(f"GetSession of {sid} stayed UNAVAILABLE")


async def predict_all(
    target: str, data: dict[str, np.ndarray], progress: threading.Event
) -> tuple[dict[str, np.ndarray], int, int]:
    """Unary calls through the proxy, seq by seq. A refused seq that names an earlier expected
    seq means steps answered early were lost: the client rewinds there (checking that the
    store says the same) and sends them again. Returns outputs, retries and steps lost."""
    sent, retries, lost = [0], [0], [0]
    total = len(data) * (STEPS // CHUNK)

    async def one(client: AsyncClient, sid: str, x: np.ndarray) -> np.ndarray:
        y = np.zeros((STEPS, 3), np.float32)
        seq = 0
        while seq < STEPS:
            try:
                r = await client.predict("tiny", sid, x[seq : seq + CHUNK], seq=seq)
            except grpc.aio.AioRpcError as exc:
                retries[0] += 1
                gap = re.search(r"expected seq (\d+)", exc.details() or "")
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and gap:
                    expected = int(gap.group(1))
                    assert expected < seq, exc.details()
                    assert await next_seq_of(client, sid) == expected
                    lost[0] += seq - expected
                    seq = expected
                    continue
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # A replica that answered steps it could not store says so: re-read.
                    assert "not stored" in (exc.details() or ""), exc.details()
                    expected = await next_seq_of(client, sid)
                    assert expected <= seq, exc.details()
                    lost[0] += seq - expected
                    seq = expected
                    continue
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                await asyncio.sleep(0.05)
                continue
            y[seq : seq + CHUNK] = r.y
            seq = r.next_seq
            sent[0] += 1
            if sent[0] >= total // 3:
                progress.set()
            await asyncio.sleep(0.02)
        return y

    async with AsyncClient(target, timeout=30) as client:
        outs = await asyncio.gather(*(one(client, sid, x) for sid, x in data.items()))
    return dict(zip(data, outs, strict=True)), retries[0], lost[0]


def test_early_answers_lose_at_most_what_next_seq_says_when_a_replica_is_killed(
    early_cluster: Cluster, redis_server: RedisServer, oracle: OnePass
) -> None:
    data = {f"e{i:03d}": xs(5000 + i, STEPS) for i in range(SESSIONS)}
    progress = threading.Event()
    t, box = run_in_thread(
        lambda: asyncio.run(predict_all(early_cluster.envoy.target, data, progress))
    )
    assert progress.wait(60)
    early_cluster.replicas[0].kill()
    t.join(120)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    ys, retries, lost = box["result"]  # type: ignore[misc]
    assert retries > 0, "no call failed: the kill came too late"
    print(f"{retries} calls retried, {lost} steps answered early were lost and sent again")
    check(data, ys, redis_server, oracle)


@pytest.mark.timeout(120)
def test_more_streams_than_envoys_default_limits_all_get_answers(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """1,100 streams open at once through Envoy to one replica: more than Envoy's default
    circuit breaker (1,024 requests, which answered the rest 503) and more than the replica's
    256 streams per connection (so Envoy must spread them over several connections)."""
    n = 1100
    replica = Replica(tiny_repo, "memory", tmp_path / "replica.log").wait_serving()
    envoy = Envoy(tmp_path / "envoy").start([replica.port])

    async def main() -> list[str]:
        failures: list[str] = []
        release = asyncio.Event()
        opened = 0
        async with grpc.aio.insecure_channel(envoy.target) as ch:
            method = ch.stream_stream("/lstm_serve.v1.LstmServe/Stream")

            async def one(k: int) -> None:
                nonlocal opened
                sid = f"wide-{k}"
                req = pb.StepRequest(
                    model=pb.ModelRef(name="tiny"),
                    sessions=[pb.SessionSteps(session_id=sid, x=np.zeros(3, np.float32).tobytes())],
                )
                call = method(metadata=((ROUTE_HEADER, sid),))
                try:
                    await call.write(req.SerializeToString())
                    resp = pb.StepResponse.FromString(await call.read())
                    assert resp.sessions[0].session_id == sid
                    opened += 1
                    if opened == n:
                        release.set()
                    await release.wait()  # every stream stays open until all have answers
                    await call.done_writing()
                except Exception as exc:  # collected and asserted below
                    failures.append(f"{k}: {type(exc).__name__}: {exc}"[:300])
                    release.set()

            await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(n))), 90)
        return failures

    try:
        failures = asyncio.run(main())
    finally:
        envoy.stop()
        replica.terminate()
    assert failures == [], f"{len(failures)} of {n} streams failed, first: {failures[:2]}"


@pytest.fixture
def envoy_pair(tiny_repo: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    """Two replicas behind an Envoy that has just started."""
    yield from _running(tiny_repo, redis_server, tmp_path, 2)


def sessions_by_replica(envoy: Envoy, client: Client, n: int = 24) -> dict[int, list[str]]:
    """n session ids by the port of the replica Envoy routes them to: one GetSession each (no
    step applied), read off Envoy's per-endpoint request counts."""
    owned: dict[int, list[str]] = {}
    for i in range(n):
        sid = f"ring-{i}"
        before = envoy.requests()
        client.get_session("tiny", sid)
        after = envoy.requests()
        (port,) = [p for p in after if after[p] != before.get(p, 0)]
        owned.setdefault(port, []).append(sid)
    return owned


def shipped_health_check() -> dict[str, object]:
    cfg = yaml.safe_load(ENVOY_CONFIG.read_text())
    (cluster,) = cfg["static_resources"]["clusters"]
    (hc,) = cluster["health_checks"]
    assert isinstance(hc, dict)
    return hc


def seconds(duration: object) -> float:
    assert isinstance(duration, str) and duration.endswith("s"), duration
    return float(duration[:-1])


@pytest.mark.timeout(90)
def test_a_replica_killed_in_envoys_first_minute_leaves_the_ring_within_seconds(
    envoy_pair: Cluster,
) -> None:
    """Envoy health-checks once a minute until the cluster has carried traffic, and the check
    then due stays scheduled: without no_traffic_interval a replica killed in Envoy's first
    minute stayed in the ring for ~60 s, and Envoy's retries, reselecting one ring entry
    further, sent about half of its sessions back to it (UNAVAILABLE all that time). Here every
    one of its sessions reaches the survivor at once, and the health checks take it out of the
    ring within two intervals."""
    victim, survivor = envoy_pair.replicas
    envoy = envoy_pair.envoy
    hc = shipped_health_check()
    out_within = seconds(hc["interval"]) * int(str(hc["unhealthy_threshold"])) + 3
    with Client(envoy.target, timeout=10) as client:
        moved = sessions_by_replica(envoy, client)[victim.port]
        victim.kill()
        killed = time.monotonic()
        assert killed - envoy.started < 30, "not in Envoy's first minute: the test proves nothing"
        failures = []
        for sid in moved:
            before = envoy.requests()[survivor.port]
            try:
                client.predict("tiny", sid, xs(7, 1), timeout=5)
            except grpc.RpcError as exc:
                failures.append(f"{sid}: {exc.code().name}: {exc.details()}")
                continue
            assert envoy.requests()[survivor.port] == before + 1, sid  # the survivor answered
        assert failures == [], f"{len(failures)} of {len(moved)} sessions failed: {failures[:2]}"
        while envoy.healthy_ports() != {survivor.port}:
            assert time.monotonic() - killed < out_within, "the killed replica is still in the ring"
            time.sleep(0.05)


@pytest.mark.timeout(90)
def test_a_crash_ends_streams_through_envoy_with_internal_rst_stream_and_sessions_resume(
    envoy_pair: Cluster, oracle: OnePass
) -> None:
    """Once a stream's answer headers have gone out, Envoy cannot end it with a status: it
    resets it, and gRPC maps that reset to INTERNAL, not UNAVAILABLE (docs/operations.md, "A
    replica crash"). The client library's session streams resume on it; the session ends equal
    to one pass."""
    victim = envoy_pair.replicas[0]
    x = xs(11, 6)
    with Client(envoy_pair.envoy.target, timeout=10) as client:
        raw_sid, sdk_sid = sessions_by_replica(envoy_pair.envoy, client)[victim.port][:2]
        # A plain gRPC stream, as another client would hold it, with one answer received.
        requests: queue.SimpleQueue[pb.StepRequest | None] = queue.SimpleQueue()
        raw = client.stub.Stream(
            iter(requests.get, None), metadata=routed(client.conn.metadata, raw_sid), timeout=30
        )
        requests.put(step_request("tiny", [session_steps(raw_sid, x[:1], seq=0)]))
        assert next(raw).sessions[0].next_seq == 1
        with client.session("tiny", sdk_sid, start_seq=0) as stream:
            ys = [stream.send(x[:2]).y]
            victim.kill()
            with pytest.raises(grpc.RpcError) as cut:
                next(raw)
            ys += [stream.send(x[2:4]).y, stream.send(x[4:]).y]
            assert stream.reconnects >= 1
        requests.put(None)
    assert cut.value.code() == grpc.StatusCode.INTERNAL, cut.value
    assert "RST_STREAM" in (cut.value.details() or ""), cut.value.details()
    np.testing.assert_allclose(np.concatenate(ys), oracle.run(x)[0], atol=ATOL)
