"""What a shared store keeps, counted in a real redis-server: sessions that live for one Open
Inference Protocol request leave nothing (and cost no call), an ended session is deleted, a
request for an unknown session writes nothing, and a replica's old claim never writes over a
later session of the same id."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.client import Client
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.cluster.test_store import stored
from tests.helpers.server import ServerThread, xs
from tests.integration.test_kserve_protocol import infer, y_of
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def store_calls(r: RedisServer) -> int:
    """Calls of the commands a replica runs on its sessions (scripts, and GetSession's HGET)."""
    stats = r.client().info("commandstats")
    used = {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load", "cmdstat_hget"}
    return sum(int(v["calls"]) for k, v in stats.items() if k in used)


@pytest.mark.parametrize("answer", ["acked", "early"])
def test_stateless_oip_requests_never_touch_the_store(
    tiny_repo: Path, redis_server: RedisServer, oracle: OnePass, answer: str
) -> None:
    """A request without a sequence id is one reset-and-end session per batch row: nothing of
    it is claimed, written or deleted in Redis."""
    with (
        ServerThread(
            model_repository=tiny_repo, state_store=redis_server.url, state_answer=answer
        ) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        calls = store_calls(redis_server)
        for i in range(25):
            x = np.stack([xs(100 * i + row, 3) for row in range(4)])
            y = y_of(stub.ModelInfer(infer("tiny", x))).reshape(4, 3, 3)
            for row in range(4):
                np.testing.assert_allclose(y[row], oracle.run(x[row])[0], atol=ATOL)
        assert redis_server.client().dbsize() == 0
        assert store_calls(redis_server) == calls
        assert len(srv.engine.models["tiny", "1"].store) == 0


def test_an_ended_session_is_deleted_and_an_unknown_one_leaves_nothing(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer
) -> None:
    a, b = pair
    r = redis_server.client()
    with Client(a.target) as ca, Client(b.target) as cb:
        ca.predict("tiny", "ends", xs(1, 3), seq=0)
        assert r.dbsize() == 3  # the session's hash, its replies, and which version holds it
        cb.end_session("tiny", "ends")  # on the replica that does not hold it
        assert r.dbsize() == 0
        ca.predict("tiny", "ends-here", xs(2, 3), seq=0)
        ca.end_session("tiny", "ends-here")  # on the replica that holds it
        assert r.dbsize() == 0
        with pytest.raises(grpc.RpcError) as info:
            cb.predict("tiny", "nobody", xs(3, 2), seq=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            cb.end_session("tiny", "nobody")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert r.dbsize() == 0
    with grpc.insecure_channel(a.target) as ch:  # a Triton sequence, from start to end
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(infer("tiny", xs(4, 2)[None], seq_id="tri", start=True))
        assert r.dbsize() == 3
        stub.ModelInfer(infer("tiny", xs(5, 2)[None], seq_id="tri", end=True))
        stub.ModelInfer(infer("tiny", xs(6, 2)[None], seq_id="one", start=True, end=True))
        assert r.dbsize() == 0


def test_an_old_claim_never_writes_over_a_later_session_of_the_same_id(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer, oracle: OnePass
) -> None:
    """A holds a copy of s; B ends s (deleted from Redis) and starts it again. A's step on its
    old copy is fenced (UNAVAILABLE), and its retry sees the new session's seq."""
    a, b = pair
    x, x2 = xs(7, 4), xs(8, 2)
    with Client(a.target) as ca, Client(b.target) as cb:
        ca.predict("tiny", "again", x, seq=0)
        cb.end_session("tiny", "again")
        cb.predict("tiny", "again", x2, seq=0)
        with pytest.raises(grpc.RpcError) as info:
            ca.predict("tiny", "again", xs(9, 2), seq=4)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            ca.predict("tiny", "again", xs(9, 2), seq=4)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expected seq 2" in (info.value.details() or "")
    _, hn, cn = oracle.run(x2)
    h, c, n = stored(redis_server, "again")
    assert n == 2
    np.testing.assert_allclose(h, hn, atol=ATOL)
    np.testing.assert_allclose(c, cn, atol=ATOL)
