"""Reaching the shared store: a password and TLS work; a replica the store refuses (wrong
password, unknown CA) fails at start with the URL's password redacted, and turns NOT_SERVING
while the store refuses it at run time; a store outage leaves it SERVING; store errors reach
clients as one fixed message, their detail goes to the log once."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.bench.procs.replica import Replica
from lstm_serve.client import Client
from tests.cluster.test_store import stored
from tests.helpers.certs import Pki
from tests.helpers.server import ServerThread, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
FIXED = "session store unavailable; retry"


def health(srv: ServerThread) -> int:
    with grpc.insecure_channel(srv.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def until_health(srv: ServerThread, status: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while health(srv) != status:
        assert time.monotonic() < deadline, f"health is not {status}"
        time.sleep(0.05)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_store_errors_reach_clients_as_one_fixed_message_and_the_log_once(
    tiny_repo: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lstm_serve")
    with (
        ServerThread(
            model_repository=tiny_repo, state_store=redis_server.url, state_store_timeout_s=0.5
        ) as srv,
        Client(srv.target) as c,
    ):
        redis_server.kill()
        for i in range(6):
            with pytest.raises(grpc.RpcError) as info:
                c.predict("tiny", f"down-{i}", xs(i, 2), seq=0)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == FIXED
        with pytest.raises(grpc.RpcError) as info:
            c.get_session("tiny", "down-0")
        assert info.value.details() == FIXED
        # The outage is Redis's, not this replica's: it stays SERVING.
        assert health(srv) == SERVING
    logged = [
        r.getMessage() for r in caplog.records if "claiming sessions failed" in r.getMessage()
    ]
    # Each distinct error logged once, with its detail (a dropped connection, then refusals).
    assert logged and len(logged) == len(set(logged)) <= 2, logged
    assert all("ConnectionError" in m for m in logged)


def test_a_password_protected_store_works(tiny_repo: Path, tmp_path: Path, oracle: OnePass) -> None:
    r = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        assert r.url.startswith("redis://:s3cret-pw@")
        x = xs(1, 6)
        with (
            ServerThread(model_repository=tiny_repo, state_store=r.url) as srv,
            Client(srv.target) as c,
        ):
            c.predict("tiny", "pw", x[:3], seq=0)
            c.predict("tiny", "pw", x[3:], seq=3)
        _, hn, _ = oracle.run(x)
        h, _, n = stored(r, "pw")
        assert n == 6
        np.testing.assert_allclose(h, hn, atol=ATOL)
    finally:
        r.stop()


def test_a_wrong_password_fails_at_start_naming_the_store_without_it(
    tiny_repo: Path, tmp_path: Path
) -> None:
    r = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        url = f"redis://:wrong-pw@127.0.0.1:{r.port}/0"
        with pytest.raises(RuntimeError) as info:
            ServerThread(model_repository=tiny_repo, state_store=url).start()
        msg = str(info.value)
        assert f"redis://:***@127.0.0.1:{r.port}/0" in msg and "refuses this replica" in msg
        assert "wrong-pw" not in msg
        # The command line: a clear error and a non-zero exit, before it ever serves.
        replica = Replica(tiny_repo, url, tmp_path / "replica.log")
        assert replica.proc.wait(60) != 0
        log = (tmp_path / "replica.log").read_text()
        assert f"redis://:***@127.0.0.1:{r.port}/0" in log and "wrong-pw" not in log
    finally:
        r.stop()


def test_an_unreachable_store_fails_at_start(tiny_repo: Path, redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.kill()
    with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port}/0 is not reachable"):
        ServerThread(
            model_repository=tiny_repo, state_store=redis_server.url, state_store_timeout_s=0.5
        ).start()


def test_a_tls_store_works_and_an_unknown_ca_is_refused_at_start(
    tiny_repo: Path, tmp_path: Path, oracle: OnePass
) -> None:
    pki = Pki.create(tmp_path / "pki")
    r = RedisServer(tmp_path / "redis", password="pw", tls=pki).start()
    try:
        assert r.url.startswith("rediss://") and "ssl_ca_certs=" in r.url
        x = xs(2, 4)
        with (
            ServerThread(model_repository=tiny_repo, state_store=r.url) as srv,
            Client(srv.target) as c,
        ):
            y = c.predict("tiny", "tls", x, seq=0).y
        np.testing.assert_allclose(y, oracle.run(x)[0], atol=ATOL)
        assert stored(r, "tls")[2] == 4
        without_ca = f"rediss://:pw@127.0.0.1:{r.port}/0"  # the system CAs do not know ours
        with pytest.raises(RuntimeError, match=r"refuses this replica.*CERTIFICATE_VERIFY_FAILED"):
            ServerThread(model_repository=tiny_repo, state_store=without_ca).start()
    finally:
        r.stop()


def test_health_is_not_serving_while_the_store_refuses_this_replica(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """The store's password changes under a running replica: its requests are answered
    UNAVAILABLE (the fixed message), and its health turns NOT_SERVING so that Envoy routes
    elsewhere; once the store accepts it again it is SERVING again."""
    r = RedisServer(tmp_path / "redis", password="pw").start()
    admin = r.client()
    try:
        with (
            ServerThread(model_repository=tiny_repo, state_store=r.url) as srv,
            Client(srv.target) as c,
        ):
            c.predict("tiny", "before", xs(1, 2), seq=0)
            assert health(srv) == SERVING
            admin.config_set("requirepass", "rotated")
            admin.client_kill_filter(_type="normal", skipme=True)  # the replica reconnects
            deadline = time.monotonic() + 15
            while health(srv) != NOT_SERVING:  # the first call may only see its connection cut
                assert time.monotonic() < deadline, "still SERVING"
                with pytest.raises(grpc.RpcError) as info:
                    c.predict("tiny", "after", xs(2, 2), seq=0)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details() == FIXED
                time.sleep(0.05)
            admin.config_set("requirepass", "pw")
            until_health(srv, SERVING)
            assert c.predict("tiny", "after", xs(2, 2), seq=0).next_seq == 2
    finally:
        admin.close()
        r.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://lonepw@h/0", "redis://:***@h/0"),
        ("rediss://h:6380/0?password=pw&ssl_ca_certs=/ca.pem", "rediss://h:6380/0?password=***&ssl_ca_certs=/ca.pem"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)  # fmt: skip
def test_the_store_url_is_shown_without_its_password(url: str, shown: str) -> None:
    from lstm_serve.core.redis_store import redact

    assert redact(url) == shown
